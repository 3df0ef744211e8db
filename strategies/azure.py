"""Azure Blob Storage (``az://container/blob``), on azure-storage-blob.

Transfers use the SDK's own chunked machinery: ``upload_blob`` stages blocks
in parallel from the open file and commits them at the end (a block blob only
becomes visible at that commit), ``download_blob(...).readinto`` fetches
ranges in parallel into the engine's verifying sink. covalent-lot adds the
checksum, atomic local files, retries and the error table from the engine.

The account comes from options (``account_url`` or ``account_name``).
Credentials are never options: the options name *environment variables*
that the executor reads when the transfer runs (a connection string, an
account key or a SAS token), or ask for ``DefaultAzureCredential`` from the
optional azure-identity package. Nothing secret is stored on the strategy,
in its settings or in what Covalent pickles.

Azure metadata names must be C# identifiers, so the checksum is stored as
``lot_sha256`` (``CHECKSUM_KEY`` with ``-`` spelled ``_``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import time
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, urlsplit, urlunsplit

from covalent_lot._config import Option
from covalent_lot._engine import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import Classified, ErrorKind, MissingBucket, exception_chain
from covalent_lot._retry import RetryPolicy
from covalent_lot._stream import CHECKSUM_KEY, VerifyingSink
from covalent_lot._strategy import LotStrategy, key_too_long
from covalent_lot._uri import StoreURI

__all__ = ["AzureStrategy", "AzureBackend", "OPTIONS", "METADATA_KEY"]

MiB = 1024 * 1024

# Azure metadata names must be valid C# identifiers: no '-'.
METADATA_KEY = CHECKSUM_KEY.replace("-", "_")

CREDENTIALS = ("auto", "connection_string", "account_key", "sas_token", "azure_identity", "anonymous")

OPTIONS: dict[str, Option] = {
    "account_url": Option(
        "str", None,
        "blob endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 "
        "(default: https://<account_name>.blob.core.windows.net)",
    ),
    "account_name": Option("str", None, "storage account name (builds account_url; names the key's account)"),
    "credential": Option(
        "str", "auto",
        "how the executor authenticates: auto tries the connection string, key and SAS "
        "variables in turn, then DefaultAzureCredential (azure-identity)",
        choices=CREDENTIALS,
    ),
    "connection_string_env": Option(
        "str", "AZURE_STORAGE_CONNECTION_STRING",
        "name of the executor's environment variable holding a connection string",
    ),
    "account_key_env": Option(
        "str", "AZURE_STORAGE_KEY", "name of the executor's environment variable holding an account key"
    ),
    "sas_token_env": Option(
        "str", "AZURE_STORAGE_SAS_TOKEN", "name of the executor's environment variable holding a SAS token"
    ),
    "max_concurrency": Option("int", 4, "parallel block/range requests per blob", 1),
    "max_block_size": Option(
        "size", 8 * MiB, "block size of chunked uploads and range size of chunked downloads", 1 * MiB
    ),
    "max_single_put_size": Option(
        "size", 16 * MiB,
        "blobs up to this size move in one request (held in memory while it is sent)", 0,
    ),
    "connect_timeout": Option("float", 10.0, "seconds to connect", 0.001),
    "read_timeout": Option("float", 60.0, "seconds to wait for data", 0.001),
    "copy_timeout": Option("float", 600.0, "seconds to wait for a server-side copy to finish", 0.001),
}

# Service limits (API version 2019-12-12 and later).
MAX_BLOCK_SIZE = 4000 * MiB
MAX_SINGLE_PUT_SIZE = 5000 * MiB
MAX_BLOCKS = 50_000
MAX_BLOB_NAME = 1024  # characters
MAX_SEGMENTS = 254

_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_SPECIAL_CONTAINERS = ("$root", "$web", "$logs")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_DENIED_CODES = {
    "AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
    "AuthorizationProtocolMismatch", "AuthorizationResourceTypeMismatch",
    "AuthorizationServiceMismatch", "AuthorizationSourceIPMismatch",
    "InsufficientAccountPermissions", "InvalidAuthenticationInfo", "AccountIsDisabled",
    "KeyBasedAuthenticationNotPermitted", "NoAuthenticationInformation",
}
_INVALID_CODES = {
    "InvalidResourceName", "InvalidMetadata", "MetadataTooLarge", "InvalidBlobOrBlock",
    "InvalidBlockId", "BlockCountExceedsLimit", "RequestBodyTooLarge",
    "InvalidHeaderValue", "InvalidQueryParameterValue", "InvalidUri", "OutOfRangeInput",
    "OutOfRangeQueryParameterValue", "InvalidInput", "InvalidBlobType", "InvalidXmlDocument",
    "UnsupportedHeader", "MissingRequiredHeader", "InvalidRange",
}
_THROTTLED_CODES = {"ServerBusy", "TooManyRequests", "IngressOverAccountLimit", "EgressOverAccountLimit"}
_TIMEOUT_CODES = {"OperationTimedOut"}


# --- options, checked on the client ------------------------------------------------------

def display_url(url: str) -> str:
    """``url`` without query, fragment or user info: safe to show in messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def account_url_of(settings: Mapping[str, Any]) -> str | None:
    """The configured blob endpoint, or None (a connection string then brings it)."""
    if settings["account_url"] is not None:
        return settings["account_url"].rstrip("/")
    if settings["account_name"] is not None:
        return f"https://{settings['account_name']}.blob.core.windows.net"
    return None


