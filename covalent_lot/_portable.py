"""How covalent-lot's hook objects travel to the executor, and fail there clearly.

Covalent cloudpickles an electron's file-transfer callables and unpickles them
on the executor, where covalent-lot may not be installed. Pickled by reference,
that is a bare ``No module named 'covalent_lot'`` from deep inside Covalent.
Instead each callable pickles as a call of :func:`rebuild` with plain values
(builtins only), and cloudpickle carries :func:`rebuild` itself by value (this
module is registered for that), so on a host without covalent-lot the first
hook to load names what to install there.

Only what must travel lives here, and it names what it calls (module and
name, plain strings) instead of importing it, so it knows no other module of
the package.
"""

from __future__ import annotations


def find(module: str, name: str, extra: str):
    """``module.name``, imported now; where covalent-lot is missing, an error that says
    what to install (``extra``: the pip extra of the backend in use)."""
    import importlib
    import socket
    import sys

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "covalent_lot":
            raise
        raise ModuleNotFoundError(
            f"covalent-lot is not installed in the Python that runs this electron "
            f"({sys.executable} on {socket.gethostname()}): pip install covalent-lot[{extra}] "
            f"there, or give the electron deps_pip=ct.DepsPip(packages=['covalent-lot[{extra}]'])"
        ) from None


def rebuild(module: str, name: str, state: dict, extra: str):
    """Make an instance of ``module.name`` with ``state`` as its ``__dict__``."""
    cls = find(module, name, extra)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def offloaded(fn, plan: dict, runner: str):
    """``@lot.offload``'s wrapper of ``fn``: calls ``runner`` ("module:function") with
    ``fn, plan, args, kwargs``. It travels by value with this module, so a host
    without covalent-lot fails with the line above, not deep in Covalent."""
    import functools

    module, _, name = runner.partition(":")

    @functools.wraps(fn)
    def lot_offload(*args, **kwargs):
        return find(module, name, plan.get("extra", "all"))(fn, plan, args, kwargs)

    lot_offload.lot_offload_plan = plan
    return lot_offload


def _register() -> None:
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - Covalent depends on cloudpickle
        return
    import sys

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_register()
