"""Checks on request bodies that pydantic cannot express: shapes, finiteness, sizes, names.

Every failure is an ApiError with a precise code, raised before anything is charged. The
checks that cost CPU per item (text scans, tokenising) run in a request's `prepare` step, on a
worker thread, after the budget pre-check (server/billing.py); a text that cannot be tokenised
fails its own request here, so it never reaches the model thread and a batch shared with others.
"""

from __future__ import annotations

import numpy as np
import torch

from server.backends.base import Backend, PromptItem, PromptTooLong, TokenIds
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


def check_texts(texts: list[str], limit: int, *, param: str, max_word_chars: int | None = None) -> None:
    for i, text in enumerate(texts):
        where = f"{param}[{i}]"
        if len(text) > limit:
            raise ApiError(
                400, ErrorCode.invalid_request, f"text of {len(text)} characters exceeds {limit}", param=where
            )
        if not text.strip():
            raise ApiError(400, ErrorCode.invalid_request, "empty text", param=where)
        if "\x00" in text:
            raise ApiError(400, ErrorCode.invalid_request, "text contains a NUL character", param=where)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    ErrorCode.invalid_request,
                    "text is not valid Unicode (it holds a lone UTF-16 surrogate)",
                    param=where,
                ) from exc
        if max_word_chars is not None:
            longest = max(map(len, text.split()), default=0)
            if longest > max_word_chars:
                raise ApiError(
                    400,
                    ErrorCode.invalid_request,
                    f"a word of {longest} characters (no whitespace) exceeds {max_word_chars}",
                    param=where,
                )


def tokenize_texts(texts: list[str], backend: Backend, *, param: str) -> list[TokenIds]:
    """Tokenise on the request's own thread: an untokenisable text is this request's 400 alone."""
    try:
        return backend.tokenize(texts)
    except Exception:
        for i, text in enumerate(texts):
            try:
                backend.tokenize([text])
            except Exception as exc:
                raise ApiError(
                    400, ErrorCode.invalid_request, f"text cannot be tokenised ({exc})", param=f"{param}[{i}]"
                ) from exc
        raise


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
        except Exception as exc:  # the tokenizer refused the name
            raise ApiError(
                400,
                ErrorCode.invalid_request,
                f"class name cannot be tokenised ({exc})",
                param=f"class_names[{j}]",
            ) from exc


def prompt_items(contexts: list[torch.Tensor], class_names: list[str], backend: Backend) -> list[PromptItem]:
    """Every (context, class name) pair, its class tokenised now (cached), not on the model thread."""
    ids = [backend.class_ids(name) for name in class_names]
    return [
        PromptItem(ctx, name, class_ids)
        for ctx in contexts
        for name, class_ids in zip(class_names, ids, strict=True)
    ]


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
