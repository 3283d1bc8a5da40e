"""float32 arrays on the wire: base64 of little-endian float32, row-major.

Both sides use these two functions so that a vector sent as base64 decodes to the
same bits on the other side. Decoding validates everything a hostile sender could
get wrong (bad base64, a length that is not a whole number of floats, NaN/inf).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FLOAT32_LE = np.dtype("<f4")


class ArrayDecodeError(ValueError):
    """The payload is not a valid float32 array of the expected shape."""


def encode_array(array: npt.ArrayLike) -> str:
    """Encode any float array as base64 little-endian float32 (row-major)."""
    data = np.ascontiguousarray(np.asarray(array, dtype=FLOAT32_LE))
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_array(
    payload: str, shape: Sequence[int] | None = None, *, width: int | None = None
) -> npt.NDArray[np.float32]:
    """Decode base64 float32 into an array.

    `shape` fixes the full shape; `width` asks for a 2-D array of rows of that width
    (the row count is inferred). Raises ArrayDecodeError on any malformed input.
    """
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArrayDecodeError(f"malformed base64: {exc}") from exc
    if len(raw) % FLOAT32_LE.itemsize:
        raise ArrayDecodeError(f"{len(raw)} bytes is not a whole number of float32 values")
    flat = np.frombuffer(raw, dtype=FLOAT32_LE).astype(np.float32)
    if shape is not None:
        expected = int(np.prod(shape))
        if flat.size != expected:
            raise ArrayDecodeError(
                f"expected {expected} float32 values for shape {list(shape)}, got {flat.size}"
            )
        out = flat.reshape(tuple(shape))
    elif width is not None:
        if width <= 0 or flat.size == 0 or flat.size % width:
            raise ArrayDecodeError(f"{flat.size} float32 values do not form rows of width {width}")
        out = flat.reshape(-1, width)
    else:
        out = flat
    if not np.isfinite(out).all():
        raise ArrayDecodeError("array contains NaN or infinite values")
    return out
