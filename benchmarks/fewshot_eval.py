"""Evaluate the few-shot feature methods and their CV selection on cached real features.

Reads the files `benchmarks/fewshot_features.py` wrote, rebuilds each (shots, seed) split with
the client's own `few_shot_split` (smaller shot counts are nested in the 16-shot draw), and for
every split cross-validates every method × grid point × template set on the labelled shots
(train + validation) only, refits, and scores the test images once. One JSON line per
(data, shots, seed, views, prior set) goes to `--out`:
- `selected`: what the CV rule chose, its CV accuracy and its test accuracy;
- `methods`: for each method, its CV-best grid point's CV and test accuracy;
- `zero_shot`: test accuracy of each template set's zero-shot classifier;
- `items`: what the run would pay on the API (labelled images × views + test + C × templates).

    python -m benchmarks.fewshot_eval --features runs/fewshot/digits.pt --out runs/fewshot/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.adapters import clip_logits
from client.data import few_shot_split, load_dataset
from client.fewshot.methods import default_methods
from client.fewshot.select import accuracy, choose, cross_validate, refit
from client.fewshot.shots import Shots
from client.fewshot.templates import ensemble

logger = logging.getLogger("cbbt.fewshot_eval")

PRIOR_SETS: dict[str, tuple[str, ...]] = {
    "single": ("single",),
    "openai80": ("openai80",),
    "all": ("single", "simple7", "openai80"),
    "default": ("single", "openai80"),  # what fewshot-cv uses
}


def priors_of(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    text = blob["text"]
    return {
        "single": text["single"][0],
        "simple7": ensemble(text["simple7"]),
        "openai80": ensemble(text["openai80"]),
    }


@dataclass(frozen=True)
class ZeroShotOf:
    prior: torch.Tensor
    scale: float

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return clip_logits(features, self.prior, self.scale)


def template_count(blob: dict[str, Any], names: tuple[str, ...]) -> int:
    """Distinct templates bought: the single template is one of the 80, so it costs nothing extra."""
    used = {blob["templates"]["single"][0]} if "single" in names else set()
    for name in names:
        if name != "single":
            used.update(blob["templates"][name])
    return len(used)


def evaluate(blob: dict[str, Any], shots: int, seed: int, views: int, prior_set: str) -> dict[str, Any]:
    dataset = load_dataset(blob["data"])
    split = few_shot_split(dataset, shots, seed, max_test_per_class=100)
    index = {s: i for i, s in enumerate(blob["sources"])}
    rows = torch.tensor([index[e.source] for e in split.train + split.val])
    classes = len(blob["class_names"])
    labelled = Shots.of(blob["features"][rows, :views], blob["labels"][rows], classes)
    test, test_labels = blob["test"], blob["test_labels"]
    assert [e.label for e in split.test] == test_labels.tolist(), "test split differs from the cached one"
    all_priors = priors_of(blob)
    names = PRIOR_SETS[prior_set]
    priors = {n: all_priors[n] for n in names}
    scale = float(blob["logit_scale"])
    methods = default_methods()
    started = time.time()
    cv = cross_validate(labelled, priors, scale, list(methods.values()))
    choice = choose(cv)
    selected = refit(choice, labelled, priors, scale, methods)
    per_method: dict[str, dict[str, Any]] = {}
    for name, cand in cv.best_per_method().items():
        single = choose(cv, methods=[name], ensembles=False)
        clf = refit(single, labelled, priors, scale, methods)
        per_method[name] = {
            "cv": cv.scores[cand].accuracy,
            "test": accuracy(clf, test, test_labels),
            "chosen": cand.describe(),
        }
    zero = {n: accuracy(ZeroShotOf(p, scale), test, test_labels) for n, p in all_priors.items()}
    return {
        "data": blob["data"],
        "shots": shots,
        "seed": seed,
        "views": views,
        "priors": prior_set,
        "labelled": int(rows.numel()),
        "folds": cv.folds,
        "selected": {
            "name": choice.name,
            "describe": choice.describe(),
            "cv": choice.score.accuracy,
            "test": accuracy(selected, test, test_labels),
        },
        "methods": per_method,
        "zero_shot": zero,
        "items": int(rows.numel()) * views + int(test.shape[0]) + classes * template_count(blob, names),
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--shots", type=int, nargs="+", default=[16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--views", type=int, nargs="+", default=[1])
    parser.add_argument("--priors", nargs="+", default=["all"], choices=sorted(PRIOR_SETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path in args.features:
        blob = torch.load(path, weights_only=True)
        for shots in args.shots:
            for views in args.views:
                for prior_set in args.priors:
                    for seed in args.seeds:
                        record = evaluate(blob, shots, seed, views, prior_set)
                        with args.out.open("a") as fh:
                            fh.write(json.dumps(record) + "\n")
                        sel = record["selected"]
                        best = max(record["methods"].items(), key=lambda kv: kv[1]["test"])
                        print(
                            f"{blob['data'][:20]:20s} K={shots:2d} v={views} {prior_set:8s} s={seed} "
                            f"sel={sel['name'][:28]:28s} cv={sel['cv']:.3f} test={sel['test']:.3f} | "
                            + " ".join(f"{m}={r['test']:.3f}" for m, r in record["methods"].items())
                            + f" | best {best[0]} | {record['seconds']:.0f}s",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
