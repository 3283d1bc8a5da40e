"""report.json and curve.png (validation accuracy against items spent)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict[str, object], curve: list[dict[str, float]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=2))
    (out_dir / "curve.json").write_text(json.dumps(_finite(curve)))
    plot_curve(curve, out_dir / "curve.png", title=f"{report.get('method')} · {report.get('shots')}-shot")


def plot_curve(curve: list[dict[str, float]], path: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
