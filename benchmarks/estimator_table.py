"""Prompt tuners at equal items, paired over seeds, from one `cbbt bench` folder.

For each method: test accuracy (mean ± sample std over seeds), its paired difference from a
reference method (mean ± std of the per-seed differences, and the standard error), the lowest
training loss the run evaluated (the optimiser's own objective, the full-batch loss: no
selection noise), and the prompt items it took to first reach the reference's lowest loss on
the same seed. Usage:

    python -m benchmarks.estimator_table runs/est-final/fashion-mnist --reference cmaes-prompt-fullbatch
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

Run = tuple[float, list[tuple[float, float]]]  # test accuracy %, [(items, training loss)]


def runs(root: Path, method: str, shots: int) -> dict[int, Run]:
    """seed -> its run, for every finished run of `method`."""
    found = {}
    for folder in sorted((root / method / f"{shots}shot").glob("seed*")):
        report, curve = folder / "report.json", folder / "curve.json"
        if not report.exists():
            continue
        points = [(p["items"], p["train_loss"]) for p in json.loads(curve.read_text()) if p.get("train_loss")]
        accuracy = 100 * json.loads(report.read_text())["test_accuracy"]
        found[int(folder.name.removeprefix("seed"))] = (accuracy, points)
    return found


def lowest(run: Run) -> float:
    return min(loss for _, loss in run[1])


def items_to_reach(run: Run, loss: float) -> float:
    """Prompt items spent when the run first evaluated a loss <= `loss` (inf: never)."""
    points = run[1]
    return next((items - points[0][0] for items, value in points if value <= loss), math.inf)


def spread(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
        if len(values) > 1
        else f"{values[0]:.1f}"
    )


def row(method: str, mine: dict[int, Run], reference: dict[int, Run], is_reference: bool) -> str:
    seeds = sorted(set(mine) & set(reference))
    diffs = [mine[s][0] - reference[s][0] for s in seeds]
    paired = better = "–"
    if not is_reference and len(diffs) > 1:
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        paired = f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f} ({se:.1f})"
        better = f"{sum(d > 0 for d in diffs)} of {len(seeds)}"
    reach = [items_to_reach(mine[s], lowest(reference[s])) for s in seeds]
    reached = [r for r in reach if math.isfinite(r)]
    to_reach = (
        f"{statistics.median(reached):,.0f} ({len(reached)} of {len(seeds)} reach it)" if reached else "never"
    )
    low = statistics.mean(lowest(mine[s]) for s in seeds)
    accuracy = spread([mine[s][0] for s in seeds])
    return f"| {method} | {len(seeds)} | {accuracy} | {paired} | {better} | {low:.3f} | {to_reach} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("root", type=Path, help="a bench folder for one data set (…/fashion-mnist)")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    methods = sorted(p.name for p in args.root.iterdir() if (p / f"{args.shots}shot").is_dir())
    reference = runs(args.root, args.reference, args.shots)
    print(
        "| prompt tuner | seeds | test accuracy | paired − reference (SE) | better on | lowest training loss "
        "| prompt items to the reference's lowest loss (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        mine = runs(args.root, method, args.shots)
        if set(mine) & set(reference):
            print(row(method, mine, reference, method == args.reference))


if __name__ == "__main__":
    main()
