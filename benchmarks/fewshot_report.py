"""Tables and the shot curve from `benchmarks/fewshot_eval.py`'s JSON lines.

    python -m benchmarks.fewshot_report runs/fewshot/eval16.jsonl runs/fewshot/curve.jsonl \
        --plot docs/img/fewshot_shots.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

METHOD_ORDER = ("zero-shot", "tip-adapter", "linear-probe", "clap", "gda")


def load(paths: list[Path]) -> list[dict[str, Any]]:
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    return 100 * statistics.fmean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["data"], r["shots"], r["views"])].append(r)
    return dict(sorted(groups.items()))


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | shots | views | seeds | fewshot-cv test | its CV estimate | "
        + " | ".join(METHOD_ORDER)
        + " | zero-shot (1 template) | items |"
    )
    lines = [head, "|" + "---|" * (len(METHOD_ORDER) + 7)]
    for (data, shots, views), group in grouped(rows).items():
        sel = mean_std([r["selected"]["test"] for r in group])
        cv = mean_std([r["selected"]["cv"] for r in group])
        cells = []
        for m in METHOD_ORDER:
            values = [r["methods"][m]["test"] for r in group if m in r["methods"]]
            cells.append("{:.1f} ± {:.1f}".format(*mean_std(values)) if values else "-")
        single = mean_std([r["zero_shot"]["single"] for r in group])
        name = data.replace("imagefolder:runs/", "")
        lines.append(
            f"| {name} | {shots} | {views} | {len(group)} | **{sel[0]:.1f} ± {sel[1]:.1f}** | "
            f"{cv[0]:.1f} ± {cv[1]:.1f} | "
            + " | ".join(cells)
            + f" | {single[0]:.1f} | {group[0]['items']:,} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in rows if r["views"] == 1})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), dpi=110, squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        groups = {k: v for k, v in grouped(rows).items() if k[0] == data and k[2] == 1}
        shots = sorted(k[1] for k in groups)
        series: dict[str, list[float]] = {"fewshot-cv (CV choice)": []}
        series.update({m: [] for m in METHOD_ORDER})
        for k in shots:
            group = groups[(data, k, 1)]
            series["fewshot-cv (CV choice)"].append(mean_std([r["selected"]["test"] for r in group])[0])
            for m in METHOD_ORDER:
                series[m].append(mean_std([r["methods"][m]["test"] for r in group])[0])
        for name, ys in series.items():
            ax.plot(shots, ys, marker="o", linewidth=2.5 if name.startswith("fewshot") else 1.2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(data.replace("imagefolder:runs/", ""))
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = load(args.results)
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
