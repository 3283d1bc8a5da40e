"""Image features, fetched once per (model, image content, view) and cached on disk.

Image features never change while the prompt is tuned, so each image (and each cached
augmented view of it) is paid for exactly once: a rerun or a resume reads them from the
cache. The cache is a small SQLite file (one row per feature vector). Feature requests
carry deterministic idempotency keys, so a call the server charged but whose answer was
lost (killed client, dropped connection) is replayed, not charged again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from client.api import ImageEmbedder
from client.data import Example
from shared.tiers import ROUTE_EMBEDDINGS

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
# Random resized crop (CBBT's training augmentation): area scale and aspect-ratio ranges.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_hash(example: Example) -> str:
    """content_hash of the bytes `example` is uploaded as. A run asks for each image's hash
    several times (plan, cache lookup, view seeds), and a camera photo's bytes cost a decode,
    a resize and a JPEG encode (~0.1 s), so a file's hash is kept while its size and mtime stay."""
    if example.path is None:
        return content_hash(example.image_bytes())
    stat = example.path.stat()
    return _file_hash(example, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _file_hash(example: Example, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a rewritten file is hashed afresh
    return content_hash(example.image_bytes())


def augmented_view(image: Image.Image, seed: int, *, flip: bool = True) -> Image.Image:
    """A deterministic random resized crop (+ horizontal flip) of `image`, at its own size."""
    rng = np.random.default_rng(seed)
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            break
    else:
        w, h, left, top = width, height, 0, 0
    view = image.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def view_bytes(example: Example, view: int, *, flip: bool = True) -> bytes:
    """View 0 is the image itself; views >= 1 are seeded augmentations, PNG-encoded."""
    if view == 0:
        return example.image_bytes()
    seed = int(image_hash(example)[:15], 16) + view
    buffer = io.BytesIO()
    augmented_view(example.image(), seed, flip=flip).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class FeatureCache:
    """key -> float32 vector, in SQLite (safe to share between runs; one writer at a time)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")
        self._conn.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, FloatArray]:
        found: dict[str, FloatArray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, vector FROM features WHERE key IN ({marks})", chunk)
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return found

    def put_many(self, entries: dict[str, FloatArray]) -> None:
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO features (key, vector) VALUES (?, ?)",
                [(k, np.asarray(v, dtype="<f4").tobytes()) for k, v in entries.items()],
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


class FeatureStore:
    """Features of examples x views through the cache, fetching only what is missing."""

    def __init__(
        self,
        client: ImageEmbedder,
        cache: FeatureCache,
        *,
        batch_size: int = 64,
        flip: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.batch_size = batch_size
        self.flip = flip
        self.progress = progress
        self.model_id = client.model_card().id

    def _key(self, digest: str, view: int) -> str:
        return f"{self.model_id}|{digest}|{view}|{int(self.flip)}"

    def item_count(self, examples: Sequence[Example], views: int) -> int:
        """How many images `features(examples, views)` uses, cached or not."""
        return len({self._key(image_hash(e), v) for e in examples for v in range(views)})

    def missing_count(self, examples: Sequence[Example], views: int) -> int:
        """How many images a `features(examples, views)` call would pay for."""
        keys = [self._key(image_hash(e), v) for e in examples for v in range(views)]
        return len(set(keys)) - len(self.cache.get_many(sorted(set(keys))))

    def features(
        self,
        examples: Sequence[Example],
        views: int = 1,
        *,
        on_batch: Callable[[int], None] | None = None,
    ) -> npt.NDArray[np.float32]:
        """[N, views, D] features; the ones not yet cached are fetched in batches, and each
        fetched batch's size goes to `on_batch` (and the store's `progress`)."""
        # Cached or not, image features are what /v1/embeddings sells: the run used that route.
        self.client.counter.routes.add(ROUTE_EMBEDDINGS)
        hashes = [image_hash(e) for e in examples]
        wanted = [(i, v, self._key(h, v)) for i, h in enumerate(hashes) for v in range(views)]
        cached = self.cache.get_many(sorted({k for _, _, k in wanted}))
        todo: dict[str, tuple[int, int]] = {}
        for i, v, key in wanted:
            if key not in cached:
                todo.setdefault(key, (i, v))
        if todo:
            logger.info("fetching %d image features (%d cached)", len(todo), len(cached))
        keys = sorted(todo)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start : start + self.batch_size]
            payloads = [view_bytes(examples[todo[k][0]], todo[k][1], flip=self.flip) for k in batch]
            idem = "features-" + content_hash("\n".join(batch).encode())[:40]
            vectors = self.client.embed_images(payloads, idempotency_key=idem)
            fetched = dict(zip(batch, vectors, strict=True))
            self.cache.put_many(fetched)
            cached.update(fetched)
            for report in (self.progress, on_batch):
                if report is not None:
                    report(len(batch))
        dim = next(iter(cached.values())).shape[0] if cached else self.client.model_card().feature_dim
        out = np.empty((len(examples), views, dim), dtype=np.float32)
        for i, v, key in wanted:
            out[i, v] = cached[key]
        return out
