"""Fixtures for the integration tests: a real SeaweedFS S3 and a private Covalent server.

Importing covalent writes (or reads) its config file at import time, and paths in
that file are taken from COVALENT_* variables only when it is first written. So
this module's first job, before anything can import covalent, is to point the test
process at a private config under a session temp dir and at the port the private
server will use. The server started later by ``covalent_server`` gets the same
variables, so client and server share one config file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest  # does not import covalent


def _load_harness():
    # Load _servers.py by path: works whether integration/ is a package or not and
    # under any pytest import mode, without touching sys.path.
    name = f"{__package__}._servers" if __package__ else "_servers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_servers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_servers = _load_harness()

# ---- process-wide environment, set before covalent can be imported ------------

SESSION_DIR = Path(tempfile.mkdtemp(prefix="lot-it-"))
COVALENT_DIR = SESSION_DIR / "covalent"
COVALENT_PORT = _servers.free_port(avoid_offsets=())

if "covalent" in sys.modules:
    # Too late for this process: it keeps the config it loaded (likely in ~).
    # covalent_server still redirects the dispatcher address in memory.
    warnings.warn(
        "covalent was imported before integration/conftest.py set its private config"
    )
for _var in [v for v in os.environ if _servers.is_covalent_core_var(v)]:
    # Stray settings from the outer shell (another port, dask disabled, ...) would
    # make the client disagree with the private server. COVALENT_LOT_* stay.
    del os.environ[_var]
os.environ.update(_servers.covalent_client_env(COVALENT_DIR, COVALENT_PORT))

S3_ACCESS_KEY = "lottestaccess"
S3_SECRET_KEY = "lottestsecret0123456789"
S3_REGION = "us-east-1"


def _s3_env(session_dir: Path) -> dict:
    """AWS variables for the test process and the covalent executors.

    Credentials come only from here: the shared config/credentials files point to
    paths that do not exist, and the EC2 metadata lookup (a non-loopback address)
    is switched off.
    """
    return {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_CONFIG_FILE": str(session_dir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(session_dir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# Variables that would override the ones above or redirect boto3 elsewhere.
_AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def lot_session_dir() -> Path:
    """The session's private temp dir (covalent config, server data, logs)."""
    return SESSION_DIR


@pytest.fixture(scope="session")
def s3_server(lot_session_dir):
    """A started SeaweedFS S3 on loopback that enforces S3_ACCESS_KEY/S3_SECRET_KEY."""
    server = _servers.SeaweedS3(lot_session_dir / "seaweed", S3_ACCESS_KEY, S3_SECRET_KEY)
    server.start()
    saved = {k: os.environ.get(k) for k in (*_s3_env(lot_session_dir), *_AWS_UNSET)}
    for key in _AWS_UNSET:
        os.environ.pop(key, None)
    os.environ.update(_s3_env(lot_session_dir))
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=S3_REGION,
    )


@pytest.fixture
def bucket(s3_client):
    """A fresh, empty bucket; removed with its contents afterwards (best effort)."""
    # Lowercase letters, digits and '-' only, 3-63 chars: valid for AWS and SeaweedFS.
    name = f"lot-it-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    _empty_and_delete_bucket(s3_client, name)


def _empty_and_delete_bucket(client, name: str) -> None:
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for up in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
    except Exception as exc:  # cleanup must not turn a passing test into an error
        warnings.warn(f"could not delete bucket {name}: {exc!r}")


@pytest.fixture(scope="session")
def covalent_server(s3_server, lot_session_dir):
    """A started private Covalent server (2 dask workers) sharing this process's config.

    Its environment carries the AWS variables, so electrons running on its dask
    workers can reach ``s3_server``.
    """
    env_extra = {**_s3_env(lot_session_dir), **{key: None for key in _AWS_UNSET}}
    server = _servers.CovalentServer(COVALENT_DIR, env_extra=env_extra, port=COVALENT_PORT)
    server.start()
    # The server may have ended up on another port than COVALENT_PORT.
    os.environ.update(server.env)
    try:
        _sync_client_config(server)
        yield server
    finally:
        server.stop()


def _sync_client_config(server) -> None:
    """Make an already-imported covalent in this process talk to ``server``.

    The server may have been started on another port than COVALENT_PORT (when that
    one was taken) and records the real one, with its dask cluster's address, in
    the shared config file; the client reads that file only at import, so reload.
    """
    if "covalent" not in sys.modules:
        return  # a later import reads the up-to-date file
    from covalent._shared_files import config as ct_config

    manager = ct_config._config_manager
    if Path(manager.config_file).resolve() == server.config_file.resolve():
        ct_config.reload_config()
        return
    # covalent was imported before this conftest set the environment (e.g. by a
    # conftest higher up): its config lives elsewhere. Redirect it in memory only,
    # never writing to that (possibly real, in ~) file.
    warnings.warn(
        f"covalent was imported before {__file__} set COVALENT_* (config at "
        f"{manager.config_file}); only the dispatcher address is redirected"
    )
    manager.set("dispatcher.address", _servers.LOOPBACK)
    manager.set("dispatcher.port", server.port)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # trylast: after an interrupt (Ctrl-C, or SIGTERM, which _servers turns into
    # KeyboardInterrupt) pytest tears the session fixtures down in its own
    # sessionfinish hook; the servers must be stopped before their dirs go.
    # The temp dir is kept when asked for, to look at logs after a failure.
    if os.environ.get("LOT_IT_KEEP_TMP"):
        print(f"\nintegration temp dir kept: {SESSION_DIR}")
        return
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
