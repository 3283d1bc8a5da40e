"""report.json and curve.png (validation accuracy against items spent)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def json_safe(value: object) -> object:
    """NaN and infinities become null (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict[str, object], curve: list[dict[str, float]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(json_safe(report), indent=2))
    (out_dir / "curve.json").write_text(json.dumps(json_safe(curve)))
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
