"""The S3 adapter without a server: name checks, the error table, guarded calls."""

from __future__ import annotations

import pytest
from botocore import exceptions as bx

from covalent_lot._errors import EXCEPTION_FOR, TRANSIENT, Classified, ErrorKind, translate

from .lot_fakes import EXPECTED_TYPE

ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def s3mod():
    from covalent_lot.strategies import s3

    return s3


@pytest.fixture(scope="module")
def strategy(s3mod):
    return s3mod.S3Strategy(endpoint_url=ENDPOINT)


@pytest.fixture(scope="module")
def backend(s3mod, strategy):
    # Building a boto3 client does no network I/O.
    backend = s3mod.S3Backend(strategy.settings)
    yield backend
    backend.close()


def client_error(code: str, status: int, message: str = "x", operation: str = "GetObject"):
    return bx.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


# --- bucket and key rules ----------------------------------------------------------------

def test_key_length_limit_is_in_utf8_bytes(strategy):
    assert strategy.parse("s3://bkt/" + "k" * 1024).key == "k" * 1024
    with pytest.raises(ValueError) as info:
        strategy.parse("s3://bkt/" + "k" * 1025)
    assert "1024 bytes" in str(info.value) and "s3://bkt/" in str(info.value)
    assert "(1025 bytes)" in str(info.value) and "shorten" in str(info.value)
    euro = "€" * 342  # 342 characters, 1026 bytes
    with pytest.raises(ValueError, match="1024 bytes"):
        strategy.parse("s3://bkt/" + euro)
    assert strategy.parse("s3://bkt/" + "€" * 341).key == "€" * 341  # 1023 bytes


# --- the error table --------------------------------------------------------------------

CLIENT_CASES = [
    ("NoSuchKey", 404, ErrorKind.NOT_FOUND),
    ("404", 404, ErrorKind.NOT_FOUND),
    ("NoSuchBucket", 404, ErrorKind.NOT_FOUND),
    ("NotFound", 404, ErrorKind.NOT_FOUND),
    ("AccessDenied", 403, ErrorKind.DENIED),
    ("403", 403, ErrorKind.DENIED),
    ("InvalidAccessKeyId", 403, ErrorKind.DENIED),
    ("SignatureDoesNotMatch", 403, ErrorKind.DENIED),
    ("ExpiredToken", 400, ErrorKind.DENIED),
    ("PreconditionFailed", 412, ErrorKind.EXISTS),
    ("SlowDown", 503, ErrorKind.THROTTLED),
    ("503", 503, ErrorKind.THROTTLED),
    ("TooManyRequests", 429, ErrorKind.THROTTLED),
    ("500", 500, ErrorKind.SERVER),
    ("InternalError", 500, ErrorKind.SERVER),
    ("502", 502, ErrorKind.SERVER),
    ("RequestTimeout", 400, ErrorKind.TIMEOUT),
    ("InvalidBucketName", 400, ErrorKind.INVALID),
    ("KeyTooLongError", 400, ErrorKind.INVALID),
    ("MalformedXML", 400, ErrorKind.OTHER),
]

TRANSIENT_KINDS = {ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.THROTTLED, ErrorKind.SERVER}


def test_the_table_itself():
    assert EXCEPTION_FOR == EXPECTED_TYPE
    assert TRANSIENT == TRANSIENT_KINDS


@pytest.mark.parametrize("code, status, kind", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_client_errors(backend, code, status, kind):
    verdict = backend.classify(client_error(code, status, message="the service says so"))
    assert verdict is not None
    assert verdict.kind is kind
    assert verdict.transient is (kind in TRANSIENT_KINDS)
    assert code in verdict.detail


SDK_CASES = [
    (bx.EndpointConnectionError(endpoint_url=ENDPOINT + "/bkt/k"), ErrorKind.CONNECTION),
    (bx.ConnectionClosedError(endpoint_url=ENDPOINT + "/bkt/k"), ErrorKind.CONNECTION),
    (bx.ReadTimeoutError(endpoint_url=ENDPOINT + "/bkt/k"), ErrorKind.TIMEOUT),
    (bx.ConnectTimeoutError(endpoint_url=ENDPOINT + "/bkt/k"), ErrorKind.TIMEOUT),
    (bx.NoCredentialsError(), ErrorKind.DENIED),
    (bx.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), ErrorKind.DENIED),
    (bx.ProfileNotFound(profile="no-such-profile"), ErrorKind.INVALID),
    (ConnectionResetError("reset by peer"), ErrorKind.CONNECTION),
    (TimeoutError("slow"), ErrorKind.TIMEOUT),
]


