"""What each API tier lets a user reach: the embeddings-tier methods, through the OpenAI-style
client only (`/v1/models` + `/v1/embeddings`), against a real server with an embeddings-tier key.

    .venv/bin/python scripts/bench_tiers.py --data digits fashion-mnist --seeds 1 2 3 --out runs/tiers

One feature cache per (data set, seed), shared by the methods of that seed, so each image is
encoded once; the table's items are what a fresh run pays: the image features at full price
(train views + validation + test) plus the run's own text queries. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.data import few_shot_split, load_dataset
from client.features import FeatureCache, FeatureStore
from client.methods import method
from client.openai_api import OpenAIEmbeddingsClient
from client.run_folder import RunFolder
from client.runner import DataSpec, RunSpec, run_method
from client.server_process import ServerProcess

METHODS = (
    "zero-shot-text",
    "prompt-search",
    "linear-probe",
    "lfa",
    "tip-adapter",
    "tip-adapter-f",
    "residual-adapter",
    "prompt-search-tip-f",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/tiers"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "tiers.db") as server:
        key = server.create_key("bench", scopes=["embed"])  # the embeddings tier
        for data in args.data:
            dataset = load_dataset(data)
            for seed in args.seeds:
                split = few_shot_split(dataset, args.shots, seed, max_test_per_class=args.test_per_class)
                cache = FeatureCache(Path(tmp) / f"{data}-{seed}.sqlite")
                full_price = None
                for name in args.methods:
                    with OpenAIEmbeddingsClient(server.url, key) as api:
                        store = FeatureStore(api, cache)
                        folder = RunFolder(args.out / data / f"seed{seed}" / name)
                        run = RunSpec(
                            method(name), split, folder, DataSpec(data, None, args.test_per_class), 2
                        )
                        report = run_method(run, api, store)
                    full_price = full_price if full_price is not None else report.feature_items_charged
                    items = report.queries["items"] - report.feature_items_charged + full_price
                    rows.append(
                        {"data": data, "seed": seed, "method": name, "test": report.test_accuracy,
                         "zero_shot": report.zero_shot_test_accuracy, "items": items,
                         "calls": report.queries["calls"], "selected": report.selected}
                    )  # fmt: skip
                    print(json.dumps(rows[-1], default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiers.json").write_text(json.dumps(rows, indent=2, default=str))
    print("\n| data | method | test accuracy (mean ± sd, %) | items per run |\n|---|---|---|---|")
    for data in args.data:
        for name in args.methods:
            accs = [float(r["test"]) * 100 for r in rows if r["data"] == data and r["method"] == name]
            items = [int(r["items"]) for r in rows if r["data"] == data and r["method"] == name]  # type: ignore[call-overload]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            mean_items = round(statistics.mean(items))
            print(f"| {data} | {name} | {statistics.mean(accs):.1f} ± {sd:.1f} | {mean_items} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
