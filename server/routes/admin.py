"""Key administration over HTTP under /admin, guarded by a separate admin token.

The same operations as `cbbt-server keys ...`; mounted only when an admin token is configured.
Handlers are plain `def` so FastAPI runs the blocking store calls in its thread pool.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import ApiError
from server.guard import ADMIN_SCOPE_KEY, GuardedRoute
from server.openapi import AUTHENTICATED, NOT_FOUND, WITH_BODY, error_responses
from server.store import (
    DEFAULT_SCOPES,
    KEY_NAME_PATTERN,
    MAX_COUNT,
    ApiKey,
    DuplicateKeyName,
    KeyNotFound,
    Store,
    StoreError,
    StoreUnavailable,
)
from server.tiers import Tier, scopes_for_tier, tier_of
from shared.errors import ErrorCode

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=KEY_NAME_PATTERN)
    # Required but nullable: an unlimited budget has to be asked for explicitly with null.
    budget_items: int | None = Field(ge=0, le=MAX_COUNT)
    budget_requests: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    rpm: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    ipm: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    # At most one of the two; neither gives the default scopes (the full tier).
    tier: Tier | None = None
    scopes: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_way_to_grant(self) -> CreateKeyBody:
        if self.tier is not None and self.scopes is not None:
            raise ValueError("give `tier` or `scopes`, not both")
        return self

    def granted(self) -> frozenset[str]:
        if self.tier is not None:
            return scopes_for_tier(self.tier)
        return frozenset(self.scopes) if self.scopes is not None else DEFAULT_SCOPES


class TopUpBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: int = Field(default=0, ge=0, le=MAX_COUNT)
    requests: int = Field(default=0, ge=0, le=MAX_COUNT)


class KeyRecord(BaseModel):
    """A key's public record: never the hash, never the plaintext."""

    object: Literal["api_key"] = "api_key"
    id: int
    name: str
    prefix: str
    scopes: list[str]
    tier: Tier | None = None  # None: a custom scope set
    budget_items: int | None
    spent_items: int
    remaining_items: int | None
    budget_requests: int | None
    spent_requests: int
    remaining_requests: int | None
    rpm: int | None
    ipm: int | None
    revoked: bool
    created_at: float

    @classmethod
    def of(cls, key: ApiKey) -> KeyRecord:
        return cls.model_validate({**key.public_dict(), "tier": tier_of(key.scopes)})


class CreatedKey(BaseModel):
    """`key` is the plaintext, returned this once and never again."""

    key: str
    record: KeyRecord


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyRecord]


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _admin_guard(admin_token: str) -> Callable[..., None]:
    expected = admin_token.encode("utf-8")

    def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        if request.scope.get(ADMIN_SCOPE_KEY):  # the guard compared it, before reading the body
            return
        token = _bearer_token(authorization)
        # Bytes, because compare_digest rejects non-ASCII str; constant time either way.
        if token is None or not hmac.compare_digest(token.encode("utf-8"), expected):
            raise ApiError(
                401,
                ErrorCode.invalid_api_key,
                "admin routes need 'Authorization: Bearer <admin token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_admin


def _call(action: Callable[[], T]) -> T:
    """Run a store operation, turning store errors into API errors."""
    try:
        return action()
    except KeyNotFound as exc:
        raise ApiError(404, ErrorCode.not_found, str(exc)) from exc
    except DuplicateKeyName as exc:
        raise ApiError(409, ErrorCode.invalid_request, str(exc), param="name") from exc
    except StoreUnavailable as exc:
        raise ApiError(503, ErrorCode.store_unavailable, str(exc), headers={"retry-after": "1"}) from exc
    except StoreError as exc:
        logger.exception("store error in an admin route")
        raise ApiError(500, ErrorCode.internal_error, "store error") from exc
    except ValueError as exc:
        raise ApiError(400, ErrorCode.invalid_request, str(exc)) from exc


def build_admin_router(get_store: Callable[[], Store], admin_token: str) -> APIRouter:
    if not admin_token:
        raise ValueError("an admin token is required; leave the admin routes unmounted without one")
    router = APIRouter(
        prefix="/admin",
        tags=["admin"],
        dependencies=[Depends(_admin_guard(admin_token))],
        route_class=GuardedRoute,
        responses=error_responses(WITH_BODY, AUTHENTICATED, NOT_FOUND, (409,)),
    )

    @router.post("/keys", status_code=201)
    def create_key(body: CreateKeyBody) -> CreatedKey:
        plaintext, key = _call(
            lambda: get_store().create_key(
                body.name,
                body.granted(),
                body.budget_items,
                budget_requests=body.budget_requests,
                rpm=body.rpm,
                ipm=body.ipm,
            )
        )
        return CreatedKey(key=plaintext, record=KeyRecord.of(key))

    @router.get("/keys")
    def list_keys() -> KeyList:
        return KeyList(data=[KeyRecord.of(key) for key in _call(lambda: get_store().list_keys())])

    @router.get("/keys/{name}")
    def show_key(name: str) -> KeyRecord:
        return KeyRecord.of(_call(lambda: get_store().get_key(name)))

    @router.post("/keys/{name}/revoke")
    def revoke_key(name: str) -> KeyRecord:
        return KeyRecord.of(_call(lambda: get_store().revoke(name)))

    @router.post("/keys/{name}/top-up")
    def top_up_key(name: str, body: TopUpBody) -> KeyRecord:
        return KeyRecord.of(_call(lambda: get_store().top_up(name, items=body.items, requests=body.requests)))

    return router