def account_name_of(settings: Mapping[str, Any], url: str) -> str | None:
    """The account an account key belongs to: the option, else read from the URL."""
    if settings["account_name"] is not None:
        return settings["account_name"]
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ".blob.core." in host:
        return host.split(".", 1)[0]
    # Emulators and IP-style endpoints put the account first in the path.
    first = parts.path.strip("/").split("/", 1)[0]
    return first or None


def check_settings(settings: Mapping[str, Any]) -> None:
    """Rules beyond single options; ValueError naming the option, never echoing a secret."""
    for option in ("connection_string_env", "account_key_env", "sas_token_env"):
        if not _ENV_NAME.match(settings[option]):
            # The value may be the secret itself, pasted by mistake: do not show it.
            raise ValueError(
                f"option {option} must be the NAME of an environment variable (letters, digits, "
                "'_'), not its value; set the secret itself in the executor's environment"
            )
    url = settings["account_url"]
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"option account_url must be an http(s) URL such as "
                f"https://myaccount.blob.core.windows.net, got {display_url(url)!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"option account_url {display_url(url)!r} must not carry a query string or "
                f"user info: put a SAS token in the executor's ${settings['sas_token_env']} "
                "(option sas_token_env) instead"
            )
    name = settings["account_name"]
    if name is not None and not _ACCOUNT.match(name):
        raise ValueError(
            f"option account_name {name!r}: storage account names are 3-24 lowercase letters and digits"
        )
    mode = settings["credential"]
    if mode not in ("auto", "connection_string") and account_url_of(settings) is None:
        raise ValueError(
            f"credential={mode} needs the account: set account_url or account_name "
            "(covalent.conf [lot.azure], COVALENT_LOT_AZURE_ACCOUNT_URL or an argument)"
        )
    if mode == "azure_identity" and urlsplit(account_url_of(settings)).scheme != "https":
        raise ValueError("credential=azure_identity sends tokens and needs an https account_url")
    if settings["max_block_size"] > MAX_BLOCK_SIZE:
        raise ValueError(f"option max_block_size must be <= {MAX_BLOCK_SIZE:,} bytes (4000 MiB)")
    if settings["max_single_put_size"] > MAX_SINGLE_PUT_SIZE:
        raise ValueError(f"option max_single_put_size must be <= {MAX_SINGLE_PUT_SIZE:,} bytes (5000 MiB)")


def container_problem(container: str) -> str | None:
    if container in _SPECIAL_CONTAINERS or _CONTAINER.match(container):
        return None
    return (
        "3-63 characters of lowercase letters, digits and single hyphens, starting and "
        "ending with a letter or digit"
    )


# --- helpers used on the executor ----------------------------------------------------------

