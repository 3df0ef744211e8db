"""Logging on the executor: the transfer summary on stderr, secrets out of SDK logs.

Two jobs, both process-wide because loggers are:

- :func:`log_to_stderr_if_unconfigured` shows the ``covalent_lot`` INFO lines in
  an electron's captured stderr when nobody configured logging. Electrons run in
  threads of one worker, so the handler is shared and reference-counted under a
  lock (one handler per call would lose or double lines when calls overlap).
- :func:`redact_sdk_logs` puts a filter on the few SDK loggers that write a
  secret at DEBUG: botocore logs the ``X-Amz-Security-Token`` header (in the
  canonical request and the request headers), urllib3 logs request URLs, which
  carry an Azure SAS signature (``sig=``). The value is replaced by ``REDACTED``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from typing import Iterator

__all__ = ["log_to_stderr_if_unconfigured", "redact_sdk_logs"]

LOGGER = "covalent_lot"


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (Covalent redirects it per electron)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("covalent-lot: %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_lock = threading.Lock()
_users = 0
_handler: _CurrentStderr | None = None
_saved_level = logging.NOTSET


@contextlib.contextmanager
def log_to_stderr_if_unconfigured() -> Iterator[None]:
    """Show the transfer's INFO summary on stderr unless logging is configured.

    Covalent keeps what an electron writes to stderr as its log; with no logging
    set up, Python would drop INFO records. A handler the user configured is respected.
    """
    global _users, _handler, _saved_level
    logger = logging.getLogger(LOGGER)
    with _lock:
        ours = _handler is not None or not logger.hasHandlers()
        if ours:
            if _users == 0:
                _handler = _CurrentStderr()
                _saved_level = logger.level
                logger.addHandler(_handler)
                if _saved_level == logging.NOTSET:
                    logger.setLevel(logging.INFO)
            _users += 1
    try:
        yield
    finally:
        if ours:
            with _lock:
                _users -= 1
                if _users == 0:
                    logger.removeHandler(_handler)
                    logger.setLevel(_saved_level)
                    _handler = None


# (?i) header names; the value runs to the next quote, space, '&' or line end.
_SECRETS = re.compile(
    r"(?i)([?&]sig=|x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^&\s'\"]+"
)
_LEAKY_LOGGERS = ("botocore.auth", "botocore.endpoint", "urllib3.connectionpool")


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = _SECRETS.sub(r"\1REDACTED", message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_redact = _Redact()


def redact_sdk_logs() -> None:
    """Filter secrets out of the SDK loggers known to log them (idempotent).

    A logger's filters see the records logged on that very logger, which is
    where these are written.
    """
    for name in _LEAKY_LOGGERS:
        logger = logging.getLogger(name)
        if _redact not in logger.filters:
            logger.addFilter(_redact)
