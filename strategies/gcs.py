"""Google Cloud Storage (``gs://bucket/key``), on google-cloud-storage.

Objects up to 8 MiB are uploaded in one request (the SDK's multipart upload).
Larger ones go up as a resumable upload session that the SDK opens, with
the bytes streamed from the file, ``chunk_size`` per request (default: all
of them in one): client memory stays near 1 MiB whatever the chunk, and the
object appears only when its last byte is accepted. Downloads are one
streaming GET pinned to the generation that was looked up, so bytes of a
concurrent overwrite are never mixed in. Copies are server-side rewrites.

Credentials are never options (``_gcs_auth``): a key file's path or
Application Default Credentials, resolved on the executor.

Retries belong to the engine (every SDK call passes ``retry=None``), except
within an upload: each request of a resumable upload is retried on its own
(``Backend.retrying``: same policy and error table), so a dropped connection
costs at most one ``chunk_size`` of bytes sent again, not the whole object.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._backend import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import ChecksumMismatchError, Classified, ErrorKind, MissingBucket, http_verdict
from covalent_lot._checksum import from_metadata
from covalent_lot._stream import CoalescingWriter, CountingReader, VerifyingSink
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI

from ._gcs_auth import client_kwargs, credentials_hint

__all__ = ["GCSStrategy", "GCSBackend", "OPTIONS", "CHUNK_MULTIPLE"]

KiB = 1024
MiB = 1024 * KiB
# The resumable upload protocol requires every chunk but the last to be a
# multiple of 256 KiB.
CHUNK_MULTIPLE = 256 * KiB
# Up to this size an upload is one multipart request (the SDK's own threshold,
# blob._MAX_MULTIPART_SIZE); the SDK reads such a file into memory.
MULTIPART_MAX = 8 * MiB
# A streamed request body is read in pieces this large (urllib3 asks for 16 KiB).
SEND_PIECE = 1 * MiB
# A streamed download is read in pieces this large (docs/measurements.md).
GET_PIECE = 1 * MiB
# Connections requests keeps per host (requests.adapters.DEFAULT_POOLSIZE).
REQUESTS_POOL = 10
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
    # The default (one request): the measurements are in docs/measurements.md.
    "chunk_size": Option(
        "size", None,
        "bytes per request of a resumable upload (objects over 8 MiB), a multiple of 256 KiB; "
        "streamed from the file, so memory does not grow with it; a dropped connection sends "
        "up to this much again. Default: the whole object in one request",
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
        # Checksum policy (the SDK's own validation, on top of our lot-* checksum):
        # - uploads send crc32c with the final request, and the service refuses
        #   to finalize an object whose bytes do not match: the only check of
        #   the bytes on their way in (lot-* is metadata, never checked by
        #   the service);
        # - downloads skip it when lot-* is verified anyway (it covers
        #   the whole object end to end) and keep it for objects without
        #   lot-* (written by other tools) or with verify off.
        # Only crc32c, and only with its C extension: the SDK's "auto" falls
        # back to md5 or a pure-Python crc32c, both far slower (docs/measurements.md).
        self._crc32c = "crc32c" if _crc32c_available() else None

    def connect(self):
        # Built on first use (Backend.client), inside the engine's guarded call, so
        # that missing or unreadable credentials become a translated PermissionError.
        from google.cloud import storage

        client = storage.Client(**client_kwargs(self.settings))
        files = self.file_concurrency()
        if files > REQUESTS_POOL:
            # A connection per file moving at once: beyond its pool, requests
            # closes every connection after one request and opens a new one.
            from requests.adapters import HTTPAdapter

            adapter = HTTPAdapter(pool_maxsize=files)
            client._http.mount("https://", adapter)
            client._http.mount("http://", adapter)
        _settle_environment(client._http, client._connection.API_BASE_URL)
        return client

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
        # no extra request per object to learn its lot-* checksum.
        # 1000 is GCS's largest page; asked for explicitly because fake-gcs-server
        # otherwise returns any number of objects in one page.
        blobs = self.client.list_blobs(
            prefix.bucket, prefix=prefix.key, page_size=1000, timeout=self._timeout, retry=None
        )
        for blob in blobs:  # the iterator fetches every page
            yield _remote(StoreURI(prefix.scheme, prefix.bucket, blob.name), blob)

    def put_file(self, local_path: str, location: StoreURI, size: int, digest) -> None:
        blob = self._blob(location)
        checksum = digest()
        if checksum is not None:
            blob.metadata = checksum.metadata()  # sent when the upload starts
        try:
            if size > MULTIPART_MAX:
                self._put_resumable(blob, local_path, size, digest)
            else:
                with open(local_path, "rb") as f:
                    # One request: metadata, bytes and their crc32c together.
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

    def _put_resumable(self, blob, local_path: str, size: int, digest) -> None:
        """A resumable upload: the SDK opens the session (the metadata goes with
        it), then the bytes stream from the file, ``chunk_size`` per request.

        The SDK's own resumable upload would read each chunk into memory, and
        fake-gcs-server re-reads everything received so far on every chunk
        (docs/measurements.md); a streamed request needs neither. Like the SDK,
        a failed request is sent again from its first byte, and the last one
        carries the crc32c of the whole object: the service refuses to
        finalize an object whose bytes differ.
        """
        crc32c = self._whole_crc32c(local_path, digest())
        url = blob.create_resumable_upload_session(
            size=size, timeout=self._timeout, checksum=None, retry=self.retrying
        )
        transport = self.client._http
        per_request = self._chunk_size or size
        offset = 0
        with open(local_path, "rb", buffering=0) as f:
            while True:
                end = min(offset + per_request, size)
                headers = {"Content-Type": _CONTENT_TYPE, "Content-Range": f"bytes {offset}-{end - 1}/{size}"}
                if end == size and crc32c is not None:
                    headers["x-goog-hash"] = f"crc32c={crc32c}"

                def send(offset: int = offset, end: int = end, headers: dict = headers):
                    f.seek(offset)
                    body = _FileRange(f, end - offset, self.sent if self.progress is not None else None)
                    return transport.request("PUT", url, data=body, headers=headers, timeout=self._timeout)

                response = self.retrying(lambda: _upload_reply(send()))()
                if response.status_code != 308:
                    break
                # Not finished: the service says how far it got (it may keep less than was sent).
                kept = _range_end(response.headers.get("range"))
                if kept <= offset:
                    raise ConnectionError(f"the upload session for {blob.name} kept none of the "
                                          f"{end - offset} bytes sent at offset {offset}")
                offset = kept
        received = response.json().get("crc32c")
        if crc32c is not None and received != crc32c:
            raise _media_errors()[0](
                response, f"crc32c mismatch: sent {crc32c}, the service stored {received}"
            )

    def _whole_crc32c(self, local_path: str, checksum) -> str | None:
        """The file's crc32c as GCS writes it (base64 of 4 big-endian bytes): the
        checksum ``digest()`` gave if that is a crc32c, else computed here."""
        if getattr(checksum, "algorithm", None) == "crc32c":
            value = int(checksum.value, 16)
        elif self._crc32c is None:
            return None  # no C extension: a pure-Python crc32c would be far slower than the upload
        else:
            from covalent_lot._checksum import file_checksum

            value = int(file_checksum(local_path, "crc32c")[0].value, 16)
        return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        location = obj.location
        if obj.version is None:
            obj = self.stat(location)
        verified_by_ours = self.settings["verify"] and obj.checksum is not None
        blob = self._blob(location, generation=int(obj.version))
        # The SDK writes in 8 KiB pieces: handed on in larger ones (docs/measurements.md).
        writer = CoalescingWriter(sink)
        try:
            if self._get_streamed(blob, sink, start, check_crc32c=not (verified_by_ours or start)):
                return obj
            # A content-encoded object (gzip, written by another tool): the SDK decodes it.
            # One streaming GET (no chunk_size: ranged requests halve the speed)
            # of exactly the generation whose lot-* checksum we hold.
            blob.download_to_file(
                writer,
                start=start or None,  # a resumed download: the rest only
                timeout=self._timeout,
                # (a crc32c covers whole objects only)
                checksum=None if verified_by_ours or start else self._crc32c,
                retry=None,
            )
            writer.flush()
        except Exception as exc:
            if _is_not_found(exc):
                self._raise_if_changed(obj, exc)
            if _is_data_corruption(exc):
                raise ChecksumMismatchError(
                    f"checksum mismatch for {location}: the crc32c of the bytes received differs "
                    f"from the one the service stored for generation {obj.version} (no lot-* checksum "
                    "to check instead); the object is corrupted at rest or was changed in transit. "
                    "The destination was left untouched."
                ) from exc
            raise
        return obj

    def _get_streamed(self, blob, sink: VerifyingSink, start: int, check_crc32c: bool) -> bool:
        """One streaming GET of ``blob``'s generation from ``start``, read in
        ``GET_PIECE`` pieces straight into the sink; False (nothing written) for
        a content-encoded object, which the SDK's download decodes.

        The SDK reads a response in 8 KiB pieces, which cost more than the bytes
        on a fast link (docs/measurements.md). ``check_crc32c``: compare the
        whole object with the crc32c the service reports (x-goog-hash), as the
        SDK does, for objects without a lot-* checksum.
        """
        client = self.client
        headers = {"accept-encoding": "gzip"}  # as the SDK asks: stored gzip stays gzip
        if start:
            headers["range"] = f"bytes={start}-"
        response = client._http.request("GET", blob._get_download_url(client), headers=headers,
                                        stream=True, timeout=self._timeout)
        with response:
            if response.status_code not in (200, 206):
                from google.api_core import exceptions as gx

                raise gx.from_http_response(response)
            if response.headers.get("content-encoding") or (start and response.status_code != 206):
                return False
            expected = _reported_crc32c(response) if check_crc32c and self._crc32c else None
            crc = 0
            if expected is not None:
                import google_crc32c
            while data := response.raw.read(GET_PIECE, decode_content=False):
                sink.write(data)
                if expected is not None:
                    crc = google_crc32c.extend(crc, data)
            if expected is not None and crc != expected:
                raise _media_errors()[0](response, "the crc32c of the bytes received differs")
        return True

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        if source.version is None:
            source = self.stat(source.location)
        # sourceGeneration pins the bytes whose lot-* checksum is copied with them.
        src = self._blob(source.location, generation=int(source.version))
        # A destination with no properties of its own takes the source's
        # metadata (the lot-* checksum included).
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
        from_metadata(metadata),
        None if generation is None else str(generation),
        epoch_seconds(blob.updated),
    )


_CONTENT_TYPE = "application/octet-stream"  # what the SDK sends for objects without a type


class _FileRange:
    """``length`` bytes of an open file from where it stands, as a request body.

    Read in ``SEND_PIECE`` pieces whatever size is asked (urllib3 asks for
    16 KiB: 64 times the Python calls for the same bytes); ``report(n)`` is
    told of each piece.
    """

    def __init__(self, f, length: int, report: Callable[[int], None] | None):
        self._f = f
        self._length = length
        self._left = length
        self._report = report

    def __len__(self) -> int:  # requests sends it as Content-Length
        return self._length

    def read(self, size: int = -1) -> bytes:
        if not self._left:
            return b""
        data = self._f.read(min(self._left, SEND_PIECE))
        if not data:
            # Not an OSError: urllib3 would take it for a dropped connection and retry.
            raise ValueError(f"upload source {self._f.name!r} ended {self._left} bytes early; it "
                             "was truncated while it was uploaded. Write it completely first.")
        self._left -= len(data)
        if self._report is not None:
            self._report(len(data))
        return data


def _settle_environment(session, url: str) -> None:
    """Look up once what requests otherwise looks up in the environment on every
    request (``trust_env``): proxies for ``url`` (NO_PROXY included), the CA
    bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) and ~/.netrc. Every request of
    this client goes to ``url``'s host. Per request those lookups were about a
    tenth of the client's CPU in a folder of small files (docs/measurements.md).
    """
    if not session.trust_env:
        return
    from requests.utils import get_environ_proxies, get_netrc_auth

    for scheme, proxy in get_environ_proxies(url).items():
        session.proxies.setdefault(scheme, proxy)
    if session.verify is True:
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    if session.auth is None:
        session.auth = get_netrc_auth(url)
    session.trust_env = False


def _upload_reply(response):
    """The response to one request of a resumable upload: 200/201 (finished) or
    308 (more to send); any other status raised as the API's error."""
    if response.status_code in (200, 201, 308):
        return response
    from google.api_core import exceptions as gx

    raise gx.from_http_response(response)


def _reported_crc32c(response) -> int | None:
    """The crc32c in a response's ``x-goog-hash: crc32c=<base64>,md5=...``, if any."""
    for part in response.headers.get("x-goog-hash", "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "crc32c":
            return int.from_bytes(base64.b64decode(value), "big")
    return None


def _range_end(value: str | None) -> int:
    """The offset after the bytes a 308's ``Range: bytes=0-N`` says are kept (0 without one)."""
    if not value:
        return 0
    match = re.fullmatch(r"bytes=0-(\d+)", value.strip())
    if match is None:
        raise ConnectionError(f"unexpected Range header in a resumable upload's reply: {value!r}")
    return int(match.group(1)) + 1


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
