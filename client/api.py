"""What the tuning code asks of a model service, and the client of cbbt's full API tier.

`ImageEmbedder` and `ModelApi` are the interfaces the rest of the client depends on; a client
for another API tier (an embeddings-only OpenAI-style service, a prediction-only service)
implements them on its own `ApiSession` (client/session.py, the one place that talks HTTP).

`CbbtClient` is the full tier: images, texts, token embeddings and soft prompts in, features
out. It splits requests by the limits the server advertises in its model card
(`ModelCard.limits`), and counts every answered call once in a `QueryCounter`. One
`Idempotency-Key` per logical call (or per part of a split call) is reused across its
retries, so a retry of a call the server already charged is replayed, not charged again;
callers may pass deterministic keys (the tuning loop does, so a resumed run replays too).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, Unpack

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from client.errors import ApiError, QuotaExhausted, TransientError
from client.session import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    ApiSession,
    RetryPolicy,
    SessionOptions,
)
from shared.arrays import decode_array, encode_array
from shared.schemas import (
    API_PREFIX,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    PromptEmbeddingResponse,
    RequestLimits,
    TokenEmbeddingResponse,
    UsageReport,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "FALLBACK_LIMITS",
    "ApiError",
    "CbbtClient",
    "ImageEmbedder",
    "ModelApi",
    "QueryCounter",
    "QuotaExhausted",
    "RetryPolicy",
    "TransientError",
]

FloatArray = npt.NDArray[np.float32]
T = TypeVar("T", bound=BaseModel)

# For servers whose card predates `limits`: what those servers accepted.
FALLBACK_LIMITS = RequestLimits(
    max_items_per_request=4096,
    max_body_bytes=32 * 1024 * 1024,
    max_image_bytes=8 * 1024 * 1024,
    max_image_pixels=4096 * 4096,
    max_text_chars=2000,
    max_class_name_chars=200,
)
# JSON and data-URI framing per image, beyond its base64 bytes.
_IMAGE_OVERHEAD_BYTES = 64
_BODY_HEADROOM = 0.9  # stay under the body limit by a margin (field names, separators)


@dataclass
class QueryCounter:
    """Queries in the three units of the evaluation protocol (+ retries, for the curious)."""

    calls: int = 0
    items: int = 0
    loss_evaluations: int = 0
    retries: int = 0
    # The routes ("embeddings", "classify", ...) the run's answered calls went to, and that of
    # the cached image features it used: what says which API tier the run needed.
    routes: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "items": self.items,
            "loss_evaluations": self.loss_evaluations,
            "retries": self.retries,
        }

    def load(self, values: dict[str, int]) -> None:
        known = self.as_dict()
        for name, value in values.items():
            if name in known:
                setattr(self, name, int(value))


class ImageEmbedder(Protocol):
    """Enough of a service for the feature cache: its card and image features."""

    counter: QueryCounter

    def model_card(self) -> ModelCard: ...

    def embed_images(self, images: Sequence[bytes], *, idempotency_key: str | None = None) -> FloatArray: ...


class ModelApi(ImageEmbedder, Protocol):
    """Everything the tuning code asks of a service (the full tier)."""

    def usage(self) -> UsageReport: ...

    def embed_texts(self, texts: Sequence[str], *, idempotency_key: str | None = None) -> FloatArray: ...

    def token_embeddings(self, text: str, *, idempotency_key: str | None = None) -> FloatArray: ...

    def prompt_embeddings(
        self, prompts: FloatArray, class_names: Sequence[str], *, idempotency_key: str | None = None
    ) -> FloatArray: ...

    def close(self) -> None: ...


class CbbtClient:
    """Typed access to one cbbt server (the full tier). Thread-compatible (use one per thread)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        counter: QueryCounter | None = None,
        max_items_per_request: int | None = None,
        **session: Unpack[SessionOptions],
    ) -> None:
        """`session`: timeout, retry (a RetryPolicy), transport (an httpx transport), as ApiSession's."""
        self.session = ApiSession(base_url, api_key, **session)
        self.session.on_retry = self._count_retry
        self.counter = counter or QueryCounter()
        self._max_items_override = max_items_per_request
        self._card: ModelCard | None = None
        self.on_retry: Callable[[BaseException, float], None] | None = None

    @property
    def retry(self) -> RetryPolicy:
        return self.session.retry

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> CbbtClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _count_retry(self, exc: BaseException, wait: float) -> None:
        self.counter.retries += 1
        if self.on_retry is not None:
            self.on_retry(exc, wait)

    def _call(
        self,
        method: str,
        path: str,
        response_model: type[T],
        *,
        json: dict[str, object] | None = None,
        items: int = 0,
        idempotency_key: str | None = None,
    ) -> T:
        """One logical call; model calls (POST) are counted once, when answered."""
        response = self.session.request(method, path, json=json, idempotency_key=idempotency_key)
        if method == "POST":  # only model calls are charged; GETs (card, usage) are free
            self.counter.calls += 1
            self.counter.items += items
            self.counter.routes.add(path.removeprefix(f"{API_PREFIX}/"))
        return response_model.model_validate_json(response.content)

    # -- what the server says about itself --------------------------------------------------
    def model_card(self) -> ModelCard:
        if self._card is None:
            self._card = self._call("GET", f"{API_PREFIX}/models", ModelList).data[0]
        return self._card

    @property
    def limits(self) -> RequestLimits:
        """The server's advertised request limits (FALLBACK_LIMITS from servers that predate them)."""
        return self.model_card().limits or FALLBACK_LIMITS

    @property
    def max_items_per_request(self) -> int:
        if self._max_items_override is not None:
            return self._max_items_override
        return self.limits.max_items_per_request

    def usage(self) -> UsageReport:
        return self._call("GET", f"{API_PREFIX}/usage", UsageReport)

    # -- features -----------------------------------------------------------------------------
    def embed_images(self, images: Sequence[bytes], *, idempotency_key: str | None = None) -> FloatArray:
        """Image file bytes -> [N, D] features, in as few requests as the server's limits allow."""
        uris = [f"data:{_mime(b)};base64,{base64.b64encode(b).decode()}" for b in images]
        parts = _split_by_limits(uris, self.max_items_per_request, self.limits.max_body_bytes)
        out = [
            self._embed(part, "image", _part_key(idempotency_key, i, len(parts)))
            for i, part in enumerate(parts)
        ]
        return np.concatenate(out) if len(out) > 1 else out[0]

    def embed_texts(self, texts: Sequence[str], *, idempotency_key: str | None = None) -> FloatArray:
        inputs = list(texts)
        limit = self.max_items_per_request
        parts = [inputs[i : i + limit] for i in range(0, len(inputs), limit)] or [[]]
        out = [
            self._embed(part, "text", _part_key(idempotency_key, i, len(parts)))
            for i, part in enumerate(parts)
        ]
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _embed(self, inputs: list[str], modality: str, idempotency_key: str | None) -> FloatArray:
        """One /v1/embeddings call: N inputs (texts or image data URIs) -> [N, D] features."""
        body: dict[str, object] = {"input": inputs, "modality": modality, "encoding_format": "base64"}
        answer = self._call(
            "POST",
            f"{API_PREFIX}/embeddings",
            EmbeddingResponse,
            json=body,
            items=len(inputs),
            idempotency_key=idempotency_key,
        )
        return _stack(answer, self.model_card().feature_dim)

    def token_embeddings(self, text: str, *, idempotency_key: str | None = None) -> FloatArray:
        answer = self._call(
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
        self, prompts: FloatArray, class_names: Sequence[str], *, idempotency_key: str | None = None
    ) -> FloatArray:
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

    def _prompt_call(self, prompts: FloatArray, class_names: list[str], key: str | None) -> FloatArray:
        body: dict[str, object] = {
            "prompts": [encode_array(p) for p in prompts],
            "class_names": class_names,
            "encoding_format": "base64",
        }
        answer = self._call(
            "POST",
            f"{API_PREFIX}/prompt-embeddings",
            PromptEmbeddingResponse,
            json=body,
            items=prompts.shape[0] * len(class_names),
            idempotency_key=key,
        )
        assert isinstance(answer.embeddings, str)
        return decode_array(answer.embeddings, answer.shape)


def _split_by_limits(uris: list[str], max_items: int, max_body_bytes: int) -> list[list[str]]:
    """Consecutive parts with at most `max_items` inputs and a body under `max_body_bytes`."""
    budget = int(max_body_bytes * _BODY_HEADROOM)
    parts: list[list[str]] = [[]]
    size = 0
    for uri in uris:
        cost = len(uri) + _IMAGE_OVERHEAD_BYTES
        if parts[-1] and (len(parts[-1]) >= max_items or size + cost > budget):
            parts.append([])
            size = 0
        parts[-1].append(uri)
        size += cost
    return parts


def _part_key(key: str | None, index: int, parts: int) -> str | None:
    """A whole call keeps its key; the parts of a split call get one each."""
    if key is None or parts == 1:
        return key
    return f"{key}/{index}"


def _stack(answer: EmbeddingResponse, dim: int) -> FloatArray:
    rows = sorted(answer.data, key=lambda d: d.index)
    if not rows:
        return np.empty((0, dim), np.float32)
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
