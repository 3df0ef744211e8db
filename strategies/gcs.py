"""Google Cloud Storage (``gs://bucket/key``), on google-cloud-storage.

Uploads are the SDK's resumable uploads (objects over 8 MiB; a single
multipart request below that): the object appears only when the last chunk
is accepted, and client memory stays near two chunks. Downloads are one
streaming GET pinned to the generation that was looked up, so bytes of a
concurrent overwrite are never mixed in. Copies are server-side rewrites.

Credentials are never options: a ``credentials_file`` *path* (read on the
executor), else Application Default Credentials resolved on the executor when
the transfer runs; with an ``endpoint`` (an emulator) and no file, anonymous.

Retries belong to the engine (every other SDK call passes ``retry=None``),
except within an upload: each request of a resumable upload is retried on
its own with the same policy, so a dropped connection costs one chunk, not
the whole object.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._engine import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import ChecksumMismatchError, Classified, ErrorKind, exception_chain
from covalent_lot._errors import MissingBucket as _MissingBucket
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import CHECKSUM_KEY, VerifyingSink
from covalent_lot._strategy import LotStrategy, key_too_long
from covalent_lot._uri import StoreURI

__all__ = ["GCSStrategy", "GCSBackend", "OPTIONS", "CHUNK_MULTIPLE"]

KiB = 1024
MiB = 1024 * KiB
# The resumable upload protocol requires every chunk but the last to be a
# multiple of 256 KiB.
CHUNK_MULTIPLE = 256 * KiB
DEFAULT_ENDPOINT = "https://storage.googleapis.com"
log = logging.getLogger("covalent_lot")
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)

OPTIONS: dict[str, Option] = {
    "project": Option("str", None, "Google Cloud project (default: from the credentials/ADC)"),
    "credentials_file": Option(
        "str", None,
        "absolute path of a service-account JSON key, read on the executor; "
        "default: Application Default Credentials",
    ),
    "endpoint": Option(
        "str", None, "emulator or private endpoint, e.g. http://127.0.0.1:4443 (anonymous "
        "unless credentials_file is set)",
    ),
    # 32 MiB: measured on fake-gcs-server (256 MiB objects) 60-72 MiB/s at +65 MiB
    # client RSS; 64 MiB was no faster within noise at +129 MiB, 8 MiB ran at ~20 MiB/s.
    "chunk_size": Option(
        "size", 32 * MiB,
        "resumable upload chunk, a multiple of 256 KiB; client memory is about 2 chunks",
        CHUNK_MULTIPLE,
    ),
    "timeout": Option("float", 60.0, "seconds to connect, and to wait for each read", 0.001),
}

_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_IP = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_GOOGLE_LIKE = re.compile(r"g[o0][o0]g[l1]e")


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` breaks GCS's naming rules, or None."""
    limit = 222 if "." in bucket else 63
    if not 3 <= len(bucket) <= limit:
        return "3-63 characters (up to 222 with dots, each dot-separated part at most 63)"
    if not _BUCKET_CHARS.match(bucket):
        return ("lowercase letters, digits, '-', '_' and '.', starting and ending with a "
                "letter or digit")
    if any(not 1 <= len(part) <= 63 for part in bucket.split(".")):
        return "each dot-separated part is 1-63 characters"
    if _IP.match(bucket):
        return "not an IP address"
    if bucket.startswith("goog") or _GOOGLE_LIKE.search(bucket):
        return "no 'goog' prefix and no 'google' (or look-alikes such as 'g00gle')"
    return None


