"""The Azure adapter without a server: options, names, credentials by reference, the error table."""

from __future__ import annotations

import base64
import sys

import cloudpickle
import pytest
from azure.core import exceptions as ax

from covalent_lot._engine import Engine, TransferStats
from covalent_lot._errors import TRANSIENT, ErrorKind, translate
from covalent_lot._retry import RetryPolicy
from covalent_lot._uri import StoreURI


from .lot_fakes import EXPECTED_TYPE, counting, import_error_without, run_python

MiB = 1024 * 1024
URL = "http://127.0.0.1:9/devstoreaccount1"
TARGET = "az://cont/runs/x.npy"

# Recognisable fakes: none of them may travel in what Covalent pickles, nor in messages.
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
SECRET_MARKS = [FAKE_KEY, "LotUnitFakeSasSignature", FAKE_CONNECTION_STRING]



@pytest.fixture(autouse=True)
def no_azure_env(monkeypatch):
    """No credential or option from the outer shell."""
    for name in list(SECRETS) + ["AZURE_STORAGE_ACCOUNT"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def az():
    from covalent_lot.strategies import azure

    return azure


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


class FakeResponse:
    """Just enough of an azure-core HTTP response for HttpResponseError."""

    def __init__(self, status: int, reason: str = "reason"):
        self.status_code = status
        self.reason = reason
        self.headers = {}
        self.request = None
        self.content_type = None

    def text(self, encoding=None):
        return ""

    def body(self):
        return b""


def http_error(cls, status: int, code: str | None = None, message: str = "the service says so"):
    err = cls(message=message, response=FakeResponse(status))
    err.error_code = code  # what azure-storage-blob's process_storage_error sets
    return err


# --- construction and options ----------------------------------------------------------------

def test_constructible_with_zero_arguments(az):
    strategy = az.AzureStrategy()
    settings = strategy.settings
    assert settings["credential"] == "auto"
    assert settings["account_url"] is None and settings["account_name"] is None
    assert settings["connection_string_env"] == "AZURE_STORAGE_CONNECTION_STRING"
    assert settings["account_key_env"] == "AZURE_STORAGE_KEY"
    assert settings["sas_token_env"] == "AZURE_STORAGE_SAS_TOKEN"
    assert settings["max_concurrency"] >= 1
    assert (strategy.scheme, strategy.section, strategy.extra) == ("az", "azure", "azure")
    assert strategy.sdk_module == "azure.storage.blob"


def test_registered_for_the_az_scheme(az):
    import covalent_lot

    assert type(covalent_lot.strategy_for("az://cont/x")) is az.AzureStrategy


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
    with pytest.raises(ValueError, match=match):
        az.AzureStrategy(**options)


def test_unknown_option_is_a_type_error(az):
    with pytest.raises(TypeError, match="account_ur"):
        az.AzureStrategy(account_ur=URL)


def test_env_and_conf_precedence(az, monkeypatch, covalent_conf):
    covalent_conf({"azure": {"max_concurrency": 3, "account_name": "confacct"}})
    assert az.AzureStrategy().settings["max_concurrency"] == 3
    monkeypatch.setenv("COVALENT_LOT_AZURE_MAX_CONCURRENCY", "6")
    assert az.AzureStrategy().settings["max_concurrency"] == 6
    assert az.AzureStrategy(max_concurrency=2).settings["max_concurrency"] == 2
    assert az.AzureStrategy().settings["account_name"] == "confacct"


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


@pytest.mark.parametrize("mode", ["account_key", "sas_token", "azure_identity", "anonymous"])
def test_explicit_credential_needs_the_account(az, mode):
    with pytest.raises(ValueError, match="account_url or account_name"):
        az.AzureStrategy(credential=mode)


def test_identity_needs_https(az):
    with pytest.raises(ValueError, match="https"):
        az.AzureStrategy(credential="azure_identity", account_url=URL)
    az.AzureStrategy(credential="azure_identity", account_name="myacct")


def test_account_name_builds_the_default_url(az):
    backend = make_backend(az, account_name="myacct")
    assert backend.endpoint == "https://myacct.blob.core.windows.net"


def test_repr_shows_only_what_was_set(az):
    assert repr(az.AzureStrategy(account_url=URL)) == f"AzureStrategy(account_url={URL!r})"


# --- container and blob names ------------------------------------------------------------------

@pytest.mark.parametrize(
    "container", ["abc", "my-container", "a1b", "123", "a" * 63, "a-b-c-1", "$root", "$web", "$logs"]
)
def test_good_container_names(strategy, container):
    assert strategy.parse(f"az://{container}/k").bucket == container


@pytest.mark.parametrize(
    "container",
    ["ab", "a" * 64, "MyContainer", "my_container", "-abc", "abc-", "a--b", "my.container",
     "con tainer", "cönt", "$other", "abc!"],
)
def test_bad_container_names(strategy, container):
    with pytest.raises(ValueError) as info:
        strategy.parse(f"az://{container}/k")
    assert type(info.value) is ValueError
    assert repr(container) in str(info.value) and "Azure container name" in str(info.value)


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


def test_parse_restricts_the_scheme(strategy):
    with pytest.raises(ValueError, match=r"'s3'.*az"):
        strategy.parse("s3://cont/k")


# --- credentials, resolved on the executor only -------------------------------------------------

def test_nothing_secret_is_touched_on_the_client(az, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    strategy = az.AzureStrategy()
    blob = cloudpickle.dumps(strategy)
    for mark in SECRET_MARKS:
        assert mark.encode() not in blob
        assert mark not in repr(strategy.settings)


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


def test_account_name_of(az):
    settings = az.AzureStrategy().settings.as_dict()
    assert az.account_name_of(settings, "https://acct1.blob.core.windows.net") == "acct1"
    assert az.account_name_of(settings, "http://azurite:10000/devstoreaccount1") == "devstoreaccount1"
    assert az.account_name_of(settings, "https://custom.example.org") is None
    settings["account_name"] = "named"
    assert az.account_name_of(settings, "https://custom.example.org") == "named"


def test_sas_token(az, monkeypatch):
    from azure.core.credentials import AzureSasCredential

    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + FAKE_SAS)
    backend = make_backend(az, account_url=URL)
    assert isinstance(backend.client.credential, AzureSasCredential)
    assert "LotUnitFakeSasSignature" not in backend.client.url  # kept out of URLs and messages
    backend.close()


def test_auto_prefers_the_connection_string(az, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    backend = make_backend(az)
    assert backend.client.account_name == "lotunitacct"
    backend.close()


def guarded(backend, fn):
    engine = Engine(backend, RetryPolicy(max_attempts=3, base_delay=0, max_delay=0))
    stats = TransferStats("download", TARGET, "/tmp/x")
    return engine._guard("read", TARGET, fn, stats), stats


def test_no_credential_is_a_permission_error_naming_the_variables(az, monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # not installed
    backend = make_backend(az, account_url=URL)
    with pytest.raises(PermissionError) as info:
        guarded(backend, lambda: backend.client)
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
        guarded(backend, lambda: backend.client)


def test_identity_without_azure_identity_names_the_extra(az, monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    backend = make_backend(az, account_name="myacct", credential="azure_identity")
    with pytest.raises(ImportError, match=r"pip install covalent-lot\[azure-identity\]"):
        backend.client


def test_key_without_an_account_is_a_value_error(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", FAKE_KEY)
    backend = make_backend(az)
    with pytest.raises(ValueError, match="account_url or account_name") as info:
        guarded(backend, lambda: backend.client)
    assert FAKE_KEY not in str(info.value)


def test_malformed_secrets_are_refused_without_echoing_them(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "LotUnitFakeSasSignature-not-a-sas")
    backend = make_backend(az, account_url=URL, credential="sas_token")
    with pytest.raises(PermissionError, match="AZURE_STORAGE_SAS_TOKEN") as info:
        guarded(backend, lambda: backend.client)
    assert "LotUnitFakeSasSignature" not in str(info.value)

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "LotUnitFakeGarbage;Nothing=here")
    backend = make_backend(az, credential="connection_string")
    with pytest.raises(PermissionError, match="AZURE_STORAGE_CONNECTION_STRING") as info:
        guarded(backend, lambda: backend.client)
    assert "LotUnitFakeGarbage" not in str(info.value)


def test_auto_with_identity_but_no_https_account_is_a_permission_error(az):
    pytest.importorskip("azure.identity")
    for options in ({}, {"account_url": URL}):
        backend = make_backend(az, **options)
        with pytest.raises(PermissionError, match="DefaultAzureCredential needs an https") as info:
            guarded(backend, lambda: backend.client)
        assert "AZURE_STORAGE_KEY" in str(info.value)


def test_identity_client_is_built_and_closed(az):
    pytest.importorskip("azure.identity")
    backend = make_backend(az, account_name="myacct", credential="azure_identity")
    assert hasattr(backend.client.credential, "get_token")  # no token is asked for yet
    backend.close()
    assert backend._identity is None and not backend.connected


def test_anonymous_has_no_credential(az):
    backend = make_backend(az, account_url=URL, credential="anonymous")
    assert backend.client.credential is None
    backend.close()


def test_undecodable_key_is_denied_before_anything_is_sent(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", "LotUnitBadPad")
    backend = make_backend(az, account_url=URL, max_attempts=1)
    location = StoreURI("az", "cont", "k")
    with pytest.raises(PermissionError) as info:
        guarded(backend, lambda: backend.stat(location))
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


def test_sdk_retry_backoff_follows_the_engine_policy(az):
    settings = az.AzureStrategy(max_attempts=4, base_delay=0.5, max_delay=2.0).settings
    retry = az.sdk_retry_policy(settings)
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


# --- helpers -------------------------------------------------------------------------------------

def test_checksum_key_is_a_valid_azure_metadata_name(az):
    assert az.METADATA_KEY == "lot_sha256"
    assert az.METADATA_KEY.isidentifier()
    assert az._checksum({"Lot_SHA256": "abc"}) == "abc"
    assert az._checksum({"other": "x"}) is None and az._checksum(None) is None


def test_directory_markers(az):
    assert az._is_directory_marker({"hdi_isfolder": "true"})
    assert not az._is_directory_marker({"lot_sha256": "x"}) and not az._is_directory_marker(None)


def test_etags_are_sent_quoted(az):
    assert az._quoted("0x8D") == '"0x8D"'
    assert az._quoted('"0x8D"') == '"0x8D"'
    assert az._quoted(None) is None


def test_display_url_drops_secrets(az):
    assert az.display_url(f"https://u:p@acct.blob.core.windows.net/?{FAKE_SAS}") == (
        "https://acct.blob.core.windows.net"
    )
    assert az.display_url(URL + "/") == URL


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


@pytest.mark.parametrize(
    "cls, status, code, kind", RESPONSE_CASES, ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in RESPONSE_CASES]
)
def test_response_errors(backend, cls, status, code, kind):
    err = http_error(cls, status, code)
    verdict = backend.classify(err)
    assert verdict is not None
    assert verdict.kind is kind
    assert verdict.transient is (kind in TRANSIENT)
    if code:
        assert code in verdict.detail
    translated = translate(verdict, action="download", target=TARGET, endpoint=backend.endpoint)
    assert type(translated) is EXPECTED_TYPE[kind]
    assert str(translated).startswith(f"download {TARGET}: {kind.value}")
    assert f"[endpoint {URL}]" in str(translated)


def test_error_codes_as_the_sdk_enum(backend):
    from azure.storage.blob import StorageErrorCode

    err = http_error(ax.ResourceNotFoundError, 404, StorageErrorCode.CONTAINER_NOT_FOUND)
    verdict = backend.classify(err)
    assert "ContainerNotFound" in verdict.detail and "container" in verdict.hint


def test_head_responses_show_the_service_message(backend):
    err = http_error(ax.ResourceNotFoundError, 404, "BlobNotFound",
                     "Operation returned an invalid status 'The specified blob does not exist.'")
    assert backend.classify(err).detail == "BlobNotFound: The specified blob does not exist."


def test_denied_hint_names_the_variables(backend):
    verdict = backend.classify(http_error(ax.HttpResponseError, 403, "AuthorizationFailure"))
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        assert name in verdict.hint


def sdk_cases():
    cases = [
        (ax.ServiceRequestError("connection refused"), ErrorKind.CONNECTION),
        (ax.ServiceResponseError("connection reset"), ErrorKind.CONNECTION),
        (ax.IncompleteReadError("short body"), ErrorKind.CONNECTION),
        (ax.ServiceRequestTimeoutError("connect timeout"), ErrorKind.TIMEOUT),
        (ax.ServiceResponseTimeoutError("read timeout"), ErrorKind.TIMEOUT),
        (ax.ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token"), ErrorKind.DENIED),
        (ax.AzureError("something else"), ErrorKind.OTHER),
        (ConnectionResetError("reset by peer"), ErrorKind.CONNECTION),
        (TimeoutError("slow"), ErrorKind.TIMEOUT),
    ]
    return cases


@pytest.mark.parametrize("exc, kind", sdk_cases(), ids=[type(e).__name__ for e, _ in sdk_cases()])
def test_sdk_errors(backend, exc, kind):
    verdict = backend.classify(exc)
    assert verdict is not None, exc
    assert verdict.kind is kind
    assert verdict.transient is (kind in TRANSIENT)
    translated = translate(verdict, action="upload to", target=TARGET, endpoint=backend.endpoint)
    assert type(translated) is EXPECTED_TYPE[kind]
    assert TARGET in str(translated) and URL in str(translated)


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


def test_wrapped_error_found_through_the_context(backend):
    try:
        try:
            raise http_error(ax.HttpResponseError, 503, "ServerBusy")
        except ax.HttpResponseError:
            raise RuntimeError("wrapped by a library")
    except RuntimeError as exc:
        wrapped = exc
    assert backend.classify(wrapped).kind is ErrorKind.THROTTLED


def test_markers(az, backend):
    verdict = backend.classify(az._MissingContainer("gone-container"))
    assert verdict.kind is ErrorKind.NOT_FOUND and "'gone-container' does not exist" in verdict.detail
    assert backend.classify(az._NoCredential("x")).kind is ErrorKind.DENIED
    assert backend.classify(az._NoAccount("x")).kind is ErrorKind.INVALID
    assert backend.classify(az._CopyTimeout("x")).kind is ErrorKind.TIMEOUT
    failed = az._CopyFailed(StoreURI("az", "c", "k"), "failed", "500 InternalError")
    assert backend.classify(failed).kind is ErrorKind.SERVER
    aborted = az._CopyFailed(StoreURI("az", "c", "k"), "aborted", "")
    assert backend.classify(aborted).kind is ErrorKind.OTHER


@pytest.mark.parametrize(
    "exc", [ValueError("bad"), KeyError("k"), FileNotFoundError("/local/x"), RuntimeError("x")]
)
def test_errors_that_are_not_the_service_s(backend, exc):
    assert backend.classify(exc) is None


def test_checksum_mismatch_is_not_classified(backend):
    from covalent_lot import ChecksumMismatchError

    assert backend.classify(ChecksumMismatchError("mismatch")) is None


# --- Engine._guard with the Azure table ------------------------------------------------------------

@pytest.mark.parametrize(
    "cls, status, code, kind",
    [c for c in RESPONSE_CASES if c[3] not in TRANSIENT],
    ids=[f"{c[1]}-{c[2]}" for c in RESPONSE_CASES if c[3] not in TRANSIENT],
)
def test_guard_does_not_retry_permanent_errors(backend, cls, status, code, kind):
    original = http_error(cls, status, code)
    fn = counting(original)
    with pytest.raises(EXPECTED_TYPE[kind]) as info:
        guarded(backend, fn)
    assert type(info.value) is EXPECTED_TYPE[kind] and info.value.__cause__ is original
    assert fn.calls == 1


def test_guard_retries_transient_errors(backend):
    fn = counting(http_error(ax.HttpResponseError, 503, "ServerBusy"),
                  ax.ServiceResponseError("reset"), "ok")
    result, stats = guarded(backend, fn)
    assert result == "ok" and fn.calls == 3 and stats.retries == 2


def test_missing_container_message_names_it(backend, az):
    with pytest.raises(FileNotFoundError) as info:
        guarded(backend, counting(az._MissingContainer("no-such-container")))
    assert "'no-such-container' does not exist" in str(info.value)
    assert "create the container" in str(info.value)


# --- what Covalent pickles ----------------------------------------------------------------------------

@pytest.fixture
def secret_env(monkeypatch, covalent_conf):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    covalent_conf({"azure": {"account_url": URL}})


def assert_no_secrets(blob: bytes, what: str) -> None:
    for mark in SECRET_MARKS:
        assert mark.encode() not in blob, f"a secret was found in the pickled {what}"


def test_transfer_calls_carry_no_secrets(secret_env):
    import covalent_lot as lot

    h = lot.handoff("az://cont/runs/{dispatch_id}/x.npy")
    assert h.strategy.settings["account_url"] == URL
    for transfer in (h.upload(), h.download()):
        pre, call = transfer.cp()
        for what, obj in (("pre-transfer hook", pre), ("transfer call", call)):
            blob = cloudpickle.dumps(obj)
            assert_no_secrets(blob, what)
            back = cloudpickle.loads(blob)
            assert type(back) is type(obj) and vars(back) == vars(obj)
        # Nothing from this machine's settings travels: the executor resolves its own
        # (there, the names of the variables holding the secrets).
        assert call.options == {}
        assert call.settings()["connection_string_env"] == "AZURE_STORAGE_CONNECTION_STRING"
        assert URL.encode() not in cloudpickle.dumps(call)
    assert_no_secrets(cloudpickle.dumps(h.strategy), "strategy")
    assert_no_secrets(cloudpickle.dumps(h), "handoff")


def test_decorated_electron_carries_no_secrets(secret_env):
    import covalent as ct

    import covalent_lot as lot

    h = lot.handoff("az://cont/runs/{dispatch_id}/x.npy")
    features = lot.handoff("az://cont/runs/{dispatch_id}/features/")

    @ct.electron(files=[h.upload(), features.download()])
    def produce(files=[]):
        return h.path

    assert_no_secrets(cloudpickle.dumps(produce), "electron")
    assert_no_secrets(cloudpickle.dumps(produce.electron_object.metadata), "electron metadata")


# --- without the SDK -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "statement",
    [
        "from covalent_lot.strategies.azure import AzureStrategy; AzureStrategy()",
        "import covalent_lot; covalent_lot.strategy_for('az://cont/x')",
        "import covalent_lot; covalent_lot.handoff('az://cont/x')",
    ],
)
def test_missing_sdk_says_how_to_install(statement):
    assert "pip install covalent-lot[azure]" in import_error_without("azure.storage.blob", statement)


def test_module_import_needs_no_sdk():
    result = run_python("""
        import sys
        sys.modules["azure"] = None
        import covalent_lot.strategies.azure as m
        print("OK", m.AzureStrategy.scheme)
    """)
    assert result.returncode == 0, result.stderr
    assert "OK az" in result.stdout


# --- server-side copy: polling a pending copy (Azurite copies synchronously) -----------------------

class FakeCopyTarget:
    """A destination blob client whose copy stays pending for ``pending`` polls, then ends ``final``."""

    def __init__(self, pending: int, final: str = "success", description: str = ""):
        self.pending = pending
        self.final = final
        self.description = description
        self.polls = 0
        self.aborted = None
        self.url = "http://127.0.0.1:9/devstoreaccount1/cont/src"

    def start_copy_from_url(self, url, **conditions):
        self.started = (url, conditions)
        return {"copy_status": "pending", "copy_id": "copy-1"}

    def get_blob_properties(self):
        from types import SimpleNamespace

        self.polls += 1
        status = "pending" if self.polls <= self.pending else self.final
        copy = SimpleNamespace(id="copy-1", status=status, status_description=self.description)
        return SimpleNamespace(copy=copy)

    def abort_copy(self, copy_id):
        self.aborted = copy_id


def copy_with(az, monkeypatch, target, **options):
    from covalent_lot._engine import RemoteObject

    backend = make_backend(az, account_url=URL, **options)
    monkeypatch.setattr(backend, "_blob", lambda location: target)
    monkeypatch.setattr(az.time, "sleep", lambda seconds: None)
    source = RemoteObject(StoreURI("az", "cont", "src"), 5, "abc", '"0x1"')
    backend.copy(source, StoreURI("az", "cont", "dst"))
    return target


def test_pending_copy_is_polled_until_done(az, monkeypatch):
    from azure.core import MatchConditions

    target = copy_with(az, monkeypatch, FakeCopyTarget(pending=3))
    assert target.polls == 4 and target.aborted is None
    url, conditions = target.started
    assert conditions == {"source_etag": '"0x1"', "source_match_condition": MatchConditions.IfNotModified}


def test_copy_that_never_finishes_is_aborted(az, monkeypatch, backend):
    target = FakeCopyTarget(pending=10**9)
    with pytest.raises(az._CopyTimeout, match="copy_timeout") as info:
        copy_with(az, monkeypatch, target, copy_timeout=0.05)
    assert target.aborted == "copy-1"
    assert backend.classify(info.value).kind is ErrorKind.TIMEOUT


def test_failed_copy_is_reported(az, monkeypatch):
    with pytest.raises(az._CopyFailed, match="500 InternalError"):
        copy_with(az, monkeypatch, FakeCopyTarget(pending=1, final="failed", description="500 InternalError"))


def test_sas_is_added_to_the_copy_source(az, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", FAKE_SAS)
    backend = make_backend(az, account_url=URL)
    backend.client  # resolves the credential
    target = FakeCopyTarget(pending=0)
    monkeypatch.setattr(backend, "_blob", lambda location: target)
    from covalent_lot._engine import RemoteObject

    backend.copy(RemoteObject(StoreURI("az", "cont", "src"), 5), StoreURI("az", "cont", "dst"))
    assert target.started[0] == f"{target.url}?{FAKE_SAS}"
    backend.close()


# --- block staging (the checksum goes with the commit) ------------------------------------
class FakeBlob:
    def __init__(self, fail_at=None):
        import threading

        self.staged = {}
        self.lock = threading.Lock()
        self.fail_at = fail_at
        self.committed = None

    def stage_block(self, block_id, data, length):
        assert len(data) == length
        with self.lock:
            if self.fail_at is not None and len(self.staged) >= self.fail_at:
                raise ax.ServiceRequestError("connection reset")
            self.staged[block_id] = data


def test_blocks_are_staged_in_order_of_ids_and_bounded(az, tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 17)  # ~5 MiB, not a whole number of blocks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    backend = make_backend(az, account_url=URL, max_block_size="1MiB", max_concurrency=3)
    blob = FakeBlob()
    with open(path, "rb") as f:
        ids = backend._stage_blocks(blob, f.fileno(), len(data))
    assert len(ids) == 6 and len(set(ids)) == 6
    assert b"".join(blob.staged[i] for i in ids) == data
    assert all(len(base64.b64decode(i)) == len(base64.b64decode(ids[0])) for i in ids)  # same length ids


def test_a_failed_block_stops_the_upload(az, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (20 * 1024 * 1024))
    backend = make_backend(az, account_url=URL, max_block_size="1MiB", max_concurrency=2)
    blob = FakeBlob(fail_at=3)
    with open(path, "rb") as f, pytest.raises(ax.ServiceRequestError):
        backend._stage_blocks(blob, f.fileno(), 20 * 1024 * 1024)
    assert len(blob.staged) < 20


def test_azure_hashes_alongside_the_upload(az):
    assert az.AzureBackend.checksum_after_upload is True
