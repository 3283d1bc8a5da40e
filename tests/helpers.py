"""Helpers shared by the test files: a real server process on loopback, images, error checks.

`ServerProcess` (client/server_process.py, re-exported here) runs `python -m server.cli serve`
as a subprocess on a free loopback port, waits for `/ready`, and can be stopped, killed (a
crash) and restarted on the same port and database. Everything it prints goes to one log
file, kept across restarts, so a failing test can show it (conftest.py attaches its tail to
failure reports). Tests default to the tiny model (`tiny_server_process`).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from client import server_process
from client.server_process import LARGE_BUDGET, REPO_ROOT, ServerStartError, free_port

__all__ = [
    "HELD_ITEMS",
    "LARGE_BUDGET",
    "REPO_ROOT",
    "TINY_MODEL",
    "FakeClock",
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "held_batch_args",
]

TINY_MODEL = "cbbt-tiny"
HELD_ITEMS = 8  # a request this small never fills a batch of 64, so it waits out the hold


def held_batch_args(hold_s: float) -> list[str]:
    """Server flags that keep every request of HELD_ITEMS in flight for at least `hold_s`.

    Each batch waits up to `--batch-max-wait-ms` to fill. That wait is a lower bound on a
    request's time in flight, so a test that must catch a request with its items reserved does
    not depend on how fast the machine runs the model.
    """
    return ["--batch-max-items", "64", "--batch-max-wait-ms", str(int(hold_s * 1000))]


class FakeClock:
    """A wall clock that only moves when a test moves it (store leases, idempotency expiry)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ServerProcess(server_process.ServerProcess):
    """The one `ServerProcess`, defaulting to the tiny random-init model (loads in ~2 s)."""

    def __init__(
        self,
        db: Path | str,
        *,
        model: str | None = TINY_MODEL,
        pretrained: str | None = "none",
        start_timeout_s: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(db, model=model, pretrained=pretrained, start_timeout_s=start_timeout_s, **kwargs)


# -- images ------------------------------------------------------------------------------
def noise_image(width: int = 48, height: int = 40, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}[fmt]
    return data_uri(image_bytes(image, fmt), mime)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of a few KB whose header claims width x height pixels (a decompression bomb)."""
    return image_bytes(Image.new("1", (width, height)), "PNG", optimize=True)


# -- responses ---------------------------------------------------------------------------
def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` in the one error envelope (with `code`, when given); returns it."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]
