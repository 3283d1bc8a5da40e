"""Items a prompt tuner needs to reach the faithful CBBT estimator's final validation accuracy.

Reads a `cbbt bench` output folder (curve.json per run) and, per seed, finds the first point
of each method's curve whose validation accuracy reaches the faithful run's final (selected)
validation accuracy; items are counted after the run's fixed costs (image features and the
initial prompt), i.e. prompt-tuning items only. Usage:

    python scripts/estimator_efficiency.py runs/bench-fm12k/fashion-mnist 16 cbbt-prompt cbbt-fast-prompt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from client.report import RunReport  # noqa: E402
from client.run_folder import BenchFolder, RunFolder  # noqa: E402


def curve(run: RunFolder) -> list[dict[str, float]]:
    return [p for p in json.loads(run.curve.read_text()) if p.get("val_accuracy") is not None]


def main(root: Path, shots: int, reference: str, methods: list[str]) -> None:
    bench = BenchFolder(root)
    for seed in bench.seeds(reference, shots):
        ref_run = bench.run(reference, shots, seed)
        ref = RunReport.load(ref_run)
        target = ref.val_accuracy
        ref_curve = curve(ref_run)
        start = ref_curve[0]["items"]
        ref_items = ref.queries["items"] - start
        line = [f"seed{seed}: {reference} final val {target:.3f} after {ref_items:.0f} prompt items"]
        for method in methods:
            run = bench.run(method, shots, seed)
            if not run.curve.exists():
                continue
            points = curve(run)
            reached = next((p for p in points if p["val_accuracy"] >= target), None)
            tenth = [p for p in points if p["items"] - points[0]["items"] <= ref_items / 10]
            best_at_tenth = max(p["val_accuracy"] for p in tenth)
            if reached is None:
                line.append(f"{method}: never (best val at 1/10 of the items {best_at_tenth:.3f})")
            else:
                used = reached["items"] - points[0]["items"]
                line.append(
                    f"{method}: {used:.0f} items ({used / max(ref_items, 1):.3f} of the faithful's; "
                    f"best val at 1/10 of the items {best_at_tenth:.3f})"
                )
        print("; ".join(line))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
