"""The GCS adapter without a server: options, name checks, the error table, credentials."""

from __future__ import annotations

import json

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


# --- without the SDK ------------------------------------------------------------------------

