"""Bench records grouped by (method, shots, budget), and their means and spreads."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def ordered_methods(records: Sequence[Mapping[str, Any]], order: Sequence[str]) -> list[str]:
    """The methods in `records`: those of `order` first, in its order, then the rest sorted."""
    names = [m for m in order if any(r["method"] == m for r in records)]
    return names + sorted({r["method"] for r in records} - set(names))


@dataclass
class Group:
    method: str
    shots: int
    budget: int | None
    runs: list[Mapping[str, Any]]

    def values(self, key: str) -> list[float]:
        """Per-run values: query counts from the report, bench counts from the record, else the report."""
        out = []
        for r in self.runs:
            if key in ("calls", "loss_evaluations"):
                value = (r["report"].get("queries") or {}).get(key)
            else:
                value = r[key] if key in r else r["report"].get(key)
            if value is not None:
                out.append(float(value))
        return out


def groups(records: Sequence[Mapping[str, Any]], order: Sequence[str]) -> list[Group]:
    """Finished runs grouped by (method, shots, budget), methods in `order` (others after)."""
    done = [r for r in records if r.get("report") is not None]
    out: list[Group] = []
    for method in ordered_methods(done, order):
        keys = sorted({(r["shots"], r.get("budget") or 0) for r in done if r["method"] == method})
        for shots, budget in keys:
            runs = [
                r
                for r in done
                if r["method"] == method and r["shots"] == shots and (r.get("budget") or 0) == budget
            ]
            out.append(Group(method, shots, budget or None, sorted(runs, key=lambda r: r["seed"])))
    return out


def mean_std(values: Sequence[float], scale: float = 1.0) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return mean, std
