"""The embeddings tier: any OpenAI-compatible `/v1/embeddings` that embeds texts and images.

What commercial multimodal embedding APIs (and proxies such as LiteLLM's) offer: `GET /v1/models`
(ids only) and `POST /v1/embeddings`, images sent as `data:image/...` URIs. There is no cbbt
model card, so this client makes its own: the model id (`--model`, or the first listed), the
feature dimension from the first answer, and no logit scale (fitted locally by the feature
methods, `fit_logit_scale`). It sends only fields OpenAI defines (no `modality`: a cbbt server
embeds data-URI inputs as images), asks for floats (proxies re-encode base64 unevenly), and
counts items as such a service bills them: one per input.

Soft prompts and token embeddings do not exist on this tier: asking for them raises
`TierNotAllowed` naming the tier that has them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Unpack

import httpx
import numpy as np
from pydantic import ValidationError

from client.api import FALLBACK_LIMITS, CbbtClient, FloatArray, QueryCounter
from client.errors import RequestError
from client.session import SessionOptions
from shared.schemas import API_PREFIX, EmbeddingResponse, ModelCard, RequestLimits, UsageReport

logger = logging.getLogger(__name__)

__all__ = ["ApiKind", "OpenAIEmbeddingsClient", "TierNotAllowed", "detect_api"]

ApiKind = Literal["auto", "cbbt", "openai"]
EMBEDDINGS_TIER = "embeddings"
# What this client sends per request: small enough for any proxy's body limit (a 224 px PNG
# data URI is ~50-150 KB), large enough that calls stay few.
OPENAI_LIMITS = RequestLimits(
    **{**FALLBACK_LIMITS.model_dump(), "max_items_per_request": 64, "max_body_bytes": 8 * 2**20}
)


class TierNotAllowed(RequestError):
    """The method needs what this API tier does not offer (one line, naming the tier it needs)."""


def detect_api(base_url: str, api_key: str | None, *, timeout_s: float = 30.0) -> Literal["cbbt", "openai"]:
    """`cbbt` when /v1/models carries cbbt model cards, `openai` when it lists plain OpenAI models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as http:
            response = http.get(f"{API_PREFIX}/models")
    except httpx.TransportError:
        return "cbbt"  # the cbbt client then reports the unreachable server, with its retries
    if not response.is_success:
        return "cbbt"  # a wrong key, a server error: the cbbt client reports it as it should
    try:
        ModelCard.model_validate((response.json().get("data") or [{}])[0])
    except ValidationError:
        return "openai"
    except (ValueError, AttributeError, IndexError, TypeError):
        return "cbbt"  # not an OpenAI-style model list at all
    return "cbbt"


class OpenAIEmbeddingsClient(CbbtClient):
    """The `ModelApi` of an embeddings-only OpenAI-compatible service (see the module doc)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        counter: QueryCounter | None = None,
        max_items_per_request: int | None = None,
        **session: Unpack[SessionOptions],
    ) -> None:
        super().__init__(
            base_url, api_key, counter=counter, max_items_per_request=max_items_per_request, **session
        )
        self.model = model
        self._feature_dim: int | None = None

    # -- what the service says about itself ------------------------------------------------
    def _model_id(self) -> str:
        if self.model is None:
            listed = self.session.request("GET", f"{API_PREFIX}/models").json().get("data") or []
            if not listed:
                raise RequestError("the API lists no models; name one with --model")
            self.model = str(listed[0]["id"])
            logger.info("embeddings tier: using model %r (the first listed; --model to choose)", self.model)
        return self.model

    def model_card(self) -> ModelCard:
        """A card built here: no soft-prompt facts, the dimension from the first answer, scale 0
        (unknown: fitted locally on the training shots)."""
        model = self._model_id()
        if self._feature_dim is None:
            self._feature_dim = int(self._embed(["a photo."], "text", None).shape[1])
        return ModelCard(
            id=model,
            owned_by="unknown",
            backend="openai-embeddings",
            feature_dim=self._feature_dim,
            token_width=0,
            max_context_vectors=0,
            context_length=0,
            logit_scale=0.0,
            image_size=224,
            causal_text=False,
            has_semantics=True,
            description="an OpenAI-compatible embeddings API (embeddings tier)",
            limits=OPENAI_LIMITS,
        )

    @property
    def limits(self) -> RequestLimits:
        return OPENAI_LIMITS

    def usage(self) -> UsageReport:
        raise TierNotAllowed("an OpenAI-compatible embeddings API has no usage endpoint; see its provider")

    # -- features ----------------------------------------------------------------------------
    def _embed(self, inputs: list[str], modality: str, idempotency_key: str | None) -> FloatArray:
        body: dict[str, object] = {"input": inputs, "model": self._model_id(), "encoding_format": "float"}
        answer = self._call(
            "POST",
            f"{API_PREFIX}/embeddings",
            EmbeddingResponse,
            json=body,
            items=len(inputs),
            idempotency_key=idempotency_key,
        )
        rows = [np.asarray(row.embedding, np.float32) for row in sorted(answer.data, key=lambda r: r.index)]
        if len(rows) != len(inputs):
            raise RequestError(f"the API answered {len(rows)} embeddings for {len(inputs)} inputs")
        features = np.stack(rows)
        self._feature_dim = int(features.shape[1])
        return features

    # -- what this tier does not have ----------------------------------------------------------
    def token_embeddings(self, text: str, *, idempotency_key: str | None = None) -> FloatArray:
        raise _needs_full_tier("token embeddings")

    def prompt_embeddings(
        self, prompts: FloatArray, class_names: Sequence[str], *, idempotency_key: str | None = None
    ) -> FloatArray:
        raise _needs_full_tier("soft prompts")


def _needs_full_tier(what: str, *_: Any) -> TierNotAllowed:
    return TierNotAllowed(
        f"{what} need cbbt's full tier (/v1/prompt-embeddings); this API offers the embeddings tier only"
    )
