"""The seam between the engine and one storage service.

A backend writes the primitives below for its protocol and nothing else; the
engine (``_engine.Engine``) brings folders, checksums, atomic local files,
resumed downloads, parallel files, retries and error translation to each.
See docs/backends.md for what a new backend must write.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ._checksum import Checksum
from ._errors import ChecksumMismatchError, Classified, MissingBucket, builtin_verdict, exception_chain
from ._retry import RetryPolicy
from ._stream import VerifyingSink
from ._uri import StoreURI

__all__ = ["Backend", "RemoteObject", "epoch_seconds"]

log = logging.getLogger("covalent_lot")
T = TypeVar("T")


def epoch_seconds(value: Any) -> float | None:
    """A service's modification time (datetime or number) as seconds since the epoch."""
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


@dataclass(frozen=True)
class RemoteObject:
    """What a backend knows of one stored object."""

    location: StoreURI
    size: int
    checksum: Checksum | None = None  # as stored with the object by covalent-lot (lot-crc32c, lot-sha256)
    version: str | None = None  # ETag/generation: lets a download notice a concurrent change
    modified: float | None = None  # last modification, seconds since the epoch

    @property
    def sha256(self) -> str | None:
        """The stored sha256, if that is the object's checksum."""
        c = self.checksum
        return c.value if c is not None and c.algorithm == "sha256" else None


class Backend(ABC):
    """Primitives one storage service must provide. Built on the executor."""

    scheme: str = ""
    # True when the backend stores the checksum after the bytes (an SFTP
    # sidecar, an Azure block-list commit): the engine then hashes the file
    # while the upload runs, and put_file's digest() waits for that hash.
    checksum_after_upload: bool = False
    # True when credentials belong to a host named in each URI (SFTP): they can
    # be checked only against a location.
    credentials_per_host: bool = False

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self._client: Any = None
        self._client_lock = threading.Lock()
        # Called with a byte count as an upload's bytes are sent (any thread); set by the engine.
        self.progress: Callable[[int], None] | None = None
        self.connect_seconds = 0.0  # how long connect() took (resolving credentials, the SDK client)

    def connect(self) -> Any:
        """Make the SDK client: resolve credentials, open sessions. Override."""
        raise NotImplementedError

    @property
    def client(self) -> Any:
        """The SDK client, made on first use.

        First use is inside a guarded call, so errors while resolving
        credentials or profiles are classified and translated like any other.
        """
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    began = time.perf_counter()
                    self._client = self.connect()
                    self.connect_seconds = time.perf_counter() - began
        return self._client

    def check_credentials(self) -> None:
        """Resolve credentials and build the client as a transfer would; raise if that fails."""
        self.client  # noqa: B018 - made on first use

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where requests go, for error messages."""

    @abstractmethod
    def stat(self, location: StoreURI) -> RemoteObject:
        """Size, stored checksum and version of one object; raises if missing."""

    @abstractmethod
    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        """Every object below a folder URI, all pages."""

    @abstractmethod
    def put_file(self, local_path: str, location: StoreURI, size: int,
                 digest: Callable[[], Checksum | None]) -> None:
        """Stream a local file to ``location`` with its checksum stored with it.

        ``digest()`` returns the :class:`~covalent_lot._checksum.Checksum` to store
        as metadata ``digest().key`` (None when checksums are off); for
        ``checksum_after_upload`` backends it waits for the hash that runs
        alongside the upload, so call it only when the bytes are sent. Must
        never leave a partial object visible under ``location``; report bytes
        sent with ``sent(n)``.
        """

    @abstractmethod
    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        """Stream bytes ``[start, size)`` of ``obj`` into ``sink`` at their offsets
        (any write order); return what was read.

        ``start`` > 0 resumes a failed attempt (then ``obj.version`` pins the
        read to the same version). The returned object's ``checksum`` is the
        stored checksum as seen by the read itself (it may be None if ``obj``
        came from a listing), its ``size`` the whole object's.
        """

    @abstractmethod
    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        """Server-side copy, keeping the stored checksum."""

    @abstractmethod
    def delete(self, location: StoreURI) -> None:
        """Remove one object."""

    @abstractmethod
    def classify_one(self, err: BaseException) -> Classified | None:
        """Place one exception of a chain in the error table; None if it is not the service's.

        The engine walks the chain (outermost first) and takes the first verdict;
        a ``weak`` one (a wrapper that says little) only if nothing below is known.
        """

    def missing_container(self, location: StoreURI, cause: BaseException) -> MissingBucket | None:
        """After ``location`` was reported missing: the bucket (container, directory)
        above it if that is what is missing, else None. Services answer "not found"
        for a missing object and a missing bucket alike; override to tell them apart."""
        return None

    # --- what the engine gives every backend ----------------------------------------
    def classify(self, exc: BaseException) -> Classified | None:
        """The verdict on ``exc``: the first exception of its chain the backend (or
        the built-in table of timeouts and dropped connections) recognises."""
        fallback = None
        for err in exception_chain(exc):
            if isinstance(err, ChecksumMismatchError):
                return None  # the engine's own verdict, whatever SDK error caused it
            if isinstance(err, MissingBucket):
                return err.verdict()
            verdict = self.classify_one(err) or builtin_verdict(err)
            if verdict is not None and verdict.weak:
                fallback = fallback or verdict
            elif verdict is not None:
                return verdict
        return fallback

    def is_transient(self, exc: BaseException) -> bool:
        """Worth sending again unchanged: a transient kind, never a checksum mismatch."""
        if isinstance(exc, ChecksumMismatchError):
            return False
        verdict = self.classify(exc)
        return verdict is not None and verdict.transient

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)

    def retrying(self, request: Callable[[], T]) -> Callable[[], T]:
        """``request`` retried on its own with the engine's policy and error table:
        for SDKs that send one transfer as many requests (chunks of a resumable
        upload), so that a dropped connection costs one request, not the transfer."""

        def note(attempt: int, exc: BaseException, wait: float) -> None:
            log.warning("request failed (%s); sending it again in %.1f s (attempt %d)",
                        type(exc).__name__, wait, attempt + 1)

        return lambda: self.retry_policy.run(request, self.is_transient, note)

    def sent(self, nbytes: int) -> None:
        """Report ``nbytes`` more of an upload sent (for a progress bar)."""
        if self.progress is not None:
            self.progress(nbytes)

    def file_concurrency(self) -> int:
        """How many files of a folder may move at once (the client is shared)."""
        return int(self.settings.get("max_files", 1))

    def close(self) -> None:
        """Release connections."""
