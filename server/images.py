"""Decoding untrusted images: base64 / data URIs in, RGB PIL images out, or a precise 4xx.

Limits are checked before work: the encoded size before decoding, the pixel count from
the header before the pixels are decompressed (decompression bombs), and only a fixed
set of formats is ever handed to a decoder.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from server.errors import ApiError
from shared.errors import ErrorCode

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_MIME_TO_FORMAT = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def _split_data_uri(payload: str, param: str) -> tuple[str | None, str]:
    if not payload.startswith("data:"):
        return None, payload
    match = _DATA_URI.match(payload)
    if match is None or not match.group("b64"):
        raise ApiError(
            400,
            ErrorCode.invalid_base64,
            "data URI must be of the form data:image/<type>;base64,<data>",
            param=param,
        )
    mime = (match.group("mime") or "").lower()
    if mime not in _MIME_TO_FORMAT:
        raise ApiError(
            415,
            ErrorCode.unsupported_image_format,
            f"unsupported image type {mime or '(none)'!r}; send one of {sorted(set(_MIME_TO_FORMAT))}",
            param=param,
        )
    return _MIME_TO_FORMAT[mime], payload[match.end() :]


def decode_image(payload: str, limits: ImageLimits, *, param: str = "input") -> Image.Image:
    """A base64 string or data URI -> an RGB image, or ApiError (400/413/415)."""
    declared, data = _split_data_uri(payload.strip(), param)
    if len(data) > (limits.max_bytes * 4) // 3 + 4:
        raise ApiError(413, ErrorCode.image_too_large, f"image exceeds {limits.max_bytes} bytes", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, ErrorCode.invalid_base64, f"malformed base64 image: {exc}", param=param) from exc
    if not raw:
        raise ApiError(400, ErrorCode.invalid_image, "empty image", param=param)
    formats = (declared,) if declared else ALLOWED_FORMATS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=formats)
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > limits.max_pixels:
                raise ApiError(
                    413,
                    ErrorCode.image_too_large,
                    f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
                    param=param,
                )
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, ErrorCode.image_too_large, f"decompression bomb: {exc}", param=param) from exc
    except UnidentifiedImageError as exc:
        what = f"a valid {declared} image" if declared else f"an image in one of {list(ALLOWED_FORMATS)}"
        raise ApiError(400, ErrorCode.invalid_image, f"payload is not {what}", param=param) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(
            400, ErrorCode.invalid_image, f"corrupt or truncated image: {exc}", param=param
        ) from exc
