"""The default's feature stage (CV over every method, then the refit) per seed on cached real
features: its wall time, its choice, the CV estimate and the test accuracy.

To compare two versions side by side, run it from this checkout against each one's code:

    python -m benchmarks.feature_stage_time --features runs/fewshot/digits.pt
    PYTHONPATH=/path/to/other/checkout python benchmarks/feature_stage_time.py --features ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.selection_ablation import labelled_split
from client.fewshot.methods import default_methods
from client.fewshot.select import accuracy, select_and_fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    blob = torch.load(args.features, weights_only=True)
    for seed in args.seeds:
        labelled, priors, scale = labelled_split(blob, 16, seed)
        started = time.perf_counter()
        selection = select_and_fit(labelled, priors, scale, default_methods())
        seconds = time.perf_counter() - started
        test = accuracy(selection.classifier, blob["test"], blob["test_labels"])
        print(
            f"{blob['data']} seed {seed}: {seconds:.1f} s, CV {selection.cv_accuracy:.4f}, "
            f"test {test:.4f}: {selection.choice.describe()}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
