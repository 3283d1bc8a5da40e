"""Linear probes on image features: one anchored to the zero-shot classifier, one plain.

`AnchoredProbe` is CLAP's recipe (Silva-Rodríguez et al., CVPR 2024): class weights start at
the zero-shot text features T and each class k pays λ_k·‖w_k − t_k‖² for drifting from them,
with λ_k = λ · (mean zero-shot probability of class k on its own shots). Classes the zero-shot
classifier already gets right stay anchored; classes it gets wrong may move. Convex for a
fixed logit scale, so full-batch L-BFGS from W = T reaches the same solution every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.adapters import LinearProbe, RowSpace
from client.fewshot.shots import Shots

LBFGS_ITERATIONS = 100


@dataclass(frozen=True)
class AnchoredProbe:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    scale: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.weight.T + self.bias


def class_anchor_weights(shots: Shots, prior: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean zero-shot probability of each class on its own training views, `[C]`."""
    x, y = shots.flat()
    probs = torch.softmax(scale * x @ F.normalize(prior, dim=-1).T, dim=-1)
    own = probs.gather(1, y.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(shots.num_classes).index_add_(0, y, own)
    counts = torch.bincount(y, minlength=shots.num_classes).clamp(min=1)
    return sums / counts


def fit_anchored_probe(
    shots: Shots,
    prior: torch.Tensor,
    scale: float,
    strength: float,
    *,
    adaptive: bool = True,
    start: AnchoredProbe | None = None,
    space: RowSpace | None = None,
) -> AnchoredProbe:
    """Minimise mean CE + Σ_k (λ_k / 2)·‖w_k − t_k‖² over W (and a bias), from W = T or from
    `start` (the solution at a nearby strength: the problem is convex, so a warm start reaches
    the same optimum in fewer iterations, which is what keeps a grid cheap with many classes).
    `space` is the shots' RowSpace, when the caller already has it."""
    x, y = shots.flat()
    anchor = F.normalize(prior.float(), dim=-1)
    trust = class_anchor_weights(shots, prior, scale) if adaptive else torch.ones(shots.num_classes)
    lam = strength * trust
    # W = T + Z·Bᵀ: the drift from the anchors lies in the span of the features (RowSpace).
    space = RowSpace.of(x) if space is None else space
    reduced = space.reduce(x)
    anchored = scale * x @ anchor.T
    drift = (
        torch.zeros(shots.num_classes, reduced.shape[1])
        if start is None
        else space.reduce(start.weight - anchor)
    )
    bias = torch.zeros(shots.num_classes) if start is None else start.bias.clone()
    drift.requires_grad_(True)
    bias.requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [drift, bias], lr=1.0, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = anchored + scale * reduced @ drift.T + bias
        loss = F.cross_entropy(logits, y) + 0.5 * (lam.unsqueeze(1) * drift.pow(2)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return AnchoredProbe(anchor + space.expand(drift.detach()), bias.detach(), scale)


def fit_linear_probe(shots: Shots, weight_decay: float, space: RowSpace | None = None) -> LinearProbe:
    """Plain multinomial logistic regression on every view (no text features)."""
    x, y = shots.flat()
    return LinearProbe(shots.dim, shots.num_classes, weight_decay=weight_decay).fit(x, y, space)
