"""What every run is given, whatever the method: the service, the feature cache, the split,
its folder, its name in the registry, progress bars, and whom to tell the plan before spending;
and what every run does first: its split's image features, as tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.api import ModelApi
from client.data import FewShotSplit
from client.features import FeatureStore
from client.progress import NO_PROGRESS, Progress
from client.run_folder import RunFolder
from client.selection import labels_of


@dataclass
class SplitFeatures:
    """A split's cached image features: train [N, V, D] (V views), val [Nv, D], test [Nt, D]."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor

    @property
    def flat_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached view as its own training sample: [N·V, D] and [N·V]."""
        n, views, dim = self.train.shape
        return self.train.reshape(n * views, dim), self.train_labels.repeat_interleave(views)


def feature_items(features: FeatureStore, split: FewShotSplit, views: int, *, missing: bool = False) -> int:
    """Images the split's features cost at full price (or, `missing`, what is not cached yet)."""
    count = features.missing_count if missing else features.item_count
    return count(split.train, views) + count(split.val + split.test, 1)


def fetch_split_features(
    features: FeatureStore,
    split: FewShotSplit,
    views: int,
    *,
    progress: Progress = NO_PROGRESS,
    on_batch: Callable[[int], None] | None = None,
) -> SplitFeatures:
    """The split's features through the cache (a bar over the images still to fetch)."""
    with progress.bar("image features", feature_items(features, split, views, missing=True), "img") as bar:

        def fetched(images: int) -> None:
            bar.update(images)
            if on_batch is not None:
                on_batch(images)

        train = torch.from_numpy(features.features(split.train, views, on_batch=fetched))
        val = torch.from_numpy(features.features(split.val, 1, on_batch=fetched))[:, 0]
        test = torch.from_numpy(features.features(split.test, 1, on_batch=fetched))[:, 0]
    return SplitFeatures(
        train, labels_of(split.train), val, labels_of(split.val), test, labels_of(split.test)
    )


@dataclass(frozen=True)
class RunContext:
    api: ModelApi
    features: FeatureStore
    split: FewShotSplit
    folder: RunFolder
    name: str
    progress: Progress = NO_PROGRESS
    on_plan: Callable[[str], None] | None = None  # the plan's cost, before anything is spent

    def feature_items(self, views: int, *, missing: bool = False) -> int:
        return feature_items(self.features, self.split, views, missing=missing)

    def fetch_features(self, views: int, on_batch: Callable[[int], None] | None = None) -> SplitFeatures:
        return fetch_split_features(
            self.features, self.split, views, progress=self.progress, on_batch=on_batch
        )
