"""What every strategy promises, checked once for all four (no server, no network).

The per-backend test modules keep only what is particular to their service:
bucket naming rules, option checks, credentials, the error codes of its SDK.
"""

from __future__ import annotations

import base64
import importlib
from dataclasses import dataclass
from typing import Callable

import cloudpickle
import pytest

import covalent_lot as lot
from covalent_lot._backend import RemoteObject
from covalent_lot._errors import ChecksumMismatchError, ErrorKind, MissingBucket
from covalent_lot._strategy import build_engine

from .lot_fakes import EXPECTED_TYPE, import_error_without, run_python


def _s3_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")


def _gcs_error(name: str):
    from google.api_core import exceptions as gx

    return getattr(gx, name)("from the test")


def _azure_error(name: str):
    from azure.core import exceptions as ax

    return getattr(ax, name)("from the test")


def _sftp_error(kind: str):
    import paramiko

    return paramiko.SSHException("Error reading SSH protocol banner") if kind == "transient" \
        else paramiko.AuthenticationException("Authentication failed.")


@dataclass(frozen=True)
class Case:
    """One backend as the contract sees it."""

    name: str  # module in covalent_lot.strategies, and the extra to install
    strategy: str
    uri: str  # an object URI with a valid bucket
    sdk: str  # the module that must not be imported before a transfer needs it
    option: tuple[str, str, str]  # (option, value from conf, value from env) of type str
    transient: Callable[[], BaseException]  # an SDK error worth a retry
    denied: Callable[[], BaseException]  # an SDK error that is final: access denied
    secrets: dict  # executor environment variables a pickle must never carry

    @property
    def cls(self):
        return getattr(importlib.import_module(f"covalent_lot.strategies.{self.name}"), self.strategy)


CASES = [
    Case("s3", "S3Strategy", "s3://bkt/runs/x.npy", "boto3", ("region_name", "eu-conf-1", "eu-env-1"),
         lambda: _s3_error("SlowDown", 503), lambda: _s3_error("AccessDenied", 403),
         {"AWS_ACCESS_KEY_ID": "AKIALOTUNITFAKE7Q2X9",
          "AWS_SECRET_ACCESS_KEY": "lotUnitFakeSecret/4x9Qz+8s7Tq0WwYy1Zz2Aa3Bb"}),
    Case("gcs", "GCSStrategy", "gs://bkt/runs/x.npy", "google.cloud.storage",
         ("project", "conf-project", "env-project"),
         lambda: _gcs_error("ServiceUnavailable"), lambda: _gcs_error("Forbidden"),
         {"GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.lotUnitFakeAccessToken0123456789"}),
    Case("azure", "AzureStrategy", "az://ctr/runs/x.npy", "azure.storage.blob",
         ("account_name", "confacct", "envacct"),
         lambda: _azure_error("ServiceResponseError"), lambda: _azure_error("ClientAuthenticationError"),
         {"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=http;AccountName=lotunit;"
                                             "AccountKey=bG90VW5pdEZha2VBenVyZUtleQ==",
          "AZURE_STORAGE_KEY": "bG90VW5pdEZha2VBenVyZUtleTI=",
          "AZURE_STORAGE_SAS_TOKEN": "sv=2024&sig=lotUnitFakeSignature"}),
    Case("sftp", "SFTPStrategy", "sftp://user@host:2222/data/runs/x.npy", "paramiko",
         ("username", "confuser", "envuser"),
         lambda: _sftp_error("transient"), lambda: _sftp_error("denied"),
         {"SSH_AUTH_SOCK": "/tmp/lot-unit-agent-socket-xyz"}),
]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    return request.param


# --- construction and configuration -----------------------------------------------------

def test_constructible_with_zero_arguments(case):
    strategy = case.cls()
    cls = type(strategy)
    assert (cls.section, cls.extra, cls.sdk_module) == (case.name, case.name, case.sdk)
    assert set(cls.options) <= set(strategy.settings.as_dict())
    for name, option in cls.options.items():
        assert strategy.settings[name] == option.default, name


def test_registered_for_its_scheme(case):
    assert isinstance(lot.strategy_for(case.uri), case.cls)


def test_unknown_option_is_a_type_error_naming_the_known_one(case):
    name = case.option[0]
    with pytest.raises(TypeError, match=name):
        case.cls(**{name[:-1]: "x"})


def test_argument_beats_environment_beats_covalent_conf(case, monkeypatch, covalent_conf):
    name, from_conf, from_env = case.option
    covalent_conf({case.name: {name: from_conf}})
    assert case.cls().settings[name] == from_conf
    monkeypatch.setenv(f"COVALENT_LOT_{case.name.upper()}_{name.upper()}", from_env)
    assert case.cls().settings[name] == from_env
    assert case.cls(**{name: "arg"}).settings[name] == "arg"
    assert case.cls(**{name: "arg"}).settings.sources[name] == "argument"


