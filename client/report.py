"""The one report every run writes (tuner, feature method, white-box reference): report.json,
its curve (curve.json) and the curve's plot (curve.png), in the run's `RunFolder`.

A new report field is a field of `RunReport` (with a default, so older report.json files
still load); the bench's tables read reports through `RunReport.load`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from client.api import QueryCounter
from client.data import FewShotSplit
from client.plots import plot_curve
from client.run_folder import RunFolder
from client.selection import CurvePoint
from shared.schemas import ModelCard
from shared.tiers import smallest_tier

logger = logging.getLogger(__name__)


def json_safe(value: object) -> object:
    """NaN and infinities become null (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass
class RunReport:
    """What one run did, cost and scored. Accuracies in [0, 1]; items as the server charges them."""

    method: str  # the registry name (client.methods)
    shots: int
    seed: int
    model: str
    classes: int
    zero_shot_val_accuracy: float
    zero_shot_test_accuracy: float
    val_accuracy: float
    test_accuracy: float
    queries: dict[str, int]  # QueryCounter: calls, items, loss_evaluations, retries
    feature_items_charged: int  # image features this run paid for (the rest came from the cache)
    test_images: int
    wall_seconds: float
    budget: int | None = None
    val_loss: float | None = None
    selected_step: int | None = None  # tuners: the step (or adapter epoch) selected on validation
    selected: dict[str, object] = field(default_factory=dict)  # hyperparameters chosen on validation
    prompt_steps: int | None = None
    adapter_epochs: int | None = None
    stopped_reason: str | None = None
    items_not_needed: int | None = None  # planned items an early-stopping run did not spend
    # Classes that had fewer labelled images than shots + validation: name -> shots trained on.
    short_classes: dict[str, int] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    white_box: bool = False
    # The API tier the run needed (embeddings | predictions | full): the narrowest one offering
    # every route it called (shared.tiers.smallest_tier); None for in-process runs.
    tier: str | None = None
    note: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def load(cls, folder: RunFolder) -> RunReport:
        return cls.from_dict(json.loads(folder.report.read_text()))

    def summary(self) -> str:
        q = self.queries
        fewer = f" ({len(self.short_classes)} classes with fewer)" if self.short_classes else ""
        return (
            f"method {self.method}, {self.shots}-shot{fewer}, seed {self.seed}"
            f"{f' ({self.tier} tier)' if self.tier else ''}: "
            f"test accuracy {self.test_accuracy:.4f} (zero-shot {self.zero_shot_test_accuracy:.4f}), "
            f"val {self.val_accuracy:.4f}; queries: {q['calls']} calls, {q['items']} items, "
            f"{q['loss_evaluations']} loss evaluations; {self.wall_seconds:.0f} s"
            + (
                f"; stopped early ({self.stopped_reason}): {self.items_not_needed} planned items not needed"
                if self.items_not_needed
                else ""
            )
        )


def tier_used(counter: QueryCounter) -> str | None:
    """The API tier the routes this run called amount to."""
    tier = smallest_tier(counter.routes)
    return None if tier is None else tier.value


def write_report(report: RunReport, curve: list[CurvePoint], folder: RunFolder) -> None:
    folder.create()
    folder.report.write_text(json.dumps(json_safe(report.as_dict()), indent=2))
    folder.curve.write_text(json.dumps(json_safe(curve)))
    plot_curve(curve, folder.curve_plot, title=f"{report.method} · {report.shots}-shot")


def finish_report(
    folder: RunFolder,
    curve: list[CurvePoint],
    *,
    method: str,
    split: FewShotSplit,
    card: ModelCard,
    counter: QueryCounter,
    scores: tuple[float, float, float, float | None, float],
    feature_items_charged: int,
    started: float,
    **details: Any,
) -> RunReport:
    """The report every run ends with, written to its folder. `scores`: zero-shot val and test
    accuracy, then the selected checkpoint's val accuracy, val loss, and its test accuracy."""
    zero_val, zero_test, val_accuracy, val_loss, test_accuracy = scores
    report = RunReport(
        method=method,
        shots=split.shots,
        short_classes=dict(split.short_classes),
        seed=split.seed,
        model=card.id,
        classes=len(split.class_names),
        zero_shot_val_accuracy=zero_val,
        zero_shot_test_accuracy=zero_test,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        test_accuracy=test_accuracy,
        queries=counter.as_dict(),
        feature_items_charged=feature_items_charged,
        test_images=len(split.test),
        wall_seconds=time.time() - started,
        tier=tier_used(counter),
        **details,
    )
    write_report(report, curve, folder)
    return report