def block_size_for(size: int, configured: int) -> int:
    """``configured``, grown (in whole MiB) when ``size`` would need more than 50,000 blocks."""
    needed = math.ceil(size / MAX_BLOCKS)
    if needed <= configured:
        return configured
    block = math.ceil(needed / MiB) * MiB
    if block > MAX_BLOCK_SIZE:
        raise ValueError(
            f"{size:,} bytes exceed the largest block blob (50,000 blocks of 4000 MiB)"
        )
    return block


def _checksum(metadata: Mapping[str, str] | None) -> str | None:
    # Metadata names are case-insensitive in Azure.
    for name, value in (metadata or {}).items():
        if name.lower() == METADATA_KEY:
            return value
    return None


def _is_directory_marker(metadata: Mapping[str, str] | None) -> bool:
    # Accounts with a hierarchical namespace list folders as empty blobs flagged so.
    return any(k.lower() == "hdi_isfolder" and v.lower() == "true" for k, v in (metadata or {}).items())


def _quoted(etag: str | None) -> str | None:
    # Listings give the ETag bare, properties give it quoted; send it quoted.
    if etag is None or etag.startswith('"') or etag.startswith("W/"):
        return etag
    return f'"{etag}"'


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


@functools.lru_cache(maxsize=None)
def _retry_class():
    from azure.storage.blob import ExponentialRetry

    class EngineBackoffRetry(ExponentialRetry):
        """The SDK's per-request retries, with the engine's backoff (full jitter, capped)."""

        def __init__(self, policy: RetryPolicy, **kwargs: Any):
            self.lot_policy = policy
            super().__init__(**kwargs)

        def get_backoff_time(self, settings: dict) -> float:
            return self.lot_policy.delay(settings["count"])

    return EngineBackoffRetry


def sdk_retry_policy(settings: Mapping[str, Any]):
    """Per-request retries inside the SDK: max_attempts attempts per request, like boto3's.

    The engine retries a whole transfer on top of this (only when the SDK gave
    up on a transient error), so one bad block does not restart a large upload.
    """
    policy = RetryPolicy(settings["max_attempts"], settings["base_delay"], settings["max_delay"])
    retries = settings["max_attempts"] - 1
    return _retry_class()(
        policy, retry_total=retries, retry_connect=retries, retry_read=retries,
        retry_status=retries, retry_to_secondary=False,
    )


def _MissingContainer(container: str) -> MissingBucket:
    return MissingBucket(container, noun="container")


class _NoCredential(Exception):
    """No credential could be resolved on the executor."""


class _NoAccount(Exception):
    """A credential was found but no account to use it with."""


class _CopyFailed(Exception):
    def __init__(self, destination: StoreURI, status: str, description: str):
        reason = description or "no reason given"
        super().__init__(f"server-side copy to {destination} ended {status}: {reason}")
        self.status = status
        self.description = description or ""


class _CopyTimeout(TimeoutError):
    pass


