"""What every method shares: mini-batches of cached features, and model selection on
validation (never the test split) with the curve of validation accuracy against items spent.

The tuner, the feature methods and the white-box reference all select with `better`
(validation accuracy first, validation loss as the tie-break) and log the same curve points,
so their reports and plots compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.api import QueryCounter
from client.data import Example

CurvePoint = dict[str, float]
# The batch sampler's seed is the run's seed + this (the tuner's and the white-box reference's
# draws are the same batches, and the same as the first release's).
BATCH_SEED_OFFSET = 1_000_003


def better(candidate: tuple[float, float], best: tuple[float, float]) -> bool:
    """(val accuracy, val loss): higher accuracy wins, lower loss breaks ties."""
    return (candidate[0], -candidate[1]) > (best[0], -best[1])


def curve_point(step: int, val_accuracy: float, train_loss: float, counter: QueryCounter) -> CurvePoint:
    return {
        "step": float(step),
        "val_accuracy": val_accuracy,
        "train_loss": train_loss,
        "items": float(counter.items),
        "calls": float(counter.calls),
        "loss_evaluations": float(counter.loss_evaluations),
    }


def labels_of(examples: list[Example]) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], dtype=torch.long)


def sample_batch(
    train: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of cached views: `batch_size` images, one random view each; <= 0: every view."""
    n, views = train.shape[0], train.shape[1]
    if batch_size <= 0:  # full batch: every cached view (costs no queries)
        return train.reshape(n * views, -1), labels.repeat_interleave(views)
    size = min(batch_size, n)
    idx = torch.randperm(n, generator=generator)[:size]
    view = torch.randint(0, views, (size,), generator=generator)
    return train[idx, view], labels[idx]


@dataclass
class Best:
    """The checkpoint selected so far: its validation score and what reproduces it."""

    val_accuracy: float = -1.0
    val_loss: float = math.inf
    step: int = -1
    theta: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    adapter: dict[str, torch.Tensor] | None = None

    def improves(self, accuracy: float, loss: float) -> bool:
        return better((accuracy, loss), (self.val_accuracy, self.val_loss))


class Selection:
    """Offers along a run -> the best on validation and the curve (validation vs items)."""

    def __init__(
        self, counter: QueryCounter, *, on_point: Callable[[CurvePoint], None] | None = None
    ) -> None:
        self.counter = counter
        self.best = Best()
        self.curve: list[CurvePoint] = []
        self.on_point = on_point

    def start(self, best: Best) -> None:
        """The starting point (zero-shot): selected unless something beats it."""
        self.best = best
        self.curve.append(curve_point(0, best.val_accuracy, math.nan, self.counter))

    def offer(
        self,
        step: int,
        val_accuracy: float,
        val_loss: float,
        train_loss: float,
        snapshot: Callable[[], Best],
    ) -> bool:
        """Log the point; keep `snapshot()` if it beats the best so far. True if it did."""
        point = curve_point(step, val_accuracy, train_loss, self.counter)
        self.curve.append(point)
        if self.on_point is not None:
            self.on_point(point)
        if self.best.improves(val_accuracy, val_loss):
            self.best = snapshot()
            return True
        return False
