"""The GCS adapter without a server: options, name checks, the error table, credentials."""

from __future__ import annotations

import io
import json
import os

import cloudpickle
import pytest
import requests
import urllib3
from google.api_core import exceptions as gx
from google.auth import exceptions as ax

from covalent_lot._engine import Engine
from covalent_lot._errors import TRANSIENT, ErrorKind, translate
from covalent_lot._retry import RetryPolicy
from covalent_lot._uri import StoreURI

from .lot_fakes import EXPECTED_TYPE

ENDPOINT = "http://127.0.0.1:9"
KiB = 1024
MiB = 1024 * KiB



@pytest.fixture(scope="module")
def gcs():
    from covalent_lot.strategies import gcs

    return gcs


@pytest.fixture(scope="module")
def strategy(gcs):
    return gcs.GCSStrategy(endpoint=ENDPOINT, project="test")


@pytest.fixture
def backend(gcs, strategy):
    # The client is built lazily, on the first request: no network here.
    backend = gcs.GCSBackend(strategy.settings.as_dict())
    yield backend
    backend.close()


# --- construction and options -------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (256 * KiB, 256 * KiB), ("32MiB", 32 * MiB), ("8 MiB", 8 * MiB), (100 * MiB, 100 * MiB),
    ("1280KiB", 1280 * KiB),
])
def test_chunk_size_multiples_of_256_kib(gcs, value, expected):
    assert gcs.GCSStrategy(chunk_size=value).settings["chunk_size"] == expected


@pytest.mark.parametrize("value", [300 * KiB, "10MB", 1_000_000, 256 * KiB + 1])
def test_chunk_size_not_a_multiple_is_refused(gcs, value):
    with pytest.raises(ValueError) as info:
        gcs.GCSStrategy(chunk_size=value)
    message = str(info.value)
    assert "chunk_size" in message and "multiple of 256 KiB" in message and "argument" in message


@pytest.mark.parametrize("value", [-1, 0, 128 * KiB, "-5MiB", "lots"])
def test_chunk_size_too_small_negative_or_garbage(gcs, value):
    with pytest.raises(ValueError, match="chunk_size"):
        gcs.GCSStrategy(chunk_size=value)


