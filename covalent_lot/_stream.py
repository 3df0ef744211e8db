"""Local side of every transfer: streaming checksums and atomic files.

Why our own checksum of the whole object (not the service's native one): it is
the same for every backend (S3-compatible stores differ in which native
checksums they keep; a multipart ETag is not a content hash; SFTP has none), so
an object is verified end to end wherever it travels. Which one (crc32c by
default, or sha256) and why: ``_checksum``.

Downloads are verified while they stream, also when the SDK writes ranges in
parallel and out of order: :class:`VerifyingSink` checks each write as it
arrives. crc32c needs nothing more (ranges combine, ``_checksum.RangeCrc``);
for sha256 bytes that continue the hashed prefix are hashed as they are
written, and a background thread hashes ranges that arrived early, reading
them back from the page cache once the gap before them fills. Memory stays
bounded by one read-back chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from typing import BinaryIO, Callable, Iterator

from ._checksum import Checksum, RangeCrc, file_checksum

__all__ = [
    "CHUNK",
    "sha256_file",
    "VerifyingSink",
    "atomic_download",
    "TEMP_MARK",
]

CHUNK = 8 * 1024 * 1024
# Temporary files carry this mark so that they are recognisable (and ignored
# by folder uploads) if a process is killed before it could remove them.
TEMP_MARK = ".lot-partial-"


def temp_name(name: str) -> str:
    """``.<name>.lot-partial-<random>``, with ``name`` cut so the whole fits in 255
    bytes (the usual limit of one path segment) however long ``name`` is."""
    stem = os.fsencode(name)[:200].decode("utf-8", "ignore") if len(os.fsencode(name)) > 200 else name
    return f".{stem}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


def sha256_file(path: str) -> tuple[str, int]:
    """sha256 hex digest and size of a local file, read in bounded chunks."""
    checksum, size = file_checksum(path, "sha256")
    return checksum.value, size


class ConfirmedPrefix:
    """Byte ranges that arrive in any order, and how far they reach without a gap.

    ``prefix``: every byte of ``[start, prefix)`` was confirmed (written and
    acknowledged), so a new attempt may resume there. Ranges past a gap wait
    until it fills; there are about as many of them as ranges in flight, so a
    linear scan is cheap. Not thread-safe: the owner holds its own lock.
    """

    def __init__(self, start: int = 0):
        self.prefix = start
        self._ranges: dict[int, int] = {}  # start -> end of ranges confirmed past the prefix

    def add(self, start: int, end: int) -> bool:
        """Record ``[start, end)``; False (and nothing recorded) if it overlaps what was."""
        if start < self.prefix:
            return False
        for s, e in list(self._ranges.items()):
            if s < end and start < e:
                return False
            if e == start:
                start = s
                del self._ranges[s]
            elif s == end:
                end = e
                del self._ranges[s]
        self._ranges[start] = end
        while self.prefix in self._ranges:
            self.prefix = self._ranges.pop(self.prefix)
        return True

    def reset(self, start: int) -> None:
        """Forget every range; the prefix ends at ``start``."""
        self._ranges.clear()
        self.prefix = start


class VerifyingSink:
    """A writable, seekable file that checksums what is written, in file order.

    Accepts writes at any offset (``seek`` + ``write``, or ``write_at``), as
    parallel ranged downloads produce them. ``algorithm``: "crc32c" (each write
    is checked where it lands, ranges combine: no read-back, no thread),
    "sha256" (below) or None (no checksum). For sha256 a write that continues the hashed
    prefix while nothing else waits is hashed right away from memory (one
    streamed response: no re-read, no hand-off; measured faster here than a
    hashing thread fed from a queue). Ranges that arrive early are hashed by a
    background thread that reads them back from the page cache once the gap
    before them fills, so SDKs writing in parallel under their own lock are not
    slowed to hashing speed. ``hexdigest()`` finishes the hash over the whole
    file; ``close()`` stops the thread early.
    """

    def __init__(self, fileobj: BinaryIO, algorithm: str | None = "crc32c",
                 on_bytes: Callable[[int], None] | None = None):
        self._f = fileobj
        self._on_bytes = on_bytes  # progress: called with each write's size, outside the lock
        if algorithm not in (None, "crc32c", "sha256"):
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._hash = hashlib.sha256() if algorithm == "sha256" else None
        self._crc = RangeCrc() if algorithm == "crc32c" else None
        self._pos = 0  # file position for seek/write callers
        # Bytes go straight to the descriptor (pwrite: no seek, no copy into the file
        # object's buffer). Through a buffered file, downloads in a fresh process ran
        # at ~0.7x boto3's download_file (docs/measurements.md).
        fileobj.flush()
        self._fd = fileobj.fileno()
        self._written = ConfirmedPrefix()  # [0, prefix) is written and flushed: the hasher may read it
        self._hashed = 0  # [0, _hashed) is hashed (advanced by the hasher thread)
        self._rehash = False  # writes overlapped: hash the finished file instead
        self._closing = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition(threading.Lock())
        self.bytes_written = 0

    # --- file-like surface used by SDKs -------------------------------------------------
    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._f.seek(offset, whence)
        return self._pos

    def write(self, data) -> int:
        n = self.write_at(self._pos, data)
        self._pos += n
        return n

    def flush(self) -> None:
        with self._cond:
            self._f.flush()

    # --- ranged writes --------------------------------------------------------------------
    def write_at(self, offset: int, data) -> int:
        n = self._write_at(offset, data)
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n

    def _write_at(self, offset: int, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        while done < n:  # outside the lock: writers at other offsets go on
            done += os.pwrite(self._fd, view[done:], offset + done)
        with self._cond:
            self.bytes_written += n
            if self._crc is not None:
                if not self._rehash and not self._crc.add(offset, data if type(data) is bytes else view):
                    self._rehash = True  # bytes written twice: check the finished file instead
                return n
            if self._hash is None or self._rehash or n == 0:
                return n
            before = self._ready
            if not self._written.add(offset, offset + n):
                # Bytes written twice (an SDK retrying a range): the running hash
                # may not match the file any more; hash the finished file instead.
                self._rehash = True
                self._cond.notify_all()
                return n
            if offset == before == self._hashed:
                # In order with nothing left to hash (the hasher is idle): hash
                # these bytes from memory; no flush, no re-read, no hand-off.
                self._hash.update(view)
                self._hashed = offset + n
            if self._ready > self._hashed:
                self._start_hasher()  # it reads the file descriptor
                self._cond.notify_all()
        return n

    @property
    def _ready(self) -> int:
        return self._written.prefix

    # --- the hasher -----------------------------------------------------------------------
    def _start_hasher(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash_loop, name="covalent-lot-sha256", daemon=True)
            self._thread.start()

    def _hash_loop(self) -> None:
        fd = self._fd
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._rehash or self._hashed < self._ready):
                        self._cond.wait()
                    if self._closing or self._rehash:
                        return
                    start, end = self._hashed, min(self._ready, self._hashed + CHUNK)
                chunk = os.pread(fd, end - start, start)  # outside the lock: writers go on
                if not chunk:
                    raise OSError(f"short read while verifying {self._f.name!r} at {start}")
                self._hash.update(chunk)
                with self._cond:
                    self._hashed = start + len(chunk)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to hexdigest()
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def _stop_hasher(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop hashing (idempotent); the file object itself stays open."""
        self._stop_hasher()

    def rewind(self, keep_prefix: bool = True) -> int:
        """Prepare for another attempt after a failed one; return the offset to resume at.

        With ``keep_prefix`` the bytes written in order from offset 0 without a gap
        stay (their hash is kept); ranges that arrived early, past a gap, are cut
        off with the rest of the file. Without it the file and the hash start over.
        Call it only while no writer is active (between attempts).
        """
        self._stop_hasher()
        with self._cond:
            if self._crc is not None:
                # The run from 0 keeps its CRC; ranges past a gap are cut off.
                start = self._crc.prefix if keep_prefix and not self._rehash else 0
                self._crc.reset(start, self._crc.prefix_crc if start else 0)
                self._rehash = False
                self._written.reset(start)
            elif self._failure is not None or not keep_prefix:  # a failed hasher cannot be trusted
                self._written.reset(0)
                self._hashed = 0
                self._rehash = False
                self._failure = None
                if self._hash is not None:
                    self._hash = hashlib.sha256()
            self._closing = False
            self._written.reset(self._ready)
            self._f.flush()
            if os.fstat(self._fd).st_size > self._ready:
                # Only when there is something to cut: ext4 (auto_da_alloc) writes a
                # file truncated to 0 back to disk when it is closed, ~0.2 s per
                # 512 MiB that every first attempt paid for nothing.
                self._f.truncate(self._ready)
            self._f.seek(self._ready)
            self._pos = self._ready
            return self._ready

    def checksum(self) -> Checksum | None:
        """The checksum of the whole file as written; None when checking is off."""
        value = self.hexdigest()
        return Checksum(self.algorithm, value) if value is not None else None

    def hexdigest(self) -> str | None:
        """The checksum of the whole file as written (hex); None when checking is off."""
        if self._crc is not None:
            with self._cond:
                self._f.flush()
                size = os.fstat(self._fd).st_size
                whole = None if self._rehash else self._crc.whole(size)
            if whole is None:  # holes, or bytes written twice: read the file back once
                return file_checksum(self._fd, "crc32c", size)[0].value
            return f"{whole:08x}"
        if self._hash is None:
            return None
        with self._cond:
            self._f.flush()
            size = os.fstat(self._fd).st_size
            if not self._rehash and size > self._ready:
                self._written.reset(size)  # the file is final: hash all of it, holes included
                self._start_hasher()
                self._cond.notify_all()
            while not (self._rehash or self._failure or self._hashed >= size):
                self._cond.wait()
            failure, rehash = self._failure, self._rehash
        self._stop_hasher()
        if failure is not None:
            raise failure
        if rehash:
            self._hash = hashlib.sha256()
            fd = self._fd
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(CHUNK, size - offset), offset)
                if not chunk:
                    raise OSError(f"short read while verifying {self._f.name!r} at {offset}")
                self._hash.update(chunk)
                offset += len(chunk)
            self._rehash = False
            self._hashed = size
        return self._hash.hexdigest()


