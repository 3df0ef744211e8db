"""Azure Blob Storage (``az://container/blob``), on azure-storage-blob.

Downloads use the SDK's ``download_blob(...).readinto``: ranges in parallel
into the engine's verifying sink. Small blobs go up in one ``upload_blob``,
larger ones block by block, committed at the end with the checksum (a block
blob becomes visible only at that commit). The account and its credential,
resolved on the executor, are in ``_azure_auth``.

Azure metadata names must be C# identifiers, so the checksum is stored as
``lot_crc32c`` or ``lot_sha256`` (the ``lot-*`` name with ``-`` spelled ``_``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._backend import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import (
    HTTP_STATUS_KINDS, Classified, ErrorKind, MissingBucket, codes_to_kinds, exception_chain, http_verdict,
)
from covalent_lot._pool import run_bounded
from covalent_lot._checksum import from_metadata
from covalent_lot._stream import VerifyingSink
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI

from ._azure_auth import ACCOUNT_OPTIONS, AzureAccount, check_account, first_line

__all__ = ["AzureStrategy", "AzureBackend", "OPTIONS", "METADATA_SEP"]

MiB = 1024 * 1024

# Azure metadata names must be valid C# identifiers: no '-' (lot_crc32c, lot_sha256).
METADATA_SEP = "_"

# Service limits (API version 2019-12-12 and later).
MAX_BLOCK_SIZE = 4000 * MiB
MAX_SINGLE_PUT_SIZE = 5000 * MiB
MAX_BLOCKS = 50_000
MAX_BLOB_NAME = 1024  # characters
MAX_SEGMENTS = 254

OPTIONS: dict[str, Option] = {
    **ACCOUNT_OPTIONS,
    "max_concurrency": Option("int", 4, "parallel block/range requests per blob", 1),
    "max_block_size": Option(
        "size", 8 * MiB, "block size of chunked uploads and range size of chunked downloads", 1 * MiB,
        maximum=MAX_BLOCK_SIZE,
    ),
    "max_single_put_size": Option(
        "size", 16 * MiB,
        "blobs up to this size move in one request (held in memory while it is sent)", 0,
        maximum=MAX_SINGLE_PUT_SIZE,
    ),
    "connect_timeout": Option("float", 10.0, "seconds to connect", 0.001),
    "read_timeout": Option("float", 60.0, "seconds to wait for data", 0.001),
    "copy_timeout": Option("float", 600.0, "seconds to wait for a server-side copy to finish", 0.001),
}

_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_SPECIAL_CONTAINERS = ("$root", "$web", "$logs")

_CODES = codes_to_kinds(
    DENIED={
        "AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
        "AuthorizationProtocolMismatch", "AuthorizationResourceTypeMismatch", "AuthorizationServiceMismatch",
        "AuthorizationSourceIPMismatch", "InsufficientAccountPermissions", "InvalidAuthenticationInfo",
        "AccountIsDisabled", "KeyBasedAuthenticationNotPermitted", "NoAuthenticationInformation",
    },
    THROTTLED={"ServerBusy", "TooManyRequests", "IngressOverAccountLimit", "EgressOverAccountLimit"},
    TIMEOUT={"OperationTimedOut"},
    # The staged blocks are gone (the service dropped them, or another writer
    # committed the blob meanwhile): a new attempt stages them again.
    SERVER={"InvalidBlockList"},
    INVALID={
        "InvalidResourceName", "InvalidMetadata", "MetadataTooLarge", "InvalidBlobOrBlock", "InvalidBlockId",
        "BlockCountExceedsLimit", "RequestBodyTooLarge", "InvalidHeaderValue", "InvalidQueryParameterValue",
        "InvalidUri", "OutOfRangeInput", "OutOfRangeQueryParameterValue", "InvalidInput", "InvalidBlobType",
        "InvalidXmlDocument", "UnsupportedHeader", "MissingRequiredHeader", "InvalidRange",
    },
)
# Azure names a bad request in its error code (an unknown one is no verdict), and
# a 504 comes from a gateway, not a slow operation: any 5xx is a server error.
_STATUSES = {status: kind for status, kind in HTTP_STATUS_KINDS.items() if status not in (400, 504)}
_CHANGED = "the blob changed (or is leased) while it was used; retry to read the new version"
_BUSY = "the blob or container is busy (leased, being copied or deleted)"


def block_size_for(size: int, configured: int) -> int:
    """``configured``, grown (in whole MiB) when ``size`` would need more than 50,000 blocks."""
    needed = math.ceil(size / MAX_BLOCKS)
    if needed <= configured:
        return configured
    block = math.ceil(needed / MiB) * MiB
    if block > MAX_BLOCK_SIZE:
        raise ValueError(f"{size:,} bytes exceed the largest block blob (50,000 blocks of 4000 MiB)")
    return block


def _quoted(etag: str | None) -> str | None:
    # Listings give the ETag bare, properties give it quoted; send it quoted.
    return etag if etag is None or etag.startswith(('"', "W/")) else f'"{etag}"'


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


class CopyFailed(Exception):
    """The service ended a server-side copy other than with success."""

    def __init__(self, destination: StoreURI, status: str, description: str):
        reason = description or "no reason given"
        super().__init__(f"server-side copy to {destination} ended {status}: {reason}")
        self.description = description or ""


class CopyTimeout(TimeoutError):
    """A server-side copy still pending after copy_timeout (it was aborted)."""


def await_copy(destination: StoreURI, started: Mapping[str, Any], poll: Callable[[], Any],
               abort: Callable[[str], None], timeout: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until the copy ``start_copy_from_url`` answered with ``started`` ends.

    ``poll()`` returns the destination's ``CopyProperties``; a copy still
    pending after ``timeout`` seconds is aborted (``abort(copy_id)``).
    """
    status, copy_id = started.get("copy_status"), started.get("copy_id")
    description = ""
    deadline = time.monotonic() + timeout
    pause = 0.1
    while status == "pending":
        if time.monotonic() >= deadline:
            with contextlib.suppress(Exception):  # the timeout is the error to report
                abort(copy_id)
            raise CopyTimeout(
                f"server-side copy to {destination} still pending after {timeout:.0f} s "
                "(copy_timeout); it was aborted"
            )
        sleep(pause)
        pause = min(pause * 2, 5.0)
        info = poll()
        if info.id is not None and copy_id is not None and info.id != copy_id:
            raise CopyFailed(destination, "superseded", "another copy to the same blob started")
        status, description = info.status, info.status_description or ""
    if status not in (None, "success"):
        raise CopyFailed(destination, status, description)


