"""Three variants of the default's feature stage, on cached real features (in-process).

Each variant is the default's CV (client.fewshot.select: zero-shot, GDA, CLAP, linear probe,
power spaces, calibrated rule, ensembles) with one thing changed, refitted on every labelled
image and scored once on the test images:
- `templates`: the zero-shot priors from other template sets (80 + "a photo of a", the 7
  "simple" ones, 7 + "a photo of a", "a photo of a" alone), at several shot counts;
- `centring`: SimpleShot's CL2N, the labelled images' mean feature subtracted before
  normalising (in the served space, or after the β = 0.5 power transform);
- `repeated-cv`: the 5-fold CV run with three fold seeds, candidates and ensembles ranked by
  their scores averaged over the three.

    python -m benchmarks.feature_stage_variants templates --shots 1 4 16 \\
        --features runs/fewshot/fashion-mnist.pt runs/fewshot/digits.pt runs/fewshot/emoji.pt
    python -m benchmarks.feature_stage_variants centring --features runs/fewshot/fashion-mnist.pt
    python -m benchmarks.feature_stage_variants repeated-cv --features runs/fewshot/*.pt
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.fewshot_eval import priors_of
from benchmarks.selection_ablation import LINEAR, labelled_split
from client.adapters import power_features
from client.fewshot.methods import FeatureMethod, default_methods
from client.fewshot.select import (
    Candidate,
    Choice,
    CrossValidation,
    Score,
    accuracy,
    choose,
    cross_validate,
    ensemble_of,
    refit,
    select_and_fit,
)
from client.fewshot.shots import Shots

TEMPLATE_PRIORS: dict[str, tuple[str, ...]] = {
    "80 + a photo of a (default)": ("single", "openai80"),
    "simple 7": ("simple7",),
    "simple 7 + a photo of a": ("single", "simple7"),
    "a photo of a": ("single",),
}
CENTRING_POWERS = {"served": 1.0, "after beta=0.5": 0.5}
FOLD_SEEDS = (0, 1, 2)


def linear_methods() -> dict[str, FeatureMethod]:
    known = default_methods()
    return {m: known[m] for m in LINEAR}


def test_accuracy(classifier: Callable[[torch.Tensor], torch.Tensor], blob: dict[str, Any]) -> float:
    return 100 * accuracy(classifier, blob["test"], blob["test_labels"])


def templates(blob: dict[str, Any], shots: int, seed: int) -> dict[str, float]:
    every = priors_of(blob)
    labelled, _, scale = labelled_split(blob, shots, seed)
    out = {}
    for name, keys in TEMPLATE_PRIORS.items():
        selection = select_and_fit(labelled, {k: every[k] for k in keys}, scale, linear_methods())
        out[name] = test_accuracy(selection.classifier, blob)
    return out


def centring(blob: dict[str, Any], shots: int, seed: int) -> dict[str, float]:
    labelled, priors, scale = labelled_split(blob, shots, seed)
    out = {
        "default": test_accuracy(select_and_fit(labelled, priors, scale, linear_methods()).classifier, blob)
    }
    for name, beta in CENTRING_POWERS.items():
        mean = power_features(labelled.features[:, 0], beta).mean(dim=0)

        def centred(features: torch.Tensor, beta: float = beta, mean: torch.Tensor = mean) -> torch.Tensor:
            return F.normalize(power_features(features, beta) - mean, dim=-1)

        moved = Shots.of(centred(labelled.features[:, :1]), labelled.labels, labelled.num_classes)
        selection = select_and_fit(moved, priors, scale, linear_methods())
        out[f"centred, {name}"] = test_accuracy(_composed(selection.classifier, centred), blob)
    return out


def _composed(
    classifier: Callable[[torch.Tensor], torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda features: classifier(transform(features))


def _mean_key(scores: Sequence[Score]) -> tuple[float, float]:
    return (
        -statistics.fmean(s.calibrated_loss for s in scores),
        statistics.fmean(s.accuracy for s in scores),
    )


def choose_over_repeats(cvs: Sequence[CrossValidation]) -> Choice:
    """`choose`'s rule on scores averaged over several fold draws."""
    key = {c: _mean_key([cv.scores[c] for cv in cvs]) for c in cvs[0].scores}
    best: dict[str, Candidate] = {}
    for cand, value in key.items():
        if cand.method not in best or value > key[best[cand.method]]:
            best[cand.method] = cand
    ranked = sorted(best.values(), key=lambda c: key[c], reverse=True)
    options = [(key[ranked[0]], Choice((ranked[0],), cvs[0].scores[ranked[0]]))]
    for size in (2, 3):
        if len(ranked) >= size:
            each = [ensemble_of(cv, ranked[:size]) for cv in cvs]
            temps = tuple(statistics.fmean(e.temperatures[i] for e in each) for i in range(size))
            options.append(
                (_mean_key([e.score for e in each]), Choice(tuple(ranked[:size]), each[0].score, temps))
            )
    return max(options, key=lambda option: option[0])[1]


def repeated_cv(blob: dict[str, Any], shots: int, seed: int) -> dict[str, float]:
    labelled, priors, scale = labelled_split(blob, shots, seed)
    methods = linear_methods()
    cvs = [cross_validate(labelled, priors, scale, list(methods.values()), seed=s) for s in FOLD_SEEDS]

    def scored(choice: Choice) -> float:
        return test_accuracy(refit(choice, labelled, priors, scale, methods), blob)

    return {
        "one fold seed (default)": scored(choose(cvs[0])),
        "three fold seeds": scored(choose_over_repeats(cvs)),
    }


STUDIES: dict[str, Callable[[dict[str, Any], int, int], dict[str, float]]] = {
    "templates": templates,
    "centring": centring,
    "repeated-cv": repeated_cv,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--shots", type=int, nargs="+", default=[16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in args.features:
        blob = torch.load(path, weights_only=True)
        for shots in args.shots:
            runs = [STUDIES[args.study](blob, shots, seed) for seed in args.seeds]
            summary = {name: round(statistics.fmean(r[name] for r in runs), 2) for name in runs[0]}
            per_seed = {name: [round(r[name], 1) for r in runs] for name in runs[0]}
            print(
                json.dumps({"data": blob["data"], "shots": shots, "mean": summary, "per_seed": per_seed}),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
