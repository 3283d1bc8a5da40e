"""POST /v1/embeddings: OpenAI-compatible text embeddings; images as data URIs with modality=image."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Request, Response

from server.backends.base import Backend, TokenIds
from server.billing import Caller, Charge, billed, check_tier, require_caller
from server.errors import ApiError
from server.guard import GuardedRoute
from server.images import ImageLimits, decode_image
from server.openapi import BILLED, WITH_BODY, WITH_IMAGES, error_responses
from server.settings import ServerSettings
from server.state import ready_state
from server.tiers import SCOPE_EMBED
from server.validation import check_item_count, check_model, check_texts, tokenize_texts
from shared.arrays import encode_array
from shared.errors import ErrorCode
from shared.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Modality, Usage

IMAGE_DATA_URI_PREFIX = "data:image/"

router = APIRouter(tags=["embeddings"], route_class=GuardedRoute)


def image_limits(settings: ServerSettings) -> ImageLimits:
    return ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def decode_and_preprocess(
    payloads: list[str], backend: Backend, limits: ImageLimits, param: str
) -> list[torch.Tensor]:
    """Decode and preprocess one image at a time (all-or-nothing); runs in a worker thread.

    One at a time: a decoded image may be 16 megapixels (about 50 MB) from a few hundred bytes of
    WebP, so holding every decoded image of a request at once would let one small request
    exhaust the server's memory. Only the small preprocessed tensors are kept.
    """
    return [
        backend.preprocess(decode_image(p, limits, param=f"{param}[{i}]")) for i, p in enumerate(payloads)
    ]


def _rows(features: torch.Tensor, encoding_format: str) -> list[list[float] | str]:
    if encoding_format == "base64":
        return [encode_array(row.numpy()) for row in features]
    return [row.tolist() for row in features]


_TOKEN_IDS_MESSAGE = (
    "token-id arrays are not supported: this model's tokenizer is not OpenAI's, so the ids would "
    "mean other words; send the texts as strings (LangChain's OpenAIEmbeddings does so with "
    "check_embedding_ctx_length=False)"
)


def _string_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    inputs = [value] if isinstance(value, str) else list(value)
    if not inputs:
        raise ApiError(400, ErrorCode.invalid_request, "input is empty", param="input")
    if not all(isinstance(item, str) for item in inputs):
        raise ApiError(400, ErrorCode.invalid_request, _TOKEN_IDS_MESSAGE, param="input")
    return [str(item) for item in inputs]


def _modality(requested: Modality | None, inputs: list[str]) -> Modality:
    """An explicit modality wins; otherwise all-data:image-URI inputs are images (see the schema)."""
    if requested is not None:
        return requested
    is_image = [item.startswith(IMAGE_DATA_URI_PREFIX) for item in inputs]
    if all(is_image):
        return "image"
    if any(is_image):
        raise ApiError(
            400,
            ErrorCode.invalid_request,
            "input mixes image data URIs and texts; send them in separate requests (or set `modality`)",
            param="input",
        )
    return "text"


def _check_dimensions(dimensions: int | None, feature_dim: int) -> int | None:
    if dimensions is not None and not 1 <= dimensions <= feature_dim:
        raise ApiError(
            400,
            ErrorCode.invalid_request,
            f"invalid value for 'dimensions' = {dimensions}: must be between 1 and {feature_dim}",
            param="dimensions",
        )
    return dimensions


def _truncate(features: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """OpenAI's `dimensions`: the first d components, re-normalised to unit length."""
    if dimensions is None or dimensions == features.shape[-1]:
        return features
    return torch.nn.functional.normalize(features[:, :dimensions], dim=-1)


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=error_responses(WITH_BODY, BILLED, WITH_IMAGES),
)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, caller: Annotated[Caller, Depends(require_caller)]
) -> Response:
    check_tier(caller, "embeddings", SCOPE_EMBED)
    state, backend, batchers = ready_state(request)
    settings = state.settings
    check_model(body.model, backend)
    inputs = _string_inputs(body.input)
    check_item_count(len(inputs), settings, param="input")
    dimensions = _check_dimensions(body.dimensions, backend.card.feature_dim)
    usage = Usage(items=len(inputs))

    def answer(features: torch.Tensor) -> EmbeddingResponse:
        rows = _rows(_truncate(features, dimensions), body.encoding_format)
        data = [EmbeddingData(index=i, embedding=row) for i, row in enumerate(rows)]
        return EmbeddingResponse(data=data, model=backend.card.id, usage=usage)

    if _modality(body.modality, inputs) == "image":
        usage.images = len(inputs)

        def prepare_images() -> list[torch.Tensor]:
            return decode_and_preprocess(inputs, backend, image_limits(settings), "input")

        async def produce_images(pixels: list[torch.Tensor]) -> EmbeddingResponse:
            return answer(await batchers.images.submit(pixels))

        charge: Charge[Any] = Charge(
            "embeddings", SCOPE_EMBED, len(inputs), body, prepare_images, produce_images
        )
    else:
        usage.texts = len(inputs)

        def prepare_texts() -> list[TokenIds]:
            check_texts(
                inputs, settings.max_text_chars, param="input", max_word_chars=settings.max_word_chars
            )
            usage.prompt_tokens = usage.total_tokens = sum(len(t.split()) for t in inputs)
            return tokenize_texts(inputs, backend, param="input")

        async def produce_texts(rows: list[TokenIds]) -> EmbeddingResponse:
            return answer(await batchers.texts.submit(rows))

        charge = Charge("embeddings", SCOPE_EMBED, len(inputs), body, prepare_texts, produce_texts)
    return await billed(request, caller, charge)
