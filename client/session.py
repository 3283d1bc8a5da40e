"""The one place that talks HTTP to a server: requests, retries, and what a failure means.

- Retries (tenacity) only what is worth retrying: 429 rate limits (honouring `Retry-After` /
  `retry-after-ms`), 408/409/5xx answers, timeouts and connections dropped mid-run; never
  `insufficient_quota`, answers marked `x-should-retry: false`, or other 4xx. Exponential
  backoff with jitter when the server does not say how long to wait; all retries of one call
  end within `RetryPolicy.max_total_s` (the CBBT_RETRY_TOTAL_S setting).
- A connection refused before the server ever answered is not retried: there is no cbbt
  server at that URL, and the user should hear so in seconds (`ServerUnreachable`).
- Every failure leaves as one of client.errors' exceptions (never a raw httpx error).

A client for another API tier builds its calls on an `ApiSession` too (see client/api.py).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base

from client.errors import (
    ApiError,
    CredentialsError,
    QuotaExhausted,
    ServerUnreachable,
    ServiceUnavailable,
    TransientError,
)
from client.settings import normalise_base_url
from shared.errors import ErrorCode

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "ApiSession",
    "RetryPolicy",
    "raise_for_answer",
]

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=30.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=4)
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CREDENTIAL_STATUS = frozenset({401, 403})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 30
    max_total_s: float = 600.0  # long enough to ride out a server restart
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    jitter: float = 0.5


DEFAULT_RETRY = RetryPolicy()


def _retry_after_seconds(response: httpx.Response) -> float | None:
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                continue
    return None


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    try:
        error = response.json().get("error", {})
        return error.get("code"), error.get("message", response.text[:200])
    except (ValueError, AttributeError):
        return None, response.text[:200]


def raise_for_answer(response: httpx.Response) -> None:
    """Turn an error answer into the exception that says what the caller can do."""
    if response.is_success:
        return
    code, message = _error_fields(response)
    status = response.status_code
    if code == ErrorCode.insufficient_quota:
        raise QuotaExhausted(status, code, message)
    if status in CREDENTIAL_STATUS:
        raise CredentialsError(status, code, message)
    no_retry = response.headers.get("x-should-retry", "").lower() == "false"
    if status in RETRYABLE_STATUS and not no_retry:
        raise TransientError(f"{status} {code}: {message}", _retry_after_seconds(response))
    raise ApiError(status, code, message)


class _TimeBound(stop_base):
    """Stop before a wait would end past `max_total_s` since the first attempt (time spent in
    attempts and in waits both count)."""

    def __init__(self, max_total_s: float) -> None:
        self.max_total_s = max_total_s

    def __call__(self, state: RetryCallState) -> bool:
        spent = max(state.seconds_since_start or 0.0, state.idle_for)
        return spent + state.upcoming_sleep >= self.max_total_s


def _waited(retrying: Retrying, started: float) -> float:
    return max(time.monotonic() - started, float(retrying.statistics.get("idle_for", 0.0)))


@dataclass
class _Wait:
    """Retry-After when the server gives one, else exponential backoff with jitter."""

    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, TransientError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.policy.backoff_max_s * 3)
        base = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** (state.attempt_number - 1))
        return base * (1 - self.policy.jitter + self.policy.jitter * self.rng.random() * 2)


class SessionOptions(TypedDict, total=False):
    """How a session talks: timeouts, the retry policy, and the transport (the test seam)."""

    timeout: httpx.Timeout
    retry: RetryPolicy
    transport: httpx.BaseTransport | None


class ApiSession:
    """One long-lived httpx client on one server. Thread-compatible (use one per thread)."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Unpack[SessionOptions]) -> None:
        self.base_url = normalise_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=options.get("timeout", DEFAULT_TIMEOUT),
            limits=DEFAULT_LIMITS,
            transport=options.get("transport"),
        )
        self.retry = options.get("retry", DEFAULT_RETRY)
        self.answered = False  # has the server ever answered this session?
        self.on_retry: Callable[[BaseException, float], None] | None = None

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """One logical call, retried as needed; a POST carries one Idempotency-Key for all attempts."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex} if method == "POST" else {}
        started = time.monotonic()
        retrying = Retrying(
            retry=retry_if_exception(self._worth_retrying),
            wait=_Wait(self.retry),
            stop=stop_after_attempt(self.retry.max_attempts) | _TimeBound(self.retry.max_total_s),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._send, method, path, json, headers)
        except TransientError as exc:
            waited = _waited(retrying, started)
            raise ServiceUnavailable(str(exc), waited, self._attempts(retrying)) from exc
        except httpx.ConnectError as exc:
            raise ServerUnreachable(self.base_url, _reason(exc)) from exc
        except httpx.TransportError as exc:
            what = f"{type(exc).__name__}: {_reason(exc)}"
            waited = _waited(retrying, started)
            raise ServiceUnavailable(what, waited, self._attempts(retrying)) from exc

    def _send(
        self, method: str, path: str, json: dict[str, Any] | None, headers: dict[str, str]
    ) -> httpx.Response:
        response = self._http.request(method, path, json=json, headers=headers)
        self.answered = True
        raise_for_answer(response)
        return response

    def _worth_retrying(self, exc: BaseException) -> bool:
        if isinstance(exc, httpx.ConnectError) and not self.answered:
            return False  # nothing listens there: say so now, not after minutes of retries
        return isinstance(exc, TransientError | httpx.TransportError)

    @staticmethod
    def _attempts(retrying: Retrying) -> int:
        return int(retrying.statistics.get("attempt_number", 1))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info("retrying in %.1fs after: %s", wait, exc)  # the final error says how long it tried
        if self.on_retry is not None and exc is not None:
            self.on_retry(exc, wait)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
