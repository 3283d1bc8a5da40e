"""Per-key rate limits: requests per minute and items per minute.

Token buckets: a bucket holds up to `limit` tokens and refills at limit/60 tokens per second,
so a key may burst up to its per-minute limit and then sustain exactly that rate. A request
takes 1 request token and `items` item tokens, from both buckets or from neither.

Two places keep the buckets, behind one `Limiter` interface: `RateLimiter` in this process's
memory (one server per SQLite file), and `SharedRateLimiter` in a store that many replicas
share (PostgreSQL), so that a key's limits hold whichever replica a request lands on. The
budget, which must be exact, is always the store's.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

# Absorbs float drift so that waiting exactly retry_after_s is always enough.
_EPS = 1e-9
_WINDOW_S = 60.0


@dataclass(frozen=True)
class LimitState:
    """One limit after the decision. limit None = unlimited (remaining is then None too)."""

    limit: int | None
    remaining: int | None
    reset_s: float


_UNLIMITED = LimitState(limit=None, remaining=None, reset_s=0.0)


@dataclass(frozen=True)
class RateDecision:
    """allowed: the tokens were taken. never: the request exceeds a whole limit and can never pass."""

    allowed: bool
    retry_after_s: float
    requests: LimitState
    items: LimitState
    never: bool = False
    reason: str | None = None


@dataclass
class BucketState:
    limit: int
    tokens: float
    updated: float

    @property
    def rate(self) -> float:
        return self.limit / _WINDOW_S

    def refill(self, now: float, limit: int) -> None:
        if limit != self.limit:
            # The key's limit changed (admin edit): keep what was left, capped at the new limit.
            self.limit = limit
            self.tokens = min(self.tokens, float(limit))
        elapsed = max(0.0, now - self.updated)  # a clock stepping back grants nothing
        self.tokens = min(float(self.limit), self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)

    def wait_for(self, cost: int) -> float:
        """Seconds until `cost` tokens are available (0 if they are now)."""
        if self.tokens + _EPS >= cost:
            return 0.0
        return (cost - self.tokens) / self.rate

    def state(self) -> LimitState:
        reset = (self.limit - self.tokens) / self.rate if self.rate > 0 else 0.0
        return LimitState(limit=self.limit, remaining=math.floor(self.tokens + _EPS), reset_s=reset)


def _take(
    req: BucketState | None, itm: BucketState | None, rpm: int | None, ipm: int | None, items: int
) -> RateDecision:
    """The decision on refilled buckets: take 1 request and `items` tokens from both, or none."""
    never = _never_reason(rpm, ipm, items)
    if never is not None:
        return _decision(False, 0.0, req, itm, never=True, reason=never)
    wait = max(req.wait_for(1) if req is not None else 0.0, itm.wait_for(items) if itm is not None else 0.0)
    if wait > 0:
        return _decision(False, wait, req, itm, reason=_wait_reason(req, itm, items))
    if req is not None:
        req.tokens -= 1
    if itm is not None:
        itm.tokens -= items
    return _decision(True, 0.0, req, itm)


def _give_back(bucket: BucketState, now: float, cost: int) -> None:
    bucket.refill(now, bucket.limit)
    bucket.tokens = min(float(bucket.limit), bucket.tokens + cost)


class Limiter(Protocol):
    """Where a server's rate limits are decided. `blocking`: calls do I/O (run them off the loop)."""

    blocking: ClassVar[bool]

    def check_and_consume(
        self, key_id: int, rpm: int | None, ipm: int | None, items: int
    ) -> RateDecision: ...

    def refund(self, key_id: int, items: int, *, request: bool = True) -> None: ...

    def forget(self, key_id: int) -> None: ...


class RateLimiter:
    """In memory, thread-safe; `clock` (monotonic seconds) is injectable so tests need no sleeping."""

    blocking: ClassVar[bool] = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[int, str], BucketState] = {}
        self._lock = threading.Lock()

    def check_and_consume(
        self, key_id: int, rpm: int | None, ipm: int | None, items: int, now: float | None = None
    ) -> RateDecision:
        t = self._clock() if now is None else now
        with self._lock:
            req = self._bucket(key_id, "requests", rpm, t)
            itm = self._bucket(key_id, "items", ipm, t)
            return _take(req, itm, rpm, ipm, items)

    def refund(self, key_id: int, items: int, now: float | None = None, *, request: bool = True) -> None:
        """Give back `items` and (unless request=False) the request: it was refused or failed
        after the check, or (request=False) it was answered from a stored replay."""
        t = self._clock() if now is None else now
        with self._lock:
            for kind, cost in (("requests", int(request)), ("items", items)):
                bucket = self._buckets.get((key_id, kind))
                if bucket is not None:
                    _give_back(bucket, t, cost)

    def forget(self, key_id: int) -> None:
        """Drop a key's state (revoked or deleted keys)."""
        with self._lock:
            for kind in ("requests", "items"):
                self._buckets.pop((key_id, kind), None)

    def _bucket(self, key_id: int, kind: str, limit: int | None, now: float) -> BucketState | None:
        if limit is None:
            self._buckets.pop((key_id, kind), None)
            return None
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = BucketState(limit=limit, tokens=float(limit), updated=now)
            self._buckets[(key_id, kind)] = bucket
        bucket.refill(now, limit)
        return bucket


