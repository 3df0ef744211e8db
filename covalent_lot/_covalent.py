"""The one module that touches Covalent's internals.

Everything covalent-lot needs from Covalent goes through here, so a change in
Covalent's private layout is mended in one place: the strategy base class,
``File``/``FileTransfer``, scheme registration, which dispatch and node the
running task belongs to (on every execution path, see :func:`run_identity`),
what ``FileTransfer.cp()`` hands Covalent (:func:`with_after_call`), electrons
made on the fly (:func:`electron_after`) and covalent.conf.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any, Callable
from urllib.parse import unquote

from covalent._file_transfer.enums import FtCallDepReturnValue, Order
from covalent._file_transfer.file import File, register_remote_scheme
from covalent._file_transfer.file_transfer import (
    FileTransfer,
    register_downloader,
    register_uploader,
)
from covalent._file_transfer.strategies.transfer_strategy_base import FileTransferStrategy

from ._uri import PLACEHOLDERS, RUN, STAGING, has_placeholders, placeholders, render

__all__ = [
    "FileTransferStrategy",
    "File",
    "FileTransfer",
    "FtCallDepReturnValue",
    "Order",
    "read_conf_section",
    "conf_file_path",
    "file_transfer",
    "with_after_call",
    "electron_after",
    "run_context",
    "run_identity",
    "resolve_template",
    "make_file",
    "is_electron",
    "original_path",
    "register_scheme",
    "register_remote_scheme",
]

_ORIGINAL = "_lot_original"


def read_conf_section(name: str) -> dict[str, Any]:
    """``[name]`` of covalent.conf as a dict ({} when absent), read now."""
    # Imported here: importing Covalent's config module writes config files.
    from covalent._shared_files.config import get_config

    try:
        value = get_config(name)
    except (KeyError, TypeError):
        return {}
    return dict(value) if isinstance(value, dict) else value


def conf_file_path() -> str:
    """Where this machine's covalent.conf is, read now."""
    # Imported here: importing Covalent's config module writes config files.
    from covalent._shared_files.config import get_config

    return str(get_config("sdk.config_file"))


# Where Covalent's remote executor plugins run a task, nothing sets the context
# (ct.get_context() is filled only on the managed path). What they do leave is
# the dispatch and node in a name: the plugin's script
# (covalent-ssh-plugin: <remote_cache>/exec_<dispatch_id>_<node_id>.py;
# covalent-slurm-plugin: script-<dispatch_id>-<node_id>.py, job
# covalent-<node_id>-<dispatch_id>), or the per-task work dir that
# create_unique_workdir=True makes (<workdir>/<dispatch_id>/node_<node_id>:
# Dask, local, SSH and Slurm executors alike).
_DISPATCH = r"(?P<dispatch_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
_NODE = r"(?P<node_id>\d+)"
_SCRIPT_NAMES = (
    ("covalent-ssh-plugin script", re.compile(rf"exec_{_DISPATCH}_{_NODE}\.py")),
    ("covalent-slurm-plugin script", re.compile(rf"script-{_DISPATCH}-{_NODE}\.py")),
)
_SLURM_JOB = re.compile(rf"covalent-{_NODE}-{_DISPATCH}")
_WORKDIR = re.compile(rf"(?:^|/){_DISPATCH}/node_{_NODE}/*$")
# The function that runs a task on the legacy path inside a Dask worker (or the
# local executor's process): it chdir()s to the task's work dir, process-wide,
# while other threads run other tasks, so there only its own argument counts.
_IO_WRAPPER = ("io_wrapper", "covalent/executor/utils/wrappers.py")


