"""What the OpenAPI document says beyond what FastAPI infers: every route declares the error
envelope for each status it can really answer (for generated clients and schemathesis'
conformance checks). The bearer scheme comes from billing's HTTPBearer dependency."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from shared.errors import ErrorEnvelope

_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: wrong types, unknown fields, bad values (code names the reason)",
    401: "Missing, invalid or revoked API key",
    403: "The key's tier or scopes do not include this route (`tier_not_allowed`)",
    404: "Unknown model or resource",
    409: "Idempotency-Key reused with another body, or its first request still running",
    413: "Request body, item count or an image over the server's limits",
    415: "Unsupported image format",
    422: "Well-formed but unusable arrays: wrong shape, non-finite values, too many context vectors",
    429: "Rate limit (`rate_limit_exceeded`, retry later) or exhausted budget (`insufficient_quota`)",
    500: "Internal error (or an injected one when fault simulation is on); nothing is charged",
    503: "Model not ready, store unavailable, overloaded or an injected failure; retry later",
}

# Every route can answer these: crashes, injected faults, an overloaded or not-ready service.
SERVER_SIDE = (500, 503)
# A route with a JSON body: malformed bodies, the body-size limit.
WITH_BODY = (400, 413)
# A route behind an API key.
AUTHENTICATED = (401,)
# A route that charges the key: tier, model, idempotency, rate limits and budgets.
BILLED = (401, 403, 404, 409, 429)
# A route that names a resource or a model.
NOT_FOUND = (404,)
# A route with query parameters.
WITH_QUERY = (400,)
# A route that decodes images.
WITH_IMAGES = (415,)
# A route that takes soft prompts (arrays).
WITH_ARRAYS = (422,)


def error_responses(*groups: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: the error envelope under each status of the given groups."""
    statuses = sorted({status for group in (*groups, SERVER_SIDE) for status in group})
    return {status: {"model": ErrorEnvelope, "description": _DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 "HTTPValidationError" answers: validation errors are 400 in
    the error envelope here (server.errors), which every route already declares."""

    build = app.openapi  # FastAPI's own, which caches the document in app.openapi_schema
    done: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = build()
        if not done:
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    if _is_fastapi_validation_error(responses.get("422")):
                        del responses["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            done.append(True)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_fastapi_validation_error(response: dict[str, Any] | None) -> bool:
    if response is None:
        return False
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    return str(ref).endswith("/HTTPValidationError")
