"""Azure Blob kit: a private Azurite on loopback, and plain azure-storage-blob helpers.

Azurite enforces the well-known development account key (devstoreaccount1),
so wrong credentials are refused. It needs ``--skipApiVersionCheck``: the SDK
speaks a newer service version than Azurite 3.35 knows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from integration import _servers
from integration._kits import StoreKit

ROOT = Path(__file__).resolve().parents[1]
AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every installation): not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Well-formed (base64, 64 bytes) but not the account's key.
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="

# The checksum is stored as lot_crc32c / lot_sha256 on Azure (metadata names are
# C# identifiers); the contract suite speaks of lot-crc32c / lot-sha256.


def connection_string(endpoint: str, key: str = ACCOUNT_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint};"
    )


class Azurite(_servers.ServerProcess):
    """A private ``azurite-blob`` on 127.0.0.1, in its own process group.

    Data, logs and Azurite's own databases stay below ``workdir``.
    """

    _name = "Azurite"
    _clash_markers = ("EADDRINUSE",)
    _clash_error = "Azurite could not bind a free port 3 times; log:\n"

    def __init__(self, workdir: os.PathLike | str, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0) -> None:
        super().__init__(workdir, "azurite.log", start_timeout)
        self.stop_timeout = stop_timeout
        self.port: Optional[int] = None

    @property
    def endpoint(self) -> str:
        return f"http://{_servers.LOOPBACK}:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint)

    def _prepare(self) -> None:
        if not AZURITE_BIN.exists():
            raise RuntimeError(
                f"Azurite not found at {AZURITE_BIN}; `make install` installs it "
                "(npm install --prefix .tools azurite@3.35.0, needs Node >= 18)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict:
        # AZURITE_ACCOUNTS would replace devstoreaccount1 and its key.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}
        env.pop("NODE_OPTIONS", None)
        env["HOME"] = str(self.workdir)
        return env

    def _command(self) -> list[str]:
        self.port = _servers.free_port(avoid_offsets=())
        return [
            str(AZURITE_BIN),
            "--blobHost", _servers.LOOPBACK,
            "--blobPort", str(self.port),
            "--location", str(self.data_dir),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]

    def _spawn_failed(self, exc: OSError) -> None:
        raise RuntimeError(f"could not run {AZURITE_BIN} (is `node` on PATH?): {exc}") from exc

    def _ready(self) -> bool:
        # Any HTTP answer (403 without credentials) means it is serving.
        return _servers._http_status(f"{self.endpoint}?comp=list") is not None


def _to_azure(metadata: dict | None) -> dict:
    # Azure refuses '-' in metadata names; the suite's lot-crc32c is lot_crc32c here.
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
        return {k.replace("_", "-") if k.startswith("lot_") else k: v for k, v in metadata.items()}

    def list_keys(self, bucket, prefix=""):
        blobs = self.client.get_container_client(bucket).list_blobs(name_starts_with=prefix or None)
        return [b.name for b in blobs]

    def wrong_credentials(self):
        return {"AZURE_STORAGE_CONNECTION_STRING": connection_string(self.server.endpoint, WRONG_KEY)}

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Blobs holding uncommitted blocks (Azure drops them after a week or at
        the blob's next commit)."""
        container = self.client.get_container_client(bucket)
        found = []
        for blob in container.list_blobs(include=["uncommittedblobs"]):
            _committed, uncommitted = container.get_blob_client(blob.name).get_block_list("uncommitted")
            if uncommitted:
                found.append(f"{len(uncommitted)} uncommitted blocks of {blob.name}")
        return found
