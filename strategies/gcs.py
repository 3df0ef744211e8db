"""Google Cloud Storage (``gs://bucket/key``), on google-cloud-storage.

Uploads are the SDK's resumable uploads (objects over 8 MiB; a single
multipart request below that): the object appears only when the last chunk
is accepted, and client memory stays near two chunks. Downloads are one
streaming GET pinned to the generation that was looked up, so bytes of a
concurrent overwrite are never mixed in. Copies are server-side rewrites.

Credentials are never options (``_gcs_auth``): a key file's path or
Application Default Credentials, resolved on the executor.

Retries belong to the engine (every SDK call passes ``retry=None``), except
within an upload: each request of a resumable upload is retried on its own
(``Backend.retrying``: same policy and error table), so a dropped connection
costs one chunk, not the whole object.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._backend import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import ChecksumMismatchError, Classified, ErrorKind, MissingBucket, http_verdict
from covalent_lot._stream import CHECKSUM_KEY, CoalescingWriter, CountingReader, VerifyingSink
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI

from ._gcs_auth import client_kwargs, credentials_hint

__all__ = ["GCSStrategy", "GCSBackend", "OPTIONS", "CHUNK_MULTIPLE"]

KiB = 1024
MiB = 1024 * KiB
# The resumable upload protocol requires every chunk but the last to be a
# multiple of 256 KiB.
CHUNK_MULTIPLE = 256 * KiB
DEFAULT_ENDPOINT = "https://storage.googleapis.com"

OPTIONS: dict[str, Option] = {
    "project": Option("str", None, "Google Cloud project (default: from the credentials/ADC)"),
    "credentials_file": Option(
        "abspath", None,
        "absolute path of a service-account JSON key, read on the executor; "
        "default: Application Default Credentials",
    ),
    "endpoint": Option(
        "url", None, "emulator or private endpoint, e.g. http://127.0.0.1:4443 (anonymous "
        "unless credentials_file is set)",
    ),
    # The default chunk: the measurements are in docs/measurements.md.
    "chunk_size": Option(
        "size", 32 * MiB,
        "resumable upload chunk, a multiple of 256 KiB; client memory is about 2 chunks",
        CHUNK_MULTIPLE, multiple_of=CHUNK_MULTIPLE,
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
        # Only crc32c, and only with its C extension: the SDK's "auto" falls
        # back to md5 or a pure-Python crc32c, both far slower (docs/measurements.md).
        self._crc32c = "crc32c" if _crc32c_available() else None

    def connect(self):
        # Built on first use (Backend.client), inside the engine's guarded call, so
        # that missing or unreadable credentials become a translated PermissionError.
        from google.cloud import storage

        return storage.Client(**client_kwargs(self.settings))

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
        blob.reload(timeout=self._timeout, retry=None)
        return _remote(location, blob)

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        # A listing returns each object's metadata: the folder download needs
        # no extra request per object to learn its lot-sha256.
        # 1000 is GCS's largest page; asked for explicitly because fake-gcs-server
        # otherwise returns any number of objects in one page.
        blobs = self.client.list_blobs(
            prefix.bucket, prefix=prefix.key, page_size=1000, timeout=self._timeout, retry=None
        )
        for blob in blobs:  # the iterator fetches every page
            yield _remote(StoreURI(prefix.scheme, prefix.bucket, blob.name), blob)

    def put_file(self, local_path: str, location: StoreURI, size: int, digest) -> None:
        blob = self._blob(location, chunk_size=self._chunk_size)
        sha256 = digest()
        if sha256 is not None:
            blob.metadata = {CHECKSUM_KEY: sha256}  # sent when the upload starts
        try:
            with open(local_path, "rb") as f:
                # Streams chunk by chunk from the file; the object is created
                # only when the final chunk is accepted.
                blob.upload_from_file(
                    CountingReader(f, self.sent) if self.progress is not None else f, size=size,
                    timeout=self._timeout, checksum=self._crc32c, retry=self.retrying,
                )
        except Exception as exc:
            if _is_not_found(exc) or getattr(exc, "code", None) == 410:
                # A missing bucket, or an upload session the service no longer has
                # (it restarted, or the session expired): a new attempt starts a new one.
                missing = self.missing_container(location, exc)
                if missing is not None:
                    raise missing from exc
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
        # The SDK writes in 8 KiB pieces: handed on in larger ones (docs/measurements.md).
        writer = CoalescingWriter(sink)
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
                missing = self.missing_container(destination, exc)
                if missing is not None:
                    raise missing from exc
                self._raise_if_changed(source, exc)
            raise

    def delete(self, location: StoreURI) -> None:
        self._blob(location).delete(timeout=self._timeout, retry=None)

    def close(self) -> None:
        if self.connected:
            self.client.close()
            self._client = None

    # --- telling 404s apart ---------------------------------------------------------------
    def missing_container(self, location: StoreURI, cause: BaseException) -> MissingBucket | None:
        # GCS answers 404 for a missing object and a missing bucket alike.
        try:
            self.client.bucket(location.bucket).reload(timeout=self._timeout, retry=None)
        except Exception as exc:
            if _is_not_found(exc):
                return MissingBucket(location.bucket)
        return None  # there, or no right to look at it: the original error stands

    def _raise_if_changed(self, obj: RemoteObject, cause: BaseException) -> None:
        """A pinned generation is 404 once overwritten: say "changed", not "missing"."""
        try:
            current = self.stat(obj.location)
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
    def classify_one(self, err: BaseException) -> Classified | None:
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax
        from requests import exceptions as rx
        from urllib3 import exceptions as ux

        data_corruption, invalid_response = _media_errors()
        if isinstance(err, _Changed):
            return Classified(ErrorKind.EXISTS, str(err),
                              "the object changed while it was read; retry to read the new version")
        if isinstance(err, gx.RetryError):
            return None  # its cause (next in the chain) says what happened
        if isinstance(err, gx.GoogleAPICallError):
            return http_verdict(err.code, None, f"{err.code} {type(err).__name__}: {err.message}")
        if isinstance(err, data_corruption):
            return Classified(ErrorKind.SERVER, f"crc32c mismatch: {err}", "the bytes were changed in transit")
        if isinstance(err, invalid_response):
            status = getattr(getattr(err, "response", None), "status_code", None)
            return http_verdict(status, None, f"unexpected response: {err}")
        if isinstance(err, ax.DefaultCredentialsError):
            return Classified(ErrorKind.DENIED, f"no usable Google credentials: {err}", credentials_hint(self.settings))
        if isinstance(err, ax.RefreshError):
            if err.retryable:
                return Classified(ErrorKind.CONNECTION, f"could not refresh credentials: {err}")
            return Classified(ErrorKind.DENIED, f"credentials were refused: {err}", credentials_hint(self.settings))
        if isinstance(err, ax.TimeoutError):
            return Classified(ErrorKind.TIMEOUT, str(err))
        if isinstance(err, ax.TransportError):
            return Classified(ErrorKind.CONNECTION, f"credentials endpoint unreachable: {err}")
        # requests' ConnectTimeout is both a Timeout and a ConnectionError.
        if isinstance(err, (rx.Timeout, ux.TimeoutError)):
            return Classified(ErrorKind.TIMEOUT, str(err))
        if isinstance(err, (rx.ConnectionError, rx.ChunkedEncodingError, ux.ProtocolError, ux.NewConnectionError)):
            return Classified(ErrorKind.CONNECTION, str(err))
        return None


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


class _Changed(Exception):
    def __init__(self, location: StoreURI, seen: str | None, now: str | None):
        super().__init__(f"{location} was replaced (generation {seen}, now {now})")
        self.location = location


class GCSStrategy(LotStrategy):
    """covalent-lot's Google Cloud Storage strategy; options from ``[lot.gcs]``."""

    scheme = "gs"
    section = "gcs"
    extra = "gcs"
    sdk_module = "google.cloud.storage"
    backend_path = "covalent_lot.strategies.gcs:GCSBackend"
    options = OPTIONS
    bucket_noun, object_noun, max_key = "GCS bucket", "GCS object", 1024
    bucket_problem = staticmethod(bucket_problem)

    def check_location(self, location: StoreURI) -> None:
        super().check_location(location)
        if location.key.startswith(".well-known/acme-challenge/"):
            raise ValueError(f"GCS refuses object names starting with .well-known/acme-challenge/: "
                             f"{location}; use another prefix")
