"""The Azure adapter without a server: options, names, credentials by reference, the error table.

Everything here goes through the strategy, the engine or the backend's seam,
with the SDK's own classes (clients that send nothing, exceptions, models);
what needs a service is in integration/ (Azurite).
"""

from __future__ import annotations

import base64
import sys

import pytest
import requests
from azure.core import exceptions as ax
from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse
from azure.storage.blob import BlobProperties, CopyProperties

from covalent_lot._checksum import Checksum
from covalent_lot._backend import RemoteObject
from covalent_lot._engine import Engine
from covalent_lot._errors import TRANSIENT, ErrorKind, translate
from covalent_lot._retry import RetryPolicy
from covalent_lot._uri import StoreURI

from .lot_fakes import EXPECTED_TYPE, counting

MiB = 1024 * 1024
URL = "http://127.0.0.1:9/devstoreaccount1"
TARGET = "az://cont/runs/x.npy"
LOCATION = StoreURI("az", "cont", "runs/x.npy")

# Recognisable fakes: none of them may appear in messages.
# Shaped like a real account key: 64 bytes, base64 (88 characters ending in "==").
FAKE_KEY = base64.b64encode(b"lot-unit-fake-azure-account-key-0123456789abcdef0123456789abcdef").decode()
FAKE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=lotunitacct;"
    f"AccountKey={FAKE_KEY};BlobEndpoint=http://127.0.0.1:9/lotunitacct;"
)
FAKE_SAS = "sv=2021-08-06&ss=b&srt=sco&sp=rl&se=2030-01-01T00:00:00Z&sig=LotUnitFakeSasSignature%2Bxyz%3D"
SECRETS = {
    "AZURE_STORAGE_CONNECTION_STRING": FAKE_CONNECTION_STRING,
    "AZURE_STORAGE_KEY": FAKE_KEY,
    "AZURE_STORAGE_SAS_TOKEN": FAKE_SAS,
}


@pytest.fixture(autouse=True)
def no_azure_env(monkeypatch):
    """No credential or option from the outer shell."""
    for name in list(SECRETS) + ["AZURE_STORAGE_ACCOUNT"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def az():
    """The strategy module, imported once conftest has isolated Covalent's home."""
    from covalent_lot.strategies import azure

    return azure


@pytest.fixture(scope="module")
def auth(az):
    return sys.modules["covalent_lot.strategies._azure_auth"]  # imported by azure


@pytest.fixture(scope="module")
def strategy(az):
    return az.AzureStrategy(account_url=URL)


@pytest.fixture
def backend(az, strategy):
    backend = az.AzureBackend(strategy.settings)
    yield backend
    backend.close()


def make_backend(az, **options):
    return az.AzureBackend(az.AzureStrategy(**options).settings)


def engine_for(backend) -> Engine:
    return Engine(backend, RetryPolicy(max_attempts=3, base_delay=0, max_delay=0))


def read(backend):
    """Stat TARGET through the engine, as a download starts: credentials resolve first."""
    return engine_for(backend).ls(LOCATION)


def http_error(cls, status: int, code: str | None = None, message: str = "the service says so"):
    """The SDK's exception for one error response, as azure-storage-blob raises it."""
    raw = requests.Response()
    raw.status_code, raw.reason, raw._content = status, "reason", b""
    err = cls(message=message, response=RequestsTransportResponse(HttpRequest("GET", URL), raw))
    err.error_code = code  # what azure-storage-blob's process_storage_error sets
    return err


# --- construction and options ----------------------------------------------------------------

def test_sizes_accept_units(az):
    settings = az.AzureStrategy(max_block_size="16MiB", max_single_put_size="32 MiB").settings
    assert settings["max_block_size"] == 16 * MiB and settings["max_single_put_size"] == 32 * MiB


@pytest.mark.parametrize(
    "options, match",
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_block_size": -1}, "max_block_size"),
        ({"max_block_size": 1024}, "max_block_size"),
        ({"max_block_size": "4001MiB"}, "max_block_size"),
        ({"max_single_put_size": -1}, "max_single_put_size"),
        ({"max_single_put_size": "5001MiB"}, "max_single_put_size"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"read_timeout": "soon"}, "read_timeout"),
        ({"copy_timeout": -5}, "copy_timeout"),
        ({"credential": "password"}, "credential"),
        ({"account_name": "Bad_Name"}, "account_name"),
        ({"account_url": "ftp://host/acct"}, "account_url"),
        ({"account_url": "not a url"}, "account_url"),
    ],
)
def test_bad_options(az, options, match):
    with pytest.raises(ValueError, match=match) as info:
        az.AzureStrategy(**options)
    assert type(info.value) is ValueError


