"""uvicorn, with what it lacks against clients that never finish: a cap on open connections, a
deadline for a request's headers, and a shutdown that drains in-flight requests.

- Over `max_connections`, the oldest connection with no request in progress (a stalled or idle
  one) is closed to make room, so holding connections open cannot lock anyone out; only when
  every connection has a request in progress is the new one refused, with a 503 `overloaded`
  in the error envelope (uvicorn's own `limit_concurrency` answers in plain text, and refuses
  newcomers while idle connections hold every slot).
- A connection whose next request's headers are not complete within `header_timeout_s` (of its
  opening, or of its previous response) is closed: h11 keeps no such deadline, and the
  keep-alive timer stops as soon as the first byte of the next request arrives.
- SIGTERM sets the service draining (server/guard.py answers new requests 503 `shutting_down`),
  waits up to `drain_timeout_s` for in-flight requests, then lets uvicorn shut down.
The body deadlines are the guard's (they need the ASGI `receive`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.malloc import limit_arenas
from server.settings import ServerSettings
from server.state import ServiceState
from shared.errors import ErrorBody, ErrorCode, ErrorEnvelope

logger = logging.getLogger(__name__)


def _overloaded_response() -> bytes:
    message = "too many open connections; retry shortly"
    body = ErrorEnvelope(
        error=ErrorBody(message=message, type="service_unavailable_error", code=ErrorCode.overloaded)
    )
    raw = json.dumps(body.model_dump()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(raw)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
    )
    return head.encode() + raw


def guarded_protocol(settings: ServerSettings) -> type[H11Protocol]:
    """The h11 protocol class with the connection cap and the header deadline of `settings`."""
    max_connections = settings.max_connections
    header_timeout_s = settings.header_timeout_s
    refusal = _overloaded_response()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        _opened_at: float = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened_at = self.loop.time()
            if len(self.connections) > max_connections and not self._evict_an_idle_connection():
                logger.warning("refusing a connection: %d open, all busy", len(self.connections))
                transport.write(refusal)
                transport.close()
                return
            self._arm_header_timer()

        def _idle(self) -> bool:
            """No request in progress: waiting for (the rest of) the next request's headers."""
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _evict_an_idle_connection(self) -> bool:
            idle = [
                c
                for c in self.connections
                if c is not self
                and isinstance(c, GuardedH11Protocol)
                and c._idle()
                and not c.transport.is_closing()
            ]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened_at)
            oldest.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request's headers are in
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class DrainingServer(uvicorn.Server):
    """On SIGTERM: refuse new requests (503 shutting_down) and let in-flight ones finish first."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.service = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.service.draining = True
        deadline = time.monotonic() + self.service.settings.drain_timeout_s
        if self.service.in_flight:
            logger.info("draining %d in-flight request(s)", self.service.in_flight)
        while self.service.in_flight > 0 and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def run(app: Any, state: ServiceState, settings: ServerSettings) -> None:
    limit_arenas()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # After the drain, whatever still runs is cancelled; the guard answers it in the envelope.
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, state).run()
