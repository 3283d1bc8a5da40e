"""Honest selection on few images: k-fold cross-validation over all labelled shots.

Every candidate (a method at one grid point, under one zero-shot prior) is fitted on k − 1
folds and scored on the held-out fold's images (view 0), so each labelled image is predicted
exactly once by a model that never saw it: the out-of-fold (OOF) logits. Candidates are ranked
by their *calibrated* OOF cross-entropy (after the one temperature that fits them best), then
OOF accuracy: on 100-300 labelled images accuracy moves in steps of 0.3-1 point and its
noise is larger than the gaps between methods, while the log-loss of calibrated logits uses
every image's margin (measured in docs/benchmarks/default.md, "Power-transformed features, a
calibrated selection rule, linear ensembles"). Ensembles average the calibrated OOF logits of
the best grid point of the top methods, so they are scored on the same images, and a mean of
linear heads is still one. The winner is refitted on all shots. The test split never enters: callers pass
only labelled shots here.

The reported estimate is the winner's OOF accuracy. It is the maximum over many candidates,
so it is optimistic by construction; the benchmark reports it beside test accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from client.fewshot.methods import (
    Classifier,
    FeatureMethod,
    FitContext,
    Params,
    SpacedClassifier,
    default_methods,
)
from client.fewshot.shots import Shots, default_folds, stratified_folds

logger = logging.getLogger(__name__)

CV_SEED = 0
NO_PRIOR = "-"  # the candidate of a method that ignores the zero-shot prior
TEMPERATURES = torch.logspace(-1.5, 1.5, 61)  # 0.03 .. 30, relative to unit-spread logits


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature `a` minimising the cross-entropy of `a · logits` (a 1-D grid search).

    The feature methods' logits come at arbitrary scales (GDA's are log-densities); putting
    them on a calibrated scale first is what makes their losses comparable, and adding the
    prompt's logits to them meaningful. The grid is relative to the logits' own spread, so
    it fits any scale."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    unit = 1.0 / max(float(centred.std()), 1e-12) if centred.numel() > 1 else 1.0
    temperatures = unit * TEMPERATURES
    losses = torch.stack([F.cross_entropy(t * logits, labels) for t in temperatures])
    return float(temperatures[int(losses.argmin())])


@dataclass(frozen=True)
class Candidate:
    prior: str
    method: str
    params: Params

    def describe(self) -> str:
        grid = ", ".join(f"{k}={v:g}" for k, v in self.params)
        where = "" if self.prior == NO_PRIOR else f" on {self.prior}"
        return f"{self.method}[{grid}]{where}" if grid else f"{self.method}{where}"


@dataclass(frozen=True)
class Score:
    accuracy: float
    loss: float
    calibrated_loss: float

    def key(self) -> tuple[float, float]:
        """Larger is better."""
        return (-self.calibrated_loss, self.accuracy)


@dataclass(frozen=True)
class Choice:
    """One candidate, or an ensemble of several: the mean of their calibrated logits
    (`temperatures`, fitted on their OOF logits), which stays a linear head when they are."""

    members: tuple[Candidate, ...]
    score: Score
    temperatures: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        if len(self.members) == 1:
            return self.members[0].method
        return "ensemble(" + "+".join(m.method for m in self.members) + ")"

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.members)


@dataclass
class CrossValidation:
    oof: dict[Candidate, torch.Tensor]  # [N, C] held-out logits per candidate
    labels: torch.Tensor
    folds: int
    scores: dict[Candidate, Score] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = {c: score_logits(logits, self.labels) for c, logits in self.oof.items()}

    def best_per_method(self) -> dict[str, Candidate]:
        best: dict[str, Candidate] = {}
        for c, s in self.scores.items():
            if c.method not in best or s.key() > self.scores[best[c.method]].key():
                best[c.method] = c
        return best


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> Score:
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    calibrated = float(F.cross_entropy(calibrate(logits, labels) * logits, labels))
    return Score(accuracy, float(F.cross_entropy(logits, labels)), calibrated)


def cross_validate(
    shots: Shots,
    priors: Mapping[str, torch.Tensor],
    scale: float,
    methods: Sequence[FeatureMethod],
    *,
    folds: int | None = None,
    seed: int = CV_SEED,
) -> CrossValidation:
    """OOF logits of every (prior, method, grid point) on the labelled shots."""
    k = default_folds(shots) if folds is None else folds
    parts = stratified_folds(shots.labels, k, seed)
    n = shots.labels.shape[0]
    oof: dict[Candidate, torch.Tensor] = {}
    for held in parts:
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        train = shots.subset(torch.nonzero(keep).flatten())
        held_feats = shots.features[held, 0]
        shared: dict[str, object] = {}
        for position, (prior_name, prior) in enumerate(priors.items()):
            ctx = FitContext(train, prior, scale, shared)
            for method in methods:
                if not method.uses_prior and position > 0:
                    continue
                with torch.no_grad():
                    fitted = method.fit(ctx)
                    for grid, classify in fitted.items():
                        cand = Candidate(prior_name if method.uses_prior else NO_PRIOR, method.name, grid)
                        if cand not in oof:
                            oof[cand] = torch.zeros(n, shots.num_classes)
                        oof[cand][held] = classify(held_feats).float()
    return CrossValidation(oof, shots.labels, len(parts))


def ensemble_of(cv: CrossValidation, members: Sequence[Candidate]) -> Choice:
    """The members' calibrated OOF logits averaged, scored like any candidate."""
    temperatures = tuple(calibrate(cv.oof[c], cv.labels) for c in members)
    logits = mean_of_scaled(cv, members, temperatures)
    return Choice(tuple(members), score_logits(logits, cv.labels), temperatures)