def test_chunk_size_error_names_the_environment_variable(gcs, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_GCS_CHUNK_SIZE", "1000000")
    with pytest.raises(ValueError, match="COVALENT_LOT_GCS_CHUNK_SIZE"):
        gcs.GCSStrategy()


def test_options_from_the_environment(gcs, monkeypatch):
    monkeypatch.setenv("COVALENT_LOT_GCS_ENDPOINT", "http://127.0.0.1:4443")
    monkeypatch.setenv("COVALENT_LOT_GCS_PROJECT", "p1")
    monkeypatch.setenv("COVALENT_LOT_GCS_TIMEOUT", "7.5")
    monkeypatch.setenv("COVALENT_LOT_GCS_CHUNK_SIZE", "16MiB")
    settings = gcs.GCSStrategy().settings
    assert (settings["endpoint"], settings["project"], settings["timeout"], settings["chunk_size"]) == (
        "http://127.0.0.1:4443", "p1", 7.5, 16 * MiB)
    assert gcs.GCSStrategy(project="p2").settings["project"] == "p2"  # argument wins


def test_options_from_covalent_conf(gcs, covalent_conf):
    covalent_conf({"gcs": {"chunk_size": "64MiB", "project": "conf-project"}})
    settings = gcs.GCSStrategy().settings
    assert settings["chunk_size"] == 64 * MiB and settings["project"] == "conf-project"
    covalent_conf({"gcs": {"chunk_size": "1000000"}})
    with pytest.raises(ValueError, match=r"\[lot.gcs\]"):
        gcs.GCSStrategy()


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_bad_timeouts(gcs, value):
    with pytest.raises(ValueError, match="timeout"):
        gcs.GCSStrategy(timeout=value)


@pytest.mark.parametrize("value", ["127.0.0.1:4443", "ftp://host", "http://", "localhost"])
def test_endpoint_must_be_an_http_url(gcs, value):
    with pytest.raises(ValueError, match="endpoint"):
        gcs.GCSStrategy(endpoint=value)


def test_credentials_file_must_be_absolute(gcs):
    with pytest.raises(ValueError, match="absolute"):
        gcs.GCSStrategy(credentials_file="key.json")
    assert gcs.GCSStrategy(credentials_file="/nowhere/key.json").settings["credentials_file"] == "/nowhere/key.json"
    assert gcs.GCSStrategy(credentials_file="~/key.json").settings["credentials_file"] == "~/key.json"


# --- bucket and key rules ----------------------------------------------------------------

def test_object_names_up_to_1024_utf8_bytes(strategy):
    assert strategy.parse("gs://bkt/" + "k" * 1024).key == "k" * 1024
    with pytest.raises(ValueError, match="1024 bytes"):
        strategy.parse("gs://bkt/" + "€" * 342)


def test_acme_challenge_prefix_is_refused(strategy):
    with pytest.raises(ValueError, match="acme-challenge"):
        strategy.parse("gs://bkt/.well-known/acme-challenge/token")


# --- the error table ----------------------------------------------------------------------

API_CASES = [
    (gx.NotFound("No such object: bkt/k"), ErrorKind.NOT_FOUND),
    (gx.Forbidden("caller does not have storage.objects.get access"), ErrorKind.DENIED),
    (gx.Unauthorized("Invalid Credentials"), ErrorKind.DENIED),
    (gx.PreconditionFailed("conditionNotMet"), ErrorKind.EXISTS),
    (gx.Conflict("conflict"), ErrorKind.EXISTS),
    (gx.TooManyRequests("rateLimitExceeded"), ErrorKind.THROTTLED),
    (gx.ServiceUnavailable("backendError"), ErrorKind.THROTTLED),
    (gx.InternalServerError("internalError"), ErrorKind.SERVER),
    (gx.BadGateway("bad gateway"), ErrorKind.SERVER),
    (gx.GatewayTimeout("gateway timeout"), ErrorKind.TIMEOUT),
    (gx.BadRequest("invalid argument"), ErrorKind.INVALID),
    (gx.MethodNotAllowed("no"), ErrorKind.OTHER),
    (gx.RequestRangeNotSatisfiable("range"), ErrorKind.OTHER),
]


@pytest.mark.parametrize("exc, kind", API_CASES, ids=[type(e).__name__ for e, _ in API_CASES])
def test_api_errors(backend, exc, kind):
    verdict = backend.classify(exc)
    assert verdict is not None and verdict.kind is kind
    assert verdict.transient is (kind in TRANSIENT)
    assert type(exc).__name__ in verdict.detail and exc.message in verdict.detail
    err = translate(verdict, action="download", target="gs://bkt/k", endpoint=backend.endpoint)
    assert type(err) is EXPECTED_TYPE[kind]
    assert str(err).startswith("download gs://bkt/k: ") and f"[endpoint {ENDPOINT}]" in str(err)


def _data_corruption(gcs):
    return gcs._media_errors()[0](None, "Checksum mismatch while downloading")


SDK_CASES = [
    (lambda: requests.exceptions.ConnectionError("refused"), ErrorKind.CONNECTION),
    (lambda: requests.exceptions.ConnectTimeout("connect timed out"), ErrorKind.TIMEOUT),
    (lambda: requests.exceptions.ReadTimeout("read timed out"), ErrorKind.TIMEOUT),
    (lambda: requests.exceptions.ChunkedEncodingError("broken stream"), ErrorKind.CONNECTION),
    (lambda: urllib3.exceptions.ProtocolError("Connection aborted."), ErrorKind.CONNECTION),
    (lambda: urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"), ErrorKind.TIMEOUT),
    (lambda: ax.DefaultCredentialsError("Your default credentials were not found."), ErrorKind.DENIED),
    (lambda: ax.RefreshError("invalid_grant: Invalid JWT Signature."), ErrorKind.DENIED),
    (lambda: ax.RefreshError("metadata server hiccup", retryable=True), ErrorKind.CONNECTION),
    (lambda: ax.TransportError("Failed to retrieve token"), ErrorKind.CONNECTION),
    (lambda: ConnectionResetError("reset by peer"), ErrorKind.CONNECTION),
    (lambda: TimeoutError("slow"), ErrorKind.TIMEOUT),
]


@pytest.mark.parametrize("make, kind", SDK_CASES, ids=[f"{i}-{k.name}" for i, (_, k) in enumerate(SDK_CASES)])
def test_transport_and_auth_errors(backend, make, kind):
    exc = make()
    verdict = backend.classify(exc)
    assert verdict is not None and verdict.kind is kind, exc
    assert verdict.transient is (kind in TRANSIENT)
    err = translate(verdict, action="upload to", target="gs://bkt/k", endpoint=backend.endpoint)
    assert type(err) is EXPECTED_TYPE[kind]
    assert "gs://bkt/k" in str(err) and ENDPOINT in str(err)


def test_credentials_hints(gcs):
    adc = gcs.GCSBackend(gcs.GCSStrategy().settings.as_dict())
    verdict = adc.classify(ax.DefaultCredentialsError("not found"))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in verdict.hint and "credentials_file" in verdict.hint
    keyed = gcs.GCSBackend(gcs.GCSStrategy(credentials_file="/keys/sa.json").settings.as_dict())
    verdict = keyed.classify(ax.RefreshError("invalid_grant"))
    assert verdict.kind is ErrorKind.DENIED and "/keys/sa.json" in verdict.hint


def test_data_corruption_on_upload_is_transient(backend, gcs):
    verdict = backend.classify(_data_corruption(gcs))
    assert verdict.kind is ErrorKind.SERVER and "crc32c" in verdict.detail


def test_checksum_mismatch_raised_from_data_corruption_is_left_to_the_engine(backend, gcs):
    from covalent_lot import ChecksumMismatchError

    try:
        raise ChecksumMismatchError("checksum mismatch for gs://bkt/k") from _data_corruption(gcs)
    except ChecksumMismatchError as exc:
        assert backend.classify(exc) is None


def test_invalid_response_uses_its_status(backend, gcs):
    class Response:
        status_code = 503

    verdict = backend.classify(gcs._media_errors()[1](Response(), "unexpected"))
    assert verdict.kind is ErrorKind.THROTTLED


def test_retry_error_is_judged_by_its_cause(backend):
    exc = gx.RetryError("Deadline of 120.0s exceeded", gx.ServiceUnavailable("backendError"))
    assert backend.classify(exc).kind is ErrorKind.THROTTLED


def test_changed_marker(backend, gcs):
    changed = gcs._Changed(StoreURI("gs", "bkt", "k"), "1", "2")
    verdict = backend.classify(changed)
    assert verdict.kind is ErrorKind.EXISTS and not verdict.transient
    assert "generation 1, now 2" in verdict.detail


def test_endpoint_property(gcs, backend, monkeypatch):
    assert backend.endpoint == ENDPOINT
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert gcs.GCSBackend(gcs.GCSStrategy().settings.as_dict()).endpoint == "https://storage.googleapis.com"
    slash = gcs.GCSBackend(gcs.GCSStrategy(endpoint=ENDPOINT + "/").settings.as_dict())
    assert slash.endpoint == ENDPOINT


# --- credentials: built on the executor, from a path or ADC, never carried -----------------

def test_anonymous_client_for_an_endpoint(backend):
    from google.auth.credentials import AnonymousCredentials

    client = backend.client
    assert isinstance(client._credentials, AnonymousCredentials)
    assert client.project == "test"
    assert backend.endpoint == ENDPOINT


@pytest.mark.parametrize("max_files, pool", [(8, 10), (32, 32)])
def test_a_connection_per_file_thread(gcs, max_files, pool):
    backend = gcs.GCSBackend(gcs.GCSStrategy(endpoint=ENDPOINT, max_files=max_files).settings.as_dict())
    adapter = backend.client._http.get_adapter(ENDPOINT)
    assert adapter._pool_maxsize == pool  # requests' default (10) unless more files move at once
    backend.close()


def test_environment_is_read_once_per_client(gcs, monkeypatch, tmp_path):
    # What requests would read from the environment on every request (proxies,
    # NO_PROXY, CA bundle, ~/.netrc) is read when the client is built, as requests
    # would have resolved it for the endpoint; later requests do not look again.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/some-bundle.pem")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    backend = gcs.GCSBackend(gcs.GCSStrategy(endpoint=ENDPOINT).settings.as_dict())
    session = backend.client._http
    assert session.trust_env is False
    assert session.proxies["http"] == "http://proxy.example:3128"
    assert session.verify == "/etc/some-bundle.pem"
    assert session.auth == ("someone", "secret")
    backend.close()

    # An endpoint NO_PROXY names goes direct, as requests decides per request.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("HOME", str(tmp_path))
    backend = gcs.GCSBackend(gcs.GCSStrategy(endpoint=ENDPOINT).settings.as_dict())
    session = backend.client._http
    assert "http" not in session.proxies and session.verify is True and session.auth is None
    backend.close()


def test_missing_credentials_file_is_a_permission_error(gcs, tmp_path):
    missing = str(tmp_path / "no-such-key.json")
    backend = gcs.GCSBackend(gcs.GCSStrategy(credentials_file=missing, max_attempts=1).settings.as_dict())
    engine = Engine(backend, RetryPolicy(max_attempts=1))
    with pytest.raises(PermissionError) as info:
        engine.ls(StoreURI("gs", "bkt", "k"))
    assert missing in str(info.value) and "credentials_file" in str(info.value)
    assert isinstance(info.value.__cause__, ax.DefaultCredentialsError)


def test_no_application_default_credentials_is_a_permission_error(gcs, tmp_path, monkeypatch):
    import google.auth._default as adc

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    # Never ask a metadata server from a unit test.
    monkeypatch.setattr(adc, "_get_gce_credentials", lambda *a, **k: (None, None))
    backend = gcs.GCSBackend(gcs.GCSStrategy().settings.as_dict())
    engine = Engine(backend, RetryPolicy(max_attempts=2, base_delay=0))
    calls = []
    stat = backend.stat
    monkeypatch.setattr(backend, "stat", lambda where: calls.append(where) or stat(where))
    with pytest.raises(PermissionError) as info:
        engine.ls(StoreURI("gs", "bkt", "k"))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert len(calls) == 1  # not retried


def _service_account_json(project: str = "lot-unit-project") -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": "0123abcd",
        "private_key": pem, "client_email": f"lot-unit@{project}.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    })


def test_credentials_file_is_read_on_the_executor(gcs, tmp_path):
    key = tmp_path / "sa.json"
    key.write_text(_service_account_json())
    backend = gcs.GCSBackend(gcs.GCSStrategy(credentials_file=str(key)).settings.as_dict())
    client = backend.client  # no network: the token is fetched on the first request
    assert client._credentials.service_account_email == "lot-unit@lot-unit-project.iam.gserviceaccount.com"
    assert client.project == "lot-unit-project"  # from the key, as no project is set
    assert backend.endpoint == "https://storage.googleapis.com"
    explicit = gcs.GCSBackend(gcs.GCSStrategy(credentials_file=str(key), project="other").settings.as_dict())
    assert explicit.client.project == "other"


@pytest.mark.parametrize("content", ["not json", json.dumps({"type": "authorized_user"})])
def test_unusable_credentials_file_is_a_permission_error(gcs, tmp_path, content):
    key = tmp_path / "bad.json"
    key.write_text(content)
    backend = gcs.GCSBackend(gcs.GCSStrategy(credentials_file=str(key)).settings.as_dict())
    engine = Engine(backend, RetryPolicy(max_attempts=1))
    with pytest.raises(PermissionError, match="not a readable service-account key"):
        engine.ls(StoreURI("gs", "bkt", "k"))


SA_SECRETS = ("-----BEGIN PRIVATE KEY-----\nMIIlotUnitFakeKeyMaterial\n-----END PRIVATE KEY-----\n",
              "lotunitfakeprivatekeyid0123456789")


def test_pickled_transfer_call_carries_the_path_not_the_key(gcs, tmp_path, monkeypatch):
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": SA_SECRETS[1],
        "private_key": SA_SECRETS[0], "client_email": "lot@p.iam.gserviceaccount.com",
    }))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    from covalent._file_transfer.file import File

    strategy = gcs.GCSStrategy(credentials_file=str(key), project="p")
    blobs = [cloudpickle.dumps(strategy)]
    for call in (strategy.download(File("gs://bkt/runs/x.npy"), File("/tmp/lot-unit/x.npy")),
                 strategy.upload(File("/tmp/lot-unit/x.npy"), File("gs://bkt/runs/x.npy"))):
        blob = cloudpickle.dumps(call)
        blobs.append(blob)
        assert str(key).encode() in blob
        assert vars(cloudpickle.loads(blob)) == vars(call)
    for blob in blobs:
        for secret in (*SA_SECRETS, "MIIlotUnitFakeKeyMaterial"):
            assert secret.encode() not in blob