def _service_account(path: str):
    """Service-account credentials from a key file on this machine (the executor)."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(
            os.path.expanduser(path), scopes=list(_SCOPES)
        )
    except (OSError, ValueError) as exc:
        # Not FileNotFoundError: that would read as "the object does not exist".
        raise DefaultCredentialsError(
            f"credentials_file {path!r} is not a readable service-account key: {exc}"
        ) from exc


def _crc32c_available() -> bool:
    try:
        import google_crc32c
    except ImportError:
        return False
    return getattr(google_crc32c, "implementation", "") == "c"


class GCSBackend(Backend):
    scheme = "gs"

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        self._timeout = settings["timeout"]
        self._chunk_size = settings["chunk_size"]
        # Checksum policy (the SDK's own validation, on top of our sha256):
        # - uploads send crc32c with the final request, and the service refuses
        #   to finalize an object whose bytes do not match: the only check of
        #   the bytes on their way in (lot-sha256 is metadata, never checked by
        #   the service);
        # - downloads skip it when lot-sha256 is verified anyway (it covers
        #   the whole object end to end) and keep it for objects without
        #   lot-sha256 (written by other tools) or with verify off.
        # Only crc32c, and only with its C extension (~GB/s, no measurable
        # cost): the SDK's "auto" falls back to md5 (measured -35% download
        # speed) or to a pure-Python crc32c (a few MB/s).
        self._crc32c = "crc32c" if _crc32c_available() else None

    # --- client ---------------------------------------------------------------------------
    # Built on first use (Backend.client), inside the engine's guarded call, so
    # that missing or unreadable credentials become a translated PermissionError.
    def connect(self):
        from google.cloud import storage

        settings = self.settings
        endpoint = settings["endpoint"]
        kwargs: dict[str, Any] = {}
        if endpoint is not None:
            kwargs["client_options"] = {"api_endpoint": endpoint.rstrip("/")}
        project = settings["project"]
        credentials = None
        if settings["credentials_file"] is not None:
            credentials = _service_account(settings["credentials_file"])
            if project is None:
                project = credentials.project_id
        elif endpoint is not None:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        if credentials is not None:
            kwargs["credentials"] = credentials
            kwargs["project"] = project  # None: no project (the SDK's "<none>")
        elif project is not None:
            kwargs["project"] = project
        # Without credentials the SDK resolves Application Default Credentials here.
        return storage.Client(**kwargs)

    @property
    def endpoint(self) -> str:
        if self.connected:
            return self.client._connection.API_BASE_URL
        if self.settings["endpoint"] is not None:
            return self.settings["endpoint"].rstrip("/")
        return os.environ.get("STORAGE_EMULATOR_HOST") or DEFAULT_ENDPOINT

    def _blob(self, location: StoreURI, **kwargs):
        return self.client.bucket(location.bucket).blob(location.key, **kwargs)

    # --- primitives -------------------------------------------------------------------------
    def stat(self, location: StoreURI) -> RemoteObject:
        # One GET of exactly this object (never a prefix listing, which would
        # also match "model.pt.bak" for "model.pt").
        blob = self._blob(location)
        try:
            blob.reload(timeout=self._timeout, retry=None)
        except Exception as exc:
            if _is_not_found(exc):
                self._raise_if_bucket_missing(location.bucket, exc)
            raise
        return _remote(location, blob)

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        # A listing returns each object's metadata: the folder download needs
        # no extra request per object to learn its lot-sha256.
        # 1000 is GCS's largest page; asked for explicitly because fake-gcs-server
        # otherwise returns any number of objects in one page.
        blobs = self.client.list_blobs(
            prefix.bucket, prefix=prefix.key, page_size=1000, timeout=self._timeout, retry=None
        )
        try:
            for blob in blobs:  # the iterator fetches every page
                yield _remote(StoreURI(prefix.scheme, prefix.bucket, blob.name), blob)
        except Exception as exc:
            if _is_not_found(exc):  # a listing is 404 only for the bucket
                raise _MissingBucket(prefix.bucket) from exc
            raise

    def put_file(self, local_path: str, location: StoreURI, size: int, sha256: str | None) -> None:
        blob = self._blob(location, chunk_size=self._chunk_size)
        if sha256 is not None:
            blob.metadata = {CHECKSUM_KEY: sha256}  # sent when the upload starts
        try:
            with open(local_path, "rb") as f:
                # Streams chunk by chunk from the file; the object is created
                # only when the final chunk is accepted.
                blob.upload_from_file(
                    _Counted(f, self.sent) if self.progress is not None else f, size=size, timeout=self._timeout, checksum=self._crc32c,
                    retry=_PerRequestRetry(self),
                )
        except Exception as exc:
            if _is_not_found(exc) or getattr(exc, "code", None) == 410:
                # A missing bucket, or an upload session the service no longer has
                # (it restarted, or the session expired): a new attempt starts a new one.
                self._raise_if_bucket_missing(location.bucket, exc)
                raise ConnectionError(f"the upload session for {location} was lost") from exc
            if _is_data_corruption(exc):
                # The SDK leaves an object whose crc32c disagrees with what was
                # sent: never leave it visible.
                self._delete_quietly(location, _generation_in(exc))
            raise

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        location = obj.location
        if obj.version is None:
            obj = self.stat(location)
        verified_by_sha256 = self.settings["verify"] and obj.sha256 is not None
        blob = self._blob(location, generation=int(obj.version))
        writer = _CoalescingWriter(sink)
        try:
            # One streaming GET (no chunk_size: ranged requests halve the speed)
            # of exactly the generation whose lot-sha256 we hold.
            blob.download_to_file(
                writer,
                start=start or None,  # a resumed download: the rest only
                timeout=self._timeout,
                # (a crc32c covers whole objects only)
                checksum=None if verified_by_sha256 or start else self._crc32c,
                retry=None,
            )
            writer.flush()
        except Exception as exc:
            if _is_not_found(exc):
                self._raise_if_changed(obj, exc)
            if _is_data_corruption(exc):
                raise ChecksumMismatchError(
                    f"checksum mismatch for {location}: the crc32c of the bytes received differs "
                    f"from the one the service stored for generation {obj.version} (no lot-sha256 "
                    "to check instead); the object is corrupted at rest or was changed in transit. "
                    "The destination was left untouched."
                ) from exc
            raise
        return obj

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        if source.version is None:
            source = self.stat(source.location)
        # sourceGeneration pins the bytes whose lot-sha256 is copied with them.
        src = self._blob(source.location, generation=int(source.version))
        # A destination with no properties of its own takes the source's
        # metadata (lot-sha256 included).
        dst = self._blob(destination)
        token = None
        try:
            while True:  # large or cross-location objects take several calls
                token, _done, _total = dst.rewrite(
                    src, token=token, timeout=self._timeout, retry=None
                )
                if token is None:
                    break
        except Exception as exc:
            if _is_not_found(exc):
                self._raise_if_bucket_missing(destination.bucket, exc)
                self._raise_if_changed(source, exc)
            raise

    def delete(self, location: StoreURI) -> None:
        self._blob(location).delete(timeout=self._timeout, retry=None)

    def close(self) -> None:
        if self.connected:
            self.client.close()
            self._client = None

    # --- telling 404s apart ---------------------------------------------------------------
    def _raise_if_bucket_missing(self, bucket: str, cause: BaseException) -> None:
        """GCS answers 404 for a missing object and a missing bucket alike."""
        from google.api_core import exceptions as gx

        try:
            self.client.bucket(bucket).reload(timeout=self._timeout, retry=None)
        except gx.NotFound:
            raise _MissingBucket(bucket) from cause
        except Exception:
            return  # no permission to look at the bucket, etc.: keep the original error

    def _raise_if_changed(self, obj: RemoteObject, cause: BaseException) -> None:
        """A pinned generation is 404 once overwritten: say "changed", not "missing"."""
        try:
            current = self.stat(obj.location)
        except _MissingBucket:
            raise
        except Exception:
            return  # gone (or unreadable): the original 404 stands
        if current.version != obj.version:
            raise _Changed(obj.location, obj.version, current.version) from cause

    def _delete_quietly(self, location: StoreURI, generation: int | None) -> None:
        try:
            self._blob(location, generation=generation).delete(timeout=self._timeout, retry=None)
        except Exception:
            pass

    # --- the error table ------------------------------------------------------------------
    def classify_one(self, exc: BaseException) -> Classified | None:
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax
        from requests import exceptions as rx
        from urllib3 import exceptions as ux

        data_corruption, invalid_response = _media_errors()

        for err in exception_chain(exc):
            if isinstance(err, ChecksumMismatchError):
                return None  # the engine's own verdict, whatever SDK error caused it
            if isinstance(err, _MissingBucket):
                return err.verdict()
            if isinstance(err, _Changed):
                return Classified(ErrorKind.EXISTS, str(err),
                                  "the object changed while it was read; retry to read the new version")
            if isinstance(err, gx.RetryError) and err.cause is not None:
                return self.classify(err.cause)
            if isinstance(err, gx.GoogleAPICallError):
                return _classify_status(err.code, f"{err.code} {type(err).__name__}: {err.message}")
            if isinstance(err, data_corruption):
                return Classified(ErrorKind.SERVER, f"crc32c mismatch: {err}",
                                  "the bytes were changed in transit")
            if isinstance(err, invalid_response):
                status = getattr(getattr(err, "response", None), "status_code", None)
                return _classify_status(status, f"unexpected response: {err}")
            if isinstance(err, ax.DefaultCredentialsError):
                return Classified(ErrorKind.DENIED, f"no usable Google credentials: {err}",
                                  self._credentials_hint())
            if isinstance(err, ax.RefreshError):
                if err.retryable:
                    return Classified(ErrorKind.CONNECTION, f"could not refresh credentials: {err}")
                return Classified(ErrorKind.DENIED, f"credentials were refused: {err}",
                                  self._credentials_hint())
            if isinstance(err, ax.TimeoutError):
                return Classified(ErrorKind.TIMEOUT, str(err))
            if isinstance(err, ax.TransportError):
                return Classified(ErrorKind.CONNECTION, f"credentials endpoint unreachable: {err}")
            # requests' ConnectTimeout is both a Timeout and a ConnectionError.
            if isinstance(err, (rx.Timeout, ux.TimeoutError)):
                return Classified(ErrorKind.TIMEOUT, str(err))
            if isinstance(err, (rx.ConnectionError, rx.ChunkedEncodingError,
                                ux.ProtocolError, ux.NewConnectionError)):
                return Classified(ErrorKind.CONNECTION, str(err))
            if isinstance(err, TimeoutError):
                return Classified(ErrorKind.TIMEOUT, str(err))
            if isinstance(err, ConnectionError):
                return Classified(ErrorKind.CONNECTION, str(err))
        return None

    def _credentials_hint(self) -> str:
        path = self.settings["credentials_file"]
        if path is not None:
            return (f"check that credentials_file {path!r} exists on the executor and holds a "
                    "valid service-account key")
        return ("give the executor Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
                "`gcloud auth application-default login`, or a service account), or set "
                "credentials_file in [lot.gcs]")


_STATUS_KINDS = {
    400: ErrorKind.INVALID,
    401: ErrorKind.DENIED,
    403: ErrorKind.DENIED,
    404: ErrorKind.NOT_FOUND,
    408: ErrorKind.TIMEOUT,
    409: ErrorKind.EXISTS,
    412: ErrorKind.EXISTS,
    429: ErrorKind.THROTTLED,
    503: ErrorKind.THROTTLED,
    504: ErrorKind.TIMEOUT,
}


def _classify_status(status: int | None, detail: str) -> Classified:
    kind = _STATUS_KINDS.get(status or 0)
    if kind is None:
        kind = ErrorKind.SERVER if status and status >= 500 else ErrorKind.OTHER
    hint = None
    if kind is ErrorKind.EXISTS:
        hint = "the object changed or exists; retry to read the new version"
    elif kind in (ErrorKind.INVALID, ErrorKind.OTHER):
        hint = ""
    return Classified(kind, detail, hint)


def _remote(location: StoreURI, blob) -> RemoteObject:
    metadata = blob.metadata or {}
    generation = blob.generation
    return RemoteObject(
        location,
        int(blob.size or 0),
        metadata.get(CHECKSUM_KEY),
        None if generation is None else str(generation),
        epoch_seconds(blob.updated),
    )


def _is_not_found(exc: BaseException) -> bool:
    from google.api_core import exceptions as gx

    return isinstance(exc, gx.NotFound)


def _media_errors() -> tuple[type, type]:
    """(DataCorruption, InvalidResponse): in google-cloud-storage since 3.0, in
    google-resumable-media before (3.x's subclass those when both are installed)."""
    try:
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
    except ImportError:  # google-cloud-storage 2.x
        from google.resumable_media import DataCorruption, InvalidResponse
    return DataCorruption, InvalidResponse


def _is_data_corruption(exc: BaseException) -> bool:
    return isinstance(exc, _media_errors()[0])


def _generation_in(exc: BaseException) -> int | None:
    try:
        return int(exc.response.json()["generation"])  # type: ignore[attr-defined]
    except Exception:
        return None


class _Counted:
    """A file whose reads are reported (progress); everything else is the file's."""

    def __init__(self, f, report: Callable[[int], None]):
        self._f = f
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._report(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _PerRequestRetry:
    """Retries one request of an upload, as the SDK asks: it wraps each request
    (the session start, every chunk) with ``retry(request)``. A chunk that failed
    transiently is sent again on its own; the session goes on from the offset the
    service confirmed. Same policy and error table as the engine's retries."""

    def __init__(self, backend: "GCSBackend"):
        settings = backend.settings
        self._policy = RetryPolicy(settings["max_attempts"], settings["base_delay"], settings["max_delay"])
        self._backend = backend

    def _transient(self, exc: BaseException) -> bool:
        verdict = self._backend.classify(exc)
        return verdict is not None and verdict.transient

    @staticmethod
    def _note(attempt: int, exc: BaseException, wait: float) -> None:
        log.warning("upload request failed (%s); sending it again in %.1f s (attempt %d)",
                    type(exc).__name__, wait, attempt + 1)

    def __call__(self, request: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: self._policy.run(request, self._transient, self._note)


class _CoalescingWriter:
    """Hands the SDK's 8 KiB writes to the sink in 1 MiB pieces.

    The SDK writes a streamed download in 8 KiB chunks; each one costs the
    sink a lock, a seek and a hash update. Measured on 256 MiB: ~330 MiB/s
    straight into the sink, ~370-410 MiB/s coalesced (plain file: ~380-430).
    """

    def __init__(self, sink: VerifyingSink, size: int = MiB):
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
        # The SDK seeks back to 0 when the service transcodes; buffered bytes
        # belong where they were written before that.
        self.flush()
        return self._sink.seek(offset, whence)

    def tell(self) -> int:
        return self._sink.tell() + len(self._buf)

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


class _Changed(Exception):
    def __init__(self, location: StoreURI, seen: str | None, now: str | None):
        super().__init__(f"{location} was replaced (generation {seen}, now {now})")
        self.location = location


class GCSStrategy(LotStrategy):
    """covalent-lot's Google Cloud Storage strategy; every option can come from ``[lot.gcs]``.

    ``GCSStrategy()`` with no arguments is built from covalent.conf and the
    environment (see the README's Configuration section).
    """

    scheme = "gs"
    section = "gcs"
    extra = "gcs"
    sdk_module = "google.cloud.storage"
    backend_path = "covalent_lot.strategies.gcs:GCSBackend"
    options = OPTIONS

    def __init__(self, **options: Any):
        super().__init__(**options)
        settings = self.settings
        chunk = settings["chunk_size"]
        if chunk % CHUNK_MULTIPLE:
            lower = max(CHUNK_MULTIPLE, chunk - chunk % CHUNK_MULTIPLE)
            raise ValueError(
                f"option chunk_size from {settings.sources['chunk_size']} must be a multiple of "
                f"256 KiB (262,144 bytes), got {chunk:,} bytes; e.g. {lower:,} or '32MiB'"
            )
        endpoint = settings["endpoint"]
        if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
            raise ValueError(
                f"option endpoint from {settings.sources['endpoint']} must be an http:// or "
                f"https:// URL, got {endpoint!r}"
            )
        path = settings["credentials_file"]
        if path is not None and not os.path.isabs(os.path.expanduser(path)):
            raise ValueError(
                f"option credentials_file from {settings.sources['credentials_file']} must be an "
                f"absolute path (electrons run in another working directory), got {path!r}"
            )

    def check_location(self, location: StoreURI) -> None:
        problem = bucket_problem(location.bucket)
        if problem:
            raise ValueError(f"invalid GCS bucket name {location.bucket!r} in {location}: {problem}")
        if len(location.key.encode("utf-8")) > 1024:
            raise key_too_long(location, "GCS object", 1024)
        if location.key.startswith(".well-known/acme-challenge/"):
            raise ValueError(f"GCS refuses object names starting with .well-known/acme-challenge/: "
                             f"{location}; use another prefix")
