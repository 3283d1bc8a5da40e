"""The folders runs write, and the names of the files in them: nothing else spells them.

RunFolder (one run: `cbbt tune --out`, or one cell of a bench grid)
  report.json  curve.json  curve.png   the typed report and its curve (client.report)
  artifact/                            the tuned artifact (client.artifact)
  run.json  checkpoint.pt              the run's id, config and plan; its checkpoint (resume)
  feature_spend.json                   image features this run paid for, logged as fetched
  bench.json  whitebox.log             the bench's record of the run; the white-box log

BenchFolder (`cbbt bench --out OUT`, per data set: OUT/<data>/)
  <method>/<shots>shot/seed<k>/        a RunFolder per grid cell
  results.json  results.md             every finished run, tables
  acc_vs_items_<k>shot.png  acc_vs_shots.png
  feature_passes.jsonl                 the shared feature passes (charged to no run)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FEATURES_DB = "features.sqlite"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    @property
    def curve(self) -> Path:
        return self.path / "curve.json"

    @property
    def curve_plot(self) -> Path:
        return self.path / "curve.png"

    @property
    def artifact(self) -> Path:
        return self.path / "artifact"

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def feature_spend(self) -> Path:
        return self.path / "feature_spend.json"

    @property
    def bench_record(self) -> Path:
        return self.path / "bench.json"

    @property
    def whitebox_log(self) -> Path:
        return self.path / "whitebox.log"

    @property
    def finished(self) -> bool:
        return self.report.exists()

    def create(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def write_json(self, path: Path, value: object, *, indent: int | None = 2) -> None:
        """Atomically: a kill never leaves half a file."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=indent))
        tmp.replace(path)


def data_slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80] or "data"


@dataclass(frozen=True)
class BenchFolder:
    """OUT/<data>/ of a `cbbt bench` run."""

    path: Path

    @classmethod
    def of(cls, out: Path, data: str) -> BenchFolder:
        return cls(out / data_slug(data))

    def run(self, method: str, shots: int, seed: int) -> RunFolder:
        return RunFolder(self.path / method / f"{shots}shot" / f"seed{seed}")

    def seeds(self, method: str, shots: int) -> list[int]:
        """The seeds with a run folder for (method, shots)."""
        return sorted(
            int(p.name.removeprefix("seed")) for p in (self.path / method / f"{shots}shot").glob("seed*")
        )

    def runs_on_disk(self) -> list[RunFolder]:
        """Every run folder the bench recorded (bench.json) under this data set."""
        return [RunFolder(p.parent) for p in sorted(self.path.glob("*/*shot/seed*/bench.json"))]

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def results_md(self) -> Path:
        return self.path / "results.md"

    @property
    def feature_passes(self) -> Path:
        return self.path / "feature_passes.jsonl"

    def items_plot(self, shots: int) -> Path:
        return self.path / f"acc_vs_items_{shots}shot.png"

    @property
    def shots_plot(self) -> Path:
        return self.path / "acc_vs_shots.png"
