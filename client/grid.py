"""`cbbt bench`'s grid: methods × shots × seeds, each run under its own fresh query counter.

Every method runs through the same client and the same few-shot protocol (validation-based
selection, test scored once) via `client.runner.run_method`. The grid is resumable: a run whose
report exists is skipped, an interrupted tuner run resumes from its checkpoint. Image features
are counted as client/accounting.py explains; the summary (results.json, results.md, plots)
covers every finished run under the output folder (or only this grid's, `grid_only`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.accounting import counts, feature_items_if_uncached, load_feature_passes, log_feature_pass
from client.api import CbbtClient
from client.data import Dataset, FewShotSplit, few_shot_split, load_dataset
from client.errors import CbbtError, RequestError
from client.features import FeatureCache, FeatureStore
from client.methods import DEFAULT_METHODS, METHODS, MethodSpec, check_settings, method, runs_paper_recipe
from client.plots import plot_items, plot_shots
from client.progress import Progress
from client.report import json_safe
from client.run_folder import BenchFolder, RunFolder
from client.runner import DataSpec, LocalModel, RunSpec, run_method
from client.session import RetryPolicy
from client.tables import results_markdown
from client.tiers import connect
from client.train import StopRequested
from shared.tiers import Tier

logger = logging.getLogger(__name__)

__all__ = ["BenchConfig", "Service", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    data: str
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    shots: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (1, 2, 3)
    budget: int | None = None  # per run, items including image features
    views: int = 2
    test_per_class: int | None = None
    data_dir: Path | None = None
    tune_flags: Mapping[str, Any] = field(default_factory=dict)  # every tuner run
    grid_only: bool = False  # summarise only this grid (not other finished runs on disk)
    progress: bool = True

    @property
    def folder(self) -> BenchFolder:
        return BenchFolder.of(self.out, self.data)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(self.data, self.data_dir, self.test_per_class)


def views_for(spec: MethodSpec, cfg: BenchConfig) -> int:
    """The views a method's runs use: its own where it pins them (the default `cbbt` and the CV'd
    feature methods run at one view, as `cbbt tune` does), else the bench's `--views`."""
    if runs_paper_recipe(spec, cfg.tune_flags):  # `cbbt --estimator faithful` runs cbbt-paper
        spec = METHODS["cbbt-paper"]
    return int(spec.settings.get("views", cfg.tune_flags.get("views", cfg.views)))


@dataclass(frozen=True)
class Service:
    url: str
    api_key: str | None
    cache_path: Path
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Set when the model also runs on this machine (--local): enables the white-box reference.
    local_model: LocalModel | None = None
    api: str = "cbbt"  # which API tier the URL is (client/tiers.py: cbbt, openai, predictions)
    model: str | None = None  # the model id on an OpenAI-compatible API

    @property
    def tier(self) -> Tier:
        return {"openai": Tier.embeddings, "predictions": Tier.predictions}.get(self.api, Tier.full)


