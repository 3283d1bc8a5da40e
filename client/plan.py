"""Fit the tuning schedule to the item budget before the run starts.

Items are what the server charges: one image or one text sequence encoded. A run spends
them on (1) image features, once per image and view, (2) the initial prompt (its token
vectors and its C class features), and (3) prompt steps, each `points_per_step * C` items.
The adapter trains on cached features and costs nothing. When the budget cannot pay for the
faithful number of prompt steps, the steps are scaled down (keeping the schedule's shape:
warm-up and adapter start at the same fractions) and the run says so; when it cannot even
pay for the features, the run refuses to start.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from client.errors import BudgetTooSmall

logger = logging.getLogger(__name__)


__all__ = ["BudgetTooSmall", "Plan", "check_features_and_texts", "check_fixed_costs", "make_plan"]


@dataclass(frozen=True)
class Plan:
    feature_items: int
    init_items: int
    items_per_step: int
    faithful_steps: int
    steps: int
    warmup_steps: int
    adapter_start_step: int
    steps_per_epoch: int
    budget: int | None
    scaled: bool

    @property
    def prompt_items(self) -> int:
        return self.steps * self.items_per_step

    @property
    def total_items(self) -> int:
        return self.feature_items + self.init_items + self.prompt_items

    def as_dict(self) -> dict[str, int | bool | None]:
        out: dict[str, int | bool | None] = dict(asdict(self))
        out["total_items"] = self.total_items
        return out

    def describe(self) -> str:
        lines = [
            f"features: {self.feature_items} items; initial prompt: {self.init_items} items",
            f"prompt steps: {self.steps} x {self.items_per_step} items = {self.prompt_items} items",
            f"planned total: {self.total_items} items"
            + (f" of a {self.budget} budget" if self.budget else ""),
        ]
        if self.scaled:
            lines.append(
                f"budget too small for the faithful {self.faithful_steps} prompt steps: scaled down to "
                f"{self.steps} (warm-up {self.warmup_steps}, "
                f"adapter joins at step {self.adapter_start_step}); "
                "the adapter still trains in full, on cached features, at no query cost"
            )
        return "\n".join(lines)


def check_fixed_costs(*, feature_items: int, num_classes: int, budget: int | None) -> int:
    """The initial prompt's items (its token vectors + its C class features); BudgetTooSmall
    when the budget cannot pay for them and the image features (checked before any spending)."""
    init_items = 1 + num_classes
    fixed = feature_items + init_items
    if budget is not None and fixed > budget:
        raise BudgetTooSmall(
            f"a budget of {budget} items cannot pay for the image features and the initial prompt "
            f"({feature_items} + {init_items} = {fixed} items); "
            "raise --budget or lower --views/--test-per-class"
        )
    return init_items


def check_features_and_texts(*, feature_items: int, text_items: int, budget: int | None) -> int:
    """The fixed cost of a run that buys image features and class texts (feature methods, the
    default `cbbt`); BudgetTooSmall before any spending when the budget cannot pay for it."""
    fixed = feature_items + text_items
    if budget is not None and fixed > budget:
        raise BudgetTooSmall(
            f"a budget of {budget} items cannot pay for the image features and the class texts "
            f"({feature_items} + {text_items} = {fixed} items); "
            "raise --budget or lower --views/--test-per-class"
        )
    return fixed


def make_plan(
    *,
    feature_items: int,
    num_classes: int,
    points_per_step: int,
    train_images: int,
    batch_size: int,
    epochs: int,
    adapter_start_epoch: int,
    budget: int | None,
    tunes_prompt: bool,
) -> Plan:
    init_items = check_fixed_costs(feature_items=feature_items, num_classes=num_classes, budget=budget)
    items_per_step = points_per_step * num_classes
    steps_per_epoch = max(1, math.ceil(train_images / batch_size))
    faithful = steps_per_epoch * epochs if tunes_prompt else 0
    fixed = feature_items + init_items
    affordable = faithful if budget is None else min(faithful, (budget - fixed) // max(1, items_per_step))
    scale = affordable / faithful if faithful else 0.0
    warmup = min(affordable, round(steps_per_epoch * scale)) if affordable else 0
    adapter_start = min(affordable, round(steps_per_epoch * adapter_start_epoch * scale))
    plan = Plan(
        feature_items=feature_items,
        init_items=init_items,
        items_per_step=items_per_step,
        faithful_steps=faithful,
        steps=affordable,
        warmup_steps=warmup,
        adapter_start_step=adapter_start,
        steps_per_epoch=steps_per_epoch,
        budget=budget,
        scaled=affordable < faithful,
    )
    if plan.scaled:
        logger.warning(plan.describe().splitlines()[-1])
    return plan
