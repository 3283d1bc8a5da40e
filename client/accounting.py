"""Counting image features honestly across the runs of a bench grid.

All runs share one feature cache. Before the runs of a (shots, seed) split, the bench fetches
that split's image features once (the "feature pass", logged in feature_passes.jsonl), so no
run's count depends on the order of the grid. Each run's record then says
- `items_charged`: what its own key was charged (≈ no image features, they were cached);
- `feature_items_if_uncached`: the images it used (train × views + val + test);
- `items_including_features`: what it would have cost alone from a cold cache.
`--budget` caps `items_including_features`: the tuner and the feature methods plan image
features at full price, cached or not, so every method has the same total allowance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from client.data import FewShotSplit
from client.run_folder import BenchFolder, RunFolder


def feature_items_if_uncached(split: FewShotSplit, views: int) -> int:
    return len(split.train) * views + len(split.val) + len(split.test)


def counts(report: Mapping[str, Any], uncached: int, folder: RunFolder) -> dict[str, int]:
    """Items charged, the image features among them, and items including cached features."""
    queries = report.get("queries") or {}
    charged_features = report.get("feature_items_charged")
    if charged_features is None and folder.feature_spend.exists():  # reports from older tuners
        charged_features = json.loads(folder.feature_spend.read_text()).get("items", 0)
    items = int(queries.get("items", 0))
    charged = int(charged_features or 0)
    return {
        "items_charged": items,
        "feature_items_charged": charged,
        "items_including_features": items - charged + uncached,
    }


def log_feature_pass(bench: BenchFolder, record: Mapping[str, Any]) -> None:
    bench.path.mkdir(parents=True, exist_ok=True)
    with bench.feature_passes.open("a") as log:  # kept across invocations
        log.write(json.dumps(record) + "\n")


def load_feature_passes(bench: BenchFolder) -> list[dict[str, Any]]:
    """Every shared feature pass made for this output folder, by this and earlier invocations."""
    path = bench.feature_passes
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
