"""The shot curve of the default `cbbt` against the best feature method and zero-shot.

Reads the `results.json` a `cbbt bench` run wrote (e.g. `--methods cbbt fewshot-cv --shots 1 2
4 8 16`) and plots test accuracy against shots per class for each method, plus the zero-shot
accuracy of the default's own prior (the 80-template ensemble, from the `cbbt` runs' reports).

    python -m benchmarks.default_curve runs/bench-default-fm/fashion-mnist/results.json \
        --out docs/img/default_shots.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def series(
    runs: list[dict[str, object]], method: str, field: str
) -> tuple[list[int], list[float], list[float]]:
    by_shots: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        report = run.get("report")
        if run.get("method") == method and isinstance(report, dict) and run.get("status") != "failed":
            by_shots[int(str(run["shots"]))].append(100.0 * float(report[field]))
    shots = sorted(by_shots)
    means = [statistics.mean(by_shots[s]) for s in shots]
    stds = [statistics.stdev(by_shots[s]) if len(by_shots[s]) > 1 else 0.0 for s in shots]
    return shots, means, stds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--methods", nargs="+", default=["cbbt", "fewshot-cv", "gda", "clap", "linear-probe"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method in args.methods:
        shots, means, stds = series(runs, method, "test_accuracy")
        if len(shots) > 1:
            ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=method)
    shots, means, stds = series(runs, "cbbt", "zero_shot_test_accuracy")
    ax.errorbar(shots, means, yerr=stds, linestyle=":", color="grey", label="zero-shot (80 templates)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{results['data']}: the default cbbt against the best feature method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
