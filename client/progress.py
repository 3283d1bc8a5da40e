"""Progress bars (tqdm) with a total and an ETA for every long phase of a run.

Bars go to stderr and are switched off with `--no-progress` (or when stderr is not a
terminal and the caller asks so); log lines still say what happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

from client.selection import CurvePoint


@dataclass(frozen=True)
class Progress:
    enabled: bool = True

    @contextmanager
    def bar(self, desc: str, total: int | None, unit: str) -> Iterator[tqdm]:
        bar = tqdm(
            total=total, desc=desc, unit=unit, disable=not self.enabled, dynamic_ncols=True, leave=False
        )
        try:
            yield bar
        finally:
            bar.close()


def show_point(bar: tqdm, point: CurvePoint) -> None:
    """One tuning step or adapter epoch done: advance and show validation, loss and items."""
    bar.update(1)
    loss = point["train_loss"]
    bar.set_postfix(
        val=f"{point['val_accuracy']:.3f}",
        loss=f"{loss:.3f}" if math.isfinite(loss) else "-",
        items=int(point["items"]),
    )


NO_PROGRESS = Progress(enabled=False)
