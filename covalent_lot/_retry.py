"""Retry policy as data: bounded attempts, exponential backoff, full jitter."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried.

    Attempt ``n`` (0-based) that fails transiently waits a random time in
    ``[0, min(max_delay, base_delay * 2**n)]`` before the next one ("full
    jitter", so many clients that failed together do not retry together).
    Only errors the backend classifies as transient are retried.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "RetryPolicy":
        """The policy of a strategy's options (``max_attempts``, ``base_delay``, ``max_delay``)."""
        return cls(settings["max_attempts"], settings["base_delay"], settings["max_delay"])

    def delay(self, attempt: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        # The exponent is capped: 2**1024 would overflow a float.
        return rng(0.0, min(self.max_delay, self.base_delay * 2.0 ** min(attempt, 64)))

    def run(
        self,
        fn: Callable[[], T],
        is_transient: Callable[[BaseException], bool],
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """Call ``fn`` until it succeeds, fails permanently, or attempts run out."""
        for attempt in range(self.max_attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if not transient
                if attempt + 1 >= self.max_attempts or not is_transient(exc):
                    raise
                wait = self.delay(attempt)
                if on_retry is not None:
                    on_retry(attempt + 1, exc, wait)
                sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover
