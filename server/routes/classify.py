"""POST /v1/classify: the prediction-only tier (images + class prompts -> logits, probabilities)."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request, Response

from server.backends.base import PromptItem, TokenIds
from server.billing import Caller, Charge, billed, check_tier, require_caller
from server.errors import ApiError
from server.guard import GuardedRoute
from server.openapi import BILLED, WITH_ARRAYS, WITH_BODY, WITH_IMAGES, error_responses
from server.routes.embeddings import decode_and_preprocess, image_limits
from server.state import ready_state
from server.tiers import SCOPE_CLASSIFY
from server.validation import (
    check_finite_features,
    check_item_count,
    check_model,
    check_prompts_fit,
    check_texts,
    decode_context,
    prompt_items,
    tokenize_texts,
)
from shared.errors import ErrorCode
from shared.schemas import ClassifyRequest, ClassifyResponse, Usage

router = APIRouter(tags=["classify"], route_class=GuardedRoute)


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=error_responses(WITH_BODY, BILLED, WITH_IMAGES, WITH_ARRAYS),
)
async def classify(
    body: ClassifyRequest, request: Request, caller: Annotated[Caller, Depends(require_caller)]
) -> Response:
    check_tier(caller, "classify", SCOPE_CLASSIFY)
    state, backend, batchers = ready_state(request)
    check_model(body.model, backend)
    settings = state.settings
    if (body.texts is None) == (body.context is None):
        raise ApiError(
            400, ErrorCode.invalid_request, "give exactly one of `texts` or `context` (+ `class_names`)"
        )
    if body.context is not None and not body.class_names:
        raise ApiError(400, ErrorCode.invalid_request, "`context` needs `class_names`", param="class_names")
    n_classes = len(body.texts) if body.texts is not None else len(body.class_names or [])
    if n_classes < 1:
        raise ApiError(400, ErrorCode.invalid_request, "at least one class is needed", param="texts")
    n_items = len(body.images) + n_classes
    check_item_count(n_items, settings, param="images")
    usage = Usage(items=n_items, images=len(body.images), texts=n_classes)

    def prepare() -> tuple[list[torch.Tensor], list[TokenIds], list[PromptItem]]:
        rows: list[TokenIds] = []
        prompts: list[PromptItem] = []
        if body.texts is not None:
            check_texts(
                body.texts, settings.max_text_chars, param="texts", max_word_chars=settings.max_word_chars
            )
            rows = tokenize_texts(body.texts, backend, param="texts")
        else:
            names = body.class_names or []
            check_texts(
                names,
                settings.max_class_name_chars,
                param="class_names",
                max_word_chars=settings.max_word_chars,
            )
            assert body.context is not None
            ctx = decode_context(body.context, backend, param="context")
            check_prompts_fit([ctx], names, backend)
            prompts = prompt_items([ctx], names, backend)
        pixels = decode_and_preprocess(body.images, backend, image_limits(settings), "images")
        return pixels, rows, prompts

    async def produce(
        prepared: tuple[list[torch.Tensor], list[TokenIds], list[PromptItem]],
    ) -> ClassifyResponse:
        pixels, rows, prompts = prepared
        image_features = await batchers.images.submit(pixels)
        if rows:
            text_features = await batchers.texts.submit(rows)
        else:
            text_features = await batchers.prompts.submit(prompts)
            check_finite_features(text_features, param="context")
        logits = backend.card.logit_scale * image_features @ text_features.T
        probabilities = torch.softmax(logits, dim=-1)
        return ClassifyResponse(
            model=backend.card.id,
            logits=logits.tolist(),
            probabilities=probabilities.tolist(),
            predictions=logits.argmax(dim=-1).tolist(),
            usage=usage,
        )

    return await billed(request, caller, Charge("classify", SCOPE_CLASSIFY, n_items, body, prepare, produce))
