"""The HTTP client of the model server: one long-lived httpx client, retries, query counting.

- Retries (tenacity) on connection errors, timeouts, dropped connections and 408/409/429/5xx,
  honouring `Retry-After` / `retry-after-ms`, exponential backoff with jitter otherwise.
  Never retries `insufficient_quota`, answers marked `x-should-retry: false`, or other 4xx.
- One `Idempotency-Key` per logical call, reused across its retries, so a retry of a call
  the server already charged is replayed, not charged again. Callers may pass their own
  deterministic key (the tuning loop does, so that a resumed run replays, too).
- Every answered call is counted once (calls, items) in a `QueryCounter`.
"""

from __future__ import annotations

import base64
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay

from shared.arrays import decode_array, encode_array
from shared.errors import ErrorCode
from shared.schemas import (
    API_PREFIX,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    PromptEmbeddingResponse,
    TokenEmbeddingResponse,
    UsageReport,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "ApiError",
    "CbbtClient",
    "QueryCounter",
    "QuotaExhausted",
    "RetryPolicy",
    "TransientError",
]

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=30.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=4)
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 30
    max_total_s: float = 600.0  # long enough to ride out a server restart
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    jitter: float = 0.5


DEFAULT_RETRY = RetryPolicy()


class ApiError(Exception):
    """The server answered with an error the client should not retry."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class QuotaExhausted(ApiError):
    """The key's budget cannot pay for the call (`insufficient_quota`): stop, do not retry."""


