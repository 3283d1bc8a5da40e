"""The soft-prompt interface CBBT needs.

POST /v1/prompt-embeddings: P soft prompts x C class names -> P*C text features, in one call.
POST /v1/token-embeddings: the input vectors of a short text (to initialise soft prompts).
"""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request, Response

from server.backends.base import PromptItem
from server.billing import Caller, Charge, billed, check_tier, require_caller
from server.errors import ApiError
from server.guard import GuardedRoute
from server.openapi import BILLED, WITH_ARRAYS, WITH_BODY, error_responses
from server.state import ready_state
from server.tiers import SCOPE_PROMPT, SCOPE_TOKENS
from server.validation import (
    check_finite_features,
    check_item_count,
    check_model,
    check_prompts_fit,
    check_texts,
    decode_context,
    prompt_items,
)
from shared.arrays import encode_array
from shared.errors import ErrorCode
from shared.schemas import (
    PromptEmbeddingRequest,
    PromptEmbeddingResponse,
    TokenEmbeddingRequest,
    TokenEmbeddingResponse,
    Usage,
)

router = APIRouter(tags=["prompts"], route_class=GuardedRoute)


@router.post(
    "/v1/prompt-embeddings",
    response_model=PromptEmbeddingResponse,
    responses=error_responses(WITH_BODY, BILLED, WITH_ARRAYS),
)
async def prompt_embeddings(
    body: PromptEmbeddingRequest, request: Request, caller: Annotated[Caller, Depends(require_caller)]
) -> Response:
    check_tier(caller, "prompt-embeddings", SCOPE_PROMPT)
    state, backend, batchers = ready_state(request)
    settings = state.settings
    check_model(body.model, backend)
    n_items = len(body.prompts) * len(body.class_names)
    check_item_count(n_items, settings, param="prompts")
    usage = Usage(items=n_items, texts=n_items)

    def prepare() -> list[PromptItem]:
        check_texts(
            body.class_names,
            settings.max_class_name_chars,
            param="class_names",
            max_word_chars=settings.max_word_chars,
        )
        contexts = [decode_context(p, backend, param=f"prompts[{i}]") for i, p in enumerate(body.prompts)]
        check_prompts_fit(contexts, body.class_names, backend)
        return prompt_items(contexts, body.class_names, backend)

    async def produce(items: list[PromptItem]) -> PromptEmbeddingResponse:
        features = await batchers.prompts.submit(items)
        check_finite_features(features, param="prompts")
        shape = [len(body.prompts), len(body.class_names), int(features.shape[-1])]
        cube = features.reshape(shape)
        embeddings = encode_array(cube.numpy()) if body.encoding_format == "base64" else cube.tolist()
        return PromptEmbeddingResponse(model=backend.card.id, shape=shape, embeddings=embeddings, usage=usage)

    return await billed(
        request, caller, Charge("prompt-embeddings", SCOPE_PROMPT, n_items, body, prepare, produce)
    )


@router.post(
    "/v1/token-embeddings",
    response_model=TokenEmbeddingResponse,
    responses=error_responses(WITH_BODY, BILLED),
)
async def token_embeddings(
    body: TokenEmbeddingRequest, request: Request, caller: Annotated[Caller, Depends(require_caller)]
) -> Response:
    check_tier(caller, "token-embeddings", SCOPE_TOKENS)
    state, backend, _ = ready_state(request)
    settings = state.settings
    check_model(body.model, backend)
    usage = Usage(items=1, texts=1)

    def prepare() -> tuple[list[str], torch.Tensor]:
        check_texts(
            [body.text], settings.max_text_chars, param="text", max_word_chars=settings.max_word_chars
        )
        try:
            return backend.token_embeddings(body.text)
        except Exception as exc:
            raise ApiError(
                400, ErrorCode.invalid_request, f"text cannot be tokenised ({exc})", param="text"
            ) from exc

    async def produce(prepared: tuple[list[str], torch.Tensor]) -> TokenEmbeddingResponse:
        tokens, matrix = prepared
        embedding = encode_array(matrix.numpy()) if body.encoding_format == "base64" else matrix.tolist()
        return TokenEmbeddingResponse(
            model=backend.card.id, tokens=tokens, shape=list(matrix.shape), embedding=embedding, usage=usage
        )

    return await billed(request, caller, Charge("token-embeddings", SCOPE_TOKENS, 1, body, prepare, produce))