@pytest.mark.parametrize("exc, kind", SDK_CASES, ids=[type(e).__name__ for e, _ in SDK_CASES])
def test_sdk_errors(backend, exc, kind):
    verdict = backend.classify(exc)
    assert verdict is not None, exc
    assert verdict.kind is kind, exc
    assert verdict.transient is (kind in TRANSIENT_KINDS)
    err = translate(verdict, action="upload to", target="s3://bkt/k", endpoint=backend.endpoint)
    assert type(err) is EXPECTED_TYPE[kind]
    assert "s3://bkt/k" in str(err) and ENDPOINT in str(err)


def test_endpoint_and_profile_are_named(backend):
    verdict = backend.classify(bx.EndpointConnectionError(endpoint_url=ENDPOINT + "/bkt/k"))
    assert ENDPOINT in verdict.detail
    verdict = backend.classify(bx.ProfileNotFound(profile="no-such-profile"))
    assert "no-such-profile" in verdict.detail and "profile" in verdict.hint
    verdict = backend.classify(bx.NoCredentialsError())
    assert "AWS_ACCESS_KEY_ID" in verdict.hint


def test_wrapped_client_error_is_found_through_the_cause(backend):
    from boto3.exceptions import S3UploadFailedError

    original = client_error("AccessDenied", 403, operation="PutObject")
    try:
        raise S3UploadFailedError("Failed to upload /tmp/x to bkt/k") from original
    except S3UploadFailedError as exc:
        wrapped = exc
    verdict = backend.classify(wrapped)
    assert verdict is not None and verdict.kind is ErrorKind.DENIED


def test_endpoint_property(backend):
    assert backend.endpoint == ENDPOINT


# --- translate ----------------------------------------------------------------------------

@pytest.mark.parametrize("code, status, kind", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_translate_gives_builtin_types_naming_target_and_endpoint(backend, code, status, kind):
    verdict = backend.classify(client_error(code, status))
    err = translate(verdict, action="download", target="s3://bkt/runs/x.npy", endpoint=backend.endpoint)
    assert type(err) is EXPECTED_TYPE[kind]
    message = str(err)
    assert message.startswith("download s3://bkt/runs/x.npy: ")
    assert f"[endpoint {ENDPOINT}]" in message
    assert kind.value in message
    assert code in message


def test_translate_uses_hints():
    err = translate(Classified(ErrorKind.NOT_FOUND, "NoSuchKey"), action="read",
                    target="s3://bkt/k", endpoint=ENDPOINT)
    assert type(err) is FileNotFoundError
    assert str(err) == (
        f"read s3://bkt/k: does not exist (NoSuchKey) [endpoint {ENDPOINT}]; check the bucket and key"
    )
    err = translate(Classified(ErrorKind.OTHER, "", ""), action="read", target="s3://bkt/k",
                    endpoint=ENDPOINT)
    assert str(err) == f"read s3://bkt/k: failed [endpoint {ENDPOINT}]"


def test_every_kind_translates_to_an_exception_subclass_of_its_type():
    for kind in ErrorKind:
        err = translate(Classified(kind, "d"), action="a", target="t", endpoint="e")
        assert type(err) is EXPECTED_TYPE[kind]
        if kind is not ErrorKind.INVALID:
            assert isinstance(err, OSError)


# --- ranged downloads or one stream -------------------------------------------------------
def test_ranged_downloads_option(s3mod):
    assert s3mod.S3Strategy().settings["ranged_downloads"] is True
    assert s3mod.S3Strategy(ranged_downloads="false").settings["ranged_downloads"] is False
    with pytest.raises(ValueError, match="ranged_downloads"):
        s3mod.S3Strategy(ranged_downloads="sometimes")


def test_a_range_given_up_by_s3transfer_is_classified_by_its_last_error(backend):
    """s3transfer keeps the real error only in RetriesExceededError.last_exception."""
    from s3transfer.exceptions import RetriesExceededError

    given_up = RetriesExceededError(bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    verdict = backend.classify(given_up)
    assert verdict is not None and verdict.kind is ErrorKind.TIMEOUT and verdict.transient
