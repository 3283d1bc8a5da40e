"""In-process unit tests: the dynamic batcher, image decoding limits, the torchvision shim."""

from __future__ import annotations

import asyncio
import base64
import importlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch
from PIL import Image

from server.backends.torchvision_compat import ensure_torchvision_importable
from server.batching import BatchObserver, DynamicBatcher, Overloaded
from server.errors import ApiError
from server.images import ImageLimits, decode_image
from tests.helpers import bomb_png, data_uri, image_bytes, noise_image

T = TypeVar("T")


def run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_factory()

    return asyncio.run(main())


class FakeModel:
    """Encodes a number x as the row [x, 2x]; fails a whole batch that holds a negative number."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.lock = threading.Lock()

    def __call__(self, items: list[float]) -> torch.Tensor:
        with self.lock:
            self.batches.append(list(items))
        if any(x < 0 for x in items):
            raise RuntimeError("the model failed on this batch")
        values = torch.tensor(items, dtype=torch.float32)
        return torch.stack([values, 2 * values], dim=1)


def _batcher(model: FakeModel, executor: ThreadPoolExecutor, **kwargs: object) -> DynamicBatcher[float]:
    return DynamicBatcher(modality="test", run_batch=model, executor=executor, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool  # type: ignore[misc]
    pool.shutdown(wait=True)


def _expected(items: list[float]) -> torch.Tensor:
    values = torch.tensor(items, dtype=torch.float32)
    return torch.stack([values, 2 * values], dim=1)


# -- DynamicBatcher ----------------------------------------------------------------------
def test_concurrent_submits_are_coalesced_into_one_batch(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    requests = [[float(10 * r + i) for i in range(3)] for r in range(5)]

    async def scenario() -> list[torch.Tensor]:
        # The batch fills exactly (15 items) long before the wait would run out.
        batcher = _batcher(model, executor, max_items=15, max_wait_s=30.0)
        batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(r) for r in requests)))
        finally:
            await batcher.stop()

    results = run(scenario)
    assert len(model.batches) == 1 and len(model.batches[0]) == 15
    for request, result in zip(requests, results, strict=True):
        torch.testing.assert_close(result, _expected(request))


def test_a_request_split_across_batches_keeps_its_order(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    first = [float(i) for i in range(10)]
    second = [100.0 + i for i in range(5)]

    async def scenario() -> tuple[torch.Tensor, torch.Tensor]:
        batcher = _batcher(model, executor, max_items=4, max_wait_s=0.001)
        batcher.start()
        try:
            a, b = await asyncio.gather(batcher.submit(first), batcher.submit(second))
            return a, b
        finally:
            await batcher.stop()

    a, b = run(scenario)
    torch.testing.assert_close(a, _expected(first))
    torch.testing.assert_close(b, _expected(second))
    assert all(len(batch) <= 4 for batch in model.batches)
    assert len(model.batches) >= 4  # 15 items in batches of at most 4
    assert sorted(x for batch in model.batches for x in batch) == sorted(first + second)


def test_full_queue_is_refused_at_once(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario() -> None:
        # Not started: nothing drains the queue, so the first request stays queued.
        batcher = _batcher(model, executor, queue_limit=5)
        waiting = asyncio.ensure_future(batcher.submit([1.0, 2.0, 3.0, 4.0]))
        await asyncio.sleep(0)
        assert batcher.depth == 4
        with pytest.raises(Overloaded) as info:
            await batcher.submit([5.0, 6.0])
        assert info.value.modality == "test"
        assert batcher.depth == 4  # the refused request queued nothing
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.depth == 0  # a caller that went away leaves nothing behind
        await batcher.stop()

    run(scenario)
    assert model.batches == []


def test_a_failing_batch_fails_only_its_requests(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    requests = [[1.0, 2.0], [-1.0, 3.0], [4.0, 5.0]]

    async def scenario() -> list[torch.Tensor | BaseException]:
        batcher = _batcher(model, executor, max_items=2, max_wait_s=0.001)
        batcher.start()
        try:
            return list(await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True))
        finally:
            await batcher.stop()

    ok_first, failed, ok_last = run(scenario)
    assert model.batches == requests  # FIFO, two items per batch
    assert isinstance(failed, RuntimeError)
    assert isinstance(ok_first, torch.Tensor) and isinstance(ok_last, torch.Tensor)
    torch.testing.assert_close(ok_first, _expected(requests[0]))
    torch.testing.assert_close(ok_last, _expected(requests[2]))


def test_the_batcher_survives_a_failed_batch(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario() -> torch.Tensor:
        batcher = _batcher(model, executor, max_items=8, max_wait_s=0.001)
        batcher.start()
        try:
            with pytest.raises(RuntimeError):
                await batcher.submit([-1.0])
            return await batcher.submit([7.0])
        finally:
            await batcher.stop()

    torch.testing.assert_close(run(scenario), _expected([7.0]))


def test_observer_sees_every_batch(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    sizes: list[tuple[str, int]] = []
    depths: list[int] = []
    observer = BatchObserver(
        on_batch=lambda modality, size, seconds: sizes.append((modality, size)),
        on_queue_depth=lambda modality, depth: depths.append(depth),
    )

    async def scenario() -> None:
        batcher = _batcher(model, executor, max_items=3, max_wait_s=0.001, observer=observer)
        batcher.start()
        try:
            await batcher.submit([1.0, 2.0, 3.0, 4.0, 5.0])
        finally:
            await batcher.stop()

    run(scenario)
    assert sum(size for _, size in sizes) == 5
    assert all(modality == "test" for modality, _ in sizes)
    assert depths[0] == 5 and depths[-1] == 0


def test_stop_fails_queued_requests_and_refuses_new_ones(executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        batcher = _batcher(FakeModel(), executor)  # not started: the request stays queued
        waiting = asyncio.ensure_future(batcher.submit([1.0]))
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting
        with pytest.raises(RuntimeError, match="shutting down"):
            await batcher.submit([2.0])

    run(scenario)


def test_empty_submit_is_an_error(executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError):
            await _batcher(FakeModel(), executor).submit([])

    run(scenario)


# -- decode_image ------------------------------------------------------------------------
LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decode_every_allowed_format(fmt: str) -> None:
    raw = image_bytes(noise_image(20, 12), fmt)
    for payload in (_b64(raw), data_uri(raw, f"image/{fmt.lower()}"), f"  {_b64(raw)}\n"):
        image = decode_image(payload, LIMITS)
        assert image.mode == "RGB" and image.size == (20, 12)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "CMYK"])
def test_decode_converts_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(_b64(image_bytes(noise_image(8, 8, mode=mode), fmt)), LIMITS)
    assert image.mode == "RGB"


def _decode_error(payload: str, limits: ImageLimits = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(payload, limits, param="images[2]")
    assert info.value.param == "images[2]"
    return info.value


def test_decode_errors() -> None:
    png = image_bytes(noise_image(32, 32), "PNG")
    cases = [
        ("data:image/png;base64,***", 400, "invalid_base64"),
        ("data:image/png,abc", 400, "invalid_base64"),
        ("QUJ", 400, "invalid_base64"),
        ("", 400, "invalid_image"),
        (_b64(b"GIF89a but not really"), 400, "invalid_image"),
        (data_uri(png, "image/jpeg"), 400, "invalid_image"),
        (data_uri(png[: len(png) // 2]), 400, "invalid_image"),
        (data_uri(png, "image/svg+xml"), 415, "unsupported_image_format"),
        (data_uri(png, "image/heic"), 415, "unsupported_image_format"),
        (data_uri(bomb_png(20000, 20000)), 413, "image_too_large"),
        (data_uri(bomb_png(1001, 1000)), 413, "image_too_large"),
    ]
    for payload, status, code in cases:
        error = _decode_error(payload)
        assert (error.status, error.code.value) == (status, code), (payload[:40], error.message)


def test_decode_byte_limit() -> None:
    raw = image_bytes(noise_image(64, 64), "PNG")
    error = _decode_error(_b64(raw), ImageLimits(max_bytes=len(raw) // 2, max_pixels=10**6))
    assert (error.status, error.code.value) == (413, "image_too_large")
    assert decode_image(_b64(raw), ImageLimits(max_bytes=len(raw), max_pixels=64 * 64)).size == (64, 64)


def test_decode_pixel_limit_is_checked_before_decompression() -> None:
    """A bomb is refused from its header: far over PIL's own limit, and well within time."""
    error = _decode_error(data_uri(bomb_png(30000, 30000)))
    assert error.status == 413
    assert Image.MAX_IMAGE_PIXELS is not None


# -- torchvision shim --------------------------------------------------------------------
def test_torchvision_shim_makes_open_clip_importable() -> None:
    first = ensure_torchvision_importable()
    assert isinstance(first, bool)
    assert ensure_torchvision_importable() is False  # idempotent: nothing left to install
    open_clip = importlib.import_module("open_clip")
    importlib.import_module("torchvision")
    assert "cbbt-tiny" in open_clip.list_models() or hasattr(open_clip, "create_model")
