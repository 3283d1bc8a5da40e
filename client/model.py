"""The client-side model: class text features, an optional adapter on image features, logits.

Shared by the tuner, the white-box reference, `cbbt eval` and `cbbt predict`, so the logits a
run selects on are the logits its artifact serves.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from client.adapters import LinearHead, ResidualAdapter, TipAdapter, adapter_state, clip_logits

AdapterKind = Literal["residual", "tip", "none"]


def make_adapter(
    kind: AdapterKind,
    dim: int,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    classes: int,
    *,
    ratio: float = 0.2,
) -> nn.Module | None:
    """A fresh adapter: `tip` builds its cache from the training views (averaged per image)."""
    if kind == "none":
        return None
    if kind == "tip":
        keys = F.normalize(train_feats.mean(dim=1), dim=-1)
        return TipAdapter(keys, train_labels, classes, trainable_keys=True)
    return ResidualAdapter(dim, ratio=ratio)


def logits_of(
    adapter: nn.Module | None, images: torch.Tensor, texts: torch.Tensor, scale: float
) -> torch.Tensor:
    """[N, D] image features x [C, D] class text features -> [N, C] logits."""
    if adapter is None:
        return clip_logits(images, texts, scale)
    if isinstance(adapter, TipAdapter):
        return adapter(images, clip_logits(images, texts, scale))
    if isinstance(adapter, LinearHead):  # the whole classifier: the texts are folded into it
        return adapter(images)
    return clip_logits(adapter(images), texts, scale)


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, cross-entropy) of logits against labels."""
    return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


@torch.no_grad()
def accuracy_and_loss(
    adapter: nn.Module | None, images: torch.Tensor, labels: torch.Tensor, texts: torch.Tensor, scale: float
) -> tuple[float, float]:
    return score(logits_of(adapter, images, texts, scale), labels)


def state_of(adapter: nn.Module | None) -> dict[str, torch.Tensor] | None:
    return None if adapter is None else adapter_state(adapter)
