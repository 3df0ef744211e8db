"""The one table that turns service errors into built-in exceptions.

Every backend classifies its SDK's exceptions into an :class:`ErrorKind`;
this module owns what each kind becomes and whether it is worth a retry.

Exception tree seen by users (all built-ins, so ``except OSError`` works):

- ``FileNotFoundError``   the object, bucket or local source does not exist
- ``PermissionError``     denied, bad or missing credentials, untrusted host key
- ``FileExistsError``     a precondition failed (object exists / changed)
- ``TimeoutError``        the service did not answer in time (after retries)
- ``ConnectionError``     the endpoint could not be reached (after retries)
- ``ChecksumMismatchError`` (an ``OSError``) the bytes received are not the
  bytes stored; the destination is left untouched
- ``OSError``             any other service failure, throttling or 5xx after retries
- ``ValueError``/``TypeError`` bad URIs, options or arguments, raised before
  anything is transferred
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorKind",
    "ChecksumMismatchError",
    "Classified",
    "translate",
    "TRANSIENT",
    "exception_chain",
    "MissingBucket",
]


class ChecksumMismatchError(OSError):
    """Downloaded bytes do not match the checksum stored with the object."""


class ErrorKind(enum.Enum):
    NOT_FOUND = "does not exist"
    DENIED = "access denied"
    EXISTS = "precondition failed"
    TIMEOUT = "timed out"
    CONNECTION = "could not connect"
    THROTTLED = "throttled by the service"
    SERVER = "service error"
    INVALID = "rejected as invalid"
    OTHER = "failed"


EXCEPTION_FOR: dict[ErrorKind, type[Exception]] = {
    ErrorKind.NOT_FOUND: FileNotFoundError,
    ErrorKind.DENIED: PermissionError,
    ErrorKind.EXISTS: FileExistsError,
    ErrorKind.TIMEOUT: TimeoutError,
    ErrorKind.CONNECTION: ConnectionError,
    ErrorKind.THROTTLED: OSError,
    ErrorKind.SERVER: OSError,
    ErrorKind.INVALID: ValueError,
    ErrorKind.OTHER: OSError,
}

# Only these are retried: the request may succeed if sent again unchanged.
TRANSIENT = frozenset(
    {ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.THROTTLED, ErrorKind.SERVER}
)

HINTS: dict[ErrorKind, str] = {
    ErrorKind.NOT_FOUND: "check the bucket and key",
    ErrorKind.DENIED: "check the credentials available on the executor and their permissions",
    ErrorKind.TIMEOUT: "raise the timeouts or check the endpoint's health",
    ErrorKind.CONNECTION: "check that the endpoint is reachable from the executor",
}


class Classified:
    """A backend's verdict on an SDK exception."""

    __slots__ = ("kind", "detail", "hint")

    def __init__(self, kind: ErrorKind, detail: str = "", hint: str | None = None):
        self.kind = kind
        self.detail = detail
        self.hint = hint

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


class MissingBucket(Exception):
    """Raised by a backend when the bucket (or container) itself does not exist.

    Services answer 404 for a missing object and a missing bucket alike; a
    backend that told them apart raises this so the message says which.
    """

    def __init__(self, bucket: str, noun: str = "bucket"):
        super().__init__(f"{noun} {bucket!r} does not exist")
        self.bucket = bucket
        self.noun = noun

    def verdict(self) -> Classified:
        return Classified(ErrorKind.NOT_FOUND, str(self), f"create the {self.noun} or fix its name")


def translate(verdict: Classified, *, action: str, target: str, endpoint: str) -> Exception:
    """The built-in exception to raise (``from`` the original) for ``verdict``."""
    hint = verdict.hint if verdict.hint is not None else HINTS.get(verdict.kind, "")
    message = f"{action} {target}: {verdict.kind.value}"
    if verdict.detail:
        message += f" ({verdict.detail})"
    message += f" [endpoint {endpoint}]"
    if hint:
        message += f"; {hint}"
    return EXCEPTION_FOR[verdict.kind](message)


def exception_chain(exc: BaseException | None):
    """``exc`` and its causes, outermost first: SDKs wrap the error that matters.

    Follows ``__cause__``/``__context__``, azure-core's ``inner_exception`` and
    s3transfer's/boto3's ``last_exception`` (RetriesExceededError keeps the real
    error only there).
    """
    seen: set[int] = set()
    pending = [exc] if exc is not None else []
    while pending:
        err = pending.pop(0)
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            yield err
            for attr in ("inner_exception", "last_exception"):
                inner = getattr(err, attr, None)
                if isinstance(inner, BaseException) and id(inner) not in seen:
                    pending.append(inner)
            err = err.__cause__ or err.__context__
