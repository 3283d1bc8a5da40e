"""GET /v1/models: the model card. Nothing secret: no weights, no gradients, no internals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.billing import Caller, require_caller
from server.guard import GuardedRoute
from server.openapi import AUTHENTICATED, NOT_FOUND, error_responses
from server.state import ready_state
from server.validation import check_model
from shared.schemas import ModelCard, ModelList, RequestLimits

router = APIRouter(tags=["models"], route_class=GuardedRoute)


def _advertised_card(request: Request) -> ModelCard:
    """The backend's card plus this server's request limits (settings, not model facts)."""
    state, backend, _ = ready_state(request)
    s = state.settings
    limits = RequestLimits(
        max_items_per_request=s.max_items_per_request,
        max_body_bytes=s.max_body_bytes,
        max_image_bytes=s.max_image_bytes,
        max_image_pixels=s.max_image_pixels,
        max_text_chars=s.max_text_chars,
        max_class_name_chars=s.max_class_name_chars,
        max_word_chars=s.max_word_chars,
        max_json_elements=s.max_json_elements,
    )
    return backend.card.model_copy(update={"limits": limits})


@router.get("/v1/models", response_model=ModelList, responses=error_responses(AUTHENTICATED))
async def list_models(request: Request, _: Annotated[Caller, Depends(require_caller)]) -> ModelList:
    return ModelList(data=[_advertised_card(request)])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=error_responses(AUTHENTICATED, NOT_FOUND),
)
async def get_model(
    model_id: str, request: Request, _: Annotated[Caller, Depends(require_caller)]
) -> ModelCard:
    check_model(model_id, ready_state(request)[1])
    return _advertised_card(request)
