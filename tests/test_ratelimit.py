"""Token-bucket rate limits with an injected clock: no sleeping, no timing thresholds."""

from __future__ import annotations

import math
import threading

import pytest

from server.ratelimit import RateLimiter, format_duration, rate_limit_headers, retry_after_headers


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def test_unlimited_key_always_passes(limiter: RateLimiter) -> None:
    for _ in range(1000):
        decision = limiter.check_and_consume(1, None, None, items=50)
        assert decision.allowed
    assert decision.requests.limit is None and decision.requests.remaining is None
    assert decision.items.limit is None


def test_requests_per_minute(limiter: RateLimiter, clock: FakeClock) -> None:
    for expected_remaining in (2, 1, 0):
        decision = limiter.check_and_consume(1, 3, None, items=1)
        assert decision.allowed and decision.requests.remaining == expected_remaining
    assert decision.requests.limit == 3
    assert decision.requests.reset_s == pytest.approx(60.0)

    refused = limiter.check_and_consume(1, 3, None, items=1)
    assert not refused.allowed and not refused.never
    assert refused.retry_after_s == pytest.approx(20.0)  # one token refills every 60/3 s
    assert refused.reason is not None and "requests per minute" in refused.reason
    assert refused.requests.remaining == 0

    clock.now += refused.retry_after_s  # waiting exactly retry_after is enough
    assert limiter.check_and_consume(1, 3, None, items=1).allowed
    assert not limiter.check_and_consume(1, 3, None, items=1).allowed


def test_items_per_minute(limiter: RateLimiter, clock: FakeClock) -> None:
    assert limiter.check_and_consume(1, None, 100, items=80).allowed
    refused = limiter.check_and_consume(1, None, 100, items=30)
    assert not refused.allowed and not refused.never
    assert refused.retry_after_s == pytest.approx(6.0)  # 10 missing items at 100/60 per second
    assert refused.items.remaining == 20
    assert refused.reason is not None and "items per minute" in refused.reason

    clock.now += 5.0
    assert not limiter.check_and_consume(1, None, 100, items=30).allowed
    clock.now += 1.0
    ok = limiter.check_and_consume(1, None, 100, items=30)
    assert ok.allowed and ok.items.remaining == 0


def test_full_recovery_after_the_window(limiter: RateLimiter, clock: FakeClock) -> None:
    for _ in range(5):
        limiter.check_and_consume(1, 5, 50, items=10)
    drained = limiter.check_and_consume(1, 5, 50, items=1)
    assert not drained.allowed
    clock.now += 60.0
    fresh = limiter.check_and_consume(1, 5, 50, items=10)
    assert fresh.allowed
    assert (fresh.requests.remaining, fresh.items.remaining) == (4, 40)


def test_a_refused_request_takes_nothing(limiter: RateLimiter) -> None:
    assert limiter.check_and_consume(1, 10, 10, items=10).allowed
    # The items bucket is empty; the request must not take a request token either.
    for _ in range(5):
        assert not limiter.check_and_consume(1, 10, 10, items=1).allowed
    assert limiter.check_and_consume(1, 10, None, items=0).requests.remaining == 8


def test_request_larger_than_the_items_limit_can_never_pass(limiter: RateLimiter) -> None:
    decision = limiter.check_and_consume(1, 10, 100, items=101)
    assert not decision.allowed and decision.never
    assert decision.reason is not None and "101" in decision.reason
    assert retry_after_headers(decision) == {"x-should-retry": "false"}
    # Nothing was taken.
    assert limiter.check_and_consume(1, 10, 100, items=100).allowed


def test_zero_rpm_never_passes(limiter: RateLimiter) -> None:
    decision = limiter.check_and_consume(1, 0, None, items=1)
    assert decision.never and not decision.allowed


def test_keys_are_independent_and_forgettable(limiter: RateLimiter) -> None:
    assert limiter.check_and_consume(1, 1, None, items=1).allowed
    assert not limiter.check_and_consume(1, 1, None, items=1).allowed
    assert limiter.check_and_consume(2, 1, None, items=1).allowed
    limiter.forget(1)
    assert limiter.check_and_consume(1, 1, None, items=1).allowed


def test_refund_gives_tokens_back(limiter: RateLimiter) -> None:
    assert limiter.check_and_consume(1, 1, 10, items=10).allowed
    limiter.refund(1, items=10)
    assert limiter.check_and_consume(1, 1, 10, items=10).allowed


def test_changed_limit_applies(limiter: RateLimiter) -> None:
    assert limiter.check_and_consume(1, 100, None, items=1).requests.remaining == 99
    assert limiter.check_and_consume(1, 5, None, items=1).requests.remaining == 4


def test_clock_going_backwards_grants_nothing(limiter: RateLimiter, clock: FakeClock) -> None:
    assert limiter.check_and_consume(1, 1, None, items=1).allowed
    clock.now -= 1000
    assert not limiter.check_and_consume(1, 1, None, items=1).allowed


def test_threads_never_exceed_the_limit(limiter: RateLimiter) -> None:
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(50):
            ok = limiter.check_and_consume(1, 30, None, items=1).allowed
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 30  # the clock is frozen: exactly the burst passes


def test_rate_limit_headers(limiter: RateLimiter) -> None:
    decision = limiter.check_and_consume(1, 60, 600, items=10)
    headers = rate_limit_headers(decision, remaining_budget_items=90)
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-items": "600",
        "x-ratelimit-remaining-items": "590",
        "x-ratelimit-reset-items": "1s",
        "x-budget-remaining-items": "90",
    }
    unlimited = limiter.check_and_consume(2, None, None, items=1)
    assert rate_limit_headers(unlimited, None) == {}


def test_retry_after_headers_round_up(limiter: RateLimiter) -> None:
    limiter.check_and_consume(1, None, 60, items=60)
    refused = limiter.check_and_consume(1, None, 60, items=1)
    assert refused.retry_after_s == pytest.approx(1.0)
    limiter.check_and_consume(2, None, 600, items=600)
    short = limiter.check_and_consume(2, None, 600, items=1)
    assert short.retry_after_s == pytest.approx(0.1)
    assert retry_after_headers(short) == {"retry-after": "1", "retry-after-ms": "100"}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0171, "18ms"), (1.0, "1s"), (1.5, "1.5s"), (360.0, "6m0s"), (3723.0, "1h2m3s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_duration_never_negative() -> None:
    assert format_duration(-5) == "0ms"
    assert not math.isnan(RateLimiter().check_and_consume(1, 1, 1, items=1).retry_after_s)