# --- streamed resumable uploads (objects over 8 MiB), against an in-process transport ----------

class FakeUploads(requests.adapters.BaseAdapter):
    """Just enough of GCS's JSON upload API for one bucket: resumable sessions
    (initiation, ranged PUTs answered 308/200) and object deletes; every request
    recorded. ``fail`` holds, per PUT number (1-based), an exception to raise
    after reading the body; ``keep_less`` makes the service keep fewer bytes
    than sent on a PUT; ``corrupt`` makes it store a flipped byte."""

    def __init__(self):
        super().__init__()
        self.requests: list[tuple[str, str, dict]] = []
        self.sessions: dict[str, dict] = {}
        self.objects: dict[str, tuple[bytes, dict]] = {}
        self.fail: dict[int, BaseException] = {}
        self.keep_less: dict[int, int] = {}
        self.corrupt = False
        self.puts = 0
        self.reported: dict[str, str] = {}  # x-goog-hash values a GET reports instead of the true ones

    def send(self, request, **kwargs):
        import urllib.parse

        url = urllib.parse.urlsplit(request.url)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path.endswith("/b/bkt"):  # the SDK's own bucket lookup (google-cloud-storage 3.x: a cache)
            return self._reply(request, 404, {"error": {"code": 404, "message": "Not Found"}})
        self.requests.append((request.method, request.url, dict(request.headers)))
        if request.method == "POST" and query.get("uploadType") == "resumable":
            upload_id = str(len(self.sessions) + 1)
            self.sessions[upload_id] = {"meta": json.loads(request.body or b"{}"), "data": bytearray()}
            location = f"{ENDPOINT}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id={upload_id}"
            return self._reply(request, 200, {}, {"Location": location})
        if request.method == "PUT" and "upload_id" in query:
            self.puts += 1
            body = request.body
            data = b"".join(iter(lambda: body.read(16 * KiB), b"")) if hasattr(body, "read") else (body or b"")
            assert len(data) == int(request.headers.get("Content-Length", 0))
            if self.puts in self.fail:
                raise self.fail.pop(self.puts)
            session = self.sessions[query["upload_id"]]
            first, _, total = request.headers["Content-Range"][len("bytes "):].partition("/")
            start, _, _end = first.partition("-")
            assert int(start) == len(session["data"]), "a request must start where the kept bytes end"
            data = data[:len(data) - self.keep_less.pop(self.puts, 0)]
            session["data"] += data
            if len(session["data"]) < int(total):
                return self._reply(request, 308, {}, {"Range": f"bytes=0-{len(session['data']) - 1}"})
            stored = bytes(session["data"])
            if self.corrupt:
                stored = bytes([stored[0] ^ 1]) + stored[1:]
            name = session["meta"]["name"]
            self.objects[name] = (stored, session["meta"])
            return self._reply(request, 200, {"name": name, "generation": "7", "crc32c": _crc32c_b64(stored)})
        if request.method == "GET" and query.get("alt") == "media":
            data, _meta = self.objects[urllib.parse.unquote(url.path.rsplit("/", 1)[-1])]
            start = int(request.headers.get("range", "bytes=0-")[len("bytes="):].rstrip("-"))
            response = self._reply(request, 206 if start else 200, None,
                                   {"x-goog-hash": f"crc32c={self.reported.get('crc32c', _crc32c_b64(data))}"})
            response.raw = urllib3.response.HTTPResponse(body=io.BytesIO(data[start:]), preload_content=False)
            return response
        if request.method == "POST" and query.get("uploadType") == "multipart":
            return self._reply(request, 200, {"name": "k", "generation": "1"})  # bytes not kept
        if request.method == "DELETE":
            self.objects.pop(url.path.rsplit("/", 1)[-1], None)
            return self._reply(request, 204, None)
        return self._reply(request, 404, {"error": {"code": 404, "message": "Not Found"}})

    @staticmethod
    def _reply(request, status, payload, headers=None):
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers or {})
        response._content = b"" if payload is None else json.dumps(payload).encode()
        response.request = request
        response.url = request.url
        return response

    def close(self):
        pass


def _crc32c_b64(data: bytes) -> str:
    import base64

    import google_crc32c

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _crc32c_checksum(data: bytes):
    """What the engine's digest() gives when uploads store a crc32c."""
    import google_crc32c

    from covalent_lot._checksum import Checksum

    return Checksum("crc32c", f"{google_crc32c.value(data):08x}")


@pytest.fixture
def uploads(gcs):
    """(make_backend(**options), transport): backends whose requests go to one FakeUploads."""
    fake = FakeUploads()
    made = []

    def make(**options):
        backend = gcs.GCSBackend(gcs.GCSStrategy(endpoint=ENDPOINT, project="test", base_delay=0,
                                                 **options).settings.as_dict())
        backend.client._http.mount(ENDPOINT + "/", fake)
        made.append(backend)
        return backend

    yield make, fake
    for backend in made:
        backend.close()


def _source(tmp_path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return str(path), data


def _puts(fake: FakeUploads) -> list[dict]:
    return [headers for method, url, headers in fake.requests if method == "PUT"]


def test_resumable_upload_streams_chunk_size_per_request(uploads, tmp_path):
    make, fake = uploads
    backend = make(chunk_size="8MiB")
    sent = []
    backend.progress = sent.append
    path, data = _source(tmp_path, 20 * MiB + 4321)
    backend.put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    stored, meta = fake.objects["k"]
    assert stored == data
    puts = _puts(fake)
    assert [h["Content-Range"] for h in puts] == [
        f"bytes 0-{8 * MiB - 1}/{len(data)}", f"bytes {8 * MiB}-{16 * MiB - 1}/{len(data)}",
        f"bytes {16 * MiB}-{len(data) - 1}/{len(data)}"]
    # Only the last request carries the whole object's crc32c (computed here: no crc32c was given).
    assert [h.get("x-goog-hash") for h in puts] == [None, None, f"crc32c={_crc32c_b64(data)}"]
    assert sum(sent) == len(data) and max(sent) <= 1 * MiB  # read in 1 MiB pieces, not all at once


def test_resumable_upload_is_one_request_by_default(uploads, tmp_path):
    make, fake = uploads
    path, data = _source(tmp_path, 9 * MiB + 1)
    checksum = _crc32c_checksum(data)
    make().put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: checksum)
    assert fake.objects["k"][0] == data
    (put,) = _puts(fake)
    assert put["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    assert put["x-goog-hash"] == f"crc32c={_crc32c_b64(data)}"  # the crc32c the engine computed


def test_resumable_upload_sends_the_checksum_metadata_when_the_session_starts(uploads, tmp_path, gcs):
    make, fake = uploads
    path, data = _source(tmp_path, 9 * MiB)
    checksum = _crc32c_checksum(data)
    make().put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: checksum)
    ((method, url, _headers), *_rest) = fake.requests
    assert method == "POST" and "uploadType=resumable" in url
    meta = fake.objects["k"][1]
    assert meta["name"] == "k", meta
    assert any(key.startswith("lot-") for key in meta.get("metadata", {})), meta  # travels with the session


