"""Client-side feature adapters, trained by exact local gradients (method.md §3).

The service returns L2-normalised image features and per-class text features; everything here
runs on those returned features, locally, with ordinary back-propagation, so none of it costs
queries beyond the feature passes that produced its inputs.

- `clip_logits`: CLIP's logits from features, scale · cos(image, text).
- `ResidualAdapter`: CLIP-Adapter's residual MLP on image features (CBBT's default adapter).
- `TipAdapter`: Tip-Adapter's cache model (keys = few-shot features, values = one-hot labels);
  with `trainable_keys=True` it is Tip-Adapter-F. `search_alpha_beta` picks α, β on validation.
- `LinearProbe`: logistic regression on normalised features, the zero-prompt-query baseline.

State dicts are plain, contiguous CPU tensors (`adapter_state`) so they save with safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """scale · normalize(image) @ normalize(text)ᵀ: `[N, D] × [C, D] → [N, C]`."""
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T


def power_features(features: torch.Tensor, power: float) -> torch.Tensor:
    """normalize(sign(x)·|x|^β): the power transform few-shot classifiers fit better on.

    Image features are skewed (ReLU towers give sparse, non-negative ones); β < 1 compresses
    the large coordinates and lifts the small ones, which brings the class clusters closer to
    the Gaussians GDA assumes and to what a linear probe separates well (Hu et al., "Leveraging
    the feature distribution in transfer-based few-shot learning", 2021). β = 1 is the
    identity on unit features. Invertible, so no information is lost."""
    if power == 1.0:
        return F.normalize(features, dim=-1)
    return F.normalize(features.sign() * features.abs().pow(power), dim=-1)


def adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as detached, contiguous CPU tensors that share no storage
    (safetensors refuses views and shared tensors)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in adapter.state_dict().items()}


class ResidualAdapter(nn.Module):
    """CLIP-Adapter: f' = normalize(r · MLP(f) + (1 − r) · f).

    MLP = Linear(D, D/reduction) → ReLU → Linear(D/reduction, D) → ReLU, without biases as in
    CLIP-Adapter: with biases the untrained MLP adds a sizeable constant vector, and the adapter
    should start close to the identity so early training does not undo the zero-shot geometry.
    """

    def __init__(self, dim: int, ratio: float = 0.2, reduction: int = 4) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be in [0, 1]")
        if reduction < 1 or dim // reduction < 1:
            raise ValueError("reduction must leave a hidden width ≥ 1")
        self.ratio = ratio
        hidden = dim // reduction
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mixed = self.ratio * self.mlp(features) + (1.0 - self.ratio) * features
        return F.normalize(mixed, dim=-1)


class TipAdapter(nn.Module):
    """Tip-Adapter cache model: logits = clip_logits + α · exp(−β(1 − f·Kᵀ)) · V.

    keys K `[N, D]` are the few-shot training features, L2-normalised here (average cached
    views per image before passing them in); values V `[N, C]` are their one-hot labels.
    `trainable_keys=True` makes K a parameter (Tip-Adapter-F); as in Tip-Adapter-F the tuned
    keys are used as they are, not re-normalised. α and β are buffers, so they travel with the
    state dict, and are set through the `alpha`/`beta` properties (not trained).
    """

    keys: torch.Tensor
    values: torch.Tensor
    alpha_buffer: torch.Tensor
    beta_buffer: torch.Tensor

    def __init__(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        alpha: float = 1.0,
        beta: float = 1.0,
        trainable_keys: bool = False,
    ) -> None:
        super().__init__()
        if keys.ndim != 2 or labels.shape != (keys.shape[0],):
            raise ValueError("keys must be [N, D] and labels [N]")
        normalised = F.normalize(keys.detach().clone(), dim=-1)
        if trainable_keys:
            self.keys = nn.Parameter(normalised)
        else:
            self.register_buffer("keys", normalised)
        self.register_buffer("values", F.one_hot(labels.long(), num_classes).to(normalised.dtype))
        self.register_buffer("alpha_buffer", torch.tensor(float(alpha), dtype=normalised.dtype))
        self.register_buffer("beta_buffer", torch.tensor(float(beta), dtype=normalised.dtype))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], trainable_keys: bool = False) -> TipAdapter:
        """Rebuild an adapter saved with `adapter_state` (the cache size comes from the state)."""
        values = state["values"]
        adapter = cls(state["keys"], values.argmax(dim=1), values.shape[1], trainable_keys=trainable_keys)
        adapter.load_state_dict(state)
        return adapter

    @property
    def alpha(self) -> float:
        return float(self.alpha_buffer)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.alpha_buffer.fill_(value)

    @property
    def beta(self) -> float:
        return float(self.beta_buffer)

    @beta.setter
    def beta(self, value: float) -> None:
        self.beta_buffer.fill_(value)

    def affinity(self, image_features: torch.Tensor) -> torch.Tensor:
        """Cosine affinity f·Kᵀ `[B, N]` of normalised image features with the cache keys."""
        return F.normalize(image_features, dim=-1) @ self.keys.T

    def cache_logits(self, image_features: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """exp(−β(1 − f·Kᵀ)) · V `[B, C]`, before the α weighting."""
        b = self.beta_buffer if beta is None else beta
        return torch.exp(-b * (1.0 - self.affinity(image_features))) @ self.values

    def forward(self, image_features: torch.Tensor, clip_logits: torch.Tensor) -> torch.Tensor:
        return clip_logits + self.alpha_buffer * self.cache_logits(image_features)


@dataclass(frozen=True)
class AlphaBetaSearch:
    alpha: float
    beta: float
    accuracy: float


@torch.no_grad()
def search_alpha_beta(
    adapter: TipAdapter,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    clip_logits_val: torch.Tensor,
    alphas: torch.Tensor | None = None,
    betas: torch.Tensor | None = None,
) -> AlphaBetaSearch:
    """Grid-search α, β for validation accuracy (Tip-Adapter's recipe); never pass test data.

    Default grids follow Tip-Adapter's search ranges: α in [0.1, 3], β in [0.1, 7]. The first
    best pair in grid order wins ties. The adapter is not modified: set `alpha`/`beta` yourself.
    """
    alphas = torch.linspace(0.1, 3.0, 30) if alphas is None else alphas
    betas = torch.linspace(0.1, 7.0, 70) if betas is None else betas
    labels = val_labels.long()
    best = AlphaBetaSearch(alpha=adapter.alpha, beta=adapter.beta, accuracy=-1.0)
    for beta in betas.tolist():
        cache = adapter.cache_logits(val_features, beta=beta)
        for alpha in alphas.tolist():
            predictions = (clip_logits_val + alpha * cache).argmax(dim=1)
            accuracy = float((predictions == labels).float().mean())
            if accuracy > best.accuracy:
                best = AlphaBetaSearch(alpha=alpha, beta=beta, accuracy=accuracy)
    logger.info("Tip-Adapter search: alpha=%.3f beta=%.3f val acc=%.4f", best.alpha, best.beta, best.accuracy)
    return best


class LinearHead(nn.Module):
    """A fixed linear classifier, logits = normalize(x)·Wᵀ + b + Σ_β power_features(x, β)·W_βᵀ:
    the default `cbbt` method's artifact (client/collab.py), whatever feature methods and
    prompt made it. The β terms are there when a method was fitted on power-transformed
    features (client/fewshot/methods.py)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        power_weights: Mapping[float, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        given = dict(power_weights or {})
        if any(not 0.0 < p < 1.0 for p in given):
            raise ValueError(f"power-space βs must be in (0, 1), got {sorted(given)} (β = 1 is `weight`)")
        self.powers = sorted(given, reverse=True)
        self.power_weights = nn.ParameterList(
            [nn.Parameter(given[p].detach().clone(), requires_grad=False) for p in self.powers]
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(features, dim=-1) @ self.weight.T + self.bias
        for power, weight in zip(self.powers, self.power_weights, strict=True):
            logits = logits + power_features(features, power) @ weight.T
        return logits

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors an artifact stores (the βs as one 1-d tensor)."""
        out = {"weight": self.weight.detach(), "bias": self.bias.detach()}
        if self.powers:
            out["powers"] = torch.tensor(self.powers, dtype=torch.float64)
            out.update({f"power_weight.{i}": w.detach() for i, w in enumerate(self.power_weights)})
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> LinearHead:
        powers = state["powers"].tolist() if "powers" in state else []
        extra = {float(p): state[f"power_weight.{i}"] for i, p in enumerate(powers)}
        return cls(state["weight"], state["bias"], extra)


@dataclass(frozen=True)
class RowSpace:
    """The span of a feature matrix's n rows, as an orthonormal basis `[D, n]` when n < D.

    For a loss of X·Wᵀ plus an L2 penalty on W, every gradient, and so every L-BFGS iterate from
    W = 0, is a combination of X's rows (the representer theorem). Optimising Z in W = Z·Bᵀ is
    then the same problem, iterate for iterate (B is an isometry on that span), at n/D of the
    cost per evaluation: with 16 shots of 10-18 classes, n ≈ 160-290 against D = 1280.
    `basis` is None when n ≥ D: the span is the whole space and nothing is saved.
    """

    basis: torch.Tensor | None

    @classmethod
    def of(cls, inputs: torch.Tensor) -> RowSpace:
        n, dim = inputs.shape
        if n >= dim:
            return cls(None)
        basis, _ = torch.linalg.qr(inputs.T.double())
        return cls(basis.to(inputs.dtype))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates in the span: `[..., D] → [..., n]` (a weight's projection onto it, too)."""
        return x if self.basis is None else x @ self.basis

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Back to the full space: `[..., n] → [..., D]`."""
        return z if self.basis is None else z @ self.basis.T


class LinearProbe(nn.Module):
    """Multinomial logistic regression on L2-normalised features, fitted full-batch by L-BFGS.

    The objective is mean cross-entropy + (weight_decay / 2)·‖W‖² (the bias is not decayed):
    convex, so L-BFGS from zero converges to the same solution every time. It is solved in the
    span of the training features (`RowSpace`), where the optimum lies.
    """

    def __init__(self, dim: int, num_classes: int, weight_decay: float = 1e-3, max_iter: int = 200) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.weight_decay = weight_decay
        self.max_iter = max_iter

    def fit(self, features: torch.Tensor, labels: torch.Tensor, space: RowSpace | None = None) -> LinearProbe:
        """Fit on `features` [N, D]; `space` is their RowSpace, when the caller already has it."""
        inputs = F.normalize(features.detach().to(self.linear.weight.dtype), dim=-1)
        targets = labels.long()
        space = RowSpace.of(inputs) if space is None else space
        reduced = space.reduce(inputs)
        weight = torch.zeros(
            self.linear.out_features, reduced.shape[1], dtype=inputs.dtype, requires_grad=True
        )
        bias = torch.zeros(self.linear.out_features, dtype=inputs.dtype, requires_grad=True)
        optimiser = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(reduced @ weight.T + bias, targets)
            loss = loss + 0.5 * self.weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            final = optimiser.step(closure)
        with torch.no_grad():
            self.linear.weight.copy_(space.expand(weight))
            self.linear.bias.copy_(bias)
        logger.debug("linear probe fitted: objective=%.5f", float(final.detach()))
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(features)
