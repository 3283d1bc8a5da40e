"""Dynamic batching: items of concurrent requests are coalesced into model batches.

Each modality (images, texts, prompts) has a `DynamicBatcher`. Requests put their items in
a bounded queue and await one future; a collector task takes up to `max_items` items,
waiting at most `max_wait_s` after the first one for more, and runs the model on a single
worker thread (off the event loop, one batch at a time: torch already uses every core for
one batch). Items of one request may be split across batches; the answer keeps their order.
A full queue is refused at once (`Overloaded`) instead of growing memory without bound.
A failed batch that mixes requests is run again request by request, so one request's bad item
fails that request only, never the others it happened to share a batch with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Overloaded(Exception):
    """The queue cannot take the request now; retry after a short wait."""

    def __init__(self, modality: str, queued: int, limit: int) -> None:
        super().__init__(f"{modality} queue is full ({queued} items queued, limit {limit})")
        self.modality = modality


class ShuttingDown(RuntimeError):
    """The batcher stopped (server shutdown) before the request was answered."""

    def __init__(self) -> None:
        super().__init__("server shutting down")


@dataclass
class _Pending:
    """One request's share of the queue: rows are filled in as batches finish."""

    future: asyncio.Future[torch.Tensor]
    rows: list[torch.Tensor | None]
    remaining: int

    def fill(self, index: int, row: torch.Tensor) -> None:
        self.rows[index] = row
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(torch.stack([r for r in self.rows if r is not None]))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class BatchObserver:
    """Hooks for metrics; no-ops by default."""

    on_batch: Callable[[str, int, float], None] = lambda modality, size, seconds: None
    on_queue_depth: Callable[[str, int], None] = lambda modality, depth: None


@dataclass
class DynamicBatcher(Generic[T]):
    modality: str
    run_batch: Callable[[list[T]], torch.Tensor]
    executor: Executor
    max_items: int = 64
    max_wait_s: float = 0.005
    queue_limit: int = 16384
    observer: BatchObserver = field(default_factory=BatchObserver)
    # Optional work bound per batch (e.g. tokens): long texts make smaller batches, so one
    # tenant's long items cannot hold the one model thread (and its memory) for long.
    cost: Callable[[T], int] | None = None
    max_cost: int = 0
    # Fill batches round-robin across the queued requests instead of first-come-first-served, so
    # a small request does not wait behind every item of a large one that came just before it.
    fair: bool = False

    def __post_init__(self) -> None:
        self._queue: deque[tuple[_Pending, int, T]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batcher-{self.modality}"
            )

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            pending, _, _ = self._queue.popleft()
            pending.fail(ShuttingDown())

    async def submit(self, items: Sequence[T]) -> torch.Tensor:
        """Encode `items`; returns a [len(items), D] tensor in the same order."""
        if not items:
            raise ValueError("nothing to encode")
        if self._closed:
            raise ShuttingDown()
        # An empty queue takes any request: one larger than the limit is then served (alone)
        # instead of being refused as "overloaded", a retryable answer it could never outgrow.
        if self._queue and len(self._queue) + len(items) > self.queue_limit:
            raise Overloaded(self.modality, len(self._queue), self.queue_limit)
        pending = _Pending(asyncio.get_running_loop().create_future(), [None] * len(items), len(items))
        self._queue.extend((pending, i, item) for i, item in enumerate(items))
        self.observer.on_queue_depth(self.modality, len(self._queue))
        self._wakeup.set()
        try:
            return await pending.future
        finally:
            if not pending.future.done() or pending.future.cancelled():
                # The caller went away (cancelling the task cancels the future it awaits):
                # drop its queued items so the model does not run them.
                self._queue = deque(entry for entry in self._queue if entry[0] is not pending)
                self.observer.on_queue_depth(self.modality, len(self._queue))

    async def _collect(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_fill()
            batch = self._take_batch()
            self.observer.on_queue_depth(self.modality, len(self._queue))
            await self._run(batch)

    def _take_batch(self) -> list[tuple[_Pending, int, T]]:
        candidates = self._round_robin() if self.fair else iter(self._queue)
        batch: list[tuple[_Pending, int, T]] = []
        spent = 0
        for entry in candidates:
            if len(batch) >= self.max_items:
                break
            cost = self.cost(entry[2]) if self.cost is not None else 0
            if batch and self.cost is not None and spent + cost > self.max_cost:
                break
            batch.append(entry)
            spent += cost
        if self.fair:
            taken = {id(entry) for entry in batch}
            self._queue = deque(entry for entry in self._queue if id(entry) not in taken)
        else:
            for _ in batch:
                self._queue.popleft()
        return batch

    def _round_robin(self) -> Iterator[tuple[_Pending, int, T]]:
        """The queue's entries, one per request in turn (each request's own in order)."""
        shares: dict[int, deque[tuple[_Pending, int, T]]] = {}
        for entry in self._queue:
            shares.setdefault(id(entry[0]), deque()).append(entry)
        while shares:
            for key in list(shares):
                share = shares[key]
                yield share.popleft()
                if not share:
                    del shares[key]

    async def _run(self, batch: list[tuple[_Pending, int, T]]) -> None:
        """Run one batch; if it fails and holds several requests, run each request's share alone."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, self.run_batch, [item for _, _, item in batch])
        except Exception as exc:
            shares: dict[int, list[tuple[_Pending, int, T]]] = {}
            for entry in batch:
                shares.setdefault(id(entry[0]), []).append(entry)
            if len(shares) == 1:  # one request's items only: fail exactly that request
                logger.exception("%s batch of %d failed", self.modality, len(batch))
                batch[0][0].fail(exc)
                return
            logger.warning(
                "%s batch of %d failed; retrying its %d requests one by one: %s",
                self.modality,
                len(batch),
                len(shares),
                exc,
            )
            for share in shares.values():
                await self._run(share)
            return
        self.observer.on_batch(self.modality, len(batch), time.perf_counter() - started)
        for row, (pending, index, _) in zip(out, batch, strict=True):
            pending.fill(index, row)

    async def _wait_for_fill(self) -> None:
        """Give concurrent requests up to max_wait_s to join a batch that is not yet full."""
        deadline = time.perf_counter() + self.max_wait_s
        while len(self._queue) < self.max_items:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)
            except TimeoutError:
                return
