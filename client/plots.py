"""Every plot cbbt draws: a run's curve (curve.png) and the bench's summary figures.

Plots read records and curves only (no registry): a record's `kind` and `black_box` pick its
marker and line style, and the caller gives the method order.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from client.grouping import Group, groups, mean_std, ordered_methods
from client.run_folder import RunFolder

CurvePoints = list[dict[str, float]]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(curve: CurvePoints, path: Path, *, title: str = "") -> None:
    plt = _pyplot()
    items = [p["items"] for p in curve]
    accuracy = [p["val_accuracy"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(items, accuracy, marker=".", linewidth=1)
    ax.set_xlabel("items spent (images + text sequences encoded)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _load_curve(record: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(items including features, best validation accuracy so far) along the run."""
    path = RunFolder(Path(record["run_dir"])).curve
    if not path.exists():
        return []
    offset = int(record["items_including_features"]) - int(record["items_charged"])
    points = [p for p in json.loads(path.read_text()) if p.get("val_accuracy") is not None]
    out: list[tuple[float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["items"], p["step"])):
        best = max(best, float(p["val_accuracy"]))
        out.append((float(p["items"]) + offset, best))
    return out


def _mean_curve(curves: Sequence[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Average step functions (value held until the next point) over a shared x grid."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    xs = sorted({x for c in curves for x, _ in c if x >= max(c2[0][0] for c2 in curves)})
    ys = []
    for x in xs:
        values = []
        for c in curves:
            held = [y for cx, y in c if cx <= x]
            values.append(held[-1] if held else c[0][1])
        ys.append(statistics.fmean(values))
    return xs, ys


_MARKERS = {"tune": "o", "feature": "s", "whitebox": "D"}


def _style(group: Group, index: int) -> dict[str, Any]:
    """A distinct colour per method (tab20), a marker per kind, dashed for white-box references."""
    import matplotlib

    first = group.runs[0] if group.runs else {}
    return {
        # tab20's dark shades first (ten distinct hues), then its light ones.
        "color": matplotlib.colormaps["tab20"]((2 * index) % 20 + (2 * index // 20) % 2),
        "marker": _MARKERS.get(str(first.get("kind", "tune")), "o"),
        "white_box": not bool(first.get("black_box", True)),
    }


def plot_items(
    records: Sequence[Mapping[str, Any]], order: Sequence[str], path_of: Callable[[int], Path]
) -> None:
    """Per shot count: validation accuracy against items (lines), final test accuracy (markers)."""
    plt = _pyplot()
    table = groups(records, order)
    order = ordered_methods(records, order)
    for shots in sorted({g.shots for g in table}):
        fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
        for g in (g for g in table if g.shots == shots):
            style = _style(g, order.index(g.method))
            tests = [100 * v for v in g.values("test_accuracy")]
            mean_t, std_t = mean_std(tests)
            if style["white_box"]:
                ax.axhline(mean_t, color=style["color"], linestyle="--", label=f"{g.method} (not black-box)")
                continue
            xs, ys = _mean_curve([_load_curve(r) for r in g.runs])
            if len(xs) > 1:
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    color=style["color"],
                    linewidth=1.2,
                    alpha=0.8,
                    drawstyle="steps-post",
                )
            items = g.values("items_including_features")
            ax.errorbar(
                [statistics.fmean(items)],
                [mean_t],
                yerr=[std_t],
                color=style["color"],
                marker=style["marker"],
                capsize=3,
                label=g.method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("items spent, image features included (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(
            f"{shots}-shot: lines = validation accuracy of the checkpoint selected so far "
            "(mean over seeds);\n"
            "markers = final test accuracy (mean ± std); squares = zero-prompt-query feature methods",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path_of(shots))
        plt.close(fig)


def plot_shots(records: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path) -> None:
    """Test accuracy against shots per class, one line per method."""
    plt = _pyplot()
    table = groups(records, order)
    order = ordered_methods(records, order)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for method in ordered_methods([r for g in table for r in g.runs], order):
        rows = sorted((g for g in table if g.method == method), key=lambda g: g.shots)
        style = _style(rows[0], order.index(method))
        stats = [mean_std(g.values("test_accuracy"), 100.0) for g in rows]
        ax.errorbar(
            [g.shots for g in rows],
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            color=style["color"],
            marker=style["marker"],
            linestyle="--" if style["white_box"] else "-",
            capsize=3,
            label=method + (" (not black-box)" if style["white_box"] else ""),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
