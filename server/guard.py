"""The front door, pure ASGI: what a request costs before any route (or FastAPI's parser) runs.

In this order, each step as cheap as the ones before it:
1. draining (SIGTERM): 503 `shutting_down`, so clients go elsewhere while in-flight ones finish;
2. a declared body over the limit: 413, before a byte of it is read;
3. /v1 and /admin authenticate from the headers: an unauthenticated request is answered 401
   without its body ever being read, buffered or parsed;
4. the body is read with an idle and a total deadline (408) and a size limit (413);
5. JSON is parsed off the event loop when large, with a bound on values (a small body of
   `[{},{},...]` is a huge object graph) and a check that every string is valid Unicode text
   (a lone surrogate cannot be tokenised, serialised or stored); the route reuses the parse.

A response sent before the body was read whole closes the connection, so a client cannot keep
one open by trickling the rest of a body nobody reads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.middleware import send_error
from server.state import ServiceState
from server.store.base import StoreUnavailable
from shared.errors import ErrorCode

JSON_SCOPE_KEY = "cbbt.json"
KEY_SCOPE_KEY = "cbbt.api_key"
ADMIN_SCOPE_KEY = "cbbt.admin"  # the admin token was checked here (the route need not compare again)
# Below this a parse takes well under a millisecond: not worth a thread hop.
_INLINE_PARSE_BYTES = 64 * 1024
# A JSON escape of a UTF-16 surrogate, or one encoded raw (json.loads decodes with surrogatepass).
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89abAB]|\xed[\xa0-\xbf]")
_CLOSE = {"Connection": "close"}
_PARSED_PLACEHOLDER = b"{}"


class Refused(Exception):
    """An answer the guard gives itself, in the error envelope."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, *, param: str | None = None, retry_after: int = 0
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = dict(_CLOSE)
        if retry_after:
            self.headers["Retry-After"] = str(retry_after)


class _ClientGone(Exception):
    pass


class GuardedRequest(Request):
    """A Request whose JSON the guard already parsed (off the event loop, bounded)."""

    async def json(self) -> Any:
        if JSON_SCOPE_KEY in self.scope:
            return self.scope[JSON_SCOPE_KEY]
        return await super().json()


class GuardedRoute(APIRoute):
    """The route class of every router: hands FastAPI a GuardedRequest."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Any:
            return await handler(GuardedRequest(request.scope, request.receive))

        return guarded


def parse_json_body(raw: bytes, max_elements: int) -> Any:
    """Bounded JSON parsing; runs on a worker thread for large bodies."""
    # Every value past the first in a container needs a comma; every container a bracket. Counted
    # in C over the raw bytes (commas inside strings count too: an upper bound, never an under-count).
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > max_elements:
        raise Refused(
            413, ErrorCode.request_too_large, f"the JSON body holds more than {max_elements} values; split it"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Refused(
            400, ErrorCode.invalid_request, f"body: JSON decode error ({exc.msg})", param=str(exc.pos)
        ) from exc
    except UnicodeDecodeError as exc:
        raise Refused(400, ErrorCode.invalid_request, f"the body is not valid UTF-8 ({exc.reason})") from exc
    except RecursionError as exc:
        raise Refused(400, ErrorCode.invalid_request, "the JSON body is nested too deeply") from exc
    if _MAYBE_SURROGATE.search(raw):
        where = unencodable_path(value)
        if where is not None:
            raise Refused(
                400,
                ErrorCode.invalid_request,
                f"{where} is not valid Unicode text (it holds a lone UTF-16 surrogate)",
                param=where,
            )
    return value


def unencodable_path(value: Any) -> str | None:
    """The path (`class_names[2]`, `input`) of the first string that is not valid Unicode text."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return path or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                child = f"{path}.{k}" if path else str(k)
                if not _encodable(str(k)):
                    return child
                stack.append((v, child))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value)
    return None