def stored_object(location: StoreURI, props: Any) -> RemoteObject:
    """What the SDK's ``BlobProperties`` (of a listing or of the blob) say about ``location``."""
    # Metadata names are case-insensitive in Azure (from_metadata compares them so).
    return RemoteObject(location, props.size, from_metadata(props.metadata, METADATA_SEP), props.etag,
                        epoch_seconds(props.last_modified))


def listed_objects(prefix: StoreURI, items: Iterator[Any]) -> Iterator[RemoteObject]:
    """The blobs of a listing below ``prefix``, without the folder markers of
    accounts with a hierarchical namespace (empty blobs flagged ``hdi_isfolder``)."""
    for item in items:
        if any(k.lower() == "hdi_isfolder" and v.lower() == "true" for k, v in (item.metadata or {}).items()):
            continue
        yield stored_object(StoreURI(prefix.scheme, prefix.bucket, item.name), item)


class AzureBackend(Backend):
    scheme = "az"
    # The checksum goes with the block-list commit, after the blocks: hash while staging.
    checksum_after_upload = True

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        # The client is built on first use (Backend.client), inside the engine's guard,
        # so that a missing credential becomes a translated PermissionError naming the target.
        self.account = AzureAccount(settings)

    @property
    def endpoint(self) -> str:
        return self.account.endpoint

    def connect(self):
        return self.account.client()

    def _blob(self, location: StoreURI):
        return self.client.get_blob_client(location.bucket, location.key)

    # --- primitives -----------------------------------------------------------------------
    def stat(self, location: StoreURI) -> RemoteObject:
        return stored_object(location, self._blob(location).get_blob_properties())

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        container = self.client.get_container_client(prefix.bucket)
        # Metadata comes with the listing: no request per blob for its checksum.
        yield from listed_objects(prefix, container.list_blobs(name_starts_with=prefix.key or None,
                                                               include=["metadata"]))

    def missing_container(self, location: StoreURI, cause: BaseException) -> MissingBucket | None:
        # The service's error code says which is missing: no request to ask again.
        if any(_error_code(err) == "ContainerNotFound" for err in exception_chain(cause)):
            return MissingBucket(location.bucket, noun="container")
        return None

    def put_file(self, local_path: str, location: StoreURI, size: int, digest) -> None:
        # Put Blob and Put Block List replace all metadata, so an upload without
        # a checksum (verify off) does not keep a stale one.
        blob = self._blob(location)
        with open(local_path, "rb") as f:
            if size <= self.settings["max_single_put_size"]:
                # One request (the bytes are held in memory while it is sent).
                checksum = digest()
                blob.upload_blob(f, length=size, overwrite=True,
                                 metadata=checksum.metadata(METADATA_SEP) if checksum is not None else None)
                self.sent(size)
                return
            block_ids = self._stage_blocks(blob, f.fileno(), size)
        # Metadata goes with the commit: the checksum was computed alongside
        # the staging (checksum_after_upload) and costs no pass of its own.
        checksum = digest()
        from azure.storage.blob import BlobBlock

        # Uncommitted blocks are invisible and expire on their own (7 days):
        # a failed upload leaves nothing under the name.
        blob.commit_block_list([BlobBlock(block_id) for block_id in block_ids],
                               metadata=checksum.metadata(METADATA_SEP) if checksum is not None else None)

    def _stage_blocks(self, blob, fd: int, size: int) -> list[str]:
        """Stage the file's blocks, ``max_concurrency`` at a time; their ids in order.

        Each block is read (``pread``) when its turn comes: memory is bounded
        by max_concurrency * block size.
        """
        import base64
        import uuid

        block = block_size_for(size, self.settings["max_block_size"])
        prefix = uuid.uuid4().hex  # ids are unique per upload: no mix with another writer's blocks

        def stage(item: tuple[int, int]) -> str:
            i, offset = item
            length = min(block, size - offset)
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"upload source shrank while it was read (at {offset})")
            block_id = base64.b64encode(f"{prefix}-{i:06d}".encode()).decode()
            blob.stage_block(block_id, data, length=length)
            self.sent(length)
            return block_id

        return run_bounded(enumerate(range(0, size, block)), stage, self.settings["max_concurrency"],
                           name="covalent-lot-az")

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        from azure.core import MatchConditions

        conditions: dict[str, Any] = {}
        if obj.version:
            # Every range request is pinned to the ETag the object was listed/stat'ed with.
            conditions = {"etag": _quoted(obj.version), "match_condition": MatchConditions.IfNotModified}
        downloader = self._blob(obj.location).download_blob(
            offset=start or None, max_concurrency=self.settings["max_concurrency"], **conditions
        )
        # Ranges are written (seek + write, relative to where the sink stands:
        # ``start``) in parallel into the sink, never readall().
        downloader.readinto(sink)
        seen = stored_object(obj.location, downloader.properties)
        return RemoteObject(obj.location, start + downloader.size, seen.checksum, seen.version)

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        from azure.core import MatchConditions

        conditions: dict[str, Any] = {}
        if source.version:
            conditions = {"source_etag": _quoted(source.version),
                          "source_match_condition": MatchConditions.IfNotModified}
        target = self._blob(destination)
        # No metadata argument: the service copies the source's, checksum included.
        started = target.start_copy_from_url(self.account.copy_source(self._blob(source.location).url),
                                             **conditions)
        await_copy(destination, started, lambda: target.get_blob_properties().copy, target.abort_copy,
                   self.settings["copy_timeout"])

    def delete(self, location: StoreURI) -> None:
        self._blob(location).delete_blob()

    def close(self) -> None:
        if self.connected:
            self.client.close()
            self._client = None
        self.account.close()

    # --- the error table ----------------------------------------------------------------
    def classify_one(self, err: BaseException) -> Classified | None:
        from azure.core import exceptions as ax

        verdict = self.account.verdict(err)
        if verdict is not None:
            return verdict
        if isinstance(err, CopyTimeout):
            return Classified(ErrorKind.TIMEOUT, str(err), "raise copy_timeout in [lot.azure]")
        if isinstance(err, CopyFailed):
            kind = ErrorKind.SERVER if err.description[:1] == "5" else ErrorKind.OTHER
            return Classified(kind, str(err), "")
        if isinstance(err, (ax.ServiceRequestTimeoutError, ax.ServiceResponseTimeoutError)):
            return Classified(ErrorKind.TIMEOUT, str(err))
        if isinstance(err, (ax.ServiceRequestError, ax.ServiceResponseError, ax.IncompleteReadError)):
            return Classified(ErrorKind.CONNECTION, str(err))
        status = getattr(err, "status_code", None)
        if isinstance(err, ax.HttpResponseError) and status is not None:
            code = _error_code(err)
            reason = first_line(err)
            detail = f"{code}: {reason}" if code and code not in reason else reason
            if isinstance(err, ax.ClientAuthenticationError):
                status = 401  # the SDK's verdict on the code, whatever the status
            hints = {ErrorKind.DENIED: self.account.hint(), ErrorKind.EXISTS: _BUSY if status == 409 else _CHANGED,
                     ErrorKind.NOT_FOUND: "check the container and blob name"}
            return http_verdict(status, code, detail, codes=_CODES, statuses=_STATUSES, hints=hints)
        if isinstance(err, ax.AzureError):
            # A wrapper without a response (the SDK's chunk downloader's): its cause says more.
            return Classified(ErrorKind.OTHER, first_line(err), "", weak=True)
        return None


class AzureStrategy(LotStrategy):
    """covalent-lot's Azure Blob strategy for ``az://container/blob`` and
    ``az://container/folder/``; every option can come from ``[lot.azure]``
    (``AzureStrategy()`` is built from covalent.conf and the environment)."""

    scheme = "az"
    section = "azure"
    extra = "azure"
    sdk_module = "azure.storage.blob"
    backend_path = "covalent_lot.strategies.azure:AzureBackend"
    options = OPTIONS

    bucket_noun, object_noun, max_key, key_unit = "Azure container", "Azure blob", MAX_BLOB_NAME, "characters"

    @staticmethod
    def bucket_problem(container: str) -> str | None:
        if container in _SPECIAL_CONTAINERS or _CONTAINER.match(container):
            return None
        return ("3-63 characters of lowercase letters, digits and single hyphens, starting and ending "
                "with a letter or digit")

    def __init__(self, **options: Any):
        super().__init__(**options)
        check_account(self.settings)

    def check_location(self, location: StoreURI) -> None:
        super().check_location(location)
        if location.key.rstrip("/").count("/") + 1 > MAX_SEGMENTS:
            raise ValueError(f"Azure blob names have at most {MAX_SEGMENTS} path segments; {location} has more")
