"""Prompt tuners at equal items, paired over seeds, from one `cbbt bench` folder.

For each method: test accuracy (mean ± sample std over seeds), its paired difference from a
reference method (mean ± std of the per-seed differences, and the standard error), and the
training loss the run reached (the optimiser's own objective: the full-batch loss at the last
step, where selection on validation adds no noise). Usage:

    python -m benchmarks.estimator_table runs/est-final/fashion-mnist --reference cmaes-prompt-fullbatch
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def runs(root: Path, method: str, shots: int) -> dict[int, tuple[float, float]]:
    """seed -> (test accuracy %, last training loss) for every finished run of `method`."""
    found = {}
    for folder in sorted((root / method / f"{shots}shot").glob("seed*")):
        report, curve = folder / "report.json", folder / "curve.json"
        if not report.exists():
            continue
        points = [p for p in json.loads(curve.read_text()) if p.get("train_loss") == p.get("train_loss")]
        last_loss = points[-1]["train_loss"] if points else float("nan")
        found[int(folder.name.removeprefix("seed"))] = (
            100 * json.loads(report.read_text())["test_accuracy"],
            last_loss,
        )
    return found


def spread(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
        if len(values) > 1
        else f"{values[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a bench folder for one data set (…/fashion-mnist)")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    methods = sorted(p.name for p in args.root.iterdir() if (p / f"{args.shots}shot").is_dir())
    reference = runs(args.root, args.reference, args.shots)
    print(
        "| prompt tuner | seeds | test accuracy | paired − reference (SE) | better on | final training loss |"
    )
    print("|---|---|---|---|---|---|")
    for method in methods:
        mine = runs(args.root, method, args.shots)
        seeds = sorted(set(mine) & set(reference))
        if not seeds:
            continue
        diffs = [mine[s][0] - reference[s][0] for s in seeds]
        paired = "–"
        if method != args.reference and len(diffs) > 1:
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            paired = f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f} ({se:.1f})"
        wins = sum(d > 0 for d in diffs)
        better = f"{wins} of {len(seeds)}" if method != args.reference else "–"
        accuracy = spread([mine[s][0] for s in seeds])
        loss = statistics.mean(mine[s][1] for s in seeds)
        print(f"| {method} | {len(seeds)} | {accuracy} | {paired} | {better} | {loss:.3f} |")


if __name__ == "__main__":
    main()
