"""The checksum stored with every object: crc32c (the default) or sha256.

Stored as metadata ``lot-<algorithm>`` (``lot-crc32c`` or ``lot-sha256``), the
same for every backend, so an object is verified end to end wherever it
travels; objects written with either keep verifying whatever the setting.

Why crc32c by default: it runs at several GB/s (sha256 at ~1 GB/s on one
core), and CRCs *combine*: the CRC of ``a + b`` follows from the CRCs of ``a``
and ``b`` and the length of ``b``. A parallel download checks each range as it
arrives, in the thread that writes it, and joins the pieces; nothing is read
back. It detects every accidental change a transfer can make (any burst of up
to 32 bits, all odd-bit errors); it is no defence against someone who
forges data on purpose, which the service's access control is for. sha256
(``checksum = "sha256"``) writes a value ``sha256sum`` can check.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ALGORITHMS", "DEFAULT", "Checksum", "new_hasher", "file_checksum", "crc32c_combine",
           "from_metadata"]

ALGORITHMS = ("crc32c", "sha256")  # in order of preference when an object has both
DEFAULT = "crc32c"
READ = 1024 * 1024
_VALUE = {"crc32c": re.compile(r"[0-9a-f]{8}"), "sha256": re.compile(r"[0-9a-f]{64}")}


@dataclass(frozen=True)
class Checksum:
    """One stored checksum: ``algorithm`` and its lowercase hex ``value``."""

    algorithm: str
    value: str

    @property
    def key(self) -> str:
        """The metadata name it is stored under (``lot-crc32c``, ``lot-sha256``)."""
        return f"lot-{self.algorithm}"

    def metadata(self, sep: str = "-") -> dict[str, str]:
        return {self.key.replace("-", sep): self.value}

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.value}"

    @classmethod
    def of(cls, algorithm: str, value: Any) -> "Checksum | None":
        """A checksum from stored text; None if it is not a well-formed value."""
        if not isinstance(value, str):
            return None
        value = value.strip().lower()
        pattern = _VALUE.get(algorithm)
        return cls(algorithm, value) if pattern is not None and pattern.fullmatch(value) else None

    @classmethod
    def parse(cls, text: str) -> "Checksum | None":
        """``crc32c:1a2b3c4d`` or ``sha256:<hex>``; a bare 64-digit hex is sha256
        (what covalent-lot recorded before it knew crc32c)."""
        algorithm, sep, value = text.partition(":")
        if not sep:
            return cls.of("sha256", text)
        return cls.of(algorithm, value)


def from_metadata(metadata: Mapping[str, Any] | None, sep: str = "-") -> Checksum | None:
    """The checksum in an object's metadata (names compared without case;
    ``sep`` is how the service spells the dash, ``_`` on Azure)."""
    if not metadata:
        return None
    lowered = {str(k).lower(): v for k, v in metadata.items()}
    for algorithm in ALGORITHMS:
        found = Checksum.of(algorithm, lowered.get(f"lot{sep}{algorithm}"))
        if found is not None:
            return found
    return None


# --- crc32c -------------------------------------------------------------------------------
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, bit-reflected (zlib's multmodp)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


_X2N = [1 << 30]  # x^(2^n) modulo the polynomial, n = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x8nmodp(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial."""
    p = 1 << 31  # x^0
    k = 3
    while nbytes:
        if nbytes & 1:
            p = _multmodp(_X2N[k & 31], p)
        nbytes >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32c of ``a + b`` from ``crc1`` of ``a``, ``crc2`` of ``b`` and ``len(b)``."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def _crc32c() -> tuple[Callable[[Any], int], Callable[[int, Any], int]]:
    """(value, extend) of google-crc32c (its C extension runs at several GB/s)."""
    import google_crc32c

    return google_crc32c.value, google_crc32c.extend


class _Crc32c:
    """hashlib's surface over google-crc32c."""

    def __init__(self) -> None:
        self._extend = _crc32c()[1]
        self.crc = 0

    def update(self, data) -> None:
        self.crc = self._extend(self.crc, data if type(data) is bytes else bytes(data))

    def hexdigest(self) -> str:
        return f"{self.crc:08x}"


def new_hasher(algorithm: str):
    """An object with ``update(bytes)`` and ``hexdigest()`` for ``algorithm``."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "crc32c":
        return _Crc32c()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def file_checksum(path_or_fd, algorithm: str, size: int | None = None) -> tuple[Checksum, int]:
    """The checksum and size of a local file (a path, or an open descriptor read
    up to ``size``), in 1 MiB reads (they stay in the CPU's cache: faster here
    than larger ones)."""
    hasher = new_hasher(algorithm)
    total = 0
    if isinstance(path_or_fd, int):
        end = os.fstat(path_or_fd).st_size if size is None else size
        while total < end:
            data = os.pread(path_or_fd, min(READ, end - total), total)
            if not data:
                raise OSError(f"short read at byte {total} of {end}")
            hasher.update(data)
            total += len(data)
    else:
        with open(path_or_fd, "rb", buffering=0) as f:
            while data := f.read(READ):
                hasher.update(data)
                total += len(data)
    return Checksum(algorithm, hasher.hexdigest()), total


class RangeCrc:
    """The crc32c of bytes that arrive as ranges, in any order, without reading
    any of them back.

    Each range is checked where it arrives (``add``): a write that continues a
    run extends that run's CRC; runs that meet are joined with
    :func:`crc32c_combine`. ``prefix``: how far the run from ``start`` reaches
    without a gap. Not thread-safe: the owner holds its own lock.
    """

    def __init__(self, start: int = 0, crc: int = 0):
        self._value, self._extend = _crc32c()
        self._runs: dict[int, list[int]] = {}  # start -> [end, crc]
        self._ends: dict[int, int] = {}  # end -> start
        self.reset(start, crc)

    def reset(self, start: int = 0, crc: int = 0) -> None:
        """Forget every range but ``[0, start)``, whose crc is ``crc``."""
        self._runs.clear()
        self._ends.clear()
        self._base = start
        if start:
            self._runs[0] = [start, crc]
            self._ends[start] = 0

    @property
    def prefix(self) -> int:
        run = self._runs.get(0)
        return run[0] if run is not None else 0

    @property
    def prefix_crc(self) -> int:
        run = self._runs.get(0)
        return run[1] if run is not None else 0

    def add(self, offset: int, data) -> bool:
        """Check ``data`` written at ``offset``; False (nothing recorded) if it
        overlaps bytes already checked."""
        end = offset + len(data)
        for s, (e, _crc) in self._runs.items():
            if s < end and offset < e:
                return False
        if not data:
            return True
        if type(data) is not bytes:  # google-crc32c takes bytes only (no buffer it must release)
            data = bytes(data)
        start = self._ends.pop(offset, None)
        if start is not None:  # continues a run: extend its CRC
            run = self._runs[start]
            run[0], run[1] = end, self._extend(run[1], data)
        else:
            start, run = offset, [end, self._value(data)]
            self._runs[start] = run
        following = self._runs.pop(end, None)
        if following is not None:  # meets the next run: join them
            del self._ends[following[0]]
            run[0], run[1] = following[0], crc32c_combine(run[1], following[1], following[0] - end)
        self._ends[run[0]] = start
        return True

    def whole(self, size: int) -> int | None:
        """The crc32c of ``[0, size)`` if exactly that was checked, else None."""
        run = self._runs.get(0)
        if len(self._runs) == 1 and run is not None and run[0] == size:
            return run[1]
        if size == 0 and not self._runs:
            return 0
        return None