def test_unknown_conf_key(az, covalent_conf):
    covalent_conf({"azure": {"acount_url": URL}})
    with pytest.raises(ValueError, match=r"unknown key 'acount_url' in \[lot.azure\].*account_url"):
        az.AzureStrategy()


def test_account_url_with_a_sas_is_refused_without_echoing_it(az):
    with pytest.raises(ValueError) as info:
        az.AzureStrategy(account_url=f"https://acct.blob.core.windows.net/?{FAKE_SAS}")
    message = str(info.value)
    assert "account_url" in message and "AZURE_STORAGE_SAS_TOKEN" in message
    assert "LotUnitFakeSasSignature" not in message and "sig=" not in message


def test_account_url_with_user_info_is_refused(az):
    with pytest.raises(ValueError, match="user info") as info:
        az.AzureStrategy(account_url="https://user:pa55word@acct.blob.core.windows.net")
    assert "pa55word" not in str(info.value)


@pytest.mark.parametrize("option", ["connection_string_env", "account_key_env", "sas_token_env"])
@pytest.mark.parametrize("value", [FAKE_CONNECTION_STRING, FAKE_KEY, FAKE_SAS, "MY-VAR", ""])
def test_env_options_must_be_variable_names_and_are_never_echoed(az, option, value):
    with pytest.raises(ValueError, match=option) as info:
        az.AzureStrategy(**{option: value})
    if value:
        assert value not in str(info.value)


def test_env_options_accept_other_names(az):
    settings = az.AzureStrategy(account_key_env="MY_TEAM_KEY", credential="account_key",
                                account_name="myacct").settings
    assert settings["account_key_env"] == "MY_TEAM_KEY"


@pytest.mark.parametrize(
    "options, match",
    [({"credential": mode}, "account_url or account_name")
     for mode in ("account_key", "sas_token", "azure_identity", "anonymous")]
    + [({"credential": "azure_identity", "account_url": URL}, "https")],  # tokens only over https
)
def test_explicit_credential_needs_the_account(az, options, match):
    with pytest.raises(ValueError, match=match):
        az.AzureStrategy(**options)


def test_account_name_builds_the_default_url(az):
    assert make_backend(az, account_name="myacct").endpoint == "https://myacct.blob.core.windows.net"
    # https, so DefaultAzureCredential may send its tokens there.
    az.AzureStrategy(credential="azure_identity", account_name="myacct")


def test_repr_shows_only_what_was_set(az):
    assert repr(az.AzureStrategy(account_url=URL)) == f"AzureStrategy(account_url={URL!r})"


# --- container and blob names ------------------------------------------------------------------

def test_blob_name_limits_count_characters(strategy):
    assert strategy.parse("az://cont/" + "€" * 1024).key == "€" * 1024  # 3072 bytes, 1024 characters
    with pytest.raises(ValueError, match="1024 characters"):
        strategy.parse("az://cont/" + "k" * 1025)
    assert strategy.parse("az://cont/" + "/".join("s" * 254)).key
    with pytest.raises(ValueError, match="254 path segments"):
        strategy.parse("az://cont/" + "/".join("s" * 255))


