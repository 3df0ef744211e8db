"""An in-memory ``Backend`` for engine tests (no SDK, no network).

It implements only the primitives, as a real backend does, and has a few
switches to misbehave on purpose: fail part-way through a read, return other
bytes than the ones stored, write ranges out of order, change the local file
while it is uploaded.

Stores are kept in a module-level dict keyed by ``settings["fake_store"]`` so
that a ``TransferCall`` (which builds its backend from a "module:Class" path
and a settings dict) reaches the same objects as the test that set them up.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._backend import Backend, RemoteObject
from covalent_lot._checksum import Checksum, new_hasher
from covalent_lot._errors import Classified, ErrorKind
from covalent_lot._stream import VerifyingSink
from covalent_lot._uri import StoreURI

# The error table as the README documents it: each backend test pins its
# classifications to these built-in types.
EXPECTED_TYPE = {
    ErrorKind.NOT_FOUND: FileNotFoundError,
    ErrorKind.DENIED: PermissionError,
    ErrorKind.EXISTS: FileExistsError,
    ErrorKind.TIMEOUT: TimeoutError,
    ErrorKind.CONNECTION: ConnectionError,
    ErrorKind.THROTTLED: OSError,
    ErrorKind.SERVER: OSError,
    ErrorKind.INVALID: ValueError,
    ErrorKind.OTHER: OSError,
}

STORES: dict[str, dict[tuple[str, str], "Stored"]] = {}
_versions = itertools.count(1)


class FakeServiceError(Exception):
    """What the fake service raises; ``classify`` maps it through ``kind``."""

    def __init__(self, kind: ErrorKind, detail: str = ""):
        super().__init__(f"{kind.name} {detail}".strip())
        self.kind = kind
        self.detail = detail


@dataclass
class Stored:
    data: bytes
    checksum: Checksum | None
    version: str


def checksum_of(data: bytes, algorithm: str = "crc32c") -> Checksum:
    """What covalent-lot stores for ``data`` (crc32c unless told otherwise)."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return Checksum(algorithm, hasher.hexdigest())


class MemoryBackend(Backend):
    scheme = "s3"

    def __init__(self, settings: Mapping[str, Any] | None = None):
        settings = dict(settings or {})
        super().__init__(settings)
        self.objects = STORES.setdefault(settings.get("fake_store", "default"), {})
        self.calls: Counter[str] = Counter()
        # Exceptions raised by get_into after half the bytes were written, one per call.
        self.read_failures: list[BaseException] = []
        # Bytes returned instead of the stored ones (the stored checksum is kept).
        self.serve_instead: dict[str, bytes] = {}
        # Write the chunks of a read in reverse order (like parallel ranged GETs).
        self.reverse_writes = False
        self.chunk = 7
        # Called with the local path while put_file streams it.
        self.during_put: Callable[[str], None] | None = None
        self.closed = False
        self.starts: list[int] = []  # the start offset of each get_into (resumed reads > 0)
        self.served = 0  # bytes get_into wrote, all attempts together

    # --- helpers for tests ---------------------------------------------------------------
    def add(self, bucket: str, key: str, data: bytes, checksum: Checksum | str | None | bool = True) -> None:
        """Store ``data``; ``checksum``: True its crc32c, False none, a string parsed
        (``crc32c:...``; a bare hex is a sha256), a Checksum as it is."""
        digest = checksum_of(data) if checksum is True else (
            None if checksum is False else (Checksum.parse(checksum) if isinstance(checksum, str) else checksum))
        self.objects[(bucket, key)] = Stored(data, digest, f'"v{next(_versions)}"')

    def keys(self, bucket: str = "bkt") -> list[str]:
        return sorted(k for b, k in self.objects if b == bucket)

    def data(self, key: str, bucket: str = "bkt") -> bytes:
        return self.objects[(bucket, key)].data

    # --- Backend ---------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return "memory://fake"

    def _get(self, location: StoreURI) -> Stored:
        try:
            return self.objects[(location.bucket, location.key)]
        except KeyError:
            raise FakeServiceError(ErrorKind.NOT_FOUND, f"NoSuchKey {location.key}") from None

    def stat(self, location: StoreURI) -> RemoteObject:
        self.calls["stat"] += 1
        stored = self._get(location)
        return RemoteObject(location, len(stored.data), stored.checksum, stored.version)

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        self.calls["iter_objects"] += 1
        for (bucket, key), stored in sorted(self.objects.items()):
            if bucket == prefix.bucket and key.startswith(prefix.key):
                # Like a real listing: no metadata, so no checksum.
                yield RemoteObject(StoreURI(prefix.scheme, bucket, key), len(stored.data),
                                   None, stored.version)

    def put_file(self, local_path: str, location: StoreURI, size: int, digest) -> None:
        self.calls["put_file"] += 1
        parts = []
        with open(local_path, "rb") as f:
            while True:
                block = f.read(self.chunk)
                if not block:
                    break
                parts.append(block)
                self.sent(len(block))
                if self.during_put is not None:
                    hook, self.during_put = self.during_put, None
                    hook(local_path)
        self.objects[(location.bucket, location.key)] = Stored(
            b"".join(parts), digest(), f'"v{next(_versions)}"')

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        self.calls["get_into"] += 1
        self.starts.append(start)
        stored = self._get(obj.location)
        data = self.serve_instead.get(obj.location.key, stored.data)
        offsets = list(range(start, len(data), self.chunk))
        if self.reverse_writes:
            offsets.reverse()
        failure = self.read_failures.pop(0) if self.read_failures else None
        for i, offset in enumerate(offsets):
            if failure is not None and i >= len(offsets) // 2:
                raise failure
            sink.seek(offset)
            sink.write(data[offset:offset + self.chunk])
            self.served += len(data[offset:offset + self.chunk])
        if failure is not None:
            raise failure
        return RemoteObject(obj.location, len(stored.data), stored.checksum, stored.version)

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        self.calls["copy"] += 1
        stored = self._get(source.location)
        self.objects[(destination.bucket, destination.key)] = Stored(
            stored.data, stored.checksum, f'"v{next(_versions)}"')

    def delete(self, location: StoreURI) -> None:
        self.calls["delete"] += 1
        self.objects.pop((location.bucket, location.key), None)

    def classify_one(self, exc: BaseException) -> Classified | None:
        if isinstance(exc, FakeServiceError):
            return Classified(exc.kind, exc.detail)
        return None

    def close(self) -> None:
        self.closed = True


