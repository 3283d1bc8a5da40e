"""The app factory: `create_app(settings)` builds one independent service (tests build many)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from server.backends.base import Backend
from server.backends.registry import create_backend
from server.errors import install_error_handlers
from server.guard import RequestGuardMiddleware
from server.lease import LeaseKeeper
from server.malloc import release_free_memory
from server.metrics import Metrics
from server.middleware import FaultInjectionMiddleware, MetricsMiddleware
from server.openapi import install_openapi
from server.ratelimit import BucketStore, Limiter, RateLimiter, SharedRateLimiter
from server.routes import classify, embeddings, health, models, prompts, usage
from server.settings import ServerSettings
from server.state import ServiceState
from server.store.base import Store, StoreReadOnly
from server.store.factory import open_store

logger = logging.getLogger(__name__)


def load_backend(settings: ServerSettings) -> Backend:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    backend = create_backend(
        settings.model,
        settings.pretrained,
        device=settings.device,
        extra_config_dir=settings.model_config_dir,
    )
    backend.warm_up()
    logger.info("model %s ready (feature dim %d)", backend.card.id, backend.card.feature_dim)
    return backend


async def _start_model(state: ServiceState, backend: Backend | None) -> None:
    try:
        if backend is None:
            backend = await asyncio.to_thread(load_backend, state.settings)
            await asyncio.to_thread(release_free_memory)  # what loading and fitting it left behind
        batchers = state.build_batchers(backend)
        for batcher in batchers.all():
            batcher.start()
        state.backend, state.batchers = backend, batchers
    except Exception as exc:  # keep serving /health and report why /ready is 503
        logger.exception("model failed to load")
        state.load_error = f"model failed to load: {exc}"


def create_app(
    settings: ServerSettings | None = None, *, backend: Backend | None = None, store: Store | None = None
) -> FastAPI:
    """Build the service. `backend`/`store` are injectable (tests); by default they come from settings."""
    settings = settings or ServerSettings()
    metrics = Metrics(labels={"replica": settings.replica} if settings.replica else {})
    state = ServiceState(settings=settings, metrics=metrics, limiter=RateLimiter(), store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keeper = None
        if state.store is None and settings.auth:
            opened = await asyncio.to_thread(open_store, settings.db)
            try:
                keeper = await asyncio.to_thread(_claim_ownership, opened, settings)
            except BaseException:
                opened.close()
                raise
            state.store = opened
            state.limiter = _limiter_for(opened)
        loader = asyncio.create_task(_start_model(state, backend))
        try:
            yield
        finally:
            loader.cancel()
            if state.batchers is not None:
                for batcher in state.batchers.all():
                    await batcher.stop()
            state.model_executor.shutdown(wait=False, cancel_futures=True)
            if state.store is not None and store is None:
                await asyncio.to_thread(_leave, state.store, keeper)

    # FastAPIOffline serves /docs and /redoc from files in its wheel, not a CDN.
    app = FastAPIOffline(
        title="cbbt model server",
        summary="A vision-language model behind a query-limited API, for black-box tuning",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.cbbt = state
    install_error_handlers(app)
    install_openapi(app)
    for module in (health, models, embeddings, prompts, classify, usage):
        app.include_router(module.router)
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        from server.routes.admin import build_admin_router

        token = settings.admin_token.get_secret_value()
        app.include_router(build_admin_router(lambda: _require_store(state), token))
    routes = _route_paths(app)
    app.add_middleware(FaultInjectionMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    # Outermost: refusals that cost nothing happen before any other layer does work.
    app.add_middleware(RequestGuardMiddleware, state=state)
    return app


def _claim_ownership(store: Store, settings: ServerSettings) -> LeaseKeeper | None:
    """Register as an owner of the database (recovering dead owners' requests) and keep the lease.

    Raises DatabaseInUse when the store serves one process at a time and another one is live.
    A read-only database can charge nothing, so it is served without a lease.
    """
    try:
        store.claim_owner(settings.lease_ttl_s)
    except StoreReadOnly:
        logger.warning("the database is read-only: serving without an owner lease (nothing can be charged)")
        return None
    keeper = LeaseKeeper(store, settings.lease_ttl_s, settings.lease_interval_s)
    keeper.start()
    return keeper


def _limiter_for(store: Store) -> Limiter:
    """Replicas sharing a store share its rate-limit buckets; a single server keeps them in memory."""
    if isinstance(store, BucketStore):
        return SharedRateLimiter(store)
    return RateLimiter()


def _leave(store: Store, keeper: LeaseKeeper | None) -> None:
    if keeper is not None:
        keeper.stop()
        try:
            store.release_owner()
        except Exception:  # the lease then expires by itself and another server recovers
            logger.exception("could not release the owner lease")
    store.close()


def _route_paths(app: FastAPI) -> list[str]:
    """Every route's path template, those of included routers too (FastAPI keeps them nested)."""
    paths: list[str] = []
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            paths += [str(getattr(context, "path", "")) for context in contexts()]
        else:
            paths.append(str(getattr(route, "path", "")))
    return paths


def _require_store(state: ServiceState) -> Store:
    if state.store is None:
        raise RuntimeError("the store is not open")
    return state.store