def test_small_files_stay_one_multipart_request(uploads, tmp_path):
    make, fake = uploads
    path, data = _source(tmp_path, 8 * MiB)
    make().put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    assert [(m, "uploadType=multipart" in u) for m, u, h in fake.requests] == [("POST", True)]


def test_a_failed_request_is_sent_again_from_its_first_byte(uploads, tmp_path):
    make, fake = uploads
    fake.fail[2] = requests.exceptions.ConnectionError("connection reset")
    backend = make(chunk_size="4MiB")
    path, data = _source(tmp_path, 10 * MiB)
    backend.put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    assert fake.objects["k"][0] == data
    ranges = [h["Content-Range"] for h in _puts(fake)]
    assert ranges[1] == ranges[2] == f"bytes {4 * MiB}-{8 * MiB - 1}/{len(data)}"
    assert len(ranges) == 4


def test_the_upload_goes_on_from_where_the_service_kept_bytes(uploads, tmp_path):
    make, fake = uploads
    fake.keep_less[1] = 256 * KiB  # a 308 that keeps less than was sent
    path, data = _source(tmp_path, 10 * MiB)
    make(chunk_size="4MiB").put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    assert fake.objects["k"][0] == data
    assert _puts(fake)[1]["Content-Range"].startswith(f"bytes {4 * MiB - 256 * KiB}-")