class TransientError(Exception):
    """A failure worth retrying (5xx, 429 rate limit, dropped connection...)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class QueryCounter:
    """Queries in the three units of the evaluation protocol (+ retries, for the curious)."""

    calls: int = 0
    items: int = 0
    loss_evaluations: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def load(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            if hasattr(self, name):
                setattr(self, name, int(value))


def _retry_after_seconds(response: httpx.Response) -> float | None:
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    seconds = response.headers.get("retry-after")
    if seconds is not None:
        try:
            return float(seconds)
        except ValueError:
            return None
    return None


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    try:
        error = response.json().get("error", {})
        return error.get("code"), error.get("message", response.text[:200])
    except (ValueError, AttributeError):
        return None, response.text[:200]


def raise_for_answer(response: httpx.Response) -> None:
    """Turn an error answer into QuotaExhausted, TransientError or ApiError."""
    if response.is_success:
        return
    code, message = _error_fields(response)
    if code == ErrorCode.insufficient_quota:
        raise QuotaExhausted(response.status_code, code, message)
    no_retry = response.headers.get("x-should-retry", "").lower() == "false"
    if response.status_code in RETRYABLE_STATUS and not no_retry:
        raise TransientError(f"{response.status_code} {code}: {message}", _retry_after_seconds(response))
    raise ApiError(response.status_code, code, message)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransientError | httpx.TransportError)


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


class CbbtClient:
    """Typed access to one server. Thread-compatible (use one per thread)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.BaseTransport | None = None,
        counter: QueryCounter | None = None,
        max_items_per_request: int = 4096,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            limits=DEFAULT_LIMITS,
            transport=transport,
        )
        self.retry = retry
        self.counter = counter or QueryCounter()
        self.max_items_per_request = max_items_per_request
        self._card: ModelCard | None = None
        self.on_retry: Callable[[BaseException, float], None] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CbbtClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        response_model: type[T],
        *,
        json: dict[str, Any] | None = None,
        items: int = 0,
        idempotency_key: str | None = None,
    ) -> T:
        """One logical call: retried as needed, counted once when answered."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex} if method == "POST" else {}
        retrying = Retrying(
            retry=retry_if_exception(_is_retryable),
            wait=_Wait(self.retry),
            stop=stop_after_attempt(self.retry.max_attempts) | stop_after_delay(self.retry.max_total_s),
            before_sleep=self._log_retry,
            reraise=True,
        )
        response = retrying(self._send, method, path, json, headers)
        if method == "POST":  # only model calls are charged; GETs (card, usage) are free
            self.counter.calls += 1
            self.counter.items += items
        return response_model.model_validate_json(response.content)

    def _send(
        self, method: str, path: str, json: dict[str, Any] | None, headers: dict[str, str]
    ) -> httpx.Response:
        response = self._http.request(method, path, json=json, headers=headers)
        raise_for_answer(response)
        return response

    def _log_retry(self, state: RetryCallState) -> None:
        self.counter.retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning("retrying in %.1fs after: %s", wait, exc)
        if self.on_retry is not None and exc is not None:
            self.on_retry(exc, wait)

    # -- API -------------------------------------------------------------------------------
    def model_card(self) -> ModelCard:
        if self._card is None:
            self._card = self.request("GET", f"{API_PREFIX}/models", ModelList).data[0]
        return self._card

    def usage(self) -> UsageReport:
        return self.request("GET", f"{API_PREFIX}/usage", UsageReport)

    def embed_images(
        self, images: Sequence[bytes], *, idempotency_key: str | None = None
    ) -> npt.NDArray[np.float32]:
        """Image file bytes -> [N, D] features (one call; split large sets yourself)."""
        uris = [f"data:{_mime(b)};base64,{base64.b64encode(b).decode()}" for b in images]
        return self._embed(uris, "image", idempotency_key)

    def embed_texts(
        self, texts: Sequence[str], *, idempotency_key: str | None = None
    ) -> npt.NDArray[np.float32]:
        return self._embed(list(texts), "text", idempotency_key)

    def _embed(
        self, inputs: list[str], modality: str, idempotency_key: str | None
    ) -> npt.NDArray[np.float32]:
        """One /v1/embeddings call: N inputs (texts or image data URIs) -> [N, D] features."""
        body = {"input": inputs, "modality": modality, "encoding_format": "base64"}
        answer = self.request(
            "POST",
            f"{API_PREFIX}/embeddings",
            EmbeddingResponse,
            json=body,
            items=len(inputs),
            idempotency_key=idempotency_key,
        )
        return _stack(answer, self.model_card().feature_dim)

    def token_embeddings(self, text: str, *, idempotency_key: str | None = None) -> npt.NDArray[np.float32]:
        answer = self.request(
            "POST",
            f"{API_PREFIX}/token-embeddings",
            TokenEmbeddingResponse,
            json={"text": text, "encoding_format": "base64"},
            items=1,
            idempotency_key=idempotency_key,
        )
        assert isinstance(answer.embedding, str)
        return decode_array(answer.embedding, answer.shape)

    def prompt_embeddings(
        self,
        prompts: npt.NDArray[np.float32],
        class_names: Sequence[str],
        *,
        idempotency_key: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """[P, M, W] soft prompts x C class names -> [P, C, D] text features.

        As few requests as the server's per-request item limit allows: whole prompts per
        request, and the class list split too when it alone exceeds the limit.
        """
        limit = self.max_items_per_request
        names = list(class_names)
        class_step = min(len(names), limit)
        prompt_step = max(1, limit // class_step)
        rows = []
        part = 0
        for start in range(0, prompts.shape[0], prompt_step):
            chunk = prompts[start : start + prompt_step]
            columns = []
            for first in range(0, len(names), class_step):
                key = None if idempotency_key is None else f"{idempotency_key}/{part}"
                columns.append(self._prompt_call(chunk, names[first : first + class_step], key))
                part += 1
            rows.append(np.concatenate(columns, axis=1))
        return np.concatenate(rows)

    def _prompt_call(
        self, prompts: npt.NDArray[np.float32], class_names: list[str], key: str | None
    ) -> npt.NDArray[np.float32]:
        body = {
            "prompts": [encode_array(p) for p in prompts],
            "class_names": class_names,
            "encoding_format": "base64",
        }
        answer = self.request(
            "POST",
            f"{API_PREFIX}/prompt-embeddings",
            PromptEmbeddingResponse,
            json=body,
            items=prompts.shape[0] * len(class_names),
            idempotency_key=key,
        )
        assert isinstance(answer.embeddings, str)
        return decode_array(answer.embeddings, answer.shape)


def _stack(answer: EmbeddingResponse, dim: int) -> npt.NDArray[np.float32]:
    rows = sorted(answer.data, key=lambda d: d.index)
    return np.stack(
        [
            decode_array(r.embedding, (dim,))
            if isinstance(r.embedding, str)
            else np.asarray(r.embedding, np.float32)
            for r in rows
        ]
    )


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
