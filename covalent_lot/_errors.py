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
from typing import Iterable, Mapping

__all__ = [
    "ErrorKind",
    "ChecksumMismatchError",
    "Classified",
    "translate",
    "TRANSIENT",
    "exception_chain",
    "MissingBucket",
    "HTTP_STATUS_KINDS",
    "http_verdict",
    "builtin_verdict",
    "codes_to_kinds",
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

    __slots__ = ("kind", "detail", "hint", "weak")

    def __init__(self, kind: ErrorKind, detail: str = "", hint: str | None = None, weak: bool = False):
        self.kind = kind
        self.detail = detail
        self.hint = hint
        # weak: a wrapper's verdict, used only if no exception further down the
        # chain (its cause) is recognised.
        self.weak = weak

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


# What an HTTP status means when the service's error code says nothing more.
HTTP_STATUS_KINDS: dict[int, ErrorKind] = {
    400: ErrorKind.INVALID,
    401: ErrorKind.DENIED,
    403: ErrorKind.DENIED,
    404: ErrorKind.NOT_FOUND,
    408: ErrorKind.TIMEOUT,
    409: ErrorKind.EXISTS,
    412: ErrorKind.EXISTS,
    429: ErrorKind.THROTTLED,
    503: ErrorKind.THROTTLED,
    504: ErrorKind.TIMEOUT,
}

# Hints of the HTTP services where the kind's general one does not fit.
HTTP_HINTS: dict[ErrorKind, str] = {
    ErrorKind.EXISTS: "the object changed or exists; retry to read the new version",
    ErrorKind.INVALID: "",
    ErrorKind.OTHER: "",
}


def http_verdict(status: int | None, code: str | None, detail: str, *,
                 codes: Mapping[str, ErrorKind] = {},  # noqa: B006 - read only
                 statuses: Mapping[int, ErrorKind] = HTTP_STATUS_KINDS,
                 hints: Mapping[ErrorKind, str] = {}) -> Classified:  # noqa: B006 - read only
    """The verdict on one HTTP error response: the service's error ``code`` first
    (``codes``: code -> kind), then the ``status`` (``statuses``), then any 5xx
    but 501/505 (not implemented, wrong version) is a server error worth a retry."""
    kind = codes.get(code or "")
    if kind is None:
        kind = statuses.get(status or 0)
    if kind is None:
        kind = ErrorKind.SERVER if status and status >= 500 and status not in (501, 505) else ErrorKind.OTHER
    hint = hints.get(kind, HTTP_HINTS.get(kind))
    return Classified(kind, detail, hint)


def builtin_verdict(err: BaseException) -> Classified | None:
    """Built-in timeouts and dropped connections, whichever library raised them."""
    if isinstance(err, TimeoutError):
        return Classified(ErrorKind.TIMEOUT, str(err) or "no answer in time")
    if isinstance(err, (ConnectionError, EOFError)):
        return Classified(ErrorKind.CONNECTION, str(err) or type(err).__name__)
    return None


def codes_to_kinds(**groups: Iterable[str]) -> dict[str, ErrorKind]:
    """``codes_to_kinds(DENIED={...}, THROTTLED={...})`` -> {code: kind}."""
    return {code: ErrorKind[name] for name, codes in groups.items() for code in codes}


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

    Follows ``__cause__``/``__context__``, azure-core's ``inner_exception``,
    s3transfer's/boto3's ``last_exception`` (RetriesExceededError keeps the real
    error only there) and google-api-core's ``cause`` (RetryError).
    """
    seen: set[int] = set()
    pending = [exc] if exc is not None else []
    while pending:
        err = pending.pop(0)
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            yield err
            for attr in ("inner_exception", "last_exception", "cause"):
                inner = getattr(err, attr, None)
                if isinstance(inner, BaseException) and id(inner) not in seen:
                    pending.append(inner)
            err = err.__cause__ or err.__context__