def test_parse_takes_only_its_own_scheme(case):
    strategy = case.cls()
    scheme = strategy.scheme
    assert strategy.parse(case.uri).scheme == scheme
    assert strategy.parse(scheme.upper() + case.uri[len(scheme):]).scheme == scheme
    other = "gs" if scheme != "gs" else "s3"
    with pytest.raises(ValueError, match=rf"'{other}'.*{scheme}"):
        strategy.parse(f"{other}://bkt/k")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        strategy.parse(case.uri.rsplit("/", 1)[0] + "/../b")


# --- naming rules, checked on the client ----------------------------------------------------

NAMES = {  # backend: (noun in the message, good bucket names, bad bucket names)
    "s3": ("S3 bucket", ["bkt", "my-bucket", "my.bucket.name", "a1b", "123", "a" * 63, "x-1.y-2"],
           ["ab", "a" * 64, "MyBucket", "my_bucket", "-bkt", "bkt-", ".bkt", "bkt.", "my..bucket",
            "192.168.1.1", "bk t", "bkt!", "bücket"]),
    "gcs": ("GCS bucket", ["bkt", "my-bucket", "my_bucket", "my.bucket.name", "a1b", "123", "a" * 63,
                           ".".join(["a" * 63] * 3), "x-1.y_2"],
            ["ab", "a" * 64, "MyBucket", "-bkt", "bkt-", "_bkt", "bkt_", ".bkt", "bkt.", "my..bucket",
             "192.168.1.1", "bk t", "bkt!", "bücket", "goog-data", "my-google-bucket", "g00gle-x",
             "a" * 64 + ".b", ".".join(["a" * 63] * 4)]),
    "azure": ("Azure container", ["abc", "my-container", "a1b", "123", "a" * 63, "a-b-c-1", "$root", "$web",
                                  "$logs"],
              ["ab", "a" * 64, "MyContainer", "my_container", "-abc", "abc-", "a--b", "my.container",
               "con tainer", "cönt", "$other", "abc!"]),
}
NAME_CASES = [(case, good, name) for case in CASES if case.name in NAMES
              for good, names in ((True, NAMES[case.name][1]), (False, NAMES[case.name][2]))
              for name in names]


@pytest.mark.parametrize("case, good, bucket", NAME_CASES,
                         ids=[f"{c.name}-{'good' if g else 'bad'}-{b[:12]}" for c, g, b in NAME_CASES])
def test_bucket_names(case, good, bucket):
    strategy = case.cls()
    uri = f"{strategy.scheme}://{bucket}/k"
    if good:
        assert strategy.parse(uri).bucket == bucket
        return
    with pytest.raises(ValueError) as info:
        strategy.parse(uri)
    assert type(info.value) is ValueError
    assert repr(bucket) in str(info.value) and f"{NAMES[case.name][0]} name" in str(info.value)


# --- the error table as every backend shares it ---------------------------------------------

@pytest.fixture
def engine(case):
    strategy = case.cls(max_attempts=3, base_delay=0)
    engine = build_engine(strategy.backend_path, strategy.settings.as_dict())
    yield engine
    engine.backend.close()


def test_a_missing_bucket_is_named(case, engine):
    verdict = engine.backend.classify(MissingBucket("gone-bucket"))
    assert verdict.kind is ErrorKind.NOT_FOUND and "'gone-bucket'" in verdict.detail


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("k"), RuntimeError("x"),
                                 ChecksumMismatchError("mismatch")])
def test_errors_that_are_not_the_service_s_are_left_alone(case, engine, exc):
    assert engine.backend.classify(exc) is None


def test_an_sdk_error_is_found_through_cause_and_context(case, engine):
    for link in ("__cause__", "__context__"):
        wrapper = RuntimeError("wrapped by a library")
        setattr(wrapper, link, case.denied())
        assert engine.backend.classify(wrapper).kind is ErrorKind.DENIED, link


def test_a_transient_error_is_retried_then_the_call_succeeds(case, engine, monkeypatch):
    location = case.cls().parse(case.uri)
    answers = [case.transient(), case.transient()]
    seen = []

    def stat(where):
        seen.append(where)
        if answers:
            raise answers.pop(0)
        return RemoteObject(where, 3)

    monkeypatch.setattr(engine.backend, "stat", stat)
    assert [obj.size for obj in engine.ls(location)] == [3]
    assert seen == [location] * 3


def test_a_final_error_is_one_call_and_a_builtin_naming_target_and_endpoint(case, engine, monkeypatch):
    location = case.cls().parse(case.uri)
    calls = []

    def stat(where):
        calls.append(where)
        raise case.denied()

    monkeypatch.setattr(engine.backend, "stat", stat)
    with pytest.raises(EXPECTED_TYPE[ErrorKind.DENIED]) as info:
        engine.ls(location)
    assert len(calls) == 1
    message = str(info.value)
    assert str(location) in message and engine.backend.endpoint in message
    assert isinstance(info.value.__cause__, type(case.denied()))


def test_retries_run_out_as_a_builtin(case, engine, monkeypatch):
    monkeypatch.setattr(engine.backend, "stat", lambda where: (_ for _ in ()).throw(case.transient()))
    kind = engine.backend.classify(case.transient()).kind
    assert kind.name in ("THROTTLED", "CONNECTION", "SERVER", "TIMEOUT")
    with pytest.raises(EXPECTED_TYPE[kind]):
        engine.ls(case.cls().parse(case.uri))


# --- what travels to the executor ----------------------------------------------------------

def _transportable_payloads(value) -> list[bytes]:
    """Decoded pickles inside Covalent's serialized metadata (base64 in JSON-able dicts)."""
    found = []
    if isinstance(value, dict):
        if value.get("type") == "TransportableObject":
            found.append(base64.b64decode(value["attributes"]["_object"]))
        for item in value.values():
            found += _transportable_payloads(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _transportable_payloads(item)
    return found


def _assert_no_secrets(case: Case, blob: bytes, what: str) -> None:
    for name, value in case.secrets.items():
        assert value.encode() not in blob, f"{name} found in the pickled {what}"


@pytest.fixture
def secret_env(case, monkeypatch):
    for name, value in case.secrets.items():
        monkeypatch.setenv(name, value)


def test_transfer_callables_carry_no_credentials(case, secret_env, monkeypatch):
    name, _, from_env = case.option
    monkeypatch.setenv(f"COVALENT_LOT_{case.name.upper()}_{name.upper()}", from_env)
    h = lot.handoff(case.uri.rsplit("/", 1)[0] + "/{dispatch_id}/x.npy")
    for transfer in (h.upload(), h.download()):
        pre, call = transfer.cp()
        for what, obj in (("pre-transfer hook", pre), ("transfer call", call)):
            blob = cloudpickle.dumps(obj)
            _assert_no_secrets(case, blob, what)
            back = cloudpickle.loads(blob)
            assert callable(back) and type(back) is type(obj)
            assert vars(back) == vars(obj)
        # Only options given in code travel; the executor reads its own environment.
        assert from_env.encode() not in cloudpickle.dumps(call)
        assert call.options == {} and call.settings()[name] == from_env
    blob = cloudpickle.dumps(h.strategy)
    _assert_no_secrets(case, blob, "strategy")
    assert cloudpickle.loads(blob).settings.as_dict() == h.strategy.settings.as_dict()
    _assert_no_secrets(case, cloudpickle.dumps(h), "handoff")


def test_a_decorated_electron_carries_no_credentials(case, secret_env):
    import covalent as ct

    folder = case.uri.rsplit("/", 1)[0]
    h = lot.handoff(folder + "/{dispatch_id}/x.npy")
    features = lot.handoff(folder + "/{dispatch_id}/features/")

    @ct.electron(files=[h.upload(), features.download()])
    def produce(files=[]):
        return h.path

    _assert_no_secrets(case, cloudpickle.dumps(produce), "electron")
    payloads = _transportable_payloads(produce.electron_object.metadata["hooks"])
    # Two pre-hooks and two transfer calls, each with its args and kwargs.
    assert sum(b"covalent_lot._strategy" in p for p in payloads) == 4
    for payload in payloads:
        _assert_no_secrets(case, payload, "electron hook")
        loaded = cloudpickle.loads(payload)
        assert callable(loaded) or isinstance(loaded, (list, dict))


# --- the SDK is optional and imported late ------------------------------------------------------

def test_a_missing_sdk_says_which_extra_to_install(case):
    for statement in (f"import covalent_lot; covalent_lot.strategy_for({case.uri!r})",
                      f"import covalent_lot; covalent_lot.handoff({case.uri!r})"):
        assert f"pip install covalent-lot[{case.name}]" in import_error_without(case.sdk, statement)


def test_importing_the_module_does_not_import_the_sdk(case):
    result = run_python(f"import sys, covalent_lot.strategies.{case.name}; print({case.sdk!r} in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_an_error_that_is_not_the_service_s_passes_through_untouched(case, engine, monkeypatch):
    bug = KeyError("a bug in the caller's code")
    monkeypatch.setattr(engine.backend, "stat", lambda where: (_ for _ in ()).throw(bug))
    with pytest.raises(KeyError) as info:
        engine.ls(case.cls().parse(case.uri))
    assert info.value is bug