def _bearer(scope: Scope) -> str | None:
    scheme, _, token = (_header(scope, b"authorization") or b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length != b"0"
    return _header(scope, b"transfer-encoding") is not None or scope.get("method") in ("POST", "PUT", "PATCH")


def _wants_json(scope: Scope) -> bool:
    content_type = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
    return not content_type or content_type == b"application/json" or content_type.endswith(b"+json")


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path = str(scope.get("path", ""))
        if state.draining and path != "/health":
            await send_error(
                send,
                503,
                ErrorCode.shutting_down,
                "the server is shutting down; retry on another replica",
                headers={**_CLOSE, "Retry-After": "1"},
            )
            return
        exchange = _Exchange(send, body_pending=_has_body(scope))
        state.in_flight += 1
        try:
            await self._guarded(scope, receive, exchange)
        except Refused as refused:
            # Its traceback holds the frames that held the body (a cycle through the awaited
            # future): cleared, they are freed now, not at the next full garbage collection.
            refused.__traceback__ = None
            if not exchange.started:
                await send_error(
                    exchange.send,
                    refused.status,
                    refused.code,
                    refused.message,
                    headers=refused.headers,
                    param=refused.param,
                )
        except _ClientGone:
            pass
        except asyncio.CancelledError:
            # Cancelled by the server's shutdown (its grace period ran out): answer in the
            # envelope rather than let uvicorn write a plain-text 500.
            if not exchange.started:
                await send_error(
                    exchange.send,
                    503,
                    ErrorCode.shutting_down,
                    "the server shut down before this request finished; nothing was charged",
                    headers={**_CLOSE, "Retry-After": "1"},
                )
                return
            raise
        finally:
            state.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, exchange: _Exchange) -> None:
        settings = self.state.settings
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > settings.max_body_bytes):
            raise Refused(
                413, ErrorCode.request_too_large, f"request body exceeds {settings.max_body_bytes} bytes"
            )
        path = str(scope.get("path", ""))
        guarded = path.startswith(("/v1/", "/admin/")) and scope.get("method") != "OPTIONS"
        if not guarded:  # /health, /ready, /metrics, CORS preflights, 404s: they never read a body
            await self.app(scope, _limited(receive, settings.max_body_bytes), exchange.send_)
            return
        if path.startswith("/v1/") and settings.auth:
            scope[KEY_SCOPE_KEY] = await self._authenticate(scope)
        elif path.startswith("/admin/"):
            self._check_admin(scope)
        body = await self._read_body(receive, exchange) if exchange.body_pending else b""
        if body and _wants_json(scope):
            if len(body) > _INLINE_PARSE_BYTES:
                scope[JSON_SCOPE_KEY] = await run_in_threadpool(
                    parse_json_body, body, settings.max_json_elements
                )
            else:
                scope[JSON_SCOPE_KEY] = parse_json_body(body, settings.max_json_elements)
            # The route reads the parse from the scope; FastAPI only checks that a body exists.
            # Dropping the raw bytes now halves what a large request holds while it runs.
            body = _PARSED_PLACEHOLDER
        try:
            await self.app(scope, _replay(body, receive), exchange.send_)
        finally:
            # Exceptions' tracebacks form reference cycles through the frames that saw the scope;
            # without its parse those cycles hold little until the garbage collector runs.
            scope.pop(JSON_SCOPE_KEY, None)

    async def _authenticate(self, scope: Scope) -> Any:
        token = _bearer(scope)
        if token is None:
            raise Refused(
                401, ErrorCode.invalid_api_key, "missing API key: send 'Authorization: Bearer <key>'"
            )
        store = self.state.store
        if store is None:
            raise Refused(503, ErrorCode.store_unavailable, "the accounting store is not open", retry_after=2)
        try:
            key = await run_in_threadpool(store.authenticate, token)
        except StoreUnavailable as exc:
            raise Refused(
                503,
                ErrorCode.store_unavailable,
                "the accounting database is unavailable; nothing was charged, retry later",
                retry_after=2,
            ) from exc
        if key is None:
            raise Refused(401, ErrorCode.invalid_api_key, "invalid or revoked API key")
        return key

    def _check_admin(self, scope: Scope) -> None:
        secret = self.state.settings.admin_token
        if secret is None or not secret.get_secret_value():
            return  # the admin routes are not mounted: routing answers 404
        token = _bearer(scope)
        expected = secret.get_secret_value().encode("utf-8")
        if token is None or not hmac.compare_digest(token.encode("utf-8", "replace"), expected):
            raise Refused(
                401, ErrorCode.invalid_api_key, "admin routes need 'Authorization: Bearer <admin token>'"
            )
        scope[ADMIN_SCOPE_KEY] = True

    async def _read_body(self, receive: Receive, exchange: _Exchange) -> bytes:
        settings = self.state.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        chunks: list[bytes] = []
        seen = 0
        while True:
            left = min(settings.body_idle_timeout_s, deadline - loop.time())
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), timeout=left)
            except TimeoutError:
                raise Refused(
                    408, ErrorCode.request_timeout, "the request body was not received in time"
                ) from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > settings.max_body_bytes:
                raise Refused(
                    413, ErrorCode.request_too_large, f"request body exceeds {settings.max_body_bytes} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                exchange.body_pending = False
                return b"".join(chunks)


class _Exchange:
    """One request's response side: whether it started, and whether the body is still unread."""

    def __init__(self, send: Send, *, body_pending: bool) -> None:
        self.send = send
        self.started = False
        self.body_pending = body_pending

    async def send_(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if self.body_pending:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self.send(message)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay_receive() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


def _limited(receive: Receive, max_bytes: int) -> Receive:
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            raise Refused(413, ErrorCode.request_too_large, f"request body exceeds {max_bytes} bytes")
        return message

    return limited_receive
