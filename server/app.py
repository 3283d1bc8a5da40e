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
from server.metrics import Metrics
from server.middleware import BodyLimitMiddleware, FaultInjectionMiddleware, MetricsMiddleware
from server.openapi import install_openapi
from server.ratelimit import RateLimiter
from server.routes import classify, embeddings, health, models, prompts, usage
from server.settings import ServerSettings
from server.state import ServiceState
from server.store.base import Store
from server.store.lock import ServerLock
from server.store.sqlite import SqliteStore

logger = logging.getLogger(__name__)


def _load_backend(settings: ServerSettings) -> Backend:
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
            backend = await asyncio.to_thread(_load_backend, state.settings)
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
    metrics = Metrics()
    state = ServiceState(settings=settings, metrics=metrics, limiter=RateLimiter(), store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lock = None
        if state.store is None and settings.auth:
            lock = ServerLock(settings.db)
            lock.acquire()  # refuses to start if another server serves this database
            sqlite = SqliteStore(settings.db)
            sqlite.recover_unsettled()
            state.store = sqlite
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
                state.store.close()
            if lock is not None:
                lock.release()

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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app


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
