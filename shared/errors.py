"""The one error envelope every non-2xx answer uses: {"error": {message, type, code, param}}.

`type` is the broad class (as in OpenAI's API, so its client maps it to an exception);
`code` is the precise, machine-readable reason a client can act on.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class ErrorCode(StrEnum):
    invalid_request = "invalid_request"
    invalid_base64 = "invalid_base64"
    invalid_image = "invalid_image"
    unsupported_image_format = "unsupported_image_format"
    image_too_large = "image_too_large"
    non_finite_values = "non_finite_values"
    wrong_shape = "wrong_shape"
    too_many_context_vectors = "too_many_context_vectors"
    too_many_items = "too_many_items"
    request_too_large = "request_too_large"
    model_not_found = "model_not_found"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    invalid_api_key = "invalid_api_key"
    permission_denied = "permission_denied"
    tier_not_allowed = "tier_not_allowed"
    idempotency_conflict = "idempotency_conflict"
    rate_limit_exceeded = "rate_limit_exceeded"
    insufficient_quota = "insufficient_quota"
    overloaded = "overloaded"
    shutting_down = "shutting_down"
    request_timeout = "request_timeout"
    model_not_ready = "model_not_ready"
    store_unavailable = "store_unavailable"
    injected_failure = "injected_failure"
    internal_error = "internal_error"


# The broad error types, by HTTP status (OpenAI's naming).
ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
}


def error_type_for(status: int) -> str:
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
