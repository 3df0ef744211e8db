"""Local side of every transfer: streaming sha256 and atomic files.

Why sha256 of the whole object (not the service's native checksum): it is the
same for every backend (S3-compatible stores differ in which native checksums
they keep; a multipart ETag is not a content hash; SFTP has none), so an object
can be verified end to end wherever it travels, and anyone can check it with
``sha256sum``. It is stored with the object as metadata ``lot-sha256``.

Downloads are verified while they stream, also when the SDK writes ranges in
parallel and out of order: :class:`VerifyingSink` hashes bytes that arrive at
the current hash position straight away and reads back (from the page cache)
the ranges that arrived early once the gap before them is filled. Memory stays
bounded by one read-back chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from typing import BinaryIO, Iterator

__all__ = [
    "CHUNK",
    "CHECKSUM_KEY",
    "sha256_file",
    "VerifyingSink",
    "atomic_download",
    "TEMP_MARK",
]

CHUNK = 8 * 1024 * 1024
CHECKSUM_KEY = "lot-sha256"
# Temporary files carry this mark so that they are recognisable (and ignored
# by folder uploads) if a process is killed before it could remove them.
TEMP_MARK = ".lot-partial-"


def sha256_file(path: str) -> tuple[str, int]:
    """sha256 hex digest and size of a local file, read in bounded chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class VerifyingSink:
    """A writable, seekable file that hashes what is written, in order.

    Accepts writes at any offset (``seek`` + ``write``, or ``write_at``), as
    parallel ranged downloads produce them. ``hexdigest()`` completes the hash
    over the whole file.
    """

    def __init__(self, fileobj: BinaryIO, hashing: bool = True):
        self._f = fileobj
        self._hash = hashlib.sha256() if hashing else None
        self._pos = 0  # file position for seek/write callers
        self._hashed = 0  # every byte below this offset is hashed
        self._early: dict[int, int] = {}  # start -> end of ranges written past _hashed
        self._rehash = False  # writes overlapped: hash the finished file instead
        self._file_pos = fileobj.tell()
        self._lock = threading.Lock()
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
        self._f.flush()

    # --- ranged writes --------------------------------------------------------------------
    def write_at(self, offset: int, data) -> int:
        view = memoryview(data)
        n = len(view)
        with self._lock:
            if offset != self._file_pos:
                self._f.seek(offset)  # a seek flushes the write buffer: only when needed
            self._f.write(view)
            self._file_pos = offset + n
            self.bytes_written += n
            if self._hash is None or self._rehash or n == 0:
                return n
            if offset == self._hashed:
                self._hash.update(view)
                self._hashed += n
                if any(start < self._hashed for start in self._early):
                    self._rehash = True  # overlapped an early range: recompute at the end
                    return n
                while self._hashed in self._early:
                    end = self._early.pop(self._hashed)
                    self._hash_from_file(self._hashed, end)
                    self._hashed = end
            elif offset > self._hashed:
                self._add_early(offset, offset + n)
            else:
                # Bytes rewritten below the hash position (an SDK retrying a
                # range): the running hash may not match the file any more.
                self._rehash = True
        return n

    def _add_early(self, start: int, end: int) -> None:
        # Ranges are merged as they grow, so there are about as many entries
        # as ranges in flight and a linear scan is cheap.
        for s, e in list(self._early.items()):
            if s < end and start < e:
                self._rehash = True
                return
            if e == start:
                start = s
                del self._early[s]
            elif s == end:
                end = e
                del self._early[s]
        self._early[start] = end

    def _hash_from_file(self, start: int, end: int) -> None:
        self._f.flush()
        fd = self._f.fileno()
        while start < end:
            chunk = os.pread(fd, min(CHUNK, end - start), start)
            if not chunk:
                raise OSError(f"short read while verifying {self._f.name!r} at {start}")
            self._hash.update(chunk)
            start += len(chunk)

    def hexdigest(self) -> str | None:
        """sha256 of the whole file as written; None when hashing is off."""
        if self._hash is None:
            return None
        with self._lock:
            self._f.flush()
            size = os.fstat(self._f.fileno()).st_size
            if self._rehash:
                self._hash = hashlib.sha256()
                self._hashed = 0
                self._rehash = False
                self._early.clear()
            if self._hashed < size:
                self._hash_from_file(self._hashed, size)
                self._hashed = size
            return self._hash.hexdigest()


@contextlib.contextmanager
def atomic_download(final_path: str) -> Iterator[tuple[BinaryIO, str]]:
    """Yield a temporary file beside ``final_path``; move it into place on success.

    On any exception the temporary file is removed and ``final_path`` keeps its
    old content (or stays absent): never a partial or empty file.
    """
    if os.path.isdir(final_path):
        raise IsADirectoryError(
            f"download destination {final_path!r} is a directory; give a file path, "
            "or a URI ending with '/' to download a folder"
        )
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    temp_path = os.path.join(
        parent, f".{os.path.basename(final_path)}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
    )
    f = open(temp_path, "xb+", buffering=1024 * 1024)
    try:
        yield f, temp_path
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(temp_path, final_path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
