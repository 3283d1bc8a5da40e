"""Request and response bodies of the /v1 API.

Arrays travel either as JSON floats or as base64 float32 (see shared.arrays);
`encoding_format` picks the format of the answer, as in OpenAI's embeddings API.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

API_PREFIX = "/v1"

EncodingFormat = Literal["float", "base64"]
Modality = Literal["text", "image"]
# One soft prompt: M context vectors of the token width, as nested floats or base64 float32.
ContextVectors = list[list[float]] | str


class _Body(BaseModel):
    # Unknown fields are ignored (OpenAI's client sends extras such as `dimensions`).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RequestLimits(_Body):
    """What one request may carry; clients split their work by these, never by guesses."""

    max_items_per_request: int
    max_body_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_text_chars: int
    max_class_name_chars: int
    max_word_chars: int | None = None  # longest whitespace-free run in a text, when bounded
    max_json_elements: int | None = None  # most JSON values (numbers, strings, ...) in one body


class ModelCard(_Body):
    """What a client may know about the hosted model: no weights, no internals."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0  # Unix time the served model was built (at server start-up)
    owned_by: str = "cbbt"
    backend: str
    feature_dim: int
    token_width: int
    max_context_vectors: int
    context_length: int
    logit_scale: float
    image_size: int
    causal_text: bool
    has_semantics: bool
    description: str = ""
    limits: RequestLimits | None = None  # None from servers that predate it


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Body):
    """Billing units of one call: `items` = images + text sequences encoded."""

    prompt_tokens: int = 0
    total_tokens: int = 0
    items: int = 0
    images: int = 0
    texts: int = 0


class EmbeddingRequest(BaseModel):
    """OpenAI-compatible; images are data URIs (or bare base64) with modality="image".

    Without `modality`, inputs that are all `data:image/...` URIs are images (so clients that
    cannot add a field, such as proxies, can send images); anything else is text.
    Unknown fields are refused (as OpenAI does), so a misspelt field cannot silently change
    what is embedded. Token-id arrays are accepted by the schema only so that the server can
    answer them with a precise message.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: EncodingFormat = "float"
    modality: Modality | None = None
    dimensions: int | None = None  # truncate to the first `dimensions` and re-normalise
    user: str | None = None


class EmbeddingData(_Body):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(_Body):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class PromptEmbeddingRequest(_Body):
    """P soft prompts x C class names -> P*C text features.

    The server builds `[SOS] ctx_1..ctx_M <class tokens> . [EOS]` for every pair.
    """

    prompts: list[ContextVectors] = Field(min_length=1)
    class_names: list[str] = Field(min_length=1)
    model: str | None = None
    encoding_format: EncodingFormat = "base64"


class PromptEmbeddingResponse(_Body):
    object: Literal["prompt_embedding"] = "prompt_embedding"
    model: str
    shape: list[int]  # [P, C, D]
    embeddings: list[list[list[float]]] | str
    usage: Usage


class TokenEmbeddingRequest(_Body):
    text: str
    model: str | None = None
    encoding_format: EncodingFormat = "float"


class TokenEmbeddingResponse(_Body):
    object: Literal["token_embedding"] = "token_embedding"
    model: str
    tokens: list[str]
    shape: list[int]  # [M, W]
    embedding: list[list[float]] | str
    usage: Usage


class ClassifyRequest(_Body):
    """The prediction-only tier: images and class prompts in, logits and probabilities out.

    Class prompts are either plain `texts` (one per class) or one soft prompt `context`
    applied to every entry of `class_names`.
    """

    images: list[str] = Field(min_length=1)
    class_names: list[str] | None = None
    texts: list[str] | None = None
    context: ContextVectors | None = None
    model: str | None = None


class ClassifyResponse(_Body):
    object: Literal["classification"] = "classification"
    model: str
    logits: list[list[float]]
    probabilities: list[list[float]]
    predictions: list[int]
    usage: Usage


class LedgerEntry(_Body):
    request_id: str
    endpoint: str
    items: int
    status: int | None  # None while the request is still being answered
    refunded: bool = False
    created_at: float


class UsageReport(_Body):
    object: Literal["usage"] = "usage"
    key_name: str
    budget_items: int | None
    spent_items: int
    remaining_items: int | None
    budget_requests: int | None
    spent_requests: int
    remaining_requests: int | None
    recent: list[LedgerEntry]
    tier: str | None = None  # embeddings | predictions | full; None for a custom scope set
