"""The staging folder as a bounded cache of verified local copies.

Every machine that runs electrons keeps local copies in its staging folder
(``staging_dir``): handoff files and offloaded values. Left alone it only
grows, so after each transfer into it :func:`trim` brings it back under
``cache_limit`` by removing the least recently used *verified copies* (files
whose recorded checksum still matches their size and mtime, see
``_stream.recorded_checksum``): copies that can be fetched again from the store.

What is never removed:

- a file that is not a verified copy: a file an electron wrote and has not
  uploaded, anything else a user keeps there;
- a file that someone holds: readers take a shared ``flock`` on it
  (:func:`pin`) and eviction takes an exclusive one without waiting, so a file
  an electron is reading is skipped (offload consumers hold their inputs for
  the whole electron, handoff downloads until the task's process ends);
- a partial download (``.lot-partial-*``) whose writer is alive: writers hold
  an exclusive lock on it. A partial that is unlocked and untouched for a
  minute belongs to a writer that is gone, and is removed when found.

"Recently used" is the access time, which :func:`touch` sets on every use
(mounts with ``noatime``/``relatime`` do not update it on reads by themselves).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from ._stream import TEMP_MARK, recorded_checksum

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: nothing is locked, nothing evicted
    fcntl = None  # type: ignore[assignment]

__all__ = ["pin", "touch", "trim", "hold_until_exit", "TrimReport", "STALE_PARTIAL_AGE"]

log = logging.getLogger("covalent_lot")

STALE_PARTIAL_AGE = 60.0  # seconds without a write before an unlocked partial counts as abandoned


def touch(path: str) -> None:
    """Mark ``path`` as used now (its access time; the mtime the verified record
    depends on is kept)."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))


@contextlib.contextmanager
def pin(path: str) -> Iterator[bool]:
    """Hold ``path`` against eviction while the block runs.

    Yields True when the file is there and held, False when it is not there
    (or was just evicted: the caller fetches it again).
    """
    fd = _open_shared(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def _open_shared(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without flock: no eviction either
            fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        # An evictor may have removed the name between our open and our lock.
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return None
    touch(path)
    return fd


_held: collections.OrderedDict[str, int] = collections.OrderedDict()
_held_lock = threading.Lock()
MAX_HELD = 64  # per process: a long-lived worker keeps its newest handoff copies held


def hold_until_exit(path: str) -> None:
    """Hold ``path`` against eviction until this process ends (a handoff copy that
    the electron, run next in this process, reads by its path). A long-lived
    process (a Dask worker) keeps the newest :data:`MAX_HELD` held."""
    fd = _open_shared(path)
    if fd is None:
        return
    with _held_lock:
        old = _held.pop(path, None)
        _held[path] = fd
        released = [old] if old is not None else []
        while len(_held) > MAX_HELD:
            released.append(_held.popitem(last=False)[1])
    for old_fd in released:
        os.close(old_fd)


@dataclass
class TrimReport:
    """What :func:`trim` found in ``root`` and removed from it."""

    root: str
    limit: int
    size_before: int = 0  # bytes found, abandoned partials removed on the way not counted

    evicted: int = 0
    evicted_bytes: int = 0
    stale_partials: int = 0
    held_skipped: int = 0  # verified copies skipped because someone holds them

    @property
    def size_after(self) -> int:
        return self.size_before - self.evicted_bytes

    def summary(self) -> str:
        return (f"{self.root}: {self.size_before:,} -> {self.size_after:,} bytes (limit "
                f"{self.limit:,}); evicted {self.evicted} file(s), {self.evicted_bytes:,} bytes; "
                f"{self.stale_partials} abandoned partial(s) removed; {self.held_skipped} held")


def _try_exclusive(path: str) -> int | None:
    """An fd holding ``path`` exclusively, or None when someone holds it (or no flock)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            log.debug("no flock on %s (%s): not evicted", path, exc)
        return None
    return fd


def _remove_held(path: str, fd: int) -> bool:
    """Unlink ``path`` if it is still the file ``fd`` holds."""
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def trim(root: str, limit: int, *, now: float | None = None, everything: bool = False) -> TrimReport:
    """Bring ``root`` under ``limit`` bytes (see the module docstring).

    ``everything``: remove every verified copy and abandoned partial that no one
    holds, whatever the limit (``covalent-lot gc --local``).
    """
    now = time.time() if now is None else now
    report = TrimReport(os.path.abspath(root), limit)
    copies: list[tuple[float, str, int]] = []  # (last use, path, size)
    total = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            if TEMP_MARK in name and now - st.st_mtime >= STALE_PARTIAL_AGE:
                fd = _try_exclusive(path)
                if fd is not None and _remove_held(path, fd):
                    report.stale_partials += 1
                    log.info("removed %s: a partial download whose writer is gone", path)
                    continue
            total += st.st_size
            if TEMP_MARK not in name and recorded_checksum(path) is not None:
                copies.append((st.st_atime, path, st.st_size))
    report.size_before = total
    copies.sort()
    for _used, path, size in copies:
        if total <= limit and not everything:
            break
        fd = _try_exclusive(path)
        if fd is None:
            report.held_skipped += 1
            continue
        if _remove_held(path, fd):
            total -= size
            report.evicted += 1
            report.evicted_bytes += size
    if report.evicted:
        _remove_empty_folders(root, now)
        log.info("local cache %s", report.summary())
    return report


def _remove_empty_folders(root: str, now: float) -> None:
    # Only folders untouched for a while: a writer may have just made one and not
    # yet created its file in it.
    for folder, _dirs, _names in os.walk(root, topdown=False):
        if os.path.abspath(folder) != os.path.abspath(root):
            with contextlib.suppress(OSError):
                if now - os.stat(folder).st_mtime >= STALE_PARTIAL_AGE:
                    os.rmdir(folder)