def _io_wrapper_workdir() -> str | None:
    """The ``workdir`` argument of Covalent's ``io_wrapper`` running this task, or None
    when this thread is not inside one."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == _IO_WRAPPER[0] and code.co_filename.replace(os.sep, "/").endswith(_IO_WRAPPER[1]):
            return str(frame.f_locals.get("workdir", ""))
        frame = frame.f_back
    return None


def _from_workdir(path: str) -> dict[str, str] | None:
    match = _WORKDIR.search(os.path.abspath(path).replace(os.sep, "/"))
    return match.groupdict() if match else None


def run_identity() -> tuple[dict[str, str], str] | None:
    """``({"dispatch_id", "node_id"}, how it was found)`` for the task running now, or None.

    Tried in turn: Covalent's context (managed path: local and Dask executors);
    the work dir Covalent's ``io_wrapper`` was given (legacy Dask/local with
    ``create_unique_workdir``); the script name of covalent-ssh-plugin or
    covalent-slurm-plugin; Slurm's job name; the process's working directory
    when it is a per-task work dir (a plugin with ``create_unique_workdir``).
    """
    from covalent.executor.utils.context import get_context

    context = get_context()
    if context is not None and context.dispatch_id is not None:
        ids = {"dispatch_id": str(context.dispatch_id), "node_id": str(context.task_id)}
        return ids, "Covalent's context (managed execution)"
    workdir = _io_wrapper_workdir()
    if workdir is not None:
        ids = _from_workdir(workdir)
        # Inside io_wrapper the process's cwd belongs to whichever task chdir()ed last.
        return (ids, "the executor's per-task work dir") if ids else None
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for how, pattern in _SCRIPT_NAMES:
        match = pattern.fullmatch(script)
        if match:
            return match.groupdict(), how
    match = _SLURM_JOB.fullmatch(os.environ.get("SLURM_JOB_NAME", ""))
    if match:
        return match.groupdict(), "the Slurm job name"
    try:
        ids = _from_workdir(os.getcwd())
    except OSError:  # the working directory was removed
        ids = None
    return (ids, "the executor's per-task work dir") if ids else None


def run_context() -> dict[str, str] | None:
    """``dispatch_id``/``node_id`` of the electron running now, or None when unknown."""
    found = run_identity()
    return None if found is None else found[0]


UNKNOWN_DISPATCH = (
    "which are known only while an electron runs in a dispatch, and nothing here says "
    "which one: the executor runs the task outside Covalent's managed path (no "
    "ct.get_context()) and without a per-task work dir. Give the executor "
    "create_unique_workdir=True (DaskExecutor, SSHExecutor, SlurmExecutor: covalent-lot "
    "then reads <workdir>/<dispatch_id>/node_<node_id>), or make the URI unique without "
    "placeholders (e.g. a run id chosen when the lattice is built)"
)


def resolve_template(text: str, staging: Callable[[], str] | None = None) -> str:
    """Fill the placeholders of ``text`` for the electron running now.

    ``{dispatch_id}``/``{node_id}`` come from :func:`run_identity`; a local path
    may also hold ``{staging}`` (``staging()``, the executor's staging folder) and
    ``{run}``: the dispatch id, or where none is known a token of this process
    and thread, which holds for the hooks and body of one task.
    """
    if not has_placeholders(text):
        return text
    names = placeholders(text)
    values: dict[str, str] = {}
    if STAGING in names:
        if staging is None:
            raise RuntimeError(f"{text!r}: no staging folder to fill {{{STAGING}}} with")
        values[STAGING] = staging()
    if names - {STAGING}:
        context = run_context()
        if context is None and names & set(PLACEHOLDERS):
            raise RuntimeError(f"{text!r} uses {{dispatch_id}}/{{node_id}}, {UNKNOWN_DISPATCH}")
        values.update(context or {})
        values[RUN] = context["dispatch_id"] if context else f"run-{os.getpid()}-{threading.get_ident()}"
    return render(text, values)


def is_electron(obj: Any) -> bool:
    """Whether ``obj`` is already a Covalent electron or lattice (a decorated function)."""
    from covalent._workflow.electron import Electron
    from covalent._workflow.lattice import Lattice

    # @ct.electron returns a plain function that keeps its Electron here.
    return isinstance(obj, (Electron, Lattice)) or isinstance(getattr(obj, "electron_object", None), Electron)


def make_file(text: str, *, remote: bool, is_dir: bool) -> File:
    """A Covalent ``File`` that also remembers ``text`` exactly.

    ``File`` runs paths through furl, which percent-encodes ``{`` and spaces
    and folds ``..``; the strategies read back the original.
    """
    if remote:
        # Covalent refuses File("az://...") for schemes it does not know.
        register_remote_scheme(text.split("://", 1)[0].lower())
    file = File(text, is_remote=remote, is_dir=is_dir)
    setattr(file, _ORIGINAL, text)
    return file


def original_path(file: File, *, remote: bool) -> str:
    """The path or URI a ``File`` was made from; a folder's ends with '/'.

    Covalent's own ``File(uri, is_dir=True)`` marks a folder without the
    trailing slash covalent-lot uses for one, so it is added.
    """
    original = getattr(file, _ORIGINAL, None)
    if original is None:
        original = unquote(file.uri if remote else file.filepath)
    if file.is_dir and not original.endswith("/"):
        original += "/"
    return original


def register_scheme(scheme: str, strategy_cls: type) -> None:
    """Make ``File("<scheme>://...")`` and guessed transfers use ``strategy_cls``."""
    register_uploader(scheme, strategy_cls)
    register_downloader(scheme, strategy_cls)


def file_transfer(strategy: FileTransferStrategy, remote: str, local: str, *,
                  upload: bool, folder: bool) -> FileTransfer:
    """Covalent's transfer between ``remote`` and ``local`` through ``strategy``: an
    upload after the electron returns, or a download before it runs."""
    remote_file = make_file(remote, remote=True, is_dir=folder)
    local_file = make_file(local, remote=False, is_dir=folder)
    if upload:
        return FileTransfer(from_file=local_file, to_file=remote_file, order=Order.AFTER, strategy=strategy)
    return FileTransfer(from_file=remote_file, to_file=local_file, order=Order.BEFORE, strategy=strategy)


class _CallInHook(FileTransfer):
    """A transfer that runs whole before the electron and gives its after-call to another.

    ``FileTransfer.cp()`` returns Covalent's private pair (pre-exec hook, call):
    the hook always runs before the electron, the call before it for
    ``Order.BEFORE`` and after it (only when the electron returned) for
    ``Order.AFTER``. Ordered AFTER, the transfer's own call moves into the hook.
    """

    def __init__(self, transfer: FileTransfer, join: Callable[[Any, Any], Any], after: Callable[[], Any]):
        super().__init__(from_file=transfer.from_file, to_file=transfer.to_file,
                         order=Order.AFTER, strategy=transfer.strategy)
        self.join = join
        self.after = after

    def cp(self):
        hook, call = super().cp()
        return self.join(hook, call), self.after


def with_after_call(transfer: FileTransfer, join: Callable[[Any, Any], Any],
                    after: Callable[[], Any]) -> FileTransfer:
    """``transfer`` done before the electron, then ``after()`` once the electron has
    returned (never when it raised).

    ``join(hook, call)`` makes the one callable Covalent runs before the electron
    from the transfer's pre-exec hook and its call: it runs both, in that order,
    and returns what the hook returned. It and ``after`` are pickled for the executor.
    """
    return _CallInHook(transfer, join, after)


def electron_after(fn: Callable[[], Any], *, after: Any = None, executor: Any = None) -> Any:
    """In a lattice being built: ``fn`` as an electron (on ``executor``, Covalent's
    default if None) that runs once every electron in ``after`` has finished."""
    import covalent as ct

    node = ct.electron(fn, executor=executor)()
    return node if after is None else ct.wait(node, after)
