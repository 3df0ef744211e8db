"""Factories: one storage URI in, the matching Covalent file transfers out.

Also removal after use (``h.download(delete_after=True)``, :func:`cleanup`).
Covalent runs an electron's ``files=`` around it: downloads before it, uploads
after it, and what runs after runs only when the electron returned (an
electron that raises skips it). Removal rides on that: it runs after the
electron (:func:`~covalent_lot._covalent.with_after_call`), so never before
the consumer holds the verified bytes, nor when the consumer failed (the
object stays for a retry).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from typing import Any

from . import _objects
from ._covalent import FileTransfer, electron_after, file_transfer, resolve_template, with_after_call
from ._logs import log_to_stderr_if_unconfigured
from ._strategy import (
    STAGING_PREFIX, LotStrategy, Portable, TransferCall, resolve_paths, staging_dir, strategy_for,
)
from ._uri import RUN, check_template

__all__ = ["Handoff", "handoff", "upload", "download", "cleanup"]

log = logging.getLogger("covalent_lot")


def _strategy(uri: str, strategy: LotStrategy | None, options: dict[str, Any]) -> LotStrategy:
    if strategy is not None and options:
        raise TypeError(
            f"give either strategy= or options ({', '.join(options)}), not both"
        )
    return strategy if strategy is not None else strategy_for(uri, **options)


def _check_local(local_path: str) -> None:
    if not isinstance(local_path, str):
        raise TypeError(f"local path must be a str, not {type(local_path).__name__}: {local_path!r}")
    check_template(local_path, "local path", local=True)
    if not (os.path.isabs(local_path) or local_path.startswith(STAGING_PREFIX)):
        raise ValueError(
            f"local path {local_path!r} must be absolute: electrons run in another "
            "working directory"
        )


def _transfer(strategy: LotStrategy, uri: str, local_path: str, *, upload: bool) -> FileTransfer:
    _check_local(local_path)
    folder = strategy.parse(uri).is_folder
    if folder and not local_path.endswith("/"):
        local_path += "/"
    return file_transfer(strategy, uri, local_path, upload=upload, folder=folder)


def upload(uri: str, local_path: str, *, strategy: LotStrategy | None = None, **options: Any) -> FileTransfer:
    """A post-exec transfer: after the electron returns, upload ``local_path`` to ``uri``."""
    return _transfer(_strategy(uri, strategy, options), uri, local_path, upload=True)


def download(uri: str, local_path: str, *, strategy: LotStrategy | None = None, **options: Any) -> FileTransfer:
    """A pre-exec transfer: before the electron runs, download ``uri`` to ``local_path``."""
    return _transfer(_strategy(uri, strategy, options), uri, local_path, upload=False)


class Handoff:
    """One stored object (or folder) passed from a producer electron to consumers.

    ``uri`` and ``local_path`` may hold ``{dispatch_id}`` and ``{node_id}``,
    filled in on the executor when the transfer runs, so concurrent dispatches
    never share a key or a local file. ``path`` is the local path resolved for
    the electron that is running now.

    The default local path is ``{staging}/{run}/<hash of uri>/<name>``: the
    staging folder of the machine the electron runs on (its ``staging_dir``),
    then the dispatch id (where the executor does not tell it, a token of the
    task's process: see :func:`~covalent_lot._covalent.resolve_template`).
    """

    def __init__(self, uri: str, local_path: str | None = None, *,
                 strategy: LotStrategy | None = None, **options: Any):
        self.strategy = _strategy(uri, strategy, options)
        location = self.strategy.parse(uri)
        self.uri = uri
        self.is_folder = location.is_folder
        self._staging_root: str | None = None  # set when the path below is ours to tidy
        if local_path is None:
            name = location.name or location.bucket  # s3://bucket/ names the whole bucket
            # One local path per (dispatch, URI), the same in the producer and its
            # consumers: a consumer on the producer's machine finds the verified
            # file already there and skips the download (option reuse_local).
            # The staging folder is the executor's own, looked up where it runs.
            tag = hashlib.sha256(uri.encode()).hexdigest()[:12]
            local_path = f"{STAGING_PREFIX}{{{RUN}}}/{tag}/{name}"
            self._staging_root = STAGING_PREFIX
            if location.is_folder:
                local_path += "/"
        _check_local(local_path)
        self.local_path = local_path

    @property
    def path(self) -> str:
        """The local path for the electron running now (placeholders filled)."""
        return resolve_template(self.local_path, lambda: staging_dir(self.strategy.settings_here()))

    def upload(self) -> FileTransfer:
        """For the producer: ``@ct.electron(files=[h.upload()])``."""
        return _transfer(self.strategy, self.uri, self.local_path, upload=True)

    def download(self, *, delete_after: bool = False) -> FileTransfer:
        """For a consumer: ``@ct.electron(files=[h.download()])``.

        ``delete_after=True`` is for the only consumer: once the electron has
        returned (so after its verified download), the stored object and the
        local copy are removed; a removal that fails is logged as a warning and
        does not fail the electron. An electron that raises removes nothing. With
        several consumers use :func:`cleanup` after all of them instead: they
        share the local copy on one machine, and each needs the stored object.
        """
        transfer = _transfer(self.strategy, self.uri, self.local_path, upload=False)
        return with_after_call(transfer, _Then, self._discard()) if delete_after else transfer

    def save(self, obj: Any) -> str:
        """In the producer: write ``obj`` to :attr:`path` (atomically), return the path.

        The suffix of the URI (not of the local path) picks the format:

        - ``.npy``: a numpy array (``np.save``, no pickle);
        - ``.parquet``/``.pq``: a pandas DataFrame (needs pyarrow);
        - ``.pkl``/``.pickle``: any picklable object;
        - ``.txt``/``.json``/``.csv``/``.tsv``/``.md``/``.yaml``/``.yml``/``.xml``/
          ``.html``/``.log``: a str, as UTF-8 text;
        - any other suffix, or none: bytes/bytearray/memoryview, raw.

        An object the suffix does not hold is a TypeError that names the suffix
        fitting its type (numpy array ``.npy``, DataFrame ``.parquet`` with pyarrow
        else ``.pkl``, bytes ``.bin``, str ``.txt``, anything else ``.pkl``).
        """
        path = self._object_path("save")
        _objects.save(obj, path, name=self.uri)
        return path

    def load(self, *, mmap: bool = False) -> Any:
        """In a consumer: the object at :attr:`path`, read as its suffix says (see
        :meth:`save`). ``mmap=True`` memory-maps a ``.npy`` file read-only
        (``np.load(mmap_mode="r")``) instead of reading it into memory."""
        return _objects.load(self._object_path("load"), mmap=mmap, name=self.uri)

    def _object_path(self, action: str) -> str:
        if self.is_folder:
            raise ValueError(
                f"h.{action}() is for a single object; {self.uri!r} is a folder handoff: "
                f"write or read the files under h.path ({self.local_path!r}) instead"
            )
        return self.path

    def _discard(self) -> "Discard":
        local = self.local_path
        if self.is_folder and not local.endswith("/"):
            local += "/"  # as _transfer does: the trailing '/' marks a folder to remove whole
        return Discard(self.strategy._call("delete", self.uri, ""), local, self._staging_root)

    def __repr__(self) -> str:
        return f"Handoff({self.uri!r}, local_path={self.local_path!r})"


def handoff(uri: str, local_path: str | None = None, *,
            strategy: LotStrategy | None = None, **options: Any) -> Handoff:
    """Make the producer/consumer pair for ``uri``; see :class:`Handoff`."""
    return Handoff(uri, local_path, strategy=strategy, **options)


def _remove_local(path: str, staging_root: str | None) -> bool:
    """Remove the local copy, and the per-dispatch folders of the default layout
    (``<staging>/<dispatch_id>/<tag>/``) once they are empty."""
    existed = os.path.lexists(path)
    if path.endswith("/"):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if staging_root is not None:
        root = os.path.abspath(staging_root)
        parent = os.path.dirname(os.path.abspath(path.rstrip("/")))
        while parent.startswith(root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:  # not empty: another handoff of this dispatch still uses it
                break
            parent = os.path.dirname(parent)
    return existed


class Discard(Portable):
    """Runs on the executor: remove a handoff's stored object(s) and its local copy.

    Removal is tidying up after the work is done, so it does not fail the
    electron it runs in (that would throw away a finished result): an object
    already gone is fine, other errors are logged as warnings.
    """

    def __init__(self, delete: TransferCall, local_path: str, staging_root: str | None):
        self.delete = delete
        self.local_path = local_path
        self.staging_root = staging_root
        self.extra = delete.extra

    def __call__(self) -> dict:
        settings = self.delete.settings()
        uri, local = resolve_paths(settings, self.delete.source, self.local_path)
        root = None if self.staging_root is None else resolve_paths(settings, self.staging_root)[0]
        removed = {"uri": uri, "objects": 0, "local_path": local, "local": False}
        with log_to_stderr_if_unconfigured():
            try:
                removed["objects"] = self.delete().files
            except FileNotFoundError:
                log.info("%s is already gone", uri)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                log.warning("could not remove %s after use: %s", uri, exc)
            try:
                removed["local"] = _remove_local(local, root)
            except OSError as exc:
                log.warning("could not remove the local copy %s: %s", local, exc)
        return removed

    def __repr__(self) -> str:
        return f"<covalent-lot remove {self.delete.source} and {self.local_path}>"


class _Then(Portable):
    """Before a delete-after download's electron: the usual pre-exec hook, then the
    download (after the electron comes the removal)."""

    def __init__(self, hook, download):
        self.hook = hook
        self.download = download
        self.extra = hook.extra

    def __call__(self):
        paths = self.hook()
        self.download()
        return paths


def cleanup(*handoffs: Handoff, after: Any = None, executor: Any = None):
    """In a lattice: an electron that removes ``handoffs``' stored objects and local
    copies once every electron in ``after`` has finished (``ct.wait``).

        results = [consume(i) for i in range(8)]   # each with files=[h.download()]
        lot.cleanup(h, after=results)

    If one of ``after`` fails, Covalent does not run it, and the objects stay.
    Local copies are removed on the machine that runs this electron (with
    ``executor``, Covalent's default if None): the consumers' machine when they
    share one. Returns the electron; its result lists what was removed.
    """
    if not handoffs:
        raise TypeError("cleanup() needs at least one handoff")
    discards = [h._discard() for h in handoffs]

    def lot_cleanup() -> list:
        return [discard() for discard in discards]

    return electron_after(lot_cleanup, after=after, executor=executor)
