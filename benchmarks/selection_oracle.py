"""How much is left on cached features: the default's feature stage against a test-peeking oracle,
and with kernel ridge regression (KRR) as one more method.

For each split, one `cross_validate` over the default's linear methods plus KRR; then
- `default`: the default's choice among the linear methods (as `cbbt` chooses), refitted;
- `oracle`: every linear candidate refitted on all labelled images and scored on the test
  images, the best taken (peeks at the test split: an upper bound, not a method);
- `default+krr`: the same rule with KRR allowed; `krr`: KRR alone, chosen by the rule.

    python -m benchmarks.selection_oracle --features runs/fewshot/fashion-mnist.pt \\
        runs/fewshot/digits.pt --out runs/fewshot/oracle.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.selection_ablation import LINEAR, labelled_split
from client.adapters import power_features
from client.fewshot.methods import POWERS, Classifier, FitContext, Params, default_methods, params, with_power
from client.fewshot.select import NO_PRIOR, Candidate, accuracy, choose, cross_validate, refit


@dataclass(frozen=True)
class KernelRidge:
    """One-hot (centred) labels regressed on an RBF kernel of the features, per power space."""

    gammas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    lams: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    powers: tuple[float, ...] = POWERS
    name: str = "krr"
    uses_prior: bool = False

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        out: dict[Params, Classifier] = {}
        for power in self.powers:
            x, y = ctx.powered(power).flat
            targets = F.one_hot(y, ctx.shots.num_classes).float() - 1.0 / ctx.shots.num_classes
            gram = x @ x.T
            for gamma in self.gammas:
                kernel = torch.exp(-gamma * (2 - 2 * gram))
                for lam in self.lams:
                    weights = torch.linalg.solve(kernel + lam * torch.eye(len(x)), targets)
                    out[with_power(params(gamma=gamma, lam=lam), power)] = _krr(x, weights, gamma, power)
        return out


def _krr(support: torch.Tensor, weights: torch.Tensor, gamma: float, power: float) -> Classifier:
    def classify(features: torch.Tensor) -> torch.Tensor:
        feats = power_features(F.normalize(features, dim=-1), power)
        return torch.exp(-gamma * (2 - 2 * feats @ support.T)) @ weights

    return classify


def evaluate(blob: dict[str, Any], shots: int, seed: int) -> dict[str, Any]:
    labelled, priors, scale = labelled_split(blob, shots, seed)
    known = default_methods()
    methods = {m: known[m] for m in LINEAR} | {"krr": KernelRidge()}
    cv = cross_validate(labelled, priors, scale, list(methods.values()))
    test_feats, test_labels = blob["test"], blob["test_labels"]
    row: dict[str, Any] = {"data": blob["data"], "shots": shots, "seed": seed}
    for name, allowed in (("default", list(LINEAR)), ("default+krr", [*LINEAR, "krr"]), ("krr", ["krr"])):
        choice = choose(cv, methods=allowed)
        row[name] = accuracy(refit(choice, labelled, priors, scale, methods), test_feats, test_labels)
        row[name + " choice"] = choice.describe()
    best = 0.0
    shared: dict[str, object] = {}
    for prior_name, prior in priors.items():
        ctx = FitContext(labelled, prior, scale, shared)
        for method in (methods[m] for m in LINEAR):
            if not method.uses_prior and prior_name != "single":
                continue
            for grid, classify in method.fit(ctx).items():
                score = accuracy(classify, test_feats, test_labels)
                if score > best:
                    best = score
                    row["oracle choice"] = Candidate(
                        prior_name if method.uses_prior else NO_PRIOR, method.name, grid
                    ).describe()
    row["oracle"] = best
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for path in args.features:
        blob = torch.load(path, weights_only=True)
        for seed in args.seeds:
            rows.append(evaluate(blob, args.shots, seed))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        for column in ("default", "oracle", "default+krr", "krr"):
            by[(r["data"], column)].append(100 * r[column])
    print("| data | default | oracle | default+krr | krr |\n|---|---|---|---|---|")
    for data in dict.fromkeys(r["data"] for r in rows):
        cells = [
            f"{statistics.fmean(by[(data, c)]):.1f}" for c in ("default", "oracle", "default+krr", "krr")
        ]
        print(f"| {data} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
