"""What each part of the default `cbbt`'s feature stage buys, on cached real features.

The default chooses among its linear heads (zero-shot, GDA, the CLAP probe, the plain probe)
by 5-fold CV over every labelled image. Three choices made that stage what it is, and this
script undoes them one at a time on the same CV (one `cross_validate` per split, every
variant choosing from its out-of-fold logits):
- the feature spaces: the served features only (β = 1), or also their power transforms
  (β = 0.5, 0.25; `client.adapters.power_features`);
- the ranking rule: OOF accuracy (then raw log-loss), or calibrated OOF log-loss (then
  accuracy);
- ensembles: none, or the mean of the top 2-3 methods' calibrated logits.
Each variant's choice is refitted on all labelled images and scored once on the test images.

    python -m benchmarks.selection_ablation --features runs/fewshot/fashion-mnist.pt \\
        runs/fewshot/digits.pt runs/fewshot/lfw.pt --out runs/fewshot/ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.fewshot_eval import priors_of
from client.data import few_shot_split, load_dataset
from client.fewshot.methods import default_methods
from client.fewshot.select import (
    Candidate,
    Choice,
    CrossValidation,
    Score,
    accuracy,
    cross_validate,
    ensemble_of,
    refit,
)
from client.fewshot.shots import Shots

LINEAR = ("zero-shot", "gda", "clap", "linear-probe")
RULES: dict[str, Callable[[Score], tuple[float, float]]] = {
    "accuracy": lambda s: (s.accuracy, -s.loss),
    "calibrated-loss": lambda s: s.key(),
}


@dataclass(frozen=True)
class Variant:
    name: str
    powers: tuple[float, ...]
    rule: str
    ensembles: bool


VARIANTS = (
    Variant("before: served space, accuracy, no ensembles", (1.0,), "accuracy", False),
    Variant("+ power spaces", (1.0, 0.5, 0.25), "accuracy", False),
    Variant("+ calibrated-loss rule", (1.0,), "calibrated-loss", False),
    Variant("power spaces + calibrated-loss rule", (1.0, 0.5, 0.25), "calibrated-loss", False),
    Variant("served space + rule + ensembles", (1.0,), "calibrated-loss", True),
    Variant("now: all three", (1.0, 0.5, 0.25), "calibrated-loss", True),
)


def power_of(candidate: Candidate) -> float:
    return dict(candidate.params).get("power", 1.0)


def choose_variant(cv: CrossValidation, variant: Variant) -> Choice:
    key = RULES[variant.rule]
    best: dict[str, Candidate] = {}
    for cand, score in cv.scores.items():
        if power_of(cand) not in variant.powers:
            continue
        if cand.method not in best or key(score) > key(cv.scores[best[cand.method]]):
            best[cand.method] = cand
    ranked = sorted(best.values(), key=lambda c: key(cv.scores[c]), reverse=True)
    options = [Choice((ranked[0],), cv.scores[ranked[0]])]
    if variant.ensembles:
        options += [ensemble_of(cv, ranked[:size]) for size in (2, 3) if len(ranked) >= size]
    return max(options, key=lambda o: key(o.score))


def labelled_split(
    blob: dict[str, Any], shots: int, seed: int
) -> tuple[Shots, dict[str, torch.Tensor], float]:
    """A split's labelled images (one view) as a `cbbt` run pools them, the default's two
    zero-shot priors, and the logit scale, from a `fewshot_features` cache."""
    split = few_shot_split(load_dataset(blob["data"]), shots, seed, max_test_per_class=100)
    index = {s: i for i, s in enumerate(blob["sources"])}
    rows = torch.tensor([index[e.source] for e in split.train + split.val])
    labelled = Shots.of(blob["features"][rows, :1], blob["labels"][rows], len(blob["class_names"]))
    every = priors_of(blob)
    return labelled, {"single": every["single"], "openai80": every["openai80"]}, float(blob["logit_scale"])


def evaluate(blob: dict[str, Any], shots: int, seed: int) -> list[dict[str, Any]]:
    labelled, priors, scale = labelled_split(blob, shots, seed)
    known = default_methods()
    methods = {m: known[m] for m in LINEAR}
    cv = cross_validate(labelled, priors, scale, list(methods.values()))
    out = []
    for variant in VARIANTS:
        choice = choose_variant(cv, variant)
        classifier = refit(choice, labelled, priors, scale, methods)
        out.append(
            {
                "data": blob["data"],
                "shots": shots,
                "seed": seed,
                "variant": variant.name,
                "choice": choice.describe(),
                "cv": choice.score.accuracy,
                "test": accuracy(classifier, blob["test"], blob["test_labels"]),
            }
        )
    return out


def table(records: list[dict[str, Any]]) -> str:
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    datas: list[str] = []
    for r in records:
        by[(r["variant"], r["data"])].append(100 * r["test"])
        if r["data"] not in datas:
            datas.append(r["data"])
    lines = ["| feature stage | " + " | ".join(datas) + " |", "|---" * (len(datas) + 1) + "|"]
    for variant in VARIANTS:
        cells = []
        for data in datas:
            values = by[(variant.name, data)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records: list[dict[str, Any]] = []
    for path in args.features:
        blob = torch.load(path, weights_only=True)
        for seed in args.seeds:
            records += evaluate(blob, args.shots, seed)
            print(f"{blob['data']} seed {seed}: done", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