@runtime_checkable
class BucketStore(Protocol):
    def update_buckets(
        self,
        key_id: int,
        capacities: dict[str, int | None],
        decide: Callable[[dict[str, BucketState], float], T],
    ) -> T:
        """Run `decide` on the key's locked buckets (at the store's time) and keep what it left."""
        ...


class SharedRateLimiter:
    """The same token buckets, kept in a store that every replica shares (one locked row each)."""

    blocking: ClassVar[bool] = True

    def __init__(self, store: BucketStore) -> None:
        self._store = store

    def check_and_consume(self, key_id: int, rpm: int | None, ipm: int | None, items: int) -> RateDecision:
        if rpm is None and ipm is None:  # an unlimited key costs the database nothing here
            return _take(None, None, rpm, ipm, items)

        def decide(buckets: dict[str, BucketState], now: float) -> RateDecision:
            for kind, limit in (("requests", rpm), ("items", ipm)):
                if limit is not None:
                    buckets[kind].refill(now, limit)
            return _take(buckets.get("requests"), buckets.get("items"), rpm, ipm, items)

        return self._store.update_buckets(key_id, {"requests": rpm, "items": ipm}, decide)

    def refund(self, key_id: int, items: int, *, request: bool = True) -> None:
        def give_back(buckets: dict[str, BucketState], now: float) -> None:
            for kind, cost in (("requests", int(request)), ("items", items)):
                if kind in buckets:
                    _give_back(buckets[kind], now, cost)

        self._store.update_buckets(key_id, {}, give_back)  # the buckets as stored, whatever their limits

    def forget(self, key_id: int) -> None:
        self._store.update_buckets(key_id, {"requests": None, "items": None}, lambda _buckets, _now: None)


def _never_reason(rpm: int | None, ipm: int | None, items: int) -> str | None:
    if rpm is not None and rpm < 1:
        return "this key's rate limit allows no requests (rpm = 0)"
    if ipm is not None and items > ipm:
        return f"request has {items} items but this key's limit is {ipm} items per minute; split it"
    return None


def _wait_reason(req: BucketState | None, itm: BucketState | None, items: int) -> str:
    if req is not None and req.wait_for(1) > 0:
        return f"rate limit of {req.limit} requests per minute reached"
    assert itm is not None  # a positive wait came from one of the two buckets
    return f"rate limit of {itm.limit} items per minute reached ({items} requested)"


def _decision(
    allowed: bool,
    retry_after_s: float,
    req: BucketState | None,
    itm: BucketState | None,
    *,
    never: bool = False,
    reason: str | None = None,
) -> RateDecision:
    return RateDecision(
        allowed=allowed,
        retry_after_s=retry_after_s,
        requests=req.state() if req is not None else _UNLIMITED,
        items=itm.state() if itm is not None else _UNLIMITED,
        never=never,
        reason=reason,
    )


def format_duration(seconds: float) -> str:
    """OpenAI's reset style: '20ms', '1s', '1.5s', '6m0s', '1h2m3s'."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(round(seconds * 1000, 3))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    out = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs_text}s"


def rate_limit_headers(decision: RateDecision, remaining_budget_items: int | None) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,items} and x-budget-remaining-items.

    Limits that do not apply (None: unlimited) are left out rather than sent as fake numbers.
    """
    headers: dict[str, str] = {}
    for kind, state in (("requests", decision.requests), ("items", decision.items)):
        if state.limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
    if remaining_budget_items is not None:
        headers["x-budget-remaining-items"] = str(remaining_budget_items)
    return headers


def retry_after_headers(decision: RateDecision) -> dict[str, str]:
    """Headers of a 429 for this decision: Retry-After (whole seconds, rounded up) and retry-after-ms.

    A request that can never pass gets `x-should-retry: false` instead, so clients do not retry it.
    """
    if decision.never:
        return {"x-should-retry": "false"}
    # Rounding before ceil keeps float noise (0.1 * 1000 = 100.00000000000001) from adding a unit.
    seconds = round(decision.retry_after_s, 6)
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(round(seconds * 1000, 3)))),
    }
