"""Checks on request bodies that pydantic cannot express: shapes, finiteness, sizes, names.

Every failure is an ApiError with a precise code, raised before anything is charged.
"""

from __future__ import annotations

import numpy as np
import torch

from server.backends.base import Backend, PromptTooLong
from server.errors import ApiError
from server.settings import ServerSettings
from shared.arrays import ArrayDecodeError, decode_array
from shared.errors import ErrorCode
from shared.schemas import ContextVectors


def check_model(requested: str | None, backend: Backend) -> None:
    if requested not in (None, "", backend.card.id):
        raise ApiError(
            404,
            ErrorCode.model_not_found,
            f"model {requested!r} is not served here; this server serves {backend.card.id!r}",
            param="model",
        )


def check_item_count(items: int, settings: ServerSettings, *, param: str) -> None:
    if items > settings.max_items_per_request:
        raise ApiError(
            413,
            ErrorCode.too_many_items,
            f"{items} items in one request exceed the limit of {settings.max_items_per_request}; split it",
            param=param,
        )


def check_texts(texts: list[str], limit: int, *, param: str) -> None:
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, ErrorCode.invalid_request, "empty text", param=f"{param}[{i}]")
        if len(text) > limit:
            raise ApiError(
                400,
                ErrorCode.invalid_request,
                f"text of {len(text)} characters exceeds {limit}",
                param=f"{param}[{i}]",
            )
        if "\x00" in text:
            raise ApiError(
                400, ErrorCode.invalid_request, "text contains a NUL character", param=f"{param}[{i}]"
            )


def decode_context(value: ContextVectors, backend: Backend, *, param: str) -> torch.Tensor:
    """A soft prompt (nested floats or base64 float32) -> a finite [M, W] tensor, W = token width."""
    width = backend.card.token_width
    try:
        if isinstance(value, str):
            array = decode_array(value, width=width)
        else:
            array = np.asarray(value, dtype=np.float32)
            if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != width:
                raise ApiError(
                    422,
                    ErrorCode.wrong_shape,
                    f"context must be M x {width} (M >= 1), got shape {list(array.shape)}",
                    param=param,
                )
            if not np.isfinite(array).all():
                raise ArrayDecodeError("array contains NaN or infinite values")
    except ArrayDecodeError as exc:
        code = (
            ErrorCode.non_finite_values
            if "NaN" in str(exc)
            else (ErrorCode.invalid_base64 if "base64" in str(exc) else ErrorCode.wrong_shape)
        )
        raise ApiError(422 if code != ErrorCode.invalid_base64 else 400, code, str(exc), param=param) from exc
    except (ValueError, OverflowError) as exc:  # ragged nested lists
        raise ApiError(
            422, ErrorCode.wrong_shape, f"context is not a rectangular array: {exc}", param=param
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(array))


def check_prompts_fit(contexts: list[torch.Tensor], class_names: list[str], backend: Backend) -> None:
    longest = max(int(c.shape[0]) for c in contexts)
    for j, name in enumerate(class_names):
        try:
            backend.check_prompt_fits(longest, name)
        except PromptTooLong as exc:
            raise ApiError(
                422, ErrorCode.too_many_context_vectors, str(exc), param=f"class_names[{j}]"
            ) from exc


def check_finite_features(features: torch.Tensor, *, param: str) -> None:
    """Finite context vectors can still be large enough to overflow the text encoder; answer 422
    (raised inside the charged work, so the charge is refunded) rather than NaN features or nulls."""
    if not bool(torch.isfinite(features).all()):
        raise ApiError(
            422,
            ErrorCode.non_finite_values,
            "the context vectors are too large: the text encoder's output is not finite; scale them down "
            "(nothing was charged)",
            param=param,
        )
