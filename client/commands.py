"""What each `cbbt` subcommand does, on typed arguments (client/cli.py only parses argv).

Every command takes its own frozen dataclass and the `ClientSettings`, returns an exit code,
and raises client.errors' exceptions for anything the user has to act on.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client.api import CbbtClient, QueryCounter
from client.artifact import load_artifact
from client.data import DatasetUnavailable, Example, few_shot_split, load_dataset
from client.errors import RequestError
from client.features import FeatureCache, FeatureStore
from client.grid import BenchConfig, Service, needs_server, run_bench
from client.methods import DEFAULT_METHOD, method, parse_define, register_method
from client.model import accuracy_and_loss, logits_of
from client.progress import Progress
from client.report import RunReport
from client.run_folder import FEATURES_DB, RunFolder
from client.runner import DataSpec, LocalModel, RunSpec, run_method
from client.server_process import LARGE_BUDGET, ServerProcess
from client.session import RetryPolicy
from client.settings import ClientSettings
from client.tiers import connect, detect

logger = logging.getLogger("cbbt")

# The demo: small enough for a few minutes on 2 CPU cores, large enough to show learning.
DEMO_BUDGET = 24_000
DEMO_TEST_PER_CLASS = 50
DEMO_SHOTS = 16
DEMO_SEED = 1
DEFAULT_LOCAL_MODEL = "devise-effnet-minilm"


@dataclass(frozen=True)
class TuneArgs:
    data: DataSpec
    out: Path
    method: str = DEFAULT_METHOD
    shots: int = 16
    seed: int = 1
    views: int | None = None
    budget: int | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)  # TuneConfig settings the user typed
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class EvalArgs:
    data: DataSpec
    artifact: Path


@dataclass(frozen=True)
class PredictArgs:
    artifact: Path
    images: tuple[Path, ...]


@dataclass(frozen=True)
class DemoArgs:
    out: Path = Path("runs/demo")
    budget: int | None = None
    port: int | None = None
    data: str = "fashion-mnist"


@dataclass(frozen=True)
class BenchArgs:
    config: BenchConfig
    cache_dir: Path | None = None
    defines: tuple[str, ...] = ()
    local: bool = False
    local_model: str | None = None
    local_pretrained: str | None = None
    local_args: tuple[str, ...] = ()
    client_threads: int = 1


def make_client(settings: ClientSettings, counter: QueryCounter | None = None) -> CbbtClient:
    """A client of the API tier at the URL (client/tiers.py): cbbt's own, an OpenAI-compatible
    embeddings API, or a prediction-only one."""
    retry = RetryPolicy(max_total_s=settings.retry_total_s)
    return connect(
        settings.api, settings.server, settings.api_key, model=settings.model, counter=counter, retry=retry
    )


def _feature_store(client: CbbtClient, settings: ClientSettings) -> FeatureStore:
    return FeatureStore(client, FeatureCache(settings.cache_dir / FEATURES_DB))


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# -- tune -------------------------------------------------------------------------------------
def tune(args: TuneArgs, settings: ClientSettings) -> int:
    spec = method(args.method)
    dataset = load_dataset(args.data.spec, data_dir=args.data.data_dir)
    # A user's folder may hold classes smaller than shots + validation: they train on what they
    # have (one warning, recorded in the report); `cbbt bench` keeps the exact K-shot protocol.
    split = few_shot_split(
        dataset, args.shots, args.seed, max_test_per_class=args.data.test_per_class, allow_fewer=True
    )
    logger.info(
        "%s: %d classes, %d train / %d val / %d test images",
        dataset.name, len(split.class_names), len(split.train), len(split.val), len(split.test),
    )  # fmt: skip
    run = RunSpec(spec, split, RunFolder(args.out), args.data, args.views, args.budget, args.flags)
    with make_client(settings) as client:
        report = run_method(
            run,
            client,
            _feature_store(client, settings),
            resume=args.resume,
            progress=Progress(args.progress),
            on_plan=lambda plan: print(f"plan:\n{plan}", flush=True),
        )
    _print_summary(report, run.folder)
    return 0


def _print_summary(report: RunReport, folder: RunFolder) -> None:
    print(report.summary())
    if folder.artifact.exists():
        print(f"artifact: {folder.artifact}")


# -- eval, predict, usage -----------------------------------------------------------------------
def _image_features(client: CbbtClient, settings: ClientSettings, examples: list[Example]) -> torch.Tensor:
    store = _feature_store(client, settings)
    with Progress().bar("image features", store.missing_count(examples, 1), "img") as bar:
        return torch.from_numpy(store.features(examples, 1, on_batch=bar.update))[:, 0]


def evaluate(args: EvalArgs, settings: ClientSettings) -> int:
    artifact = load_artifact(args.artifact)
    dataset = load_dataset(args.data.spec, data_dir=args.data.data_dir)
    if list(dataset.class_names) != artifact.class_names:
        raise RequestError("the data set's classes differ from the artifact's")
    test = few_shot_split(dataset, 1, 0, val_per_class=0, max_test_per_class=args.data.test_per_class).test
    with make_client(settings) as client:
        feats = _image_features(client, settings, test)
    labels = torch.tensor([e.label for e in test])
    acc, loss = accuracy_and_loss(
        artifact.build_adapter(), feats, labels, artifact.class_text_features, artifact.logit_scale
    )
    print_json({"test_accuracy": acc, "test_loss": loss, "test_images": len(test)})
    return 0


def predict(args: PredictArgs, settings: ClientSettings) -> int:
    artifact = load_artifact(args.artifact)
    examples = [Example.from_file(-1, path, str(path)) for path in args.images]
    with make_client(settings) as client:
        feats = _image_features(client, settings, examples)
    with torch.no_grad():
        logits = logits_of(
            artifact.build_adapter(), feats, artifact.class_text_features, artifact.logit_scale
        )
        probs = torch.softmax(logits, dim=-1)
    for path, row in zip(args.images, probs, strict=True):
        index = int(row.argmax())
        line = {"image": str(path), "label": artifact.class_names[index], "probability": float(row[index])}
        print(json.dumps(line))
    return 0


def usage(settings: ClientSettings) -> int:
    with make_client(settings) as client:
        print_json(client.usage().model_dump())
    return 0


# -- demo ---------------------------------------------------------------------------------------
def demo(args: DemoArgs) -> int:
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
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with ServerProcess(out / "server.db", port=args.port, log_path=out / "server.log") as server:
        key = server.create_key("demo", budget_items=budget * 2)
        settings = ClientSettings(server=server.url, api_key=key, cache_dir=out / "cache")
        tune_args = TuneArgs(
            data=DataSpec(data, test_per_class=DEMO_TEST_PER_CLASS),
            out=out / "run",
            shots=DEMO_SHOTS,
            seed=DEMO_SEED,
            budget=budget,
            progress=sys.stderr.isatty(),
        )
        code = tune(tune_args, settings)
        with make_client(settings) as client:
            ledger = client.usage()
        print(f"server ledger: {ledger.spent_items} items in {ledger.spent_requests} requests")
    return code


# -- bench --------------------------------------------------------------------------------------
def bench(args: BenchArgs, settings: ClientSettings) -> int:
    """`cbbt bench`: against the configured server, or a server started here with --local."""
    for text in args.defines:
        name, base, overrides = parse_define(text)
        register_method(name, based_on=base, **overrides)
    cfg = args.config
    if args.client_threads > 0:
        torch.set_num_threads(args.client_threads)
    cache_path = (args.cache_dir or cfg.out / "cache") / FEATURES_DB
    retry = RetryPolicy(max_total_s=settings.retry_total_s)
    local = None
    if args.local:
        local = LocalModel(args.local_model or DEFAULT_LOCAL_MODEL, args.local_pretrained, cache_path)
    if not args.local or not needs_server(cfg):
        api = settings.api if settings.api != "auto" else detect(settings.server, settings.api_key)
        service = Service(settings.server, settings.api_key, cache_path, retry, local, api, settings.model)
        records = run_bench(cfg, service)
    else:
        server_dir = cfg.out / "server"
        with ServerProcess(
            server_dir / "server.db",
            model=args.local_model,
            pretrained=args.local_pretrained,
            log_path=server_dir / "server.log",
            extra_args=args.local_args,
        ) as server:
            name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{server.port}"  # key names are unique
            key = server.create_key(name, budget_items=LARGE_BUDGET)
            api = "cbbt" if settings.api == "auto" else settings.api  # the local server is cbbt's
            records = run_bench(cfg, Service(server.url, key, cache_path, retry, local, api, settings.model))
    failed = [r for r in records if r.get("status") == "failed"]
    print(f"{len(records)} runs ({len(failed)} failed); summary: {cfg.folder.results_md}")
    return 1 if failed else 0
