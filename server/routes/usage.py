"""GET /v1/usage: the caller's own budget, spending and recent ledger (never other keys')."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.billing import Caller, _store, _store_call, require_caller
from server.errors import ApiError
from server.guard import GuardedRoute
from server.openapi import AUTHENTICATED, NOT_FOUND, WITH_QUERY, error_responses
from server.state import get_state
from server.store.base import LedgerRow
from server.tiers import tier_of
from shared.errors import ErrorCode
from shared.schemas import LedgerEntry, UsageReport

router = APIRouter(tags=["usage"], route_class=GuardedRoute)


@router.get(
    "/v1/usage", response_model=UsageReport, responses=error_responses(WITH_QUERY, AUTHENTICATED, NOT_FOUND)
)
async def usage(
    request: Request, caller: Annotated[Caller, Depends(require_caller)], recent: int = 20
) -> UsageReport:
    if caller.key is None:
        raise ApiError(404, ErrorCode.not_found, "usage accounting is off on this server (auth disabled)")
    state = get_state(request)
    key, rows = await _store_call(state, _store(state).usage, caller.key.id, max(0, min(recent, 1000)))
    tier = tier_of(key.scopes)
    return UsageReport(
        key_name=key.name,
        budget_items=key.budget_items,
        spent_items=key.spent_items,
        remaining_items=key.remaining_items,
        budget_requests=key.budget_requests,
        spent_requests=key.spent_requests,
        remaining_requests=key.remaining_requests,
        recent=[_entry(row) for row in rows],
        tier=None if tier is None else tier.value,
    )


def _entry(row: LedgerRow) -> LedgerEntry:
    return LedgerEntry(
        request_id=row.request_id,
        endpoint=row.endpoint,
        items=row.items,
        status=row.status,
        refunded=row.refunded,
        created_at=row.created_at,
    )
