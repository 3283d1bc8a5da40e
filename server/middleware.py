"""Pure-ASGI middleware: per-route metrics, injected latency and failures (the body limits,
authentication and parsing bounds are the guard's, server/guard.py).

Pure ASGI (not BaseHTTPMiddleware) so that a "dropped connection" can really be dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics
from server.settings import ServerSettings
from shared.errors import ErrorBody, ErrorCode, ErrorEnvelope, error_type_for


async def send_error(
    send: Send,
    status: int,
    code: ErrorCode,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> None:
    body = ErrorEnvelope(
        error=ErrorBody(message=message, type=error_type_for(status), code=code.value, param=param)
    )
    raw = json.dumps(body.model_dump()).encode()
    all_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    all_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": raw})


class MetricsMiddleware:
    """Requests and latency per route template (unknown paths collapse to one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = (
            path
            if path in self.routes
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        )
        status = 500
        started = time.perf_counter()

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class FaultInjectionMiddleware:
    """Simulate a slow, flaky commercial API on /v1 routes.

    Faults are injected before the request reaches accounting, so they are never charged:
    - latency: mean +- uniform jitter, on every /v1 request;
    - failure_rate: a 503 (or 500) in the error envelope, code `injected_failure`;
    - drop_rate: the response starts and the connection is cut mid-body.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.rng = random.Random(settings.fault_seed)

    @property
    def active(self) -> bool:
        s = self.settings
        return s.latency_ms > 0 or s.latency_jitter_ms > 0 or s.failure_rate > 0 or s.drop_rate > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.active or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        s = self.settings
        delay = max(0.0, s.latency_ms + self.rng.uniform(-1.0, 1.0) * s.latency_jitter_ms) / 1000.0
        if delay:
            await asyncio.sleep(delay)
        roll = self.rng.random()
        if roll < s.failure_rate:
            self.metrics.injected_failures.labels("error").inc()
            status = 503 if self.rng.random() < 0.5 else 500
            await send_error(
                send, status, ErrorCode.injected_failure, "injected transient failure (simulation)"
            )
            return
        if roll < s.failure_rate + s.drop_rate:
            self.metrics.injected_failures.labels("drop").inc()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
            )
            await send({"type": "http.response.body", "body": b"{", "more_body": True})
            raise ConnectionAbortedError("injected dropped connection (simulation)")
        await self.app(scope, receive, send)
