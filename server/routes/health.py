"""Liveness, readiness and Prometheus metrics (no auth: they reveal nothing about keys)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import error_response
from server.guard import GuardedRoute
from server.openapi import error_responses
from server.state import get_state
from shared.errors import ErrorCode

router = APIRouter(tags=["health"], route_class=GuardedRoute)


@router.get("/health", responses=error_responses())
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=None, responses=error_responses())
async def ready(request: Request) -> Response | dict[str, str]:
    state = get_state(request)
    if not state.ready:
        message = state.load_error or "model loading"
        return error_response(503, ErrorCode.model_not_ready, message, headers={"Retry-After": "2"})
    assert state.backend is not None
    answer = {"status": "ready", "model": state.backend.card.id}
    if state.settings.replica:  # which replica answered, behind a load balancer or Ray's proxy
        answer["replica"] = state.settings.replica
    return answer


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        },
        **error_responses(),
    },
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