class Bench:
    def __init__(self, cfg: BenchConfig, service: Service) -> None:
        for name in cfg.methods:
            method(name)  # unknown names fail before anything runs
        check_settings("tune", cfg.tune_flags)
        self.cfg = cfg
        self.service = service
        self.cache = FeatureCache(service.cache_path)
        self.records: list[dict[str, Any]] = []
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.cfg.data, data_dir=self.cfg.data_dir)
        return self._dataset

    def close(self) -> None:
        self.cache.close()

    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        progress = Progress(cfg.progress)
        with progress.bar("bench", len(grid(cfg)), "run") as bar:
            for shots in cfg.shots:
                for seed in cfg.seeds:
                    split = few_shot_split(self.dataset, shots, seed, max_test_per_class=cfg.test_per_class)
                    prefetched = False
                    for name in cfg.methods:
                        spec = METHODS[name]
                        folder = cfg.folder.run(name, shots, seed)
                        bar.set_postfix_str(f"{name} {shots}-shot seed {seed}")
                        if folder.finished:
                            logger.info("skipping %s: finished (report exists)", folder.path)
                            self.records.append(self._record(spec, split, folder, "cached"))
                        else:
                            if spec.kind != "whitebox" and not prefetched and self._uses_features:
                                self._feature_pass(split)
                                prefetched = True
                            self.records.append(self._run_one(spec, split, folder, progress))
                        bar.update(1)
        return self.records

    # -- the shared feature pass --------------------------------------------------------------
    def _feature_pass(self, split: FewShotSplit) -> None:
        with self._client() as client:
            store = FeatureStore(client, self.cache)
            started = time.time()
            views, rest = self.cfg.views, split.val + split.test
            todo = store.missing_count(split.train, views) + store.missing_count(rest, 1)
            with Progress(self.cfg.progress).bar(f"features, seed {split.seed}", todo, "img") as bar:
                store.features(split.train, views, on_batch=bar.update)
                store.features(rest, 1, on_batch=bar.update)
            if client.counter.items:
                record = {
                    "shots": split.shots,
                    "seed": split.seed,
                    "views": self.cfg.views,
                    "queries": client.counter.as_dict(),
                    "wall_seconds": time.time() - started,
                }
                log_feature_pass(self.cfg.folder, record)

    @property
    def _uses_features(self) -> bool:
        return self.service.tier != Tier.predictions  # that tier returns logits, never a feature

    def _client(self) -> CbbtClient:
        s = self.service  # a fresh QueryCounter per client, so per run
        return connect(s.api, s.url, s.api_key, model=s.model, retry=s.retry)

    # -- one run ------------------------------------------------------------------------------
    def _views(self, spec: MethodSpec) -> int:
        return views_for(spec, self.cfg)

    def _run_one(
        self, spec: MethodSpec, split: FewShotSplit, folder: RunFolder, progress: Progress
    ) -> dict[str, Any]:
        logger.info("running %s, %d-shot, seed %d -> %s", spec.name, split.shots, split.seed, folder.path)
        run = RunSpec(
            spec, split, folder, self.cfg.data_spec, self._views(spec), self.cfg.budget, self.cfg.tune_flags
        )
        try:
            if spec.kind == "whitebox":
                run_method(run, None, None, local_model=self.service.local_model)
            else:
                with self._client() as client:
                    self._run_api_method(run, client, progress)
        except (KeyboardInterrupt, StopRequested):
            raise  # checkpointed: a rerun resumes this run
        except Exception as exc:
            logger.error("%s, %d-shot, seed %d failed: %s", spec.name, split.shots, split.seed, exc,
                         exc_info=not isinstance(exc, CbbtError))  # fmt: skip
            return {
                **self._identity(spec, split, folder),
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
            }
        return self._record(spec, split, folder, "done")

    def _run_api_method(self, run: RunSpec, client: CbbtClient, progress: Progress) -> None:
        store = FeatureStore(client, self.cache)
        resume = run.folder.checkpoint.exists()
        try:
            run_method(run, client, store, resume=resume, progress=progress)
        except RequestError as exc:
            if not resume:
                raise
            logger.warning("cannot resume %s (%s): starting it again", run.folder.path, exc)
            run_method(run, client, store, resume=False, progress=progress)

    # -- records ------------------------------------------------------------------------------
    def _identity(self, spec: MethodSpec, split: FewShotSplit, folder: RunFolder) -> dict[str, Any]:
        return {
            "method": spec.name,
            "kind": spec.kind,
            "black_box": spec.black_box,
            "shots": split.shots,
            "seed": split.seed,
            "budget": self.cfg.budget if spec.black_box else None,
            "run_dir": str(folder.path),
            "feature_items_if_uncached": (
                feature_items_if_uncached(split, self._views(spec)) if self._uses_features else 0
            ),
        }

    def _record(
        self, spec: MethodSpec, split: FewShotSplit, folder: RunFolder, status: str
    ) -> dict[str, Any]:
        record = {**self._identity(spec, split, folder), "status": status}
        if status == "cached" and folder.bench_record.exists():  # the bench's own record of that run
            record = {**folder.read_json(folder.bench_record), "status": status}
        report = folder.read_json(folder.report)
        record.update(counts(report, record["feature_items_if_uncached"], folder))
        if status == "done":
            folder.write_json(folder.bench_record, record)
        return {**record, "report": report}


def collect_on_disk(bench: BenchFolder, known: set[str]) -> list[dict[str, Any]]:
    """Finished runs under OUT/<data> that the current grid did not list (earlier invocations)."""
    found = []
    for folder in bench.runs_on_disk():
        if str(folder.path) in known or not folder.finished:
            continue
        record = folder.read_json(folder.bench_record)
        report = folder.read_json(folder.report)
        record.update(counts(report, record["feature_items_if_uncached"], folder))
        found.append({**record, "status": "on-disk", "report": report})
    return found


def grid(cfg: BenchConfig) -> list[tuple[int, int, str]]:
    return [(k, s, m) for k in cfg.shots for s in cfg.seeds for m in cfg.methods]


def needs_server(cfg: BenchConfig) -> bool:
    """Only API runs need a server: finished runs are skipped, the white-box runs in-process."""
    pending = [m for k, s, m in grid(cfg) if not cfg.folder.run(m, k, s).finished]
    return any(method(m).kind != "whitebox" for m in pending)


def run_bench(cfg: BenchConfig, service: Service) -> list[dict[str, Any]]:
    """Run the grid (skipping finished runs) and write results.json, results.md and the plots."""
    bench = Bench(cfg, service)
    try:
        records = bench.run()
    finally:
        bench.close()
    if not cfg.grid_only:
        records += collect_on_disk(cfg.folder, {r["run_dir"] for r in records})
    write_outputs(cfg, records)
    return records


def machine() -> dict[str, Any]:
    return {"uname": " ".join(platform.uname()), "cpus": os.cpu_count(), "python": platform.python_version()}


def write_outputs(cfg: BenchConfig, records: list[dict[str, Any]]) -> None:
    folder = cfg.folder
    folder.path.mkdir(parents=True, exist_ok=True)
    passes = load_feature_passes(folder)
    payload = {
        "data": cfg.data,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            "methods": list(cfg.methods),
            "shots": list(cfg.shots),
            "seeds": list(cfg.seeds),
            "budget": cfg.budget,
            "views": cfg.views,
            "test_per_class": cfg.test_per_class,
            "tune_flags": dict(cfg.tune_flags),
        },
        "methods": {
            name: {"kind": s.kind, "settings": dict(s.settings), "needs": s.needs, "black_box": s.black_box}
            for name, s in METHODS.items()
            if any(r["method"] == name for r in records)
        },
        "feature_passes": passes,
        "runs": records,
    }
    folder.results_json.write_text(json.dumps(json_safe(payload), indent=2))
    folder.results_md.write_text(results_markdown(cfg, records, passes))
    order = list(METHODS)
    plot_items(records, order, folder.items_plot)
    plot_shots(records, order, folder.shots_plot)
    logger.info("wrote %s", folder.results_md)
