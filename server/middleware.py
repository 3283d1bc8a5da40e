"""Pure-ASGI middleware: body-size limit, per-route metrics, injected latency and failures.

Pure ASGI (not BaseHTTPMiddleware) so that a huge body is refused before it is read whole
and so that a "dropped connection" can really be dropped.
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
    send: Send, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> None:
    body = ErrorEnvelope(error=ErrorBody(message=message, type=error_type_for(status), code=code.value))
    raw = json.dumps(body.model_dump()).encode()
    all_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    all_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": raw})


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or as soon as the stream passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await send_error(
                send, 413, ErrorCode.request_too_large, f"request body exceeds {self.max_bytes} bytes"
            )
            return
        if declared is None:
            await self._buffered(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await send_error(
                    send, 413, ErrorCode.request_too_large, f"request body exceeds {self.max_bytes} bytes"
                )

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No Content-Length (chunked): read the body up to the limit before the app sees it.

        An error raised from inside the app's body read would be turned into a 400 by FastAPI's
        body parsing, so the limit is enforced here, where a 413 can still be answered.
        """
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await send_error(
                    send, 413, ErrorCode.request_too_large, f"request body exceeds {self.max_bytes} bytes"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)


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