def test_crc32c_mismatch_removes_the_object_and_is_retried_by_the_engine(uploads, tmp_path, gcs):
    make, fake = uploads
    fake.corrupt = True
    backend = make()
    path, data = _source(tmp_path, 9 * MiB)
    with pytest.raises(gcs._media_errors()[0]) as info:
        backend.put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    assert "k" not in fake.objects  # never left visible
    deletes = [u for m, u, h in fake.requests if m == "DELETE"]
    assert len(deletes) == 1 and "generation=7" in deletes[0]
    assert backend.classify(info.value).transient


def test_service_errors_keep_their_status(uploads, tmp_path, gcs):
    make, fake = uploads
    backend = make(max_attempts=1)

    def gone(request, **kwargs):
        if request.method == "PUT":
            return FakeUploads._reply(request, 503, {"error": {"code": 503, "message": "backendError"}})
        return FakeUploads.send(fake, request, **kwargs)

    fake.send = gone
    path, data = _source(tmp_path, 9 * MiB)
    with pytest.raises(gx.ServiceUnavailable):
        backend.put_file(path, StoreURI("gs", "bkt", "k"), len(data), lambda: None)
    assert backend.classify(gx.ServiceUnavailable("x")).transient


def _download(backend, tmp_path, obj, start: int = 0) -> bytes:
    from covalent_lot._stream import VerifyingSink

    path = tmp_path / "out.bin"
    with open(path, "wb+") as f:
        sink = VerifyingSink(f, None)
        sink.seek(start)
        backend.get_into(obj, sink, start)
        sink.close()
    return path.read_bytes()[start:]