def test_folder_uris(strategy):
    assert strategy.parse("az://cont/").is_folder
    assert strategy.parse("az://cont/runs/a/").is_folder


# --- credentials, resolved on the executor only -------------------------------------------------
# The SDK builds its clients without sending anything: these look at the real client.

def test_connection_string_from_the_environment(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", FAKE_CONNECTION_STRING)
    backend = make_backend(az)
    assert backend.client.account_name == "lotunitacct"  # builds a client, sends nothing
    assert backend.endpoint == "http://127.0.0.1:9/lotunitacct"
    backend.close()


def test_connection_string_variable_name_is_an_option(az, monkeypatch):
    monkeypatch.setenv("TEAM_AZURE_CS", FAKE_CONNECTION_STRING)
    backend = make_backend(az, connection_string_env="TEAM_AZURE_CS", credential="connection_string")
    assert backend.client.account_name == "lotunitacct"
    backend.close()


def test_explicit_account_url_wins_over_the_connection_string_endpoint(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", FAKE_CONNECTION_STRING)
    backend = make_backend(az, account_url="http://127.0.0.1:8/lotunitacct")
    assert backend.client.url.startswith("http://127.0.0.1:8/lotunitacct")
    backend.close()


def test_account_key_names_the_account_from_the_url(az, monkeypatch):
    from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy

    monkeypatch.setenv("AZURE_STORAGE_KEY", FAKE_KEY)
    backend = make_backend(az, account_url=URL)
    service = backend.client
    assert isinstance(service.credential, SharedKeyCredentialPolicy)
    assert service.credential.account_name == "devstoreaccount1"
    backend.close()
    backend = make_backend(az, account_name="myacct")
    assert backend.client.credential.account_name == "myacct"
    backend.close()


def test_account_name_of(az, auth):
    settings = az.AzureStrategy().settings.as_dict()
    assert auth.account_name_of(settings, "https://acct1.blob.core.windows.net") == "acct1"
    assert auth.account_name_of(settings, "http://azurite:10000/devstoreaccount1") == "devstoreaccount1"
    assert auth.account_name_of(settings, "https://custom.example.org") is None
    settings["account_name"] = "named"
    assert auth.account_name_of(settings, "https://custom.example.org") == "named"


def test_sas_token(az, monkeypatch):
    from azure.core.credentials import AzureSasCredential

    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + FAKE_SAS)
    backend = make_backend(az, account_url=URL)
    assert isinstance(backend.client.credential, AzureSasCredential)
    assert "LotUnitFakeSasSignature" not in backend.client.url  # kept out of URLs and messages
    backend.close()


def test_sas_is_added_to_the_copy_source(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", FAKE_SAS)
    backend = make_backend(az, account_url=URL)
    source = backend.client.get_blob_client("cont", "src").url  # resolves the credential
    assert backend.account.copy_source(source) == f"{source}?{FAKE_SAS}"
    backend.close()


def test_auto_prefers_the_connection_string(az, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    backend = make_backend(az)
    assert backend.client.account_name == "lotunitacct"
    backend.close()


def test_no_credential_is_a_permission_error_naming_the_variables(az, monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # not installed
    backend = make_backend(az, account_url=URL)
    with pytest.raises(PermissionError) as info:
        read(backend)
    message = str(info.value)
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        assert name in message
    assert "covalent-lot[azure-identity]" in message
    assert TARGET in message and URL in message


@pytest.mark.parametrize(
    "mode, variable",
    [("connection_string", "AZURE_STORAGE_CONNECTION_STRING"), ("account_key", "AZURE_STORAGE_KEY"),
     ("sas_token", "AZURE_STORAGE_SAS_TOKEN")],
)
def test_explicit_credential_whose_variable_is_unset(az, mode, variable):
    backend = make_backend(az, account_url=URL, credential=mode)
    with pytest.raises(PermissionError, match=variable):
        read(backend)


def test_identity_without_azure_identity_names_the_extra(az, monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    backend = make_backend(az, account_name="myacct", credential="azure_identity")
    with pytest.raises(ImportError, match=r"pip install covalent-lot\[azure-identity\]"):
        backend.client


def test_key_without_an_account_is_a_value_error(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", FAKE_KEY)
    backend = make_backend(az)
    with pytest.raises(ValueError, match="account_url or account_name") as info:
        read(backend)
    assert FAKE_KEY not in str(info.value)


def test_malformed_secrets_are_refused_without_echoing_them(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "LotUnitFakeSasSignature-not-a-sas")
    backend = make_backend(az, account_url=URL, credential="sas_token")
    with pytest.raises(PermissionError, match="AZURE_STORAGE_SAS_TOKEN") as info:
        read(backend)
    assert "LotUnitFakeSasSignature" not in str(info.value)

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "LotUnitFakeGarbage;Nothing=here")
    backend = make_backend(az, credential="connection_string")
    with pytest.raises(PermissionError, match="AZURE_STORAGE_CONNECTION_STRING") as info:
        read(backend)
    assert "LotUnitFakeGarbage" not in str(info.value)


def test_auto_with_identity_but_no_https_account_is_a_permission_error(az):
    pytest.importorskip("azure.identity")
    for options in ({}, {"account_url": URL}):
        backend = make_backend(az, **options)
        with pytest.raises(PermissionError, match="DefaultAzureCredential needs an https") as info:
            read(backend)
        assert "AZURE_STORAGE_KEY" in str(info.value)


def test_identity_client_is_built_and_closed(az, monkeypatch):
    identity = pytest.importorskip("azure.identity")
    closed = []
    monkeypatch.setattr(identity.DefaultAzureCredential, "close", lambda self: closed.append(self))
    backend = make_backend(az, account_name="myacct", credential="azure_identity")
    credential = backend.client.credential
    assert hasattr(credential, "get_token")  # no token is asked for yet
    backend.close()
    assert closed == [credential] and not backend.connected


def test_anonymous_has_no_credential(az):
    backend = make_backend(az, account_url=URL, credential="anonymous")
    assert backend.client.credential is None
    backend.close()


def test_undecodable_key_is_denied_before_anything_is_sent(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", "LotUnitBadPad")
    backend = make_backend(az, account_url=URL, max_attempts=1)
    with pytest.raises(PermissionError) as info:
        read(backend)
    assert "LotUnitBadPad" not in str(info.value)
    backend.close()


def test_client_takes_the_transfer_settings(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", FAKE_CONNECTION_STRING)
    backend = make_backend(az, max_block_size="16MiB", max_single_put_size="32MiB", max_attempts=3)
    config = backend.client._config
    assert config.max_block_size == 16 * MiB and config.max_chunk_get_size == 16 * MiB
    assert config.max_single_put_size == 32 * MiB
    retry = config.retry_policy
    counts = (retry.total_retries, retry.connect_retries, retry.read_retries, retry.status_retries)
    assert counts == (2, 2, 2, 2)
    assert retry.retry_to_secondary is False
    backend.close()


def test_sdk_retry_backoff_follows_the_engine_policy(az, auth):
    settings = az.AzureStrategy(max_attempts=4, base_delay=0.5, max_delay=2.0).settings
    retry = auth.sdk_retry_policy(settings)
    for count in range(10):
        wait = retry.get_backoff_time({"count": count})
        assert 0 <= wait <= min(2.0, 0.5 * 2**count)


def test_block_size_grows_for_huge_blobs(az):
    assert az.block_size_for(10 * MiB, 8 * MiB) == 8 * MiB
    assert az.block_size_for(50_000 * 8 * MiB, 8 * MiB) == 8 * MiB
    grown = az.block_size_for(50_000 * 8 * MiB + 1, 8 * MiB)
    assert grown == 9 * MiB and 50_000 * grown >= 50_000 * 8 * MiB + 1
    with pytest.raises(ValueError, match="50,000 blocks"):
        az.block_size_for(50_000 * 4000 * MiB + 1, 8 * MiB)


def test_display_url_drops_secrets(auth):
    assert auth.display_url(f"https://u:p@acct.blob.core.windows.net/?{FAKE_SAS}") == (
        "https://acct.blob.core.windows.net"
    )
    assert auth.display_url(URL + "/") == URL


# --- what the SDK's models say ---------------------------------------------------------------------

def test_checksum_is_read_from_metadata_of_any_case(az):
    assert Checksum("crc32c", "0" * 8).metadata(az.METADATA_SEP) == {"lot_crc32c": "0" * 8}
    props = BlobProperties(metadata={"Lot_SHA256": "AB" * 32}, **{"Content-Length": 5, "ETag": '"0x1"'})
    assert az.stored_object(LOCATION, props) == RemoteObject(LOCATION, 5, Checksum("sha256", "ab" * 32), '"0x1"')
    props = BlobProperties(metadata={"LOT_CRC32C": "1234abcd"}, **{"Content-Length": 5, "ETag": '"0x1"'})
    assert az.stored_object(LOCATION, props).checksum == Checksum("crc32c", "1234abcd")
    assert az.stored_object(LOCATION, BlobProperties(metadata={"other": "x"})).checksum is None
    assert az.stored_object(LOCATION, BlobProperties(metadata={"lot_sha256": "abc"})).checksum is None  # malformed
    assert az.stored_object(LOCATION, BlobProperties()).checksum is None


def test_listings_skip_directory_markers(az):
    items = [BlobProperties(name="runs/a", metadata={"hdi_isfolder": "true"}),
             BlobProperties(name="runs/a/x", metadata={"lot_sha256": "x"}),
             BlobProperties(name="runs/b")]
    listed = az.listed_objects(StoreURI("az", "cont", "runs/"), iter(items))
    assert [obj.location.key for obj in listed] == ["runs/a/x", "runs/b"]


# --- the error table -------------------------------------------------------------------------------

RESPONSE_CASES = [
    (ax.ResourceNotFoundError, 404, "BlobNotFound", ErrorKind.NOT_FOUND),
    (ax.ResourceNotFoundError, 404, "ContainerNotFound", ErrorKind.NOT_FOUND),
    (ax.HttpResponseError, 404, "ResourceNotFound", ErrorKind.NOT_FOUND),
    (ax.ClientAuthenticationError, 403, "AuthenticationFailed", ErrorKind.DENIED),
    (ax.HttpResponseError, 403, "AuthorizationFailure", ErrorKind.DENIED),
    (ax.HttpResponseError, 403, "AuthorizationPermissionMismatch", ErrorKind.DENIED),
    (ax.ClientAuthenticationError, 401, "InvalidAuthenticationInfo", ErrorKind.DENIED),
    (ax.HttpResponseError, 400, "InvalidAuthenticationInfo", ErrorKind.DENIED),
    (ax.ResourceModifiedError, 412, "ConditionNotMet", ErrorKind.EXISTS),
    (ax.HttpResponseError, 412, "LeaseIdMissing", ErrorKind.EXISTS),
    (ax.ResourceExistsError, 409, "BlobAlreadyExists", ErrorKind.EXISTS),
    (ax.HttpResponseError, 409, "LeaseAlreadyPresent", ErrorKind.EXISTS),
    (ax.HttpResponseError, 429, "TooManyRequests", ErrorKind.THROTTLED),
    (ax.HttpResponseError, 503, "ServerBusy", ErrorKind.THROTTLED),
    (ax.HttpResponseError, 500, "InternalError", ErrorKind.SERVER),
    (ax.HttpResponseError, 500, "OperationTimedOut", ErrorKind.TIMEOUT),
    (ax.HttpResponseError, 502, None, ErrorKind.SERVER),
    (ax.HttpResponseError, 504, None, ErrorKind.SERVER),
    (ax.HttpResponseError, 408, None, ErrorKind.TIMEOUT),
    (ax.HttpResponseError, 400, "InvalidMetadata", ErrorKind.INVALID),
    (ax.HttpResponseError, 400, "InvalidResourceName", ErrorKind.INVALID),
    (ax.HttpResponseError, 400, "InvalidHeaderValue", ErrorKind.INVALID),
    (ax.HttpResponseError, 400, "InvalidBlockList", ErrorKind.SERVER),  # staged blocks lost: stage again
    (ax.HttpResponseError, 400, "Md5Mismatch", ErrorKind.OTHER),
    (ax.HttpResponseError, 501, "NotImplemented", ErrorKind.OTHER),
    (ax.HttpResponseError, 416, "InvalidRange", ErrorKind.INVALID),
]


def test_error_codes_as_the_sdk_enum(backend):
    from azure.storage.blob import StorageErrorCode

    err = http_error(ax.ResourceNotFoundError, 404, StorageErrorCode.CONTAINER_NOT_FOUND)
    verdict = backend.classify(err)
    assert "ContainerNotFound" in verdict.detail and "container" in verdict.hint
    assert backend.missing_container(LOCATION, err).bucket == "cont"


def test_head_responses_show_the_service_message(backend):
    err = http_error(ax.ResourceNotFoundError, 404, "BlobNotFound",
                     "Operation returned an invalid status 'The specified blob does not exist.'")
    assert backend.classify(err).detail == "BlobNotFound: The specified blob does not exist."
    assert backend.missing_container(LOCATION, err) is None


def test_denied_hint_names_the_variables(backend):
    verdict = backend.classify(http_error(ax.HttpResponseError, 403, "AuthorizationFailure"))
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        assert name in verdict.hint


def test_busy_and_changed_blobs_have_their_own_hints(backend):
    assert "busy" in backend.classify(http_error(ax.ResourceExistsError, 409, "LeaseAlreadyPresent")).hint
    assert "changed" in backend.classify(http_error(ax.ResourceModifiedError, 412, "ConditionNotMet")).hint


# Errors without a response: the connection, the credential, a wrapper of the SDK's.
SDK_ERRORS = {
    ErrorKind.CONNECTION: (ax.ServiceRequestError("connection refused"), ax.ServiceResponseError("connection reset"),
                           ax.IncompleteReadError("short body"), ConnectionResetError("reset by peer")),
    ErrorKind.TIMEOUT: (ax.ServiceRequestTimeoutError("connect timeout"),
                        ax.ServiceResponseTimeoutError("read timeout"), TimeoutError("slow")),
    ErrorKind.DENIED: (ax.ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token"),),
    ErrorKind.OTHER: (ax.AzureError("something else"),),
}
ERROR_CASES = [((cls, status, code), kind) for cls, status, code, kind in RESPONSE_CASES] + [
    (exc, kind) for kind, errors in SDK_ERRORS.items() for exc in errors]


@pytest.mark.parametrize("case, kind", ERROR_CASES, ids=[
    type(case).__name__ if isinstance(case, BaseException) else f"{case[0].__name__}-{case[1]}-{case[2]}"
    for case, _ in ERROR_CASES])
def test_error_table(backend, case, kind):
    err = case if isinstance(case, BaseException) else http_error(*case)
    verdict = backend.classify(err)
    assert verdict is not None, err
    assert verdict.kind is kind
    assert verdict.transient is (kind in TRANSIENT)
    code = None if isinstance(case, BaseException) else case[2]
    if code:
        assert code in verdict.detail
    translated = translate(verdict, action="download", target=TARGET, endpoint=backend.endpoint)
    assert type(translated) is EXPECTED_TYPE[kind]
    assert str(translated).startswith(f"download {TARGET}: {kind.value}")
    assert f"[endpoint {URL}]" in str(translated)


def test_identity_package_errors_are_denied(backend):
    pytest.importorskip("azure.identity")
    from azure.identity import CredentialUnavailableError

    verdict = backend.classify(CredentialUnavailableError("no managed identity endpoint"))
    assert verdict.kind is ErrorKind.DENIED


def test_wrapped_read_errors_are_found_through_the_cause(backend):
    # What the SDK's chunk downloader raises after its own read retries.
    inner = ax.ServiceResponseError("connection broken: IncompleteRead")
    try:
        raise ax.HttpResponseError(inner, error=inner) from inner
    except ax.HttpResponseError as exc:
        wrapped = exc
    verdict = backend.classify(wrapped)
    assert verdict.kind is ErrorKind.CONNECTION and verdict.transient


def test_markers(az, auth, backend):
    assert backend.classify(auth.NoCredential("x")).kind is ErrorKind.DENIED
    assert backend.classify(auth.NoAccount("x")).kind is ErrorKind.INVALID
    assert backend.classify(az.CopyTimeout("x")).kind is ErrorKind.TIMEOUT
    failed = az.CopyFailed(StoreURI("az", "c", "k"), "failed", "500 InternalError")
    assert backend.classify(failed).kind is ErrorKind.SERVER
    aborted = az.CopyFailed(StoreURI("az", "c", "k"), "aborted", "")
    assert backend.classify(aborted).kind is ErrorKind.OTHER


# --- the engine with the Azure table -----------------------------------------------------------------

def test_missing_container_message_names_it(monkeypatch, backend):
    missing = http_error(ax.ResourceNotFoundError, 404, "ContainerNotFound")
    fn = counting(missing)
    monkeypatch.setattr(backend, "stat", lambda location: fn())
    with pytest.raises(FileNotFoundError) as info:
        engine_for(backend).ls(StoreURI("az", "no-such-container", "x"))
    assert "'no-such-container' does not exist" in str(info.value)
    assert "create the container" in str(info.value)


# --- server-side copy: waiting for a pending copy (Azurite copies synchronously) -----------------------

def copy_states(pending: int, final: str = "success", description: str = ""):
    """``poll`` for await_copy: the destination's CopyProperties, pending ``pending`` times."""

    def poll():
        poll.calls += 1
        status = "pending" if poll.calls <= pending else final
        return CopyProperties(**{"x-ms-copy-id": "copy-1", "x-ms-copy-status": status,
                                 "x-ms-copy-status-description": description})

    poll.calls = 0
    return poll


def await_copy(az, poll, timeout: float = 600.0) -> list[str]:
    aborted: list[str] = []
    started = {"copy_status": "pending", "copy_id": "copy-1"}
    az.await_copy(StoreURI("az", "cont", "dst"), started, poll, aborted.append, timeout, sleep=lambda s: None)
    return aborted


def test_pending_copy_is_polled_until_done(az):
    poll = copy_states(pending=3)
    assert await_copy(az, poll) == [] and poll.calls == 4


def test_copy_that_never_finishes_is_aborted(az, backend):
    aborted = []
    with pytest.raises(az.CopyTimeout, match="copy_timeout") as info:
        az.await_copy(StoreURI("az", "cont", "dst"), {"copy_status": "pending", "copy_id": "copy-1"},
                      copy_states(pending=10**9), aborted.append, 0.05, sleep=lambda s: None)
    assert aborted == ["copy-1"]
    assert backend.classify(info.value).kind is ErrorKind.TIMEOUT


def test_failed_copy_is_reported(az):
    with pytest.raises(az.CopyFailed, match="500 InternalError"):
        await_copy(az, copy_states(pending=1, final="failed", description="500 InternalError"))
