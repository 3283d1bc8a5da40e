"""The server's exceptions and the handlers that render every failure in the one envelope."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ErrorBody, ErrorCode, ErrorEnvelope, error_type_for

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client can act on: status, machine-readable code, human message."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorEnvelope(
        error=ErrorBody(message=message, type=error_type_for(status), code=str(code), param=param)
    )
    return JSONResponse(status_code=status, content=body.model_dump(), headers=dict(headers or {}))


_CODE_BY_STATUS: dict[int, ErrorCode] = {
    404: ErrorCode.not_found,
    405: ErrorCode.method_not_allowed,
    413: ErrorCode.request_too_large,
}


def _validation_param(exc: RequestValidationError) -> str | None:
    """The field at fault: the common prefix of the errors' locations (a value that fits no
    member of a union gets one error per member, each with the member's name appended)."""
    locs = [[str(part) for part in err.get("loc", ()) if part != "body"] for err in exc.errors()]
    if not locs:
        return None
    common = locs[0]
    for loc in locs[1:]:
        size = next(
            (i for i, (a, b) in enumerate(zip(common, loc, strict=False)) if a != b),
            min(len(common), len(loc)),
        )
        common = common[:size]
    return ".".join(common) or None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "extra_forbidden":  # OpenAI's wording for an unknown field
            parts.append(f"unrecognized request argument supplied: {loc}")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, param=exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # 400, as OpenAI answers a malformed request (FastAPI's default is 422 in its own shape).
        return error_response(
            400, ErrorCode.invalid_request, _validation_message(exc), param=_validation_param(exc)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_BY_STATUS.get(exc.status_code, ErrorCode.invalid_request)
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, ErrorCode.internal_error, "internal server error")
