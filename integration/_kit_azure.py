"""Azure Blob kit: a private Azurite on loopback, and plain azure-storage-blob helpers.

Azurite enforces the well-known development account key (devstoreaccount1),
so wrong credentials are refused. It needs ``--skipApiVersionCheck``: the SDK
speaks a newer service version than Azurite 3.35 knows.
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

ROOT = Path(__file__).resolve().parents[1]
AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every installation): not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Well-formed (base64, 64 bytes) but not the account's key.
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="

# The checksum is stored as lot_sha256 on Azure (metadata names are C# identifiers);
# the contract suite speaks of it as lot-sha256.
_SUITE_KEY = "lot-sha256"
_AZURE_KEY = "lot_sha256"


def connection_string(endpoint: str, key: str = ACCOUNT_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint};"
    )


class Azurite:
    """A private ``azurite-blob`` on 127.0.0.1, in its own process group.

    Data, logs and Azurite's own databases stay below ``workdir``.
    """

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "azurite.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{_servers.LOOPBACK}:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint)

    def start(self) -> "Azurite":
        if self._proc is not None:
            raise RuntimeError("Azurite already started")
        if not AZURITE_BIN.exists():
            raise RuntimeError(
                f"Azurite not found at {AZURITE_BIN}; `make install` installs it "
                "(npm install --prefix .tools azurite@3.35.0, needs Node >= 18)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            try:
                self._start_once()
                return self
            except _PortClash:
                continue
        raise RuntimeError(
            f"Azurite could not bind a free port 3 times; log:\n{_servers._tail(self.log_path)}"
        )

    def _env(self) -> dict:
        # AZURITE_ACCOUNTS would replace devstoreaccount1 and its key.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}
        env.pop("NODE_OPTIONS", None)
        env["HOME"] = str(self.workdir)
        return env

    def _start_once(self) -> None:
        self.port = _servers.free_port(avoid_offsets=())
        args = [
            str(AZURITE_BIN),
            "--blobHost", _servers.LOOPBACK,
            "--blobPort", str(self.port),
            "--location", str(self.data_dir),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]
        self._log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: stop() signals the group
            )
        except OSError as exc:
            self._log.close()
            self._log = None
            raise RuntimeError(f"could not run {AZURITE_BIN} (is `node` on PATH?): {exc}") from exc
        _servers._LIVE.add(self)
        _servers._convert_sigterm()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"{self.endpoint}?comp=list"
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                log = _servers._tail(self.log_path)
                if "EADDRINUSE" in log:
                    raise _PortClash()
                raise RuntimeError(f"Azurite exited with {rc} while starting; log tail:\n{log}")
            # Any HTTP answer (403 without credentials) means it is serving.
            if _servers._http_status(url) is not None:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"Azurite not ready after {self.start_timeout:.1f}s; log tail:\n{_servers._tail(self.log_path)}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                _servers._kill_group(proc.pid, term_timeout=self.stop_timeout)
                _servers._reap(proc)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            _servers._LIVE.discard(self)

    def __enter__(self) -> "Azurite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _PortClash(Exception):
    pass


def _to_azure(metadata: dict | None) -> dict:
    # Azure refuses '-' in metadata names; the suite's lot-sha256 is lot_sha256 here.
    return {k.replace("-", "_"): v for k, v in (metadata or {}).items()}


class AzureKit(StoreKit):
    name = "azure"
    scheme = "az"
    enforces_credentials = True  # Azurite checks the shared-key signature
    listing_page_size = 5000  # List Blobs returns at most 5000 names per page

    def start(self, workdir: Path) -> None:
        from azure.storage.blob import BlobServiceClient

        self.server = Azurite(workdir / "azurite").start()
        self.client = BlobServiceClient.from_connection_string(self.server.connection_string)

    def stop(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str | None]:
        return {
            "AZURE_STORAGE_CONNECTION_STRING": self.server.connection_string,
            "COVALENT_LOT_AZURE_ACCOUNT_URL": self.server.endpoint,
            # Only the connection string above authenticates.
            "AZURE_STORAGE_KEY": None,
            "AZURE_STORAGE_SAS_TOKEN": None,
            "AZURE_STORAGE_ACCOUNT": None,
            "COVALENT_LOT_AZURE_ACCOUNT_NAME": None,
            "COVALENT_LOT_AZURE_CREDENTIAL": None,
        }

    def strategy(self, **options: Any):
        from covalent_lot.strategies.azure import AzureStrategy

        return AzureStrategy(**{"account_url": self.server.endpoint, **options})

    def new_bucket(self) -> str:
        name = self.unique()
        self.client.create_container(name)
        return name

    def delete_bucket(self, bucket: str) -> None:
        # Deleting a container deletes its blobs (and uncommitted blocks) with it.
        self.client.delete_container(bucket)

    def put_bytes(self, bucket, key, data, metadata=None):
        self.client.get_blob_client(bucket, key).upload_blob(
            data, overwrite=True, metadata=_to_azure(metadata)
        )

    def get_bytes(self, bucket, key):
        return self.client.get_blob_client(bucket, key).download_blob().readall()

    def get_metadata(self, bucket, key):
        metadata = dict(self.client.get_blob_client(bucket, key).get_blob_properties().metadata)
        if _AZURE_KEY in metadata:
            metadata[_SUITE_KEY] = metadata.pop(_AZURE_KEY)
        return metadata

    def list_keys(self, bucket, prefix=""):
        blobs = self.client.get_container_client(bucket).list_blobs(name_starts_with=prefix or None)
        return [b.name for b in blobs]

    def wrong_credentials(self):
        return {"AZURE_STORAGE_CONNECTION_STRING": connection_string(self.server.endpoint, WRONG_KEY)}