def mean_of_scaled(
    cv: CrossValidation, members: Sequence[Candidate], temperatures: Sequence[float]
) -> torch.Tensor:
    """mean_i t_i · OOF_i: an ensemble's out-of-fold logits (as `refit` combines its members)."""
    return torch.stack([t * cv.oof[c] for t, c in zip(temperatures, members, strict=True)]).mean(dim=0)


def choose(cv: CrossValidation, *, methods: Sequence[str] | None = None, ensembles: bool = True) -> Choice:
    """The best single candidate, or ensemble of the top 2 or 3 methods' best grid points."""
    best = cv.best_per_method()
    allowed = [m for m in best if methods is None or m in methods]
    ranked = sorted((best[m] for m in allowed), key=lambda c: cv.scores[c].key(), reverse=True)
    if not ranked:
        raise ValueError("no candidate to choose from")
    options = [Choice((ranked[0],), cv.scores[ranked[0]])]
    if ensembles:
        for size in (2, 3):
            if len(ranked) >= size:
                options.append(ensemble_of(cv, ranked[:size]))
    chosen = max(options, key=lambda o: o.score.key())
    logger.info("selected %s (CV accuracy %.4f)", chosen.describe(), chosen.score.accuracy)
    return chosen


def refit(
    choice: Choice,
    shots: Shots,
    priors: Mapping[str, torch.Tensor],
    scale: float,
    methods: Mapping[str, FeatureMethod] | None = None,
) -> Classifier:
    """The chosen candidate(s) fitted on every labelled shot."""
    known = default_methods() if methods is None else methods
    fitted: list[Classifier] = []
    contexts: dict[str, FitContext] = {}
    shared: dict[str, object] = {}
    any_prior = next(iter(priors.values()))
    for member in choice.members:
        prior = any_prior if member.prior == NO_PRIOR else priors[member.prior]
        ctx = contexts.setdefault(member.prior, FitContext(shots, prior, scale, shared))
        with torch.no_grad():
            fitted.append(known[member.method].fit(ctx)[member.params])
    if len(fitted) == 1:
        return fitted[0]
    return SpacedClassifier.total(fitted, [t / len(fitted) for t in choice.temperatures])


@dataclass(frozen=True)
class Selection:
    choice: Choice
    classifier: Classifier
    cv: CrossValidation

    @property
    def cv_accuracy(self) -> float:
        return self.choice.score.accuracy

    def oof_logits(self) -> torch.Tensor:
        """The choice's out-of-fold logits, `[N, C]` (an ensemble's: as `refit` combines them)."""
        members = self.choice.members
        if len(members) == 1:
            return self.cv.oof[members[0]]
        return mean_of_scaled(self.cv, members, self.choice.temperatures)

    def method_scores(self) -> dict[str, float]:
        """Each method's best CV accuracy (for the report)."""
        return {m: self.cv.scores[c].accuracy for m, c in self.cv.best_per_method().items()}


def select_and_fit(
    shots: Shots,
    priors: Mapping[str, torch.Tensor],
    scale: float,
    methods: Mapping[str, FeatureMethod] | None = None,
    *,
    allowed: Sequence[str] | None = None,
    ensembles: bool = True,
    folds: int | None = None,
) -> Selection:
    """Cross-validate everything, choose, refit on all shots."""
    known = default_methods() if methods is None else dict(methods)
    cv = cross_validate(shots, priors, scale, list(known.values()), folds=folds)
    choice = choose(cv, methods=allowed, ensembles=ensembles)
    return Selection(choice, refit(choice, shots, priors, scale, known), cv)


def accuracy(classifier: Classifier, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((classifier(features).argmax(dim=1) == labels).float().mean())