# A local file's record of the checksum it had when it was uploaded or
# downloaded and verified, with the size and mtime it had then (an extended
# attribute): "<algorithm>:<hex> <size> <mtime_ns>" (a bare hex is a sha256).
LOCAL_ATTR = "user.covalent-lot.sha256"


def _as_checksum(value: Checksum | str) -> Checksum:
    return value if isinstance(value, Checksum) else Checksum("sha256", value)


def mark_verified(path_or_fd, checksum: Checksum | str) -> None:
    """Record that ``path_or_fd`` now holds bytes with ``checksum`` (a bare
    string is a sha256; best effort)."""
    try:
        st = os.stat(path_or_fd)
        os.setxattr(path_or_fd, LOCAL_ATTR, f"{_as_checksum(checksum)} {st.st_size} {st.st_mtime_ns}".encode())
    except (OSError, AttributeError):  # no xattrs on this filesystem/platform: no shortcut
        pass


def holds_verified(path: str, checksum: Checksum | str, size: int) -> bool:
    """True if ``path`` is a file recorded with ``checksum`` and unchanged since (size, mtime)."""
    try:
        matches = os.stat(path).st_size == size
    except OSError:
        return False
    return matches and recorded_checksum(path) == _as_checksum(checksum)


def recorded_checksum(path: str) -> Checksum | None:
    """The checksum recorded for ``path`` by :func:`mark_verified`, if the file is
    unchanged since (size and mtime); else None."""
    try:
        st = os.stat(path)
        value = os.getxattr(path, LOCAL_ATTR).decode("ascii").split()
    except (OSError, AttributeError, UnicodeDecodeError):
        return None
    if len(value) == 3 and value[1] == str(st.st_size) and value[2] == str(st.st_mtime_ns):
        return Checksum.parse(value[0])
    return None


