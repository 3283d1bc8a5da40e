"""The feature methods as data: each fits a whole hyperparameter grid on one set of shots.

A method maps (training shots, a zero-shot prior `[C, D]`, the logit scale) to one classifier
per grid point; a classifier maps image features `[N, D]` to logits `[N, C]`. Grids are fitted
together where that is cheaper (GDA: one eigendecomposition for every shrinkage and fusion
weight). `FitContext` memoises what several methods or grid points share within one fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from client.adapters import TipAdapter, clip_logits
from client.fewshot.gda import CovarianceBasis, covariance_basis, fusion_scale
from client.fewshot.probes import fit_anchored_probe, fit_linear_probe
from client.fewshot.shots import Shots

Classifier = Callable[[torch.Tensor], torch.Tensor]
# A grid point, hashable and printable: sorted (name, value) pairs.
Params = tuple[tuple[str, float], ...]


def params(**values: float) -> Params:
    return tuple(sorted(values.items()))


@dataclass
class FitContext:
    """One fold's training shots, the prior and the scale. `shared` memoises prior-independent
    work (GDA's eigendecomposition) across the contexts of one fold's priors."""

    shots: Shots
    prior: torch.Tensor
    scale: float
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def basis(self) -> CovarianceBasis:
        if "basis" not in self.shared:
            self.shared["basis"] = covariance_basis(self.shots)
        basis: CovarianceBasis = self.shared["basis"]
        return basis

    @cached_property
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shots.flat()

    def zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.prior, self.scale)


class FeatureMethod(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def uses_prior(self) -> bool:
        """False: fitted once per fold, whatever the zero-shot prior."""
        ...

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]: ...


@dataclass(frozen=True)
class ZeroShot:
    name: str = "zero-shot"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        return {(): ctx.zero_shot}


@dataclass(frozen=True)
class Gda:
    """GDA fused with the zero-shot logits; α = inf means GDA alone."""

    shrinkages: Sequence[float] = (0.05, 0.2, 0.5, 0.8)
    alphas: Sequence[float] = (0.3, 1.0, 3.0, 10.0, float("inf"))
    name: str = "gda"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        x, _ = ctx.flat
        zero_train = ctx.zero_shot(x)
        out: dict[Params, Classifier] = {}
        for shrinkage in self.shrinkages:
            model = ctx.basis.model(shrinkage)
            s = fusion_scale(zero_train, model.logits(x))
            for alpha in self.alphas:
                out[params(shrinkage=shrinkage, alpha=alpha)] = _fused(ctx, model.logits, s, alpha)
        return out


def _fused(ctx: FitContext, gda: Classifier, s: float, alpha: float) -> Classifier:
    def classify(features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features, dim=-1)
        if alpha == float("inf"):
            return s * gda(feats)
        return ctx.zero_shot(feats) + alpha * s * gda(feats)

    return classify


@dataclass(frozen=True)
class AnchoredLinearProbe:
    """CLAP-style probe: W from the text features, a class-adaptive penalty toward them."""

    strengths: Sequence[float] = (0.01, 0.1, 1.0, 10.0)
    name: str = "clap"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        out: dict[Params, Classifier] = {}
        for strength in self.strengths:
            probe = fit_anchored_probe(ctx.shots, ctx.prior, ctx.scale, strength)
            out[params(strength=strength)] = probe.logits
        return out


@dataclass(frozen=True)
class PlainLinearProbe:
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2)
    name: str = "linear-probe"
    uses_prior: bool = False

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        out: dict[Params, Classifier] = {}
        for wd in self.weight_decays:
            probe = fit_linear_probe(ctx.shots, wd)
            out[params(weight_decay=wd)] = probe.predict_logits
        return out


@dataclass(frozen=True)
class TipCache:
    """Training-free Tip-Adapter: keys = the images' view-averaged features."""

    alphas: Sequence[float] = (0.3, 1.0, 3.0, 10.0)
    betas: Sequence[float] = (1.0, 3.0, 6.0)
    name: str = "tip-adapter"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        keys = ctx.shots.features.mean(dim=1)
        cache = TipAdapter(keys, ctx.shots.labels, ctx.shots.num_classes)
        out: dict[Params, Classifier] = {}
        for beta in self.betas:
            for alpha in self.alphas:
                out[params(alpha=alpha, beta=beta)] = _tip(ctx, cache, alpha, beta)
        return out


def _tip(ctx: FitContext, cache: TipAdapter, alpha: float, beta: float) -> Classifier:
    def classify(features: torch.Tensor) -> torch.Tensor:
        return ctx.zero_shot(features) + alpha * cache.cache_logits(features, beta=beta)

    return classify


def default_methods() -> dict[str, FeatureMethod]:
    methods: list[FeatureMethod] = [ZeroShot(), Gda(), AnchoredLinearProbe(), PlainLinearProbe(), TipCache()]
    return {m.name: m for m in methods}
