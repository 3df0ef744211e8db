"""RetryPolicy: bounded attempts, capped exponential backoff with full jitter."""

from __future__ import annotations

import random

import pytest

from covalent_lot import RetryPolicy


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


def flaky(failures: list[BaseException], result="done"):
    def fn():
        fn.calls += 1
        if failures:
            raise failures.pop(0)
        return result

    fn.calls = 0
    return fn


def test_success_needs_no_retry():
    sleeps = []
    fn = flaky([])
    assert RetryPolicy().run(fn, is_transient, sleep=sleeps.append) == "done"
    assert fn.calls == 1 and sleeps == []


def test_transient_failures_are_retried_until_success():
    sleeps, retries = [], []
    fn = flaky([Transient("a"), Transient("b")])
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=20)
    result = policy.run(fn, is_transient, on_retry=lambda *a: retries.append(a), sleep=sleeps.append)
    assert result == "done"
    assert fn.calls == 3
    assert [attempt for attempt, _, _ in retries] == [1, 2]
    assert [str(exc) for _, exc, _ in retries] == ["a", "b"]
    assert [wait for _, _, wait in retries] == sleeps


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_attempts_are_bounded_and_the_last_error_is_raised(attempts):
    errors = [Transient(str(i)) for i in range(10)]
    expected_last = errors[attempts - 1]
    sleeps = []
    fn = flaky(errors)
    with pytest.raises(Transient) as info:
        RetryPolicy(max_attempts=attempts, base_delay=0.1).run(fn, is_transient, sleep=sleeps.append)
    assert info.value is expected_last
    assert fn.calls == attempts
    assert len(sleeps) == attempts - 1


def test_non_transient_errors_are_never_retried():
    sleeps = []
    original = Permanent("no")
    fn = flaky([original])
    with pytest.raises(Permanent) as info:
        RetryPolicy(max_attempts=10).run(fn, is_transient, sleep=sleeps.append)
    assert info.value is original
    assert fn.calls == 1 and sleeps == []


def test_a_permanent_error_after_transient_ones_stops_at_once():
    sleeps = []
    fn = flaky([Transient("t"), Permanent("p"), Transient("never reached")])
    with pytest.raises(Permanent):
        RetryPolicy(max_attempts=10).run(fn, is_transient, sleep=sleeps.append)
    assert fn.calls == 2 and len(sleeps) == 1


def test_base_exceptions_are_not_caught():
    fn = flaky([KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        RetryPolicy(max_attempts=3).run(fn, lambda e: True, sleep=lambda s: None)
    assert fn.calls == 1


def upper_bound(low, high):
    assert low == 0.0
    return high


def test_backoff_doubles_up_to_the_cap():
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=20.0)
    bounds = [policy.delay(n, rng=upper_bound) for n in range(9)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]


def test_cap_holds_for_any_attempt_number():
    # A policy with many attempts (or base_delay 0 for tests) must not overflow.
    assert RetryPolicy(base_delay=0.5, max_delay=20.0).delay(2000, rng=upper_bound) == 20.0
    assert RetryPolicy(base_delay=0.0, max_delay=0.0).delay(2000, rng=upper_bound) == 0.0


def test_zero_delays_mean_no_waiting():
    assert RetryPolicy(base_delay=0, max_delay=0).delay(3, rng=upper_bound) == 0


def test_jitter_stays_in_range():
    policy = RetryPolicy(max_attempts=8, base_delay=0.5, max_delay=5.0)
    rng = random.Random(1234)
    for attempt in range(8):
        high = min(5.0, 0.5 * 2**attempt)
        samples = [policy.delay(attempt, rng=rng.uniform) for _ in range(200)]
        assert all(0.0 <= s <= high for s in samples)
        assert max(samples) > high / 2  # actually spread over the range, not stuck at 0


def test_run_sleeps_within_the_backoff_bounds():
    sleeps = []
    policy = RetryPolicy(max_attempts=7, base_delay=0.25, max_delay=3.0)
    fn = flaky([Transient(str(i)) for i in range(20)])
    with pytest.raises(Transient):
        policy.run(fn, is_transient, sleep=sleeps.append)
    assert len(sleeps) == 6
    for attempt, wait in enumerate(sleeps):
        assert 0.0 <= wait <= min(3.0, 0.25 * 2**attempt)


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", None, 2.0])
def test_bad_max_attempts(value):
    with pytest.raises(ValueError) as info:
        RetryPolicy(max_attempts=value)
    assert "max_attempts" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("name", ["base_delay", "max_delay"])
@pytest.mark.parametrize("value", [-0.1, -5, "1", None])
def test_bad_delays(name, value):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**{name: value})
    assert name in str(info.value) and repr(value) in str(info.value)


def test_nan_max_delay_is_refused():
    # With max_delay NaN the first retry would call sleep(nan) and fail with an
    # unrelated ValueError on the executor instead of retrying.
    with pytest.raises(ValueError, match="max_delay"):
        RetryPolicy(max_delay=float("nan"))


def test_defaults_and_immutability():
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (5, 0.5, 20.0)
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]
