"""What Covalent pickles and ships to the executor must hold no credentials."""

from __future__ import annotations

import base64

import cloudpickle
import pytest

import covalent_lot as lot

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALOTUNITFAKE7Q2X9",
    "AWS_SECRET_ACCESS_KEY": "lotUnitFakeSecret/4x9Qz+8s7Tq0WwYy1Zz2Aa3Bb",
    "AWS_SESSION_TOKEN": "LotUnitFakeSessionToken//////////wEaCXVzLWVhc3QtMSJHMEUCIQD",
}
PROFILE = "lot-unit-profile"


@pytest.fixture
def secret_env(monkeypatch, covalent_conf):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    covalent_conf({"s3": {"profile": PROFILE, "endpoint_url": "http://127.0.0.1:9"}})


def assert_no_secrets(blob: bytes, what: str) -> None:
    for name, value in SECRETS.items():
        assert value.encode() not in blob, f"{name} found in the pickled {what}"


def transportable_payloads(value) -> list[bytes]:
    """Decoded pickles inside Covalent's serialized metadata (base64 in JSON-able dicts)."""
    found = []
    if isinstance(value, dict):
        if value.get("type") == "TransportableObject":
            found.append(base64.b64decode(value["attributes"]["_object"]))
        for item in value.values():
            found += transportable_payloads(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += transportable_payloads(item)
    return found


def test_transfer_callables_carry_no_credentials(secret_env):
    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.npy")
    assert h.strategy.settings["profile"] == PROFILE
    for transfer in (h.upload(), h.download()):
        pre, call = transfer.cp()
        for what, obj in (("pre-transfer hook", pre), ("transfer call", call)):
            blob = cloudpickle.dumps(obj)
            assert_no_secrets(blob, what)
            back = cloudpickle.loads(blob)
            assert callable(back) and type(back) is type(obj)
            assert vars(back) == vars(obj)
        # Only options given in code travel; the profile came from this machine's
        # environment, and the executor resolves its own.
        assert PROFILE.encode() not in cloudpickle.dumps(call)
        assert call.options == {} and call.settings()["profile"] == PROFILE

    blob = cloudpickle.dumps(h.strategy)
    assert_no_secrets(blob, "strategy")
    assert cloudpickle.loads(blob).settings.as_dict() == h.strategy.settings.as_dict()
    assert_no_secrets(cloudpickle.dumps(h), "handoff")


def test_decorated_electron_carries_no_credentials(secret_env):
    import covalent as ct

    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.npy")
    features = lot.handoff("s3://bkt/runs/{dispatch_id}/features/")

    @ct.electron(files=[h.upload(), features.download()])
    def produce(files=[]):
        return h.path

    blob = cloudpickle.dumps(produce)
    assert_no_secrets(blob, "electron")
    hooks = produce.electron_object.metadata["hooks"]
    payloads = transportable_payloads(hooks)
    # Two pre-hooks and two transfer calls, each with its args and kwargs.
    assert sum(b"covalent_lot._strategy" in p for p in payloads) == 4
    for payload in payloads:
        assert_no_secrets(payload, "electron hook")
        assert callable(cloudpickle.loads(payload)) or isinstance(cloudpickle.loads(payload), (list, dict))