def test_download_is_one_get_of_the_generation_read_in_large_pieces(uploads, tmp_path):
    make, fake = uploads
    backend = make()
    data = os.urandom(3 * MiB + 5)
    fake.objects["k"] = (data, {})
    sizes = []
    backend.progress = None
    from covalent_lot._backend import RemoteObject

    obj = RemoteObject(StoreURI("gs", "bkt", "k"), len(data), None, "7")
    from covalent_lot._stream import VerifyingSink

    with open(tmp_path / "out.bin", "wb+") as f:
        sink = VerifyingSink(f, None, on_bytes=sizes.append)
        backend.get_into(obj, sink)
        sink.close()
    assert (tmp_path / "out.bin").read_bytes() == data
    assert sizes == [MiB, MiB, MiB, 5]
    ((method, url, headers),) = fake.requests
    assert method == "GET" and "generation=7" in url and "range" not in {h.lower() for h in headers}


def test_a_resumed_download_asks_for_the_rest(uploads, tmp_path):
    make, fake = uploads
    data = os.urandom(2 * MiB)
    fake.objects["k"] = (data, {})
    from covalent_lot._backend import RemoteObject

    obj = RemoteObject(StoreURI("gs", "bkt", "k"), len(data), None, "7")
    assert _download(make(), tmp_path, obj, start=MiB + 1) == data[MiB + 1:]
    assert fake.requests[0][2]["range"] == f"bytes={MiB + 1}-"


def test_download_without_a_lot_checksum_checks_the_services_crc32c(uploads, tmp_path):
    from covalent_lot import ChecksumMismatchError
    from covalent_lot._backend import RemoteObject

    make, fake = uploads
    data = os.urandom(MiB)
    fake.objects["k"] = (data, {})
    fake.reported["crc32c"] = _crc32c_b64(data[1:])
    obj = RemoteObject(StoreURI("gs", "bkt", "k"), len(data), None, "7")
    with pytest.raises(ChecksumMismatchError, match="crc32c"):
        _download(make(), tmp_path, obj)
    # With a lot-* checksum the engine checks the whole file itself: the service's is not asked for.
    checked = RemoteObject(StoreURI("gs", "bkt", "k"), len(data), _crc32c_checksum(data), "7")
    assert _download(make(), tmp_path, checked) == data


# --- without the SDK ------------------------------------------------------------------------

