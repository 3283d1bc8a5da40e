"""Authentication and the charge-around-the-work gate every /v1 model route goes through.

Order of a charged request (the guard authenticated it from the headers; the route checked
what costs nothing: counts, shapes of the JSON):
scope -> rate limit -> idempotent replay (free of budget, but it counts as a request) ->
budget pre-check (a request whose items exceed what the key has left is refused before any
per-item CPU work) -> `prepare`, the CPU-costly validation (tokenising, decoding), on a worker
thread -> reserve the items (one atomic conditional update) -> run the model -> settle.
Anything that fails on the server side after the reservation refunds it, so every item
charged belongs to a request that was answered.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.batching import Overloaded, ShuttingDown
from server.errors import ApiError
from server.guard import KEY_SCOPE_KEY
from server.ratelimit import RateDecision, rate_limit_headers, retry_after_headers
from server.state import ServiceState, get_state
from server.store.base import ApiKey, KeyNotFound, QuotaExceeded, Reservation, Store, StoreUnavailable
from server.tiers import granted_scopes, tier_of, tiers_allowing
from shared.errors import ErrorCode

logger = logging.getLogger(__name__)
T = TypeVar("T")
P = TypeVar("P")

IDEMPOTENCY_HEADER = "idempotency-key"
REPLAY_HEADER = "x-idempotent-replayed"
_MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class Caller:
    """Who is calling: an API key, or nobody when the server runs with auth off."""

    key: ApiKey | None


def _store(state: ServiceState) -> Store:
    if state.store is None:
        raise ApiError(503, ErrorCode.store_unavailable, "the accounting store is not open")
    return state.store


async def _store_call(state: ServiceState, fn: Callable[..., T], *args: object) -> T:
    try:
        return await run_in_threadpool(fn, *args)
    except StoreUnavailable as exc:
        logger.error("store unavailable: %s", exc)
        raise ApiError(
            503,
            ErrorCode.store_unavailable,
            "the accounting database is unavailable; nothing was charged, retry later",
            headers={"Retry-After": "2"},
        ) from exc


# Declares the HTTP bearer scheme in the OpenAPI document (the "Authorize" button of /docs);
# auto_error=False so that a missing key is answered in the error envelope below.
_bearer = HTTPBearer(auto_error=False, description="an API key made by `cbbt-server keys create`")


async def require_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """FastAPI dependency: a valid `Authorization: Bearer <key>` (unless auth is off)."""
    state = get_state(request)
    if not state.settings.auth:
        return Caller(key=None)
    if KEY_SCOPE_KEY in request.scope:  # authenticated by the guard, before the body was read
        return Caller(key=request.scope[KEY_SCOPE_KEY])
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise ApiError(401, ErrorCode.invalid_api_key, "missing API key: send 'Authorization: Bearer <key>'")
    key = await _store_call(state, _store(state).authenticate, token)
    if key is None:
        raise ApiError(401, ErrorCode.invalid_api_key, "invalid or revoked API key")
    return Caller(key=key)


def body_fingerprint(endpoint: str, body: BaseModel) -> str:
    try:
        dumped = body.model_dump_json()
    except ValueError as exc:  # the guard refuses strings that are not valid Unicode; never a 500
        raise ApiError(
            400, ErrorCode.invalid_request, "the body holds text that is not valid Unicode"
        ) from exc
    return hashlib.sha256(f"{endpoint}\n{dumped}".encode()).hexdigest()


def _json_response(payload: BaseModel, headers: dict[str, str]) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


@dataclass
class Charge(Generic[P]):
    """One billed call: who, where, how many items, and the work that answers it.

    `prepare` is the request's CPU-costly validation and preprocessing (tokenising, decoding
    images); it runs on a worker thread once the key is known to afford the items, raises
    ApiError (4xx) for bad input, and its result is what `produce` turns into the answer.
    """

    endpoint: str
    scope: str
    items: int
    body: BaseModel
    prepare: Callable[[], P]
    produce: Callable[[P], Awaitable[BaseModel]]


async def billed(request: Request, caller: Caller, charge: Charge[Any]) -> Response:
    state = get_state(request)
    # Always the server's own: a request id is the ledger's primary key, shared by every key, so
    # a client-chosen one could collide with another request's (a 500, and an existence oracle).
    request_id = uuid.uuid4().hex
    base_headers = {"x-request-id": request_id}
    key = caller.key
    if key is None:  # auth off: no accounting at all
        prepared = await run_in_threadpool(charge.prepare)
        return _json_response(await _produce(state, charge, prepared), base_headers)
    check_tier(caller, charge.endpoint, charge.scope)
    # Before the replay: a stored answer is free of budget but still a request (as payment APIs
    # count them), or one answer could be replayed without limit.
    decision = await _rate_check(state, key, charge.items)
    if not decision.allowed:
        raise _rate_limited(decision, key)
    idem_key = request.headers.get(IDEMPOTENCY_HEADER)
    try:
        if idem_key is not None:
            fingerprint = await run_in_threadpool(body_fingerprint, charge.endpoint, charge.body)
            replay = await _begin_idempotent(state, key, idem_key, fingerprint)
            if replay is not None:
                await _rate_refund(state, key, charge.items, request=False)
                return replay
    except BaseException:
        await _rate_refund(state, key, charge.items)
        raise
    try:
        return await _charged(state, key, charge, decision, request_id, base_headers, idem_key)
    except BaseException:
        if idem_key is not None:
            await _quietly(state, _store(state).abandon_idempotent, key.id, idem_key)
        raise


async def _begin_idempotent(
    state: ServiceState, key: ApiKey, idem_key: str, fingerprint: str
) -> Response | None:
    if not idem_key or len(idem_key) > _MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            400,
            ErrorCode.invalid_request,
            "Idempotency-Key must be 1-255 characters",
            param="Idempotency-Key",
        )
    record = await _store_call(
        state, _store(state).begin_idempotent, key.id, idem_key, fingerprint, state.settings.idempotency_ttl_s
    )
    if record is None:
        return None
    if record.body_hash != fingerprint:
        raise ApiError(
            409,
            ErrorCode.idempotency_conflict,
            "this Idempotency-Key was used with a different request body",
            param="Idempotency-Key",
            headers={"x-should-retry": "false"},
        )
    if record.status is None:
        raise ApiError(
            409,
            ErrorCode.idempotency_conflict,
            "a request with this Idempotency-Key is still in progress; retry shortly",
            param="Idempotency-Key",
            headers={"Retry-After": "1"},
        )
    headers = dict(record.headers)
    headers[REPLAY_HEADER] = "true"
    return Response(record.body, status_code=record.status, headers=headers)


def _quota_exceeded(items: int, remaining: int | None) -> ApiError:
    return ApiError(
        429,
        ErrorCode.insufficient_quota,
        f"budget exhausted: this request needs {items} items, {remaining} remain",
        headers={"x-should-retry": "false", "x-budget-remaining-items": str(remaining or 0)},
    )


def _precheck_budget(key: ApiKey, items: int) -> None:
    """Refuse, before any per-item work, what the key cannot pay for (the reservation decides)."""
    if key.remaining_items is not None and key.remaining_items < items:
        raise _quota_exceeded(items, key.remaining_items)
    if key.remaining_requests is not None and key.remaining_requests < 1:
        raise ApiError(
            429,
            ErrorCode.insufficient_quota,
            "budget exhausted: this key has no requests left",
            headers={"x-should-retry": "false"},
        )


async def _charged(
    state: ServiceState,
    key: ApiKey,
    charge: Charge[Any],
    decision: RateDecision,
    request_id: str,
    headers: dict[str, str],
    idem_key: str | None,
) -> Response:
    store = _store(state)
    try:
        _precheck_budget(key, charge.items)
        prepared = await run_in_threadpool(charge.prepare)
    except BaseException:
        await _rate_refund(state, key, charge.items)
        raise
    try:
        reservation = await _store_call(
            state, store.reserve, key.id, charge.items, request_id, charge.endpoint
        )
    except QuotaExceeded as exc:
        await _rate_refund(state, key, charge.items)
        raise _quota_exceeded(charge.items, exc.remaining_items) from exc
    except KeyNotFound as exc:  # revoked between authentication and the charge
        await _rate_refund(state, key, charge.items)
        raise ApiError(401, ErrorCode.invalid_api_key, "invalid or revoked API key") from exc
    except BaseException:
        await _rate_refund(state, key, charge.items)
        raise
    try:
        payload = await _produce(state, charge, prepared)
    except BaseException as exc:
        status = exc.status if isinstance(exc, ApiError) else 500
        await _quietly(state, store.refund, request_id, status)
        await _rate_refund(state, key, charge.items)
        raise
    state.metrics.items_charged.inc(charge.items)
    # From the charge itself, not from `key` (read at authentication, stale under concurrency).
    assert isinstance(reservation, Reservation)
    remaining = reservation.remaining_items
    response = _json_response(payload, {**headers, **rate_limit_headers(decision, remaining)})
    answer = None
    if idem_key is not None:  # stored with the settlement, in one transaction (see Store.settle)
        kept = {k: v for k, v in response.headers.items() if k.startswith(("x-", "content-type"))}
        answer = (idem_key, bytes(response.body), kept)
    await _quietly(state, store.settle, request_id, 200, answer)
    return response


async def _produce(state: ServiceState, charge: Charge[P], prepared: P) -> BaseModel:
    try:
        return await charge.produce(prepared)
    except ShuttingDown as exc:
        raise ApiError(
            503,
            ErrorCode.shutting_down,
            "the server is shutting down; nothing was charged, retry shortly",
            headers={"Retry-After": "1"},
        ) from exc
    except Overloaded as exc:
        state.metrics.overloaded.inc()
        raise ApiError(
            503,
            ErrorCode.overloaded,
            f"server overloaded: {exc}; retry shortly",
            headers={"Retry-After": "1"},
        ) from exc


def check_tier(caller: Caller, endpoint: str, scope: str) -> None:
    """403 unless the key's tier (or scopes) include the route. Routes call it first, so a call
    outside the key's tier costs no decoding; `billed` checks again."""
    key = caller.key
    if key is None or scope in granted_scopes(key.scopes):
        return
    allowed = " or ".join(t.value for t in tiers_allowing(scope)) or "no"
    tier = tier_of(key.scopes)
    if tier is None:  # a custom scope set, not one of the simulated API tiers
        raise ApiError(403, ErrorCode.permission_denied, f"this key lacks the {scope!r} scope")
    raise ApiError(
        403,
        ErrorCode.tier_not_allowed,
        f"this key is on the {tier.value} tier; /v1/{endpoint} needs the {allowed} tier",
        headers={"x-should-retry": "false"},
    )