class AzureBackend(Backend):
    scheme = "az"
    # The checksum goes with the block-list commit, after the blocks: hash while staging.
    checksum_after_upload = True

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        # The client is built on first use (Backend.client), inside the engine's guard,
        # so that a missing credential becomes a translated PermissionError naming the target.
        self._identity = None  # DefaultAzureCredential, closed with the client
        self._copy_sas: str | None = None  # appended to copy sources for SAS credentials
        url = account_url_of(settings)
        self._endpoint = display_url(url) if url else "(account from the connection string)"

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # --- the client ---------------------------------------------------------------------
    def _client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        s = self.settings
        kwargs = {
            "retry_policy": sdk_retry_policy(s),
            "connection_timeout": s["connect_timeout"],
            "read_timeout": s["read_timeout"],
            "max_block_size": s["max_block_size"],
            "max_single_put_size": s["max_single_put_size"],
            # Downloads: the first request is held in memory whole, then ranges of
            # max_block_size are written as they arrive.
            "max_single_get_size": s["max_block_size"],
            "max_chunk_get_size": s["max_block_size"],
        }
        kwargs.update(overrides)
        return kwargs

    def _secret(self, option: str) -> str | None:
        value = os.environ.get(self.settings[option])
        return value.strip() if value and value.strip() else None

    def connect(self):
        return self._connect(**self._client_kwargs())

    def _connect(self, **kwargs: Any):
        """The client for the first credential found, in the order of ``credential``."""
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
        from azure.storage.blob import BlobServiceClient

        s = self.settings
        mode = s["credential"]
        url = account_url_of(s)

        if mode in ("auto", "connection_string"):
            connection_string = self._secret("connection_string_env")
            if connection_string is not None:
                return self._from_connection_string(connection_string, url, kwargs)
        if mode in ("auto", "account_key"):
            key = self._secret("account_key_env")
            if key is not None:
                url = self._require_account(url, f"${s['account_key_env']}")
                name = account_name_of(s, url)
                if name is None:
                    raise _NoAccount(f"the account of ${s['account_key_env']} is unknown: set account_name")
                return BlobServiceClient(url, credential=AzureNamedKeyCredential(name, key), **kwargs)
        if mode in ("auto", "sas_token"):
            sas = self._secret("sas_token_env")
            if sas is not None:
                sas = sas.lstrip("?")
                if "sig" not in parse_qs(sas):
                    raise _NoCredential(f"${s['sas_token_env']} does not hold a SAS token (sv=...&sig=...)")
                url = self._require_account(url, f"${s['sas_token_env']}")
                # Kept out of the client's URLs (and so out of messages); copies need it.
                self._copy_sas = sas
                return BlobServiceClient(url, credential=AzureSasCredential(sas), **kwargs)
        if mode == "anonymous":
            return BlobServiceClient(self._require_account(url, "anonymous access"), **kwargs)
        if mode in ("auto", "azure_identity"):
            return self._with_identity(url, kwargs)
        raise _NoCredential(f"${s[mode + '_env']} is not set on the executor")

    def _with_identity(self, url: str | None, kwargs: dict):
        from azure.storage.blob import BlobServiceClient

        s = self.settings
        unset = (
            f"none of ${s['connection_string_env']}, ${s['account_key_env']}, "
            f"${s['sas_token_env']} is set on the executor"
        )
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            if s["credential"] == "azure_identity":
                raise ImportError(
                    "credential=azure_identity needs azure-identity on the executor: "
                    "pip install covalent-lot[azure-identity]"
                ) from exc
            raise _NoCredential(
                f"{unset}, and azure-identity (for DefaultAzureCredential) is not installed there"
            ) from None
        if url is None or urlsplit(url).scheme != "https":
            # Only reachable with credential=auto: azure_identity is checked on the client.
            raise _NoCredential(
                f"{unset}, and DefaultAzureCredential needs an https account_url or account_name"
            )
        self._identity = DefaultAzureCredential()
        return BlobServiceClient(url, credential=self._identity, **kwargs)

    def _require_account(self, url: str | None, what: str) -> str:
        if url is None:
            raise _NoAccount(f"{what} needs the account: set account_url or account_name")
        return url

    def _from_connection_string(self, connection_string: str, url: str | None, kwargs: dict):
        from azure.core.credentials import AzureSasCredential
        from azure.storage.blob import BlobServiceClient

        try:
            service = BlobServiceClient.from_connection_string(connection_string, **kwargs)
        except ValueError as exc:
            # Not chained: a parser's message could quote the string.
            raise _NoCredential(
                f"${self.settings['connection_string_env']} is not a valid connection string "
                f"({type(exc).__name__})"
            ) from None
        sas = urlsplit(service.url).query or None
        if url is None or display_url(url) == display_url(service.primary_endpoint):
            self._endpoint = display_url(service.primary_endpoint)
            return service
        # account_url was set explicitly: it wins; the connection string lends its credential.
        credential = service.credential if sas is None else AzureSasCredential(sas)
        if sas is not None:
            self._copy_sas = sas
        service.close()
        return BlobServiceClient(url, credential=credential, **kwargs)

    def _blob(self, location: StoreURI):
        return self.client.get_blob_client(location.bucket, location.key)

    @contextlib.contextmanager
    def _naming(self, container: str):
        """Turn "container not found" into an error that names the container."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            yield
        except ResourceNotFoundError as exc:
            if _error_code(exc) == "ContainerNotFound":
                raise _MissingContainer(container) from exc
            raise

    # --- primitives -----------------------------------------------------------------------
    def stat(self, location: StoreURI) -> RemoteObject:
        with self._naming(location.bucket):
            props = self._blob(location).get_blob_properties()
        return RemoteObject(location, props.size, _checksum(props.metadata), props.etag,
                            epoch_seconds(props.last_modified))

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        container = self.client.get_container_client(prefix.bucket)
        with self._naming(prefix.bucket):
            # Metadata comes with the listing: no request per blob for its checksum.
            for item in container.list_blobs(name_starts_with=prefix.key or None, include=["metadata"]):
                if _is_directory_marker(item.metadata):
                    continue
                yield RemoteObject(
                    StoreURI(prefix.scheme, prefix.bucket, item.name),
                    item.size, _checksum(item.metadata), _quoted(item.etag),
                    epoch_seconds(item.last_modified),
                )

    def put_file(self, local_path: str, location: StoreURI, size: int, sha256) -> None:
        # Put Blob and Put Block List replace all metadata, so an upload without
        # a checksum (verify off) does not keep a stale one.
        blob = self._blob(location)
        with self._naming(location.bucket), open(local_path, "rb") as f:
            if size <= self.settings["max_single_put_size"]:
                # One request (the bytes are held in memory while it is sent).
                digest = sha256() if callable(sha256) else sha256
                blob.upload_blob(f, length=size, overwrite=True,
                                 metadata={METADATA_KEY: digest} if digest is not None else None)
                self.sent(size)
                return
            block_ids = self._stage_blocks(blob, f.fileno(), size)
            # Metadata goes with the commit: the checksum was computed alongside
            # the staging (checksum_after_upload) and costs no pass of its own.
            digest = sha256() if callable(sha256) else sha256
            from azure.storage.blob import BlobBlock

            # Uncommitted blocks are invisible and expire on their own (7 days):
            # a failed upload leaves nothing under the name.
            blob.commit_block_list([BlobBlock(block_id) for block_id in block_ids],
                                   metadata={METADATA_KEY: digest} if digest is not None else None)

    def _stage_blocks(self, blob, fd: int, size: int) -> list[str]:
        """Stage the file's blocks, ``max_concurrency`` at a time; their ids in order.

        Each worker reads its block with ``pread`` when it starts: memory is
        bounded by max_concurrency * block size.
        """
        import base64
        import concurrent.futures
        import uuid

        block = block_size_for(size, self.settings["max_block_size"])
        prefix = uuid.uuid4().hex  # ids are unique per upload: no mix with another writer's blocks
        ranges = [(i, offset, min(block, size - offset)) for i, offset in enumerate(range(0, size, block))]
        ids = [base64.b64encode(f"{prefix}-{i:06d}".encode()).decode() for i, _, _ in ranges]

        def stage(item: tuple[int, int, int]) -> None:
            i, offset, length = item
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"upload source shrank while it was read (at {offset})")
            blob.stage_block(ids[i], data, length=length)
            self.sent(length)

        workers = max(1, min(self.settings["max_concurrency"], len(ranges)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="covalent-lot-az") as pool:
            futures = [pool.submit(stage, item) for item in ranges[:workers]]
            pending = iter(ranges[workers:])
            # At most `workers` blocks submitted: the first failure stops new ones.
            while futures:
                done, rest = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
                futures = list(rest)
                for future in done:
                    future.result()  # the first failure stops the upload
                    item = next(pending, None)
                    if item is not None:
                        futures.append(pool.submit(stage, item))
        return ids

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        from azure.core import MatchConditions

        conditions: dict[str, Any] = {}
        if obj.version:
            # Every range request is pinned to the ETag the object was listed/stat'ed with.
            conditions = {"etag": _quoted(obj.version), "match_condition": MatchConditions.IfNotModified}
        with self._naming(obj.location.bucket):
            downloader = self._blob(obj.location).download_blob(
                offset=start or None, max_concurrency=self.settings["max_concurrency"], **conditions
            )
            # Ranges are written (seek + write, relative to where the sink stands:
            # ``start``) in parallel into the sink, never readall().
            downloader.readinto(sink)
        props = downloader.properties
        return RemoteObject(obj.location, start + downloader.size, _checksum(props.metadata), props.etag)

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        from azure.core import MatchConditions

        source_url = self._blob(source.location).url
        if self._copy_sas is not None and "sig=" not in urlsplit(source_url).query:
            source_url += ("&" if "?" in source_url else "?") + self._copy_sas
        conditions: dict[str, Any] = {}
        if source.version:
            conditions = {"source_etag": _quoted(source.version),
                          "source_match_condition": MatchConditions.IfNotModified}
        target = self._blob(destination)
        with self._naming(destination.bucket):
            # No metadata argument: the service copies the source's, checksum included.
            started = target.start_copy_from_url(source_url, **conditions)
            status, copy_id = started.get("copy_status"), started.get("copy_id")
            description = ""
            deadline = time.monotonic() + self.settings["copy_timeout"]
            pause = 0.1
            while status == "pending":
                if time.monotonic() >= deadline:
                    with contextlib.suppress(Exception):
                        target.abort_copy(copy_id)
                    raise _CopyTimeout(
                        f"server-side copy to {destination} still pending after "
                        f"{self.settings['copy_timeout']:.0f} s (copy_timeout); it was aborted"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                info = target.get_blob_properties().copy
                if info.id is not None and copy_id is not None and info.id != copy_id:
                    raise _CopyFailed(destination, "superseded", "another copy to the same blob started")
                status, description = info.status, info.status_description or ""
        if status not in (None, "success"):
            raise _CopyFailed(destination, status, description)

    def delete(self, location: StoreURI) -> None:
        with self._naming(location.bucket):
            self._blob(location).delete_blob()

    def close(self) -> None:
        if self.connected:
            self.client.close()
            self._client = None
        if self._identity is not None:
            self._identity.close()
            self._identity = None

    # --- the error table ----------------------------------------------------------------
    def _credential_hint(self) -> str:
        s = self.settings
        return (
            f"set ${s['connection_string_env']}, ${s['account_key_env']} or ${s['sas_token_env']} "
            f"on the executor (credential={s['credential']}; the variable names are options "
            "of [lot.azure]), or install covalent-lot[azure-identity] for DefaultAzureCredential; "
            "check that the credential may access this container"
        )

    def classify_one(self, exc: BaseException) -> Classified | None:
        from azure.core import exceptions as ax

        timeouts = tuple(
            t for t in (getattr(ax, "ServiceRequestTimeoutError", None),
                        getattr(ax, "ServiceResponseTimeoutError", None)) if t is not None
        )
        fallback: BaseException | None = None
        for err in exception_chain(exc):
            if isinstance(err, MissingBucket):
                return err.verdict()
            if isinstance(err, _NoCredential):
                return Classified(ErrorKind.DENIED, f"no Azure credential: {err}", self._credential_hint())
            if isinstance(err, _NoAccount):
                return Classified(ErrorKind.INVALID, str(err),
                                  "set account_url or account_name in [lot.azure] or "
                                  "COVALENT_LOT_AZURE_ACCOUNT_URL")
            if isinstance(err, _CopyTimeout):
                return Classified(ErrorKind.TIMEOUT, str(err), "raise copy_timeout in [lot.azure]")
            if isinstance(err, _CopyFailed):
                kind = ErrorKind.SERVER if err.description[:1] == "5" else ErrorKind.OTHER
                return Classified(kind, str(err), "")
            if timeouts and isinstance(err, timeouts):
                return Classified(ErrorKind.TIMEOUT, str(err))
            if isinstance(err, (ax.ServiceRequestError, ax.ServiceResponseError, ax.IncompleteReadError)):
                return Classified(ErrorKind.CONNECTION, str(err))
            if isinstance(err, ax.HttpResponseError):
                verdict = self._classify_response(err, ax)
                if verdict is not None:
                    return verdict
                fallback = fallback or err  # a wrapper without a response: look at its cause
                continue
            if isinstance(err, ax.AzureError):
                fallback = fallback or err
                continue
            if isinstance(err, (ConnectionError, TimeoutError)):
                kind = ErrorKind.TIMEOUT if isinstance(err, TimeoutError) else ErrorKind.CONNECTION
                return Classified(kind, str(err))
        if fallback is not None:
            return Classified(ErrorKind.OTHER, _first_line(fallback), "")
        return None

    def _classify_response(self, err, ax) -> Classified | None:
        status = err.status_code
        if status is None and err.response is not None:
            status = getattr(err.response, "status_code", None)
        code = _error_code(err)
        reason = _first_line(err)
        detail = f"{code}: {reason}" if code and code not in reason else reason
        if isinstance(err, ax.ClientAuthenticationError) and status is None:
            # azure-identity could not get a token (no response from storage at all).
            return Classified(ErrorKind.DENIED, detail, self._credential_hint())
        if status is None:
            return None
        if status == 404 or isinstance(err, ax.ResourceNotFoundError):
            if code == "ContainerNotFound":
                return Classified(ErrorKind.NOT_FOUND, detail, "create the container or fix its name")
            return Classified(ErrorKind.NOT_FOUND, detail, "check the container and blob name")
        if status in (401, 403) or code in _DENIED_CODES or isinstance(err, ax.ClientAuthenticationError):
            return Classified(ErrorKind.DENIED, detail, self._credential_hint())
        if status == 412 or isinstance(err, ax.ResourceModifiedError):
            return Classified(
                ErrorKind.EXISTS, detail,
                "the blob changed (or is leased) while it was used; retry to read the new version",
            )
        if status == 409 or isinstance(err, ax.ResourceExistsError):
            return Classified(ErrorKind.EXISTS, detail,
                              "the blob or container is busy (leased, being copied or deleted)")
        if status in (429, 503) or code in _THROTTLED_CODES:
            return Classified(ErrorKind.THROTTLED, detail)
        if code == "InvalidBlockList":
            # The staged blocks are gone (the service dropped them, or another writer
            # committed the blob meanwhile): a new attempt stages them again.
            return Classified(ErrorKind.SERVER, detail)
        if status == 408 or code in _TIMEOUT_CODES:
            return Classified(ErrorKind.TIMEOUT, detail)
        if status >= 500 and status not in (501, 505):
            return Classified(ErrorKind.SERVER, detail)
        if code in _INVALID_CODES:
            return Classified(ErrorKind.INVALID, detail, "")
        return Classified(ErrorKind.OTHER, detail, "")


_NO_BODY = re.compile(r"^Operation returned an invalid status '(.*)'$")


def _first_line(err: BaseException) -> str:
    message = (getattr(err, "message", None) or str(err) or "").strip()
    line = message.splitlines()[0].strip() if message else type(err).__name__
    # Responses without a body (HEAD) carry the service's message as the HTTP reason.
    match = _NO_BODY.match(line)
    return match.group(1) if match else line


class AzureStrategy(LotStrategy):
    """covalent-lot's Azure Blob strategy; every option can come from ``[lot.azure]``.

    ``AzureStrategy()`` with no arguments is built from covalent.conf and the
    environment (see the README's Configuration section). URIs are
    ``az://container/blob`` and ``az://container/folder/``.
    """

    scheme = "az"
    section = "azure"
    extra = "azure"
    sdk_module = "azure.storage.blob"
    backend_path = "covalent_lot.strategies.azure:AzureBackend"
    options = OPTIONS

    def __init__(self, **options: Any):
        super().__init__(**options)
        check_settings(self.settings)

    def check_location(self, location: StoreURI) -> None:
        problem = container_problem(location.bucket)
        if problem:
            raise ValueError(f"invalid Azure container name {location.bucket!r} in {location}: {problem}")
        if len(location.key) > MAX_BLOB_NAME:
            raise key_too_long(location, "Azure blob", MAX_BLOB_NAME, "characters")
        if location.key.rstrip("/").count("/") + 1 > MAX_SEGMENTS:
            raise ValueError(
                f"Azure blob names have at most {MAX_SEGMENTS} path segments; {location} has more"
            )
