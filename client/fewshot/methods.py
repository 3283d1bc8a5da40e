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

from client.adapters import RowSpace, TipAdapter, clip_logits, power_features
from client.fewshot.gda import CovarianceBasis, covariance_basis, fusion_scale
from client.fewshot.probes import fit_anchored_probe, fit_linear_probe
from client.fewshot.shots import Shots

Classifier = Callable[[torch.Tensor], torch.Tensor]
# A grid point, hashable and printable: sorted (name, value) pairs.
Params = tuple[tuple[str, float], ...]

# The feature spaces GDA and the plain probe are fitted in (β of `power_features`; 1 = the
# features as served). A grid axis like any other, so the CV keeps β = 1 where the transform
# does not help (measured in docs/benchmarks/default.md, "Power-transformed features, a calibrated
# selection rule, linear ensembles").
POWERS: tuple[float, ...] = (1.0, 0.5, 0.25)


def params(**values: float) -> Params:
    return tuple(sorted(values.items()))


def with_power(values: Params, power: float) -> Params:
    """β joins a grid point only when it is not 1, so the served space's points keep their names."""
    return values if power == 1.0 else tuple(sorted((*values, ("power", power))))


@dataclass(frozen=True)
class SpacedClassifier:
    """Σ_β part_β(power_features(x, β)): a sum of classifiers, each on one feature space
    (β = 1: the features as served, L2-normalised). The linear methods' parts are affine in
    their space, so any sum of them (a method fused with the zero-shot prior, an ensemble,
    the prompt on top) is kept as parts that the default `cbbt` saves as one exact linear
    head (client/collab.py)."""

    parts: tuple[tuple[float, Classifier], ...]

    @classmethod
    def of(cls, classifier: Classifier) -> SpacedClassifier:
        """`classifier` as parts (a plain classifier is one part on the served features)."""
        return classifier if isinstance(classifier, SpacedClassifier) else cls(((1.0, classifier),))

    @classmethod
    def total(cls, classifiers: Sequence[Classifier], factors: Sequence[float]) -> SpacedClassifier:
        """Σ factor_i · classifier_i, part by part."""
        parts: list[tuple[float, Classifier]] = []
        for classifier, factor in zip(classifiers, factors, strict=True):
            parts.extend((power, _times(factor, part)) for power, part in cls.of(classifier).parts)
        return cls(tuple(parts))

    @property
    def powers(self) -> list[float]:
        return sorted({power for power, _ in self.parts}, reverse=True)

    def part(self, power: float) -> Classifier:
        """The sum of the parts on the space of `power` (input: features in that space)."""
        mine = [part for p, part in self.parts if p == power]
        return lambda feats: torch.stack([part(feats) for part in mine]).sum(dim=0)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([part(power_features(features, p)) for p, part in self.parts]).sum(dim=0)


def _times(factor: float, classifier: Classifier) -> Classifier:
    return classifier if factor == 1.0 else lambda feats: factor * classifier(feats)


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

    @property
    def row_space(self) -> RowSpace:
        """The span of the training views, shared by every probe fit on them (see RowSpace)."""
        if "row_space" not in self.shared:
            self.shared["row_space"] = RowSpace.of(self.flat[0])
        space: RowSpace = self.shared["row_space"]
        return space

    def zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.prior, self.scale)

    def powered(self, power: float) -> FitContext:
        """This fold's shots in the power-transformed space (β = 1: this context itself); the
        prior stays in the served space. The transformed shots and their memo are kept per β,
        shared across priors and methods (`shared` always belongs to one set of shots)."""
        if power == 1.0:
            return self
        memo = self.shared.setdefault(f"power={power}", {})
        if "shots" not in memo:  # GDA and the probe fit on the same transformed shots
            memo["shots"] = self.shots.powered(power)
        return FitContext(memo["shots"], self.prior, self.scale, memo)


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
    powers: Sequence[float] = POWERS
    name: str = "gda"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        x, _ = ctx.flat
        zero_train = ctx.zero_shot(x)
        out: dict[Params, Classifier] = {}
        for power in self.powers:
            space = ctx.powered(power)
            xp, _ = space.flat  # row for row the same images as x
            for shrinkage in self.shrinkages:
                model = space.basis.model(shrinkage)
                s = fusion_scale(zero_train, model.logits(xp))
                for alpha in self.alphas:
                    key = with_power(params(shrinkage=shrinkage, alpha=alpha), power)
                    out[key] = _fused(ctx, model.logits, s, alpha, power)
        return out


def _fused(ctx: FitContext, gda: Classifier, s: float, alpha: float, power: float = 1.0) -> Classifier:
    if power != 1.0:  # GDA in the power space, the zero-shot prior on the served features
        if alpha == float("inf"):
            return SpacedClassifier(((power, _times(s, gda)),))
        return SpacedClassifier(((power, _times(alpha * s, gda)), (1.0, ctx.zero_shot)))

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
        probe = None
        for strength in sorted(self.strengths, reverse=True):  # each warm-starts the next, weaker one
            probe = fit_anchored_probe(
                ctx.shots, ctx.prior, ctx.scale, strength, start=probe, space=ctx.row_space
            )
            out[params(strength=strength)] = probe.logits
        return out


@dataclass(frozen=True)
class PlainLinearProbe:
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2)
    powers: Sequence[float] = POWERS
    name: str = "linear-probe"
    uses_prior: bool = False

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        out: dict[Params, Classifier] = {}
        for power in self.powers:
            space = ctx.powered(power)
            for wd in self.weight_decays:
                probe = fit_linear_probe(space.shots, wd, space.row_space)
                key = with_power(params(weight_decay=wd), power)
                logits = probe.predict_logits
                out[key] = logits if power == 1.0 else SpacedClassifier(((power, logits),))
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
