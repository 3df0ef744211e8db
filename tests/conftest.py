"""Shared setup for the unit tests: a private Covalent home, no stray settings.

``import covalent`` writes its config, log, cache and data folders at import
time, to paths taken from HOME and COVALENT_* variables. So before anything can
import covalent, this module points all of them at a fresh temporary folder.
Test modules import covalent (and anything that imports it, such as
``covalent_lot._strategy`` or ``covalent_lot.strategies.s3``) inside tests or
fixtures, never at module level, so that collection alone does not create a
config anywhere.
"""

from __future__ import annotations

import os
import sys
import tempfile

_HOME = tempfile.mkdtemp(prefix="lot-unit-home-")


def _isolate_covalent(home: str) -> None:
    os.environ["HOME"] = home
    covalent_dir = os.path.join(home, "covalent")
    for var, sub in {
        "COVALENT_CONFIG_DIR": "config",
        "COVALENT_DATA_DIR": "data",
        "COVALENT_CACHE_DIR": "cache",
        "COVALENT_LOGDIR": "logs",
        "COVALENT_EXECUTOR_DIR": "executor_plugins",
        "COVALENT_DISPATCH_CACHE_DIR": "dispatches",
        "COVALENT_RESULTS_DIR": "results",
    }.items():
        os.environ[var] = os.path.join(covalent_dir, sub)
    os.environ["COVALENT_DATABASE"] = os.path.join(covalent_dir, "db", "dispatcher.sqlite")
    os.environ["COVALENT_HEARTBEAT_FILE"] = os.path.join(covalent_dir, "cache", "heartbeat")
    # Covalent falls back to these before HOME for some paths.
    os.environ["XDG_CACHE_HOME"] = os.path.join(home, ".cache")
    os.environ["XDG_CONFIG_DIR"] = os.path.join(home, ".config")
    os.environ["XDG_DATA_HOME"] = os.path.join(home, ".local", "share")


def _isolate_options(home: str) -> None:
    # Settings from the outer shell would change what the tests resolve.
    for var in [v for v in os.environ if v.startswith("COVALENT_LOT_")]:
        del os.environ[var]
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    # boto3 must not read the real user's AWS files or ask an instance-metadata service.
    os.environ["AWS_CONFIG_FILE"] = os.path.join(home, "no-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(home, "no-aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


if "covalent" in sys.modules:  # pragma: no cover - a guard, not a code path
    raise RuntimeError(
        "covalent was imported before tests/conftest.py could point it at a temporary "
        "home; it may have written config under the real HOME"
    )
_isolate_covalent(_HOME)
_isolate_options(_HOME)

import shutil  # noqa: E402

import pytest  # noqa: E402

UNIT_HOME = _HOME

# Variables that change what a strategy resolves or which credentials an SDK
# finds. Other suites sharing the session (integration/) set them for their own
# tests; here each test starts from what _isolate_options left.
_OPTION_PREFIXES = ("COVALENT_LOT_", "AWS_", "AZURE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCE_")
_OPTION_NAMES = ("STORAGE_EMULATOR_HOST", "API_ENDPOINT_OVERRIDE")


def _is_option(name: str) -> bool:
    return name.startswith(_OPTION_PREFIXES) or name in _OPTION_NAMES


_UNIT_OPTIONS = {name: value for name, value in os.environ.items() if _is_option(name)}


@pytest.fixture(autouse=True)
def _unit_options(monkeypatch):
    """The options and credentials environment of a unit test: exactly the one
    this module set up at import, whatever ran before in the session."""
    for name in [n for n in os.environ if _is_option(n) and n not in _UNIT_OPTIONS]:
        monkeypatch.delenv(name)
    for name, value in _UNIT_OPTIONS.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def covalent_conf():
    """Write a ``[lot]`` table into the (temporary) covalent.conf; removed afterwards.

    Returns ``set_lot(table)``: replaces ``[lot]`` with ``table`` in the file and
    in Covalent's in-memory copy, the way a user editing covalent.conf would; an
    empty table removes ``[lot]``.
    """
    from covalent._shared_files import config as ct_config

    manager = ct_config._config_manager

    def set_lot(table: dict) -> None:
        manager.config_data.pop("lot", None)
        manager.write_config()
        if table:
            ct_config.update_config({"lot": table})

    yield set_lot
    manager.config_data.pop("lot", None)
    manager.write_config()


@pytest.fixture
def s3():
    """The S3 strategy module (imports covalent, so only when a test asks)."""
    from covalent_lot.strategies import s3 as module

    return module
