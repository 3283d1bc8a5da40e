"""What each API tier lets a user reach, against one real server with one key per tier:

- the embeddings tier: the feature and template methods, through the OpenAI-style client only
  (`/v1/models` + `/v1/embeddings`), an embeddings-tier key;
- the prediction-only tier: the loss-only prompt tuners through `/v1/classify` only
  (client/prediction_tier.py), a predictions-tier key, at a fixed item budget.

    .venv/bin/python scripts/bench_tiers.py --data digits fashion-mnist --seeds 1 2 3 --out runs/tiers

Embeddings tier: one feature cache per (data set, seed), shared by the methods of that seed, so
each image is encoded once; the table's items are what a fresh run pays: the image features at
full price (train views + validation + test) plus the run's own text queries. Prediction tier:
nothing is cached (every call re-sends its images), so items are what the run's key was charged.
Each row's tier is the report's (measured from the routes the run called). Prints a markdown
table; every row also goes to OUT/tiers.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.data import few_shot_split, load_dataset
from client.features import FeatureCache, FeatureStore
from client.methods import method
from client.openai_api import OpenAIEmbeddingsClient
from client.prediction_tier import ClassifyClient
from client.report import RunReport
from client.run_folder import RunFolder
from client.runner import DataSpec, RunSpec, run_method
from client.server_process import ServerProcess

EMBEDDINGS_METHODS = (
    "zero-shot-text",
    "prompt-search",
    "linear-probe",
    "residual-adapter",
    "fewshot-cv",
)
PREDICTION_METHODS = ("cbbt-prompt",)


def _row(data: str, seed: int, report: RunReport, items: int, test_images: int) -> dict[str, object]:
    return {
        "data": data, "seed": seed, "method": report.method, "tier": report.tier,
        "test": report.test_accuracy, "zero_shot": report.zero_shot_test_accuracy, "items": items,
        "calls": report.queries["calls"], "test_images": test_images, "selected": report.selected,
        "prompt_steps": report.prompt_steps, "wall_seconds": report.wall_seconds,
    }  # fmt: skip


def _key(server: ServerProcess, tier: str) -> str:
    return server.keys("create", "--name", tier, "--budget-items", "100000000", "--tier", tier)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--methods", nargs="*", default=list(EMBEDDINGS_METHODS), help="embeddings tier")
    parser.add_argument("--prediction-methods", nargs="*", default=list(PREDICTION_METHODS))
    parser.add_argument("--prediction-budget", type=int, default=3000, help="items per prediction-tier run")
    parser.add_argument(
        "--prediction-test-per-class", type=int, default=20,
        help="prediction tier: every scoring re-sends (and pays for) its test images, twice",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/tiers"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict[str, object]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "tiers.db") as server:
        embeddings_key, predictions_key = _key(server, "embeddings"), _key(server, "predictions")
        for data in args.data:
            dataset = load_dataset(data)
            for seed in args.seeds:
                split = few_shot_split(dataset, args.shots, seed, max_test_per_class=args.test_per_class)
                cache = FeatureCache(Path(tmp) / f"{data}-{seed}.sqlite")
                full_price: dict[int, int] = {}  # views -> image items at full price
                for name in args.methods:
                    spec = method(name)
                    views = int(spec.settings.get("views", 2))
                    with OpenAIEmbeddingsClient(server.url, embeddings_key) as api:
                        store = FeatureStore(api, cache)
                        folder = RunFolder(args.out / data / f"seed{seed}" / name)
                        run = RunSpec(spec, split, folder, DataSpec(data, None, args.test_per_class), views)
                        report = run_method(run, api, store)
                    price = len(split.train) * views + len(split.val) + len(split.test)
                    full_price.setdefault(views, price)
                    items = report.queries["items"] - report.feature_items_charged + full_price[views]
                    rows.append(_row(data, seed, report, items, len(split.test)))
                    print(json.dumps(rows[-1], default=str), flush=True)
                cache.close()
                small = few_shot_split(
                    dataset, args.shots, seed, max_test_per_class=args.prediction_test_per_class
                )
                for name in args.prediction_methods:
                    with ClassifyClient(server.url, predictions_key) as api:
                        folder = RunFolder(args.out / data / f"seed{seed}" / f"{name}-predictions")
                        run = RunSpec(
                            method(name), small, folder, DataSpec(data, None, args.prediction_test_per_class),
                            budget=args.prediction_budget,
                        )  # fmt: skip
                        report = run_method(
                            run, api, FeatureStore(api, FeatureCache(Path(tmp) / "none.sqlite"))
                        )
                    rows.append(_row(data, seed, report, report.queries["items"], len(small.test)))
                    print(json.dumps(rows[-1], default=str), flush=True)
        ledger = {k: json.loads(server.keys("show", k)) for k in ("embeddings", "predictions")}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "wall_seconds": time.time() - started, "ledger": ledger}
    (args.out / "tiers.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"\n{time.time() - started:.0f} s\n")
    print(
        "| data | tier | method | runs | test accuracy (mean ± sd, %) | zero-shot % | items per run "
        "| test images |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for data in args.data:
        for name in [*args.methods, *args.prediction_methods]:
            for tier in sorted({str(r["tier"]) for r in rows if r["data"] == data and r["method"] == name}):
                mine = [r for r in rows if r["data"] == data and r["method"] == name and r["tier"] == tier]
                accs = [float(r["test"]) * 100 for r in mine]  # type: ignore[arg-type]
                zero = [float(r["zero_shot"]) * 100 for r in mine]  # type: ignore[arg-type]
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                items = round(statistics.mean(int(r["items"]) for r in mine))  # type: ignore[call-overload]
                print(
                    f"| {data} | {tier} | {name} | {len(mine)} | {statistics.mean(accs):.1f} ± {sd:.1f} "
                    f"| {statistics.mean(zero):.1f} | {items:,} | {mine[0]['test_images']} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