def hold_while_writing(fd: int) -> None:
    """Lock a partial file for as long as its writer has it open, so that the
    staging folder's trim (``_cache``) can tell a live partial from one whose
    writer is gone."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):  # no flock here: partials are then never removed
        pass


@contextlib.contextmanager
def atomic_download(final_path: str, fsync: bool = True) -> Iterator[tuple[BinaryIO, str]]:
    """Yield a temporary file beside ``final_path``; move it into place on success.

    With ``fsync`` the bytes reach the disk before the rename, so the file
    survives a power loss too (the rename alone is atomic for every reader and
    against a crash of this process).
    On any exception the temporary file is removed and ``final_path`` keeps its
    old content (or stays absent): never a partial or empty file.
    """
    if os.path.isdir(final_path):
        raise IsADirectoryError(
            f"download destination {final_path!r} is a directory; give a file path, "
            "or a URI ending with '/' to download a folder"
        )
    parent = os.path.dirname(os.path.abspath(final_path))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotADirectoryError(
            f"download destination {final_path!r}: {parent!r} cannot be a folder, a part of it "
            "is a file; remove that file or choose another destination"
        ) from exc
    temp_path = os.path.join(parent, temp_name(os.path.basename(final_path)))
    # The default buffer: the engine's sink writes to the descriptor (pwrite), and a
    # 1 MiB buffer was one more allocation per file of a folder of small ones.
    f = open(temp_path, "xb+")
    hold_while_writing(f.fileno())
    try:
        yield f, temp_path
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        os.replace(temp_path, final_path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


class CountingReader:
    """A file whose reads are reported (``report(n)``: progress); the rest is the file's."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]):
        self._f = f
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._report(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class CoalescingWriter:
    """Hands an SDK's small writes to the sink in ``size`` pieces.

    Each write costs the sink a lock, a seek and a hash update; SDKs that
    stream in small chunks (8 KiB) spend more on that than on the bytes.
    """

    def __init__(self, sink: VerifyingSink, size: int = 1024 * 1024):
        self._sink = sink
        self._size = size
        self._buf = bytearray()

    def write(self, data) -> int:
        self._buf += data
        if len(self._buf) >= self._size:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._sink.write(buf)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # SDKs seek back to 0 when the service transcodes; buffered bytes
        # belong where they were written before that.
        self.flush()
        return self._sink.seek(offset, whence)

    def tell(self) -> int:
        return self._sink.tell() + len(self._buf)

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True
