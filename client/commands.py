"""What each `cbbt` subcommand does (the CLI module only parses arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from client.api import CbbtClient, QueryCounter
from client.artifact import load_artifact
from client.cli import ClientSettings, print_json, tune_config
from client.data import DatasetUnavailable, Example, few_shot_split, load_dataset
from client.features import FeatureCache, FeatureStore
from client.local_server import LocalServer
from client.train import Tuner, TuneResult, accuracy_and_loss, logits_of

logger = logging.getLogger("cbbt")

CACHE_FILE = "features.sqlite"
# The demo: small enough for a few minutes on 2 CPU cores, large enough to show learning.
DEMO_BUDGET = 24_000
DEMO_TEST_PER_CLASS = 50


def _client(settings: ClientSettings, counter: QueryCounter | None = None) -> CbbtClient:
    return CbbtClient(settings.server, settings.api_key, counter=counter)


def _feature_store(client: CbbtClient, settings: ClientSettings, bar: tqdm | None = None) -> FeatureStore:
    cache = FeatureCache(settings.cache_dir / CACHE_FILE)
    progress = (lambda n: bar.update(n)) if bar is not None else None
    return FeatureStore(client, cache, progress=progress)


def tune(args: argparse.Namespace, settings: ClientSettings) -> int:
    cfg = tune_config(args)
    dataset = load_dataset(args.data, data_dir=args.data_dir)
    split = few_shot_split(dataset, cfg.shots, cfg.seed, max_test_per_class=args.test_per_class)
    logger.info(
        "%s: %d classes, %d train / %d val / %d test images",
        dataset.name,
        len(split.class_names),
        len(split.train),
        len(split.val),
        len(split.test),
    )
    with _client(settings) as client:
        bar = tqdm(desc="tuning", unit="step", disable=args.no_progress, dynamic_ncols=True)

        def show(point: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(
                val=f"{point['val_accuracy']:.3f}",
                loss=f"{point['train_loss']:.3f}" if math.isfinite(point["train_loss"]) else "-",
                items=int(point["items"]),
            )

        features = _feature_store(client, settings)
        tuner = Tuner(client, features, split, cfg, args.out, progress=show)
        try:
            result = tuner.run(resume=args.resume)
        finally:
            bar.close()
    _print_summary(result)
    return 0


def _print_summary(result: TuneResult) -> None:
    r = result.report
    queries = r["queries"]
    assert isinstance(queries, dict)
    print(
        f"method {r['method']}, {r['shots']}-shot, seed {r['seed']}: "
        f"test accuracy {r['test_accuracy']:.4f} (zero-shot {r['zero_shot_test_accuracy']:.4f}), "
        f"val {r['val_accuracy']:.4f}; queries: {queries['calls']} calls, {queries['items']} items, "
        f"{queries['loss_evaluations']} loss evaluations; {r['wall_seconds']:.0f} s"
    )
    print(f"artifact: {result.artifact_dir}")


def _image_features(client: CbbtClient, settings: ClientSettings, examples: list[Example]) -> torch.Tensor:
    store = _feature_store(client, settings)
    return torch.from_numpy(store.features(examples, 1))[:, 0]


def evaluate(args: argparse.Namespace, settings: ClientSettings) -> int:
    artifact = load_artifact(args.artifact)
    dataset = load_dataset(args.data, data_dir=args.data_dir)
    if [n for n in dataset.class_names] != artifact.class_names:
        raise SystemExit("the data set's classes differ from the artifact's")
    test = few_shot_split(dataset, 1, 0, val_per_class=0, max_test_per_class=args.test_per_class).test
    with _client(settings) as client:
        feats = _image_features(client, settings, test)
    labels = torch.tensor([e.label for e in test])
    acc, loss = accuracy_and_loss(
        artifact.build_adapter(), feats, labels, artifact.class_text_features, artifact.logit_scale
    )
    print_json({"test_accuracy": acc, "test_loss": loss, "test_images": len(test)})
    return 0


def predict(args: argparse.Namespace, settings: ClientSettings) -> int:
    artifact = load_artifact(args.artifact)
    examples = [Example.from_file(-1, path, str(path)) for path in args.images]
    with _client(settings) as client:
        feats = _image_features(client, settings, examples)
    with torch.no_grad():
        logits = logits_of(
            artifact.build_adapter(), feats, artifact.class_text_features, artifact.logit_scale
        )
        probs = torch.softmax(logits, dim=-1)
    for path, row in zip(args.images, probs, strict=True):
        index = int(row.argmax())
        print(
            json.dumps(
                {"image": str(path), "label": artifact.class_names[index], "probability": float(row[index])}
            )
        )
    return 0


def usage(_: argparse.Namespace, settings: ClientSettings) -> int:
    with _client(settings) as client:
        print_json(client.usage().model_dump())
    return 0


def demo(args: argparse.Namespace) -> int:
    """Start the default real-weights server, create a key, tune 16-shot, print, stop the server."""
    data = args.data
    try:
        load_dataset(data)
    except DatasetUnavailable as exc:
        logger.warning("%s; falling back to scikit-learn's digits", exc)
        data = "digits"
    budget = args.budget or DEMO_BUDGET
    # The server shares this machine's cores: a one-thread client keeps the two from
    # oversubscribing them (the client's local work, the adapter, is small).
    torch.set_num_threads(1)
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with LocalServer(db=out / "server.db", port=args.port, log_path=out / "server.log") as server:
        key = server.create_key("demo", budget_items=budget * 2)
        settings = ClientSettings(server=server.url, api_key=key, cache_dir=out / "cache")
        tune_args = build_tune_args(data, budget, out / "run")
        code = tune(tune_args, settings)
        with _client(settings) as client:
            report = client.usage()
        print(f"server ledger: {report.spent_items} items in {report.spent_requests} requests")
    return code


def build_tune_args(data: str, budget: int, out: Path) -> argparse.Namespace:
    from client.cli import build_parser

    return build_parser().parse_args(
        [
            "tune",
            "--data",
            data,
            "--shots",
            "16",
            "--seed",
            "1",
            "--budget",
            str(budget),
            "--out",
            str(out),
            "--test-per-class",
            str(DEMO_TEST_PER_CLASS),
            *(["--no-progress"] if not sys.stderr.isatty() else []),
        ]
    )
