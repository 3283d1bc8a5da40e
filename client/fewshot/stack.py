"""Stacking a tuned prompt on the chosen feature method (the default `cbbt`, client/collab.py).

The collaborative classifier is `a · f(x) + w · z_θ(x)`: `f` the feature method the
cross-validation chose, `a` its temperature (calibrated on its out-of-fold logits), `z_θ` the
zero-shot logits of the soft prompt θ, `w ≥ 0` their weight. The prompt is tuned on `f`'s
*out-of-fold* logits, so it learns what the feature method gets wrong on images it never saw,
instead of what the feature method already knows (which is how an adapter trained beside a
prompt absorbs the prompt's gain). `w` is fitted for every perturbed prompt (a convex 1-D
problem, solved on a grid), so a prompt that does not help gets `w = 0`, never a worse loss.

Pure numerics on tensors; no HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.adapters import LinearHead
from client.fewshot.shots import stratified_folds

Classifier = Callable[[torch.Tensor], torch.Tensor]

WEIGHTS = torch.linspace(0.0, 2.0, 41)


@dataclass(frozen=True)
class Weighted:
    weight: float
    loss: float
    accuracy: float


def best_weight(base: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor) -> Weighted:
    """The weight `w ∈ [0, 2]` of the prompt's logits minimising the cross-entropy of
    `base + w · prompt` (w = 0 is on the grid: the prompt can only help the fitted loss)."""
    stacked = base.unsqueeze(0) + WEIGHTS.view(-1, 1, 1) * prompt.unsqueeze(0)  # [W, N, C]
    losses = F.cross_entropy(stacked.flatten(0, 1), labels.repeat(len(WEIGHTS)), reduction="none")
    per_weight = losses.view(len(WEIGHTS), -1).mean(dim=1)
    i = int(per_weight.argmin())
    accuracy = float((stacked[i].argmax(dim=1) == labels).float().mean())
    return Weighted(float(WEIGHTS[i]), float(per_weight[i]), accuracy)


def evaluate_weight(
    base: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor, weight: float
) -> Weighted:
    logits = base + weight * prompt
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return Weighted(weight, float(F.cross_entropy(logits, labels)), accuracy)


def pick_classes(
    logits: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """`size` classes to score a step's perturbed prompts on, when there are too many to score
    all: half drawn at random from the labelled classes, the rest their hardest negatives (the
    classes the current classifier gives the most probability to on those classes' images).

    The loss restricted to these classes leaves the other classes out of each softmax's
    normaliser; the hard negatives are the terms that carry most of it, which is what keeps
    the restricted loss's gradient close to the full one (measured in docs/benchmarks/default.md)."""
    classes = logits.shape[1]
    if size >= classes:
        return torch.arange(classes)
    present = torch.unique(labels)
    drawn = present[torch.randperm(present.numel(), generator=generator)[: max(1, size // 2)]]
    mass = torch.softmax(logits[torch.isin(labels, drawn)], dim=1).mean(dim=0)
    mass[drawn] = -1.0
    negatives = mass.topk(size - drawn.numel()).indices
    return torch.cat([drawn, negatives]).sort().values


@dataclass(frozen=True)
class HoldoutSplit:
    """The labelled images the prompt trains on, and those that decide when it stops."""

    train: torch.Tensor
    held: torch.Tensor


def holdout_split(labels: torch.Tensor, folds: int, seed: int) -> HoldoutSplit:
    """One stratified fold held out (the CV's fold count, so about 1/k of each class)."""
    parts = stratified_folds(labels, folds, seed)
    held = parts[0]
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[held] = False
    return HoldoutSplit(torch.nonzero(keep).flatten(), held)


def as_linear_head(
    classifier: Classifier, dim: int, probe: torch.Tensor, *, tol: float = 1e-3
) -> LinearHead | None:
    """`classifier` as a `LinearHead` when it is affine in the unit features, else None.

    Read off at ±e_i (b = (f(e_i) + f(−e_i)) / 2, W·e_i = (f(e_i) − f(−e_i)) / 2) and checked
    on `probe` (real features): a classifier that is not affine (a cache model, a mixture)
    fails the check instead of being silently approximated."""
    with torch.no_grad():
        eye = torch.eye(dim)
        plus, minus = classifier(eye), classifier(-eye)
        weight = ((plus - minus) / 2).T.contiguous()
        bias = ((plus + minus) / 2).mean(dim=0)
        head = LinearHead(weight, bias)
        expected = classifier(probe)
        error = float((head(probe) - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    return head if error <= tol * max(1.0, scale) else None
