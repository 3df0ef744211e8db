"""Store kits: what the backend-independent contract suite needs from each backend.

A kit starts its real server as a process on 127.0.0.1, builds the strategy
pointing at it, and offers a few plain-SDK operations (no covalent-lot code)
so tests can check interop and tamper with stored bytes. Kits for other
backends live in ``_kit_<name>.py`` and follow :class:`StoreKit` exactly.
"""

from __future__ import annotations

import importlib
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

from integration import _servers

# name -> (module of this package, kit class). A backend joins the contract suite
# when its kit module is there; LOT_BACKENDS=s3,gcs narrows the run.
KIT_CLASSES = {
    "s3": ("_kits", "S3Kit"),
    "gcs": ("_kit_gcs", "GCSKit"),
    "azure": ("_kit_azure", "AzureKit"),
    "sftp": ("_kit_sftp", "SFTPKit"),
}

# SFTP keeps each object's checksum in a sidecar file beside it, named after the
# checksum; covalent-lot writes crc32c unless told otherwise (offloads: sha256).
SIDECARS = (".lot-crc32c", ".lot-sha256")
SIDECAR = ".lot-crc32c"


def is_sidecar(key: str) -> bool:
    return key.endswith(SIDECARS)


def crc32c_of(data_or_path) -> str:
    """``crc32c:<hex>`` of bytes or of a file: what covalent-lot stores by default."""
    from covalent_lot._checksum import file_checksum, new_hasher

    if isinstance(data_or_path, (bytes, bytearray)):
        hasher = new_hasher("crc32c")
        hasher.update(bytes(data_or_path))
        return f"crc32c:{hasher.hexdigest()}"
    return str(file_checksum(str(data_or_path), "crc32c")[0])


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def stored_checksum(kit, bucket: str, key: str) -> str | None:
    """The checksum stored with an object (``crc32c:<hex>``, ``sha256:<hex>``), read with the plain SDK."""
    from covalent_lot._checksum import from_metadata

    found = from_metadata(kit.get_metadata(bucket, key))
    return str(found) if found is not None else None


# Programs a backend's server needs that `make install` cannot provide (no root).
REQUIRED_TOOLS = {"sftp": ("sshd", "ssh-keygen")}
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def kit_class(name: str) -> type:
    """The kit class of backend ``name``; its module is imported only now, so a
    run that leaves a backend out never imports that backend's SDK."""
    module_name, class_name = KIT_CLASSES[name]
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)


def selected_backends() -> list[str]:
    """The backends LOT_BACKENDS names (default all) whose kit module and server
    programs are here."""
    wanted = [b for b in os.environ.get("LOT_BACKENDS", "").split(",") if b]
    names = []
    for name, (module, _) in KIT_CLASSES.items():
        if wanted and name not in wanted:
            continue
        if not Path(__file__).with_name(f"{module}.py").exists():
            continue
        missing = [tool for tool in REQUIRED_TOOLS.get(name, ()) if not shutil.which(tool, path=_TOOL_PATH)]
        if missing and not os.environ.get("CI"):
            # A developer machine without the server: say so, run the rest. CI
            # installs every server (.ci/run), so there a missing one fails loudly.
            warnings.warn(f"{name} backend not tested: {', '.join(missing)} not installed "
                          f"(.ci/run shows how to install it)")
            continue
        names.append(name)
    return names


class StoreKit:
    """Interface every backend kit implements."""

    name: str = ""  # test id and covalent.conf section: "s3", "gcs", "azure"
    scheme: str = ""  # URI scheme: "s3", "gs", "az"
    # Whether the server enforces credentials (wrong ones -> PermissionError).
    enforces_credentials: bool = True

    def start(self, workdir: Path) -> None:
        """Start the server (bounded wait) and set up SDK clients."""
        raise NotImplementedError

    def stop(self) -> None:
        """Close the SDK client (when the kit has one), then stop the server."""
        client = getattr(self, "client", None)
        try:
            if client is not None and hasattr(client, "close"):
                client.close()
        finally:
            self.server.stop()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str | None]:
        """Environment for the test process AND the Covalent server (its executors):
        credentials by reference plus COVALENT_LOT_<NAME>_* options, so that
        ``<Strategy>()`` with no arguments reaches this server. None unsets."""
        raise NotImplementedError

    def strategy(self, **options: Any):
        """A strategy for this server (explicit endpoint), with ``options``."""
        raise NotImplementedError

    def uri(self, bucket: str, key: str) -> str:
        return f"{self.scheme}://{bucket}/{key}"

    def new_bucket(self) -> str:
        """Create a fresh, empty bucket/container with a unique valid name."""
        raise NotImplementedError

    def delete_bucket(self, bucket: str) -> None:
        """Remove it with everything in it (best effort)."""
        raise NotImplementedError

    # --- plain SDK, no covalent-lot ----------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, metadata: dict | None = None) -> None:
        raise NotImplementedError

    def get_bytes(self, bucket: str, key: str) -> bytes:
        raise NotImplementedError

    def get_metadata(self, bucket: str, key: str) -> dict:
        """User metadata of the object (e.g. {'lot-crc32c': ...})."""
        raise NotImplementedError

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def wrong_credentials(self) -> dict[str, str | None]:
        """Environment overrides under which the strategy's requests are denied."""
        raise NotImplementedError

    @staticmethod
    def unique(prefix: str = "lot-it") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}"


class S3Kit(StoreKit):
    name = "s3"
    scheme = "s3"
    access_key = "lottestaccess"
    secret_key = "lottestsecret0123456789"
    region = "us-east-1"

    def start(self, workdir: Path) -> None:
        self.server = _servers.SeaweedS3(workdir / "seaweed", self.access_key, self.secret_key).start()
        import boto3

        self.client = boto3.client(
            "s3", endpoint_url=self.server.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
        )
        self._workdir = workdir

    @property
    def env(self) -> dict[str, str | None]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Credentials come only from the two variables above.
            "AWS_CONFIG_FILE": str(self._workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self._workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_ENDPOINT_URL": None,
            "AWS_ENDPOINT_URL_S3": None,
            "COVALENT_LOT_S3_ENDPOINT_URL": self.server.endpoint,
            "COVALENT_LOT_S3_REGION_NAME": self.region,
        }

    def strategy(self, **options: Any):
        from covalent_lot.strategies.s3 import S3Strategy

        return S3Strategy(**{"endpoint_url": self.server.endpoint, "region_name": self.region, **options})

    def new_bucket(self) -> str:
        name = self.unique()
        self.client.create_bucket(Bucket=name)
        return name

    def delete_bucket(self, bucket: str) -> None:
        client = self.client
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for up in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)

    def put_bytes(self, bucket, key, data, metadata=None):
        self.client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})

    def get_bytes(self, bucket, key):
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def get_metadata(self, bucket, key):
        return self.client.head_object(Bucket=bucket, Key=key)["Metadata"]

    def list_keys(self, bucket, prefix=""):
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    def wrong_credentials(self):
        return {"AWS_ACCESS_KEY_ID": "wrongkey", "AWS_SECRET_ACCESS_KEY": "wrongsecret"}

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Multipart uploads started but neither completed nor aborted (they keep
        their parts, and cost storage, until aborted or a lifecycle rule expires them)."""
        found = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            found += [f"multipart upload of {up['Key']}" for up in page.get("Uploads", [])]
        return found
