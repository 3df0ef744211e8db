"""S3 and S3-compatible storage (``s3://bucket/key``), on boto3.

Transfers use boto3's own managed transfers (``TransferConfig``: multipart
threshold, part size, concurrency); covalent-lot adds the checksum, atomic
local files, retries and the error table from the engine.

Credentials are never options: boto3's default chain (environment, shared
files, instance roles) or the named ``profile`` resolves them on the executor
when the transfer runs.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Iterator, Mapping

from covalent_lot._config import Option
from covalent_lot._backend import Backend, RemoteObject, epoch_seconds
from covalent_lot._errors import (
    HTTP_STATUS_KINDS, Classified, ErrorKind, MissingBucket, codes_to_kinds, http_verdict,
)
from covalent_lot._checksum import from_metadata
from covalent_lot._stream import VerifyingSink
from covalent_lot._strategy import LotStrategy
from covalent_lot._uri import StoreURI

__all__ = ["S3Strategy", "S3Backend", "OPTIONS"]

MiB = 1024 * 1024

OPTIONS: dict[str, Option] = {
    "endpoint_url": Option("str", None, "S3-compatible endpoint, e.g. http://127.0.0.1:8333"),
    "region_name": Option("str", None, "region (default: boto3's, e.g. AWS_DEFAULT_REGION)"),
    "profile": Option("str", None, "AWS profile name, resolved on the executor"),
    "addressing_style": Option("str", "auto", "bucket addressing", choices=("auto", "path", "virtual")),
    "sse": Option("str", None, "server-side encryption", choices=("AES256", "aws:kms", "aws:kms:dsse")),
    "sse_kms_key_id": Option("str", None, "KMS key id/ARN when sse is aws:kms"),
    "multipart_threshold": Option("size", 16 * MiB, "objects from this size use multipart", 5 * MiB),
    "multipart_chunksize": Option("size", 16 * MiB, "part size of multipart transfers", 5 * MiB),
    "max_concurrency": Option("int", 8, "parallel part requests per object", 1),
    "ranged_downloads": Option(
        "bool", True, "large downloads as parallel ranged GETs (false: one streamed GET)",
    ),    "connect_timeout": Option("float", 10.0, "seconds to connect", 0.001),
    "read_timeout": Option("float", 60.0, "seconds to wait for data", 0.001),
}

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# Error codes S3 and compatible servers send, where the HTTP status alone misleads.
_CODES = codes_to_kinds(
    NOT_FOUND={"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"},
    DENIED={
        "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
        "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
        "AccountProblem", "InvalidSecurity", "401", "Unauthorized",
    },
    EXISTS={"PreconditionFailed", "412", "ConditionalRequestConflict", "BucketAlreadyExists"},
    THROTTLED={
        "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
        "TooManyRequests", "RequestThrottled", "429", "503", "ServiceUnavailable",
    },
    TIMEOUT={"RequestTimeout", "RequestTimeoutException"},
    SERVER={"InternalError", "500"},
    INVALID={
        "InvalidBucketName", "KeyTooLongError", "InvalidArgument", "InvalidRequest",
        "InvalidStorageClass", "InvalidObjectName", "MetadataTooLarge",
    },
)
# S3 says what a 400 or 409 means in its error code; the status alone is no verdict.
_STATUSES = {status: kind for status, kind in HTTP_STATUS_KINDS.items() if status not in (400, 409, 504)}


def _bucket_problem(bucket: str) -> str | None:
    if not _BUCKET.match(bucket):
        return "3-63 characters of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    if ".." in bucket or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        return "no '..' and not an IP address"
    return None


STREAM_CHUNK = 1 * MiB  # reads of a streamed GET; larger reads were slower (docs/measurements.md)

# botocore's service models (JSON), parsed once per process and shared by every
# client made in it: a fresh session parses them again (docs/measurements.md).
# Credentials and profiles are still resolved by each new session.
_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def _new_session(profile: str | None):
    import boto3
    import botocore.loaders
    import botocore.session

    with _models_lock:
        loader = _models.setdefault("loader", botocore.loaders.create_loader())
        core = botocore.session.get_session()
        core.register_component("data_loader", loader)
        session = boto3.session.Session(profile_name=profile, botocore_session=core)
        # boto3 appends its own data folder to the loader's search path per session.
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


class _Known:
    """An s3transfer subscriber that gives the transfer the size and ETag a HEAD
    already returned (s3transfer would otherwise send its own HEAD first)."""

    def __init__(self, size: int, etag: str | None):
        self._size, self._etag = size, etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag:
            future.meta.provide_object_etag(self._etag)


class S3Backend(Backend):
    scheme = "s3"

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        from boto3.s3.transfer import TransferConfig

        self._transfer = TransferConfig(
            multipart_threshold=settings["multipart_threshold"],
            multipart_chunksize=settings["multipart_chunksize"],
            max_concurrency=settings["max_concurrency"],
            # s3transfer retries a failed range itself (on top of botocore's retries
            # of each request): as often as configured, not its own default of 5.
            num_download_attempts=settings["max_attempts"],
            use_threads=True,
        )
        self._extra: dict[str, str] = {}
        if settings["sse"] is not None:
            self._extra["ServerSideEncryption"] = settings["sse"]
        if settings["sse_kms_key_id"] is not None:
            self._extra["SSEKMSKeyId"] = settings["sse_kms_key_id"]

    def connect(self):
        from botocore.config import Config

        settings = self.settings
        # The profile and the credential chain are resolved here, on the executor.
        session = _new_session(settings["profile"])
        self._session = session
        return session.client(
            "s3",
            endpoint_url=settings["endpoint_url"],
            region_name=settings["region_name"],
            config=Config(
                s3={"addressing_style": settings["addressing_style"]},
                retries={"mode": "standard", "total_max_attempts": settings["max_attempts"]},
                connect_timeout=settings["connect_timeout"],
                read_timeout=settings["read_timeout"],
                max_pool_connections=max(10, settings["max_concurrency"] + 2),
            ),
        )

    def check_credentials(self) -> None:
        super().check_credentials()
        # boto3 builds a client without credentials and fails only at the first request.
        if self._session.get_credentials() is None:
            from botocore.exceptions import NoCredentialsError

            raise NoCredentialsError()

    @property
    def endpoint(self) -> str:
        if self.connected:
            return self.client.meta.endpoint_url
        return self.settings["endpoint_url"] or "AWS S3"

    def stat(self, location: StoreURI) -> RemoteObject:
        return self._object(location, self.client.head_object(Bucket=location.bucket, Key=location.key))

    def missing_container(self, location: StoreURI, cause: BaseException) -> MissingBucket | None:
        # HEAD answers 404 for a missing key and a missing bucket alike.
        try:
            self.client.head_bucket(Bucket=location.bucket)
        except Exception as exc:
            if self._code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return MissingBucket(location.bucket)
        return None

    @staticmethod
    def _object(location: StoreURI, response: Mapping[str, Any]) -> RemoteObject:
        return RemoteObject(
            location,
            response["ContentLength"],
            from_metadata(response.get("Metadata")),
            response.get("ETag"),
            epoch_seconds(response.get("LastModified")),
        )

    def iter_objects(self, prefix: StoreURI) -> Iterator[RemoteObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=prefix.bucket, Prefix=prefix.key
        )
        for page in pages:
            for item in page.get("Contents", ()):
                yield RemoteObject(
                    StoreURI(prefix.scheme, prefix.bucket, item["Key"]), item["Size"], None,
                    item.get("ETag"), epoch_seconds(item.get("LastModified")),
                )

    def put_file(self, local_path: str, location: StoreURI, size: int, digest) -> None:
        extra = dict(self._extra)
        checksum = digest()
        if checksum is not None:
            extra["Metadata"] = checksum.metadata()
        # Single PUTs and multipart uploads both become visible only when
        # complete; a failed multipart upload is aborted by boto3.
        self.client.upload_file(local_path, location.bucket, location.key,
                                 ExtraArgs=extra, Config=self._transfer, Callback=self.sent)

    def get_into(self, obj: RemoteObject, sink: VerifyingSink, start: int = 0) -> RemoteObject:
        location = obj.location
        if start or obj.size < self._transfer.multipart_threshold or not self.settings["ranged_downloads"]:
            # One GET returns data and metadata: no separate HEAD. Its bytes come in
            # order, so the sink hashes them as they pass (no re-read). Large
            # objects take ranged GETs instead, which were faster even on
            # loopback (docs/measurements.md). A resumed download asks for the rest only.
            args = {"Bucket": location.bucket, "Key": location.key}
            if obj.version:
                args["IfMatch"] = obj.version
            if start:
                args["Range"] = f"bytes={start}-"
            response = self.client.get_object(**args)
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(STREAM_CHUNK):
                    sink.write(chunk)
            finally:
                body.close()
            seen = self._object(location, response)
            return RemoteObject(location, start + seen.size, seen.checksum, seen.version, seen.modified)
        if obj.checksum is None:
            obj = self.stat(location)  # a listing has no metadata; the checksum is in HEAD
        # boto3's transfer manager writes ranges in parallel (seek + write); the
        # sink checks them. Told the size and ETag already known, it sends no HEAD
        # of its own; it pins every ranged GET to that ETag (IfMatch) and retries a
        # failed range by itself.
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self.client, self._transfer) as manager:
            manager.download(location.bucket, location.key, sink,
                             subscribers=[_Known(obj.size, obj.version)]).result()
        return obj

    def copy(self, source: RemoteObject, destination: StoreURI) -> None:
        extra: dict[str, Any] = dict(self._extra)
        if source.version:
            extra["CopySourceIfMatch"] = source.version
        # boto3's managed copy keeps metadata (incl. the lot-* checksum) for single and multipart copies.
        self.client.copy({"Bucket": source.location.bucket, "Key": source.location.key},
                          destination.bucket, destination.key, ExtraArgs=extra, Config=self._transfer)

    def delete(self, location: StoreURI) -> None:
        self.client.delete_object(Bucket=location.bucket, Key=location.key)

    def close(self) -> None:
        if self.connected:
            self.client.close()

    # --- the error table ----------------------------------------------------------------
    @staticmethod
    def _code(exc: BaseException) -> str | None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
        return None

    def classify_one(self, err: BaseException) -> Classified | None:
        from botocore import exceptions as bx

        if isinstance(err, bx.ClientError):
            code = self._code(err) or ""
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.response.get("Error", {}).get("Message") or code
            detail = f"{code}: {message}" if message != code else code
            return http_verdict(status, code, detail or "no such object", codes=_CODES, statuses=_STATUSES)
        if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return Classified(ErrorKind.DENIED, "no AWS credentials found on the executor",
                              "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE there, "
                              "or profile in [lot.s3]")
        if isinstance(err, bx.ProfileNotFound):
            return Classified(ErrorKind.INVALID, str(err),
                              "fix profile in [lot.s3] or add it to ~/.aws/config on the executor")
        if isinstance(err, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            return Classified(ErrorKind.TIMEOUT, str(err))
        if isinstance(err, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                            bx.ResponseStreamingError, bx.ConnectionError, bx.IncompleteReadError)):
            return Classified(ErrorKind.CONNECTION, str(err))
        return None


class S3Strategy(LotStrategy):
    """covalent-lot's S3 strategy (also S3-compatible servers); options from ``[lot.s3]``."""

    scheme = "s3"
    section = "s3"
    extra = "s3"
    sdk_module = "boto3"
    backend_path = "covalent_lot.strategies.s3:S3Backend"
    options = OPTIONS
    bucket_noun, object_noun, max_key = "S3 bucket", "S3 object", 1024
    bucket_problem = staticmethod(_bucket_problem)
