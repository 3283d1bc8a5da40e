"""The labelled shots as tensors, and the folds cross-validation splits them into.

`Shots` holds every labelled image (the training shots and the validation images alike) as
`views` cached features each: `[N, V, D]`, view 0 being the image itself. Folds split by
image, never by view, so no augmented copy of a held-out image is ever trained on; held-out
images are scored on view 0 only, as test images are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.adapters import power_features


@dataclass(frozen=True)
class Shots:
    """L2-normalised features `[N, V, D]` of N labelled images and their labels `[N]`."""

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.features.ndim != 3 or self.labels.shape != (self.features.shape[0],):
            raise ValueError("features must be [N, V, D] and labels [N]")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError("labels out of range")

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Shots:
        """Normalises the features (and gives a `[N, D]` input one view)."""
        feats = features.unsqueeze(1) if features.ndim == 2 else features
        return cls(F.normalize(feats.float(), dim=-1), labels.long(), num_classes)

    @classmethod
    def pooled(
        cls,
        train: torch.Tensor,
        train_labels: torch.Tensor,
        val: torch.Tensor,
        val_labels: torch.Tensor,
        num_classes: int,
    ) -> Shots:
        """The training shots `[N, V, D]` and the validation images `[Nv, D]` as one pool;
        a validation image's one view is repeated V times, so every image weighs the same."""
        views = train.shape[1]
        feats = torch.cat([train, val.unsqueeze(1).expand(-1, views, -1)])
        return cls.of(feats, torch.cat([train_labels, val_labels]), num_classes)

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view as its own sample: `[N·V, D]` and `[N·V]`."""
        n, v, d = self.features.shape
        return self.features.reshape(n * v, d), self.labels.repeat_interleave(v)

    def powered(self, power: float) -> Shots:
        """The same images in the power-transformed space (`power_features`)."""
        return Shots(power_features(self.features, power), self.labels, self.num_classes)

    def subset(self, index: torch.Tensor) -> Shots:
        return Shots(self.features[index], self.labels[index], self.num_classes)

    def with_views(self, views: int) -> Shots:
        """The first `views` views of each image (view 0 is the image itself)."""
        if not 1 <= views <= self.views:
            raise ValueError(f"views must be in 1..{self.views}")
        return Shots(self.features[:, :views], self.labels, self.num_classes)

    def per_class_min(self) -> int:
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        return int(counts.min())


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """`folds` disjoint index sets covering every image, each class dealt round-robin after a
    seeded shuffle, so every fold holds ⌊n_k / folds⌋ or ⌈n_k / folds⌉ images of class k."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    generator = torch.Generator().manual_seed(seed)
    buckets: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        for i, index in enumerate(members.tolist()):
            buckets[(offset + i) % folds].append(index)
        offset += members.numel()  # keeps small classes from all landing in fold 0
    return [torch.tensor(sorted(b), dtype=torch.long) for b in buckets if b]


def default_folds(shots: Shots, most: int = 5) -> int:
    """As many folds as the rarest class allows (each fold should see every class), ≤ `most`."""
    return max(2, min(most, shots.per_class_min()))