async def _rate_check(state: ServiceState, key: ApiKey, items: int) -> RateDecision:
    """In memory the check is instant; a shared limiter (buckets in the database) runs off the loop."""
    if state.limiter.blocking:
        return await _store_call(state, state.limiter.check_and_consume, key.id, key.rpm, key.ipm, items)
    return state.limiter.check_and_consume(key.id, key.rpm, key.ipm, items)


async def _rate_refund(state: ServiceState, key: ApiKey, items: int, *, request: bool = True) -> None:
    if state.limiter.blocking:
        await _quietly(state, functools.partial(state.limiter.refund, key.id, items, request=request))
    else:
        state.limiter.refund(key.id, items, request=request)


def _rate_limited(decision: RateDecision, key: ApiKey) -> ApiError:
    headers = {**rate_limit_headers(decision, key.remaining_items), **retry_after_headers(decision)}
    return ApiError(
        429, ErrorCode.rate_limit_exceeded, decision.reason or "rate limit exceeded", headers=headers
    )


async def _quietly(state: ServiceState, fn: Callable[..., object], *args: object) -> None:
    """Best-effort bookkeeping after the fact: log, never turn an answer into an error."""
    try:
        await run_in_threadpool(fn, *args)
    except Exception:
        logger.exception("store bookkeeping failed (%s)", getattr(fn, "__name__", fn))