def xattrs_work(directory) -> bool:
    """Whether files in ``directory`` take user xattrs (where covalent-lot records
    verified copies: the same-host shortcut and the local cache depend on it)."""
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(str(directory), ".xattr-probe")
    open(probe, "wb").close()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


def counting(*outcomes):
    """A callable that raises/returns ``outcomes`` in turn; ``.calls`` counts calls."""

    def fn():
        outcome = outcomes[min(fn.calls, len(outcomes) - 1)]
        fn.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    fn.calls = 0
    return fn


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this test session's environment
    (conftest's private HOME and COVALENT_* paths)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )


def import_error_without(sdk_module: str, statement: str) -> str:
    """The ImportError message ``statement`` raises when ``sdk_module`` cannot be imported."""
    result = run_python(f"""
        import sys
        sys.modules[{sdk_module!r}] = None  # makes the import raise ImportError
        try:
            {statement}
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("NO ERROR")
    """)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR:" in result.stdout, result.stdout
    return result.stdout


def __getattr__(name: str):
    # Made on first use, so that importing this module does not import covalent
    # (tests/conftest.py must point covalent at a temporary home first).
    if name == "MemoryS3Strategy":
        from covalent_lot._config import Option
        from covalent_lot.strategies.s3 import S3Strategy

        class MemoryS3Strategy(S3Strategy):
            """S3's options and config section, served by :class:`MemoryBackend`:
            what a TransferCall resolves and builds on the executor."""

            backend_path = f"{__name__}:MemoryBackend"
            options = {**S3Strategy.options, "fake_store": Option("str", "default", "STORES key")}

        globals()[name] = MemoryS3Strategy
        return MemoryS3Strategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def in_memory(call, store_name: str):
    """Point a TransferCall (or a Discard's) at the in-memory store ``store_name``,
    with no retry delays; it still resolves its settings when it runs."""
    target = getattr(call, "delete", call)  # a Discard runs its delete TransferCall
    target.strategy = f"{__name__}:MemoryS3Strategy"
    target.options = {**target.options, "fake_store": store_name, "base_delay": 0, "max_delay": 0}
    return call
