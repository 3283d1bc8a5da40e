"""GET /v1/models: the model card. Nothing secret: no weights, no gradients, no internals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.billing import Caller, require_caller
from server.state import ready_state
from server.validation import check_model
from shared.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, _: Annotated[Caller, Depends(require_caller)]) -> ModelList:
    backend = ready_state(request)[1]
    return ModelList(data=[backend.card])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(
    model_id: str, request: Request, _: Annotated[Caller, Depends(require_caller)]
) -> ModelCard:
    backend = ready_state(request)[1]
    check_model(model_id, backend)
    return backend.card
