"""`cbbt bench`: methods × shots × seeds under one honest query counter (issue 5, method.md §4-5).

Every method runs through the same `CbbtClient`, the same `QueryCounter` (a fresh one per run)
and the same few-shot protocol (validation-based selection, test scored once). The grid is
resumable: a run whose `report.json` exists is skipped, an interrupted tuner run resumes from
its checkpoint. Per-run folders: `OUT/<data>/<method>/<shots>shot/seed<k>/`; the summary
(`results.json`, `results.md`, `acc_vs_items_<k>shot.png`, `acc_vs_shots.png`) goes to
`OUT/<data>/`.

Counting image features honestly. All runs share one feature cache (`OUT/cache` unless
`--cache-dir`). Before the runs of a (shots, seed) split, the bench fetches that split's image
features once (the "feature pass", recorded in results.json), so no run's count depends on the
order of the grid. Each run records
- `items_charged`: what its own key was charged (≈ no image features, they were cached);
- `feature_items_if_uncached`: the images it used (train × views + val + test);
- `items_including_features`: what it would have cost alone from a cold cache.
`--budget` caps `items_including_features`: the tuner and the feature baselines plan image
features at full price, cached or not, so every method has the same total allowance.

Methods are data (`METHODS`): a name, how it runs (`tune`: `Tuner` with `TuneConfig`
overrides; `feature`: a zero-query baseline from `client.baselines`; `whitebox`: the CoOp
reference in `benchmarks/whitebox.py`, run as its own process and only with `--local`), and
what it needs from the API. `register_method` (or `--define NAME=BASE:key=value,...`) adds
variants such as an estimator with other flags, e.g.
`--define cbbt-fast=cbbt:antithetic=true,directions=16`. A method's own overrides win over the
bench-wide tuning flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from client.api import CbbtClient
from client.baselines import FeatureConfig, run_feature_baseline
from client.cli import _TUNE_FLAGS, ClientSettings, _add_connection, _add_data
from client.data import Dataset, FewShotSplit, few_shot_split, load_dataset
from client.features import FeatureCache, FeatureStore
from client.local_server import LocalServer
from client.report import json_safe
from client.train import StopRequested, TuneConfig, Tuner, tune_config

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "BenchConfig",
    "MethodSpec",
    "Service",
    "register_method",
    "run_bench",
]

Kind = Literal["tune", "feature", "whitebox"]
CACHE_FILE = "features.sqlite"
PASSES_FILE = "feature_passes.jsonl"
TUNER_FEATURE_LOG = "feature_spend.json"  # written by client.train.Tuner when it pays for features
LOCAL_KEY_BUDGET = 10**12
REPO_ROOT = Path(__file__).resolve().parent.parent
WHITEBOX_SCRIPT = REPO_ROOT / "benchmarks" / "whitebox.py"
WHITEBOX_MODULE = "benchmarks.whitebox"
DEFAULT_LOCAL_MODEL = "devise-effnet-minilm"

_NEEDS_FEATURES = "image features + C template texts (plain text in, features out)"
_NEEDS_PROMPTS = "image features + text features of soft prompts (embeddings in, features out)"


@dataclass(frozen=True)
class MethodSpec:
    """One bench method: how it runs, with which overrides, and what it needs from the API."""

    name: str
    kind: Kind
    overrides: Mapping[str, Any] = field(default_factory=dict)
    needs: str = ""
    description: str = ""
    black_box: bool = True


def _specs(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _specs(
    MethodSpec(
        "zero-shot",
        "tune",
        {"method": "zero-shot"},
        "image features + one soft prompt's class features",
        "the prompt 'a {class}.' (CBBT's init), no tuning",
    ),
    MethodSpec(
        "linear-probe",
        "feature",
        {"method": "linear-probe"},
        _NEEDS_FEATURES,
        "logistic regression on image features (text unused), weight decay on val",
    ),
    MethodSpec(
        "lfa",
        "feature",
        {"method": "lfa"},
        _NEEDS_FEATURES,
        "LFA-style map: Procrustes init, shrunk to identity, short refinement",
    ),
    MethodSpec(
        "tip-adapter",
        "feature",
        {"method": "tip-adapter"},
        _NEEDS_FEATURES,
        "training-free cache model, alpha/beta on val",
    ),
    MethodSpec(
        "tip-adapter-f",
        "feature",
        {"method": "tip-adapter-f"},
        _NEEDS_FEATURES,
        "cache keys fine-tuned locally, epoch and alpha/beta on val",
    ),
    MethodSpec(
        "adapter",
        "tune",
        {"method": "adapter"},
        "image features + one soft prompt's class features",
        "CLIP-Adapter residual MLP alone on the 'a {class}.' text features",
    ),
    MethodSpec(
        "cbbt-prompt",
        "tune",
        {"method": "cbbt-prompt"},
        _NEEDS_PROMPTS,
        "faithful CBBT estimator (q=256, one-sided), prompt only",
    ),
    MethodSpec(
        "cbbt",
        "tune",
        {"method": "cbbt"},
        _NEEDS_PROMPTS,
        "faithful CBBT: estimated-gradient prompt + residual adapter",
    ),
    MethodSpec(
        "cmaes-prompt",
        "tune",
        {"method": "cbbt-prompt", "optimizer": "cmaes"},
        _NEEDS_PROMPTS,
        "BBT/BPT-VLM style CMA-ES in a random subspace, prompt only",
    ),
    MethodSpec(
        "spsa-gc-prompt",
        "tune",
        {"method": "cbbt-prompt", "optimizer": "spsa-gc"},
        _NEEDS_PROMPTS,
        "BlackVIP-style SPSA-GC on the context vectors, prompt only",
    ),
    MethodSpec(
        "zip-prompt",
        "tune",
        {"method": "cbbt-prompt", "optimizer": "zip"},
        _NEEDS_PROMPTS,
        "ZIP-style low-rank context, SPSA, sqrt(d) clipping, prompt only",
    ),
    MethodSpec(
        "cbbt-fast-prompt",
        "tune",
        {"method": "cbbt-prompt", "estimator": "fast"},
        _NEEDS_PROMPTS,
        "cbbt's estimator (full-batch loss, 4 antithetic orthogonal directions, lr 5e-2), prompt only",
    ),
    MethodSpec(
        "cbbt-fast",
        "tune",
        {"method": "cbbt", "estimator": "fast"},
        _NEEDS_PROMPTS,
        "cbbt's estimator + Tip-Adapter-F cache on the tuned prompt's logits",
    ),
    MethodSpec(
        "cbbt-fast-residual",
        "tune",
        {"method": "cbbt", "estimator": "fast", "adapter": "residual"},
        _NEEDS_PROMPTS,
        "cbbt's estimator + CBBT's residual adapter",
    ),
    MethodSpec(
        "cmaes-prompt-fullbatch",
        "tune",
        {"method": "cbbt-prompt", "optimizer": "cmaes", "batch_size": 0},
        _NEEDS_PROMPTS,
        "CMA-ES as above, loss on all cached training views (as cbbt-fast's)",
    ),
    MethodSpec(
        "coop-whitebox",
        "whitebox",
        {"method": "cbbt"},
        "model weights and gradients (in-process; NOT black-box)",
        "CoOp: exact gradients through the text encoder + the same adapter",
        black_box=False,
    ),
    MethodSpec(
        "coop-prompt-whitebox",
        "whitebox",
        {"method": "cbbt-prompt"},
        "model weights and gradients (in-process; NOT black-box)",
        "CoOp alone: exact gradients through the text encoder, prompt only",
        black_box=False,
    ),
)
DEFAULT_METHODS: tuple[str, ...] = ("zero-shot", "linear-probe", "tip-adapter", "cbbt-prompt", "cbbt")


def register_method(
    name: str,
    *,
    based_on: str = "cbbt",
    needs: str | None = None,
    description: str | None = None,
    **overrides: Any,
) -> MethodSpec:
    """Add (or replace) a method: `based_on`'s spec with more config overrides.

    e.g. `register_method("cbbt-fast", based_on="cbbt", antithetic=True, directions=16)`.
    """
    base = METHODS[based_on]
    _check_overrides(base.kind, overrides)
    spec = replace(
        base,
        name=name,
        overrides={**base.overrides, **overrides},
        needs=base.needs if needs is None else needs,
        description=description or f"{based_on} with {_format_overrides(overrides)}",
    )
    METHODS[name] = spec
    return spec


def _format_overrides(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def _check_overrides(kind: Kind, overrides: Mapping[str, Any]) -> None:
    target = FeatureConfig if kind == "feature" else TuneConfig
    names = {f.name for f in fields(target)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown {target.__name__} fields: {', '.join(unknown)}")


def parse_define(text: str) -> tuple[str, str, dict[str, Any]]:
    """'NAME=BASE:key=value,key=value' -> (name, base, overrides); values parsed as JSON if they can be."""
    name, sep, rest = text.partition("=")
    base, _, assignments = rest.partition(":")
    if not sep or not name or not base:
        raise ValueError(f"--define wants NAME=BASE:key=value,...; got {text!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in assignments.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--define {name}: {item!r} is not key=value")
        lowered = raw.strip().lower()
        value: Any = None if lowered in ("none", "null") else raw.strip()
        if value is not None:
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(lowered if lowered in ("true", "false") else raw.strip())
        overrides[key.strip().replace("-", "_")] = value
    return name.strip(), base.strip(), overrides


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


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
    tune_overrides: Mapping[str, Any] = field(default_factory=dict)  # every Tuner run
    grid_only: bool = False  # summarise only this grid (not other finished runs on disk)
    progress: bool = True

    @property
    def data_out(self) -> Path:
        return self.out / data_slug(self.data)


@dataclass(frozen=True)
class Service:
    url: str
    api_key: str | None
    cache_path: Path
    # (model, pretrained) when the model also runs in this machine (--local): enables the
    # in-process white-box reference.
    local_model: tuple[str, str | None] | None = None


def data_slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80] or "data"


def run_dir(data_out: Path, method: str, shots: int, seed: int) -> Path:
    return data_out / method / f"{shots}shot" / f"seed{seed}"


def feature_items_if_uncached(split: FewShotSplit, views: int) -> int:
    return len(split.train) * views + len(split.val) + len(split.test)


# ---------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: BenchConfig, service: Service) -> None:
        unknown = [m for m in cfg.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        _check_overrides("tune", cfg.tune_overrides)
        self.cfg = cfg
        self.service = service
        self.cache = FeatureCache(service.cache_path)
        self.records: list[dict[str, Any]] = []
        self.feature_passes: list[dict[str, Any]] = []
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.cfg.data, data_dir=self.cfg.data_dir)
        return self._dataset

    def close(self) -> None:
        self.cache.close()

    def grid(self) -> list[tuple[int, int, str]]:
        c = self.cfg
        return [(k, s, m) for k in c.shots for s in c.seeds for m in c.methods]

    def pending(self) -> list[tuple[int, int, str]]:
        return [
            (k, s, m)
            for k, s, m in self.grid()
            if not (run_dir(self.cfg.data_out, m, k, s) / "report.json").exists()
        ]

    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        grid = self.grid()
        bar = tqdm(total=len(grid), desc="bench", unit="run", disable=not cfg.progress, dynamic_ncols=True)
        try:
            for shots in cfg.shots:
                for seed in cfg.seeds:
                    split = few_shot_split(self.dataset, shots, seed, max_test_per_class=cfg.test_per_class)
                    prefetched = False
                    for method in cfg.methods:
                        spec = METHODS[method]
                        out = run_dir(cfg.data_out, method, shots, seed)
                        bar.set_postfix_str(f"{method} {shots}-shot seed {seed}")
                        if (out / "report.json").exists():
                            logger.info("skipping %s: finished (%s)", out, "report.json exists")
                            self.records.append(self._record(spec, split, out, "cached"))
                        else:
                            if spec.kind != "whitebox" and not prefetched:
                                self._feature_pass(split)
                                prefetched = True
                            self.records.append(self._run_one(spec, split, out, bar))
                        bar.update(1)
        finally:
            bar.close()
        return self.records

    # -- the shared feature pass --------------------------------------------------------------
    def _feature_pass(self, split: FewShotSplit) -> None:
        with self._client() as client:
            store = FeatureStore(client, self.cache)
            started = time.time()
            store.features(split.train, self.cfg.views)
            store.features(split.val + split.test, 1)
            if client.counter.items:
                record = {
                    "shots": split.shots,
                    "seed": split.seed,
                    "views": self.cfg.views,
                    "queries": client.counter.as_dict(),
                    "wall_seconds": time.time() - started,
                }
                self.feature_passes.append(record)
                self.cfg.data_out.mkdir(parents=True, exist_ok=True)
                with (self.cfg.data_out / PASSES_FILE).open("a") as log:  # kept across invocations
                    log.write(json.dumps(record) + "\n")

    def _client(self) -> CbbtClient:
        return CbbtClient(self.service.url, self.service.api_key)  # a fresh QueryCounter per client

    # -- one run ------------------------------------------------------------------------------
    def _run_one(self, spec: MethodSpec, split: FewShotSplit, out: Path, bar: tqdm) -> dict[str, Any]:
        logger.info("running %s, %d-shot, seed %d -> %s", spec.name, split.shots, split.seed, out)
        try:
            if spec.kind == "whitebox":
                self._run_whitebox(spec, split, out)
            elif spec.kind == "feature":
                self._run_feature(spec, split, out)
            else:
                self._run_tuner(spec, split, out, bar)
        except (KeyboardInterrupt, StopRequested):
            raise  # checkpointed: a rerun resumes this run
        except Exception as exc:
            logger.exception("%s, %d-shot, seed %d failed", spec.name, split.shots, split.seed)
            return {
                **self._identity(spec, split, out),
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
            }
        return self._record(spec, split, out, "done")

    def _views(self, spec: MethodSpec) -> int:
        return int(spec.overrides.get("views", self.cfg.tune_overrides.get("views", self.cfg.views)))

    def _run_tuner(self, spec: MethodSpec, split: FewShotSplit, out: Path, bar: tqdm) -> None:
        views = self._views(spec)
        with self._client() as client:
            store = FeatureStore(client, self.cache)
            values = {
                **self.cfg.tune_overrides,
                **spec.overrides,
                "shots": split.shots,
                "seed": split.seed,
                "views": views,
                # The Tuner plans image features at full price, cached or not: the bench budget as is.
                "budget": self.cfg.budget,
            }
            tune_cfg = tune_config(str(values.pop("estimator", "faithful")), **values)

            def show(point: dict[str, float]) -> None:
                bar.set_postfix_str(
                    f"{spec.name} {split.shots}-shot seed {split.seed}: step {int(point['step'])}, "
                    f"val {point['val_accuracy']:.3f}, items {int(point['items'])}"
                )

            tuner = Tuner(client, store, split, tune_cfg, out, progress=show)
            resume = (out / "checkpoint.pt").exists()
            try:
                tuner.run(resume=resume)
            except ValueError as exc:
                if not resume:
                    raise
                logger.warning("cannot resume %s (%s): starting it again", out, exc)
                tuner = Tuner(client, store, split, tune_cfg, out, progress=show)
                tuner.run(resume=False)

    def _run_feature(self, spec: MethodSpec, split: FewShotSplit, out: Path) -> None:
        views = self._views(spec)
        with self._client() as client:
            store = FeatureStore(client, self.cache)
            overrides = {k: v for k, v in spec.overrides.items() if k != "views"}
            feature_cfg = FeatureConfig(
                **{
                    **overrides,
                    "shots": split.shots,
                    "seed": split.seed,
                    "views": views,
                    "budget": self.cfg.budget,  # features at full price, as for the tuner
                }
            )
            run_feature_baseline(client, store, split, feature_cfg, out)

    def _run_whitebox(self, spec: MethodSpec, split: FewShotSplit, out: Path) -> None:
        if self.service.local_model is None:
            raise RuntimeError(
                "the white-box reference runs the model in-process: use --local, or run "
                f"`python -m {WHITEBOX_MODULE} ...` yourself (its report.json is then picked up)"
            )
        if not WHITEBOX_SCRIPT.exists():
            raise FileNotFoundError(f"{WHITEBOX_SCRIPT} not found (the white-box script lives in the repo)")
        model, pretrained = self.service.local_model
        overrides = {
            **{k: v for k, v in self.cfg.tune_overrides.items() if k != "budget"},
            **{k: v for k, v in spec.overrides.items() if k not in ("views", "optimizer")},
        }
        command = [
            sys.executable,
            "-m",
            WHITEBOX_MODULE,
            "--data",
            self.cfg.data,
            "--shots",
            str(split.shots),
            "--seed",
            str(split.seed),
            "--views",
            str(self._views(spec)),
            "--cache",
            str(self.service.cache_path),
            "--out",
            str(out),
            "--model",
            model,
            "--config-json",
            json.dumps(overrides),
            "--name",
            spec.name,
        ]
        if pretrained is not None:
            command += ["--pretrained", pretrained]
        if self.cfg.test_per_class is not None:
            command += ["--test-per-class", str(self.cfg.test_per_class)]
        if self.cfg.data_dir is not None:
            command += ["--data-dir", str(self.cfg.data_dir)]
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with (out / "whitebox.log").open("wb") as log:
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"the white-box run exited with {done.returncode}; see {out / 'whitebox.log'}")

    # -- records ------------------------------------------------------------------------------
    def _identity(self, spec: MethodSpec, split: FewShotSplit, out: Path) -> dict[str, Any]:
        return {
            "method": spec.name,
            "kind": spec.kind,
            "black_box": spec.black_box,
            "shots": split.shots,
            "seed": split.seed,
            "budget": self.cfg.budget if spec.black_box else None,
            "run_dir": str(out),
            "feature_items_if_uncached": feature_items_if_uncached(split, self._views(spec)),
        }

    def _record(self, spec: MethodSpec, split: FewShotSplit, out: Path, status: str) -> dict[str, Any]:
        record = {**self._identity(spec, split, out), "status": status}
        saved = out / "bench.json"
        if status == "cached" and saved.exists():  # the bench's own record of that run
            record = {**json.loads(saved.read_text()), "status": status}
        report = json.loads((out / "report.json").read_text())
        record.update(_counts(report, record["feature_items_if_uncached"], out))
        if status == "done":
            saved.write_text(json.dumps(record, indent=2))
        return {**record, "report": report}


def _counts(report: Mapping[str, Any], uncached: int, out: Path) -> dict[str, Any]:
    """Items charged, the image features among them, and items including cached features."""
    queries = report.get("queries") or {}
    charged_features = report.get("feature_items_charged")  # feature baselines, white-box
    if charged_features is None:  # the tuner logs what it paid for features as it fetches them
        spend = out / TUNER_FEATURE_LOG
        charged_features = json.loads(spend.read_text()).get("items", 0) if spend.exists() else 0
    items = int(queries.get("items", 0))
    return {
        "items_charged": items,
        "feature_items_charged": int(charged_features),
        "items_including_features": items - int(charged_features) + uncached,
    }


def collect_on_disk(data_out: Path, known: Iterable[str]) -> list[dict[str, Any]]:
    """Finished runs under OUT/<data> that the current grid did not list (earlier invocations)."""
    seen = set(known)
    found = []
    for saved in sorted(data_out.glob("*/*shot/seed*/bench.json")):
        out = saved.parent
        if str(out) in seen or not (out / "report.json").exists():
            continue
        record = json.loads(saved.read_text())
        report = json.loads((out / "report.json").read_text())
        record.update(_counts(report, record["feature_items_if_uncached"], out))
        found.append({**record, "status": "on-disk", "report": report})
    return found


def run_bench(cfg: BenchConfig, service: Service) -> list[dict[str, Any]]:
    """Run the grid (skipping finished runs) and write results.json, results.md and the plots."""
    bench = Bench(cfg, service)
    try:
        records = bench.run()
    finally:
        bench.close()
    if not cfg.grid_only:
        records += collect_on_disk(cfg.data_out, (r["run_dir"] for r in records))
    write_outputs(cfg, records, load_feature_passes(cfg.data_out))
    return records


def load_feature_passes(data_out: Path) -> list[dict[str, Any]]:
    """Every shared feature pass made for this output folder, by this and earlier invocations."""
    path = data_out / PASSES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Summary: results.json, results.md, plots
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "uname": " ".join(platform.uname()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_outputs(cfg: BenchConfig, records: list[dict[str, Any]], passes: list[dict[str, Any]]) -> None:
    data_out = cfg.data_out
    data_out.mkdir(parents=True, exist_ok=True)
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
            "tune_overrides": dict(cfg.tune_overrides),
        },
        "methods": {
            name: {"kind": s.kind, "overrides": dict(s.overrides), "needs": s.needs, "black_box": s.black_box}
            for name, s in METHODS.items()
            if any(r["method"] == name for r in records)
        },
        "feature_passes": passes,
        "runs": records,
    }
    (data_out / "results.json").write_text(json.dumps(json_safe(payload), indent=2))
    (data_out / "results.md").write_text(results_markdown(cfg, records, passes))
    plot_items(records, data_out)
    plot_shots(records, data_out / "acc_vs_shots.png")
    logger.info("wrote %s", data_out / "results.md")


def _method_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [m for m in METHODS if any(r["method"] == m for r in records)]
    return names + sorted({r["method"] for r in records} - set(names))


@dataclass
class Group:
    method: str
    shots: int
    budget: int | None
    runs: list[Mapping[str, Any]]

    def values(self, key: str) -> list[float]:
        """Per-run values: query counts from the report, bench counts from the record, else the report."""
        out = []
        for r in self.runs:
            if key in ("calls", "loss_evaluations"):
                value = (r["report"].get("queries") or {}).get(key)
            else:
                value = r[key] if key in r else r["report"].get(key)
            if value is not None:
                out.append(float(value))
        return out


def groups(records: Sequence[Mapping[str, Any]]) -> list[Group]:
    done = [r for r in records if r.get("report") is not None]
    out: list[Group] = []
    for method in _method_order(done):
        keys = sorted({(r["shots"], r.get("budget") or 0) for r in done if r["method"] == method})
        for shots, budget in keys:
            runs = [
                r
                for r in done
                if r["method"] == method and r["shots"] == shots and (r.get("budget") or 0) == budget
            ]
            out.append(Group(method, shots, budget or None, sorted(runs, key=lambda r: r["seed"])))
    return out


def _mean_std(values: Sequence[float], scale: float = 1.0) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return mean, std


def _pm(values: Sequence[float]) -> str:
    mean, std = _mean_std(values, 100.0)
    return "–" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def _num(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:,.0f}" if mean >= 10 else f"{mean:.1f}"


def _prompt_only(method: str) -> bool:
    spec = METHODS.get(method)
    return spec is not None and spec.overrides.get("method") == "cbbt-prompt"


def results_markdown(
    cfg: BenchConfig, records: Sequence[Mapping[str, Any]], passes: Sequence[Mapping[str, Any]]
) -> str:
    table = groups(records)
    # White-box references per (shots, prompt-only?): prompt-only methods are measured against
    # CoOp alone when it ran, everything else against CoOp + adapter.
    ceilings = {
        (g.shots, g.method == "coop-prompt-whitebox"): statistics.fmean(g.values("test_accuracy"))
        for g in table
        if g.method in ("coop-whitebox", "coop-prompt-whitebox") and g.values("test_accuracy")
    }
    lines = [
        f"# Benchmark: {cfg.data}",
        "",
        f"Seeds {', '.join(map(str, cfg.seeds))}; per-run budget "
        f"{cfg.budget if cfg.budget is not None else 'none'} items (image features included); "
        f"{cfg.views} cached view(s) per training image; test images per class: "
        f"{cfg.test_per_class or 'all'}. Accuracies in %, mean ± sample std over seeds; selection on "
        "validation only; the test split is scored once per run.",
        "",
        "- **items charged**: items (images + text sequences encoded) the run's own key paid for. All "
        "runs share one feature cache, and each split's image features are fetched once before its "
        "runs (the feature pass below), so this is ≈ the run's text/prompt cost only.",
        "- **items incl. features**: items charged + the image features the run used but found cached "
        "(train × views + val + test): what it would cost alone, from a cold cache. `--budget` caps this.",
        "- **calls**: HTTP requests; **loss evals**: prompt evaluations (each = C class texts).",
        "- **% of white-box**: mean test accuracy as a fraction of white-box CoOp's (exact gradients, "
        "in-process, NOT black-box; its items count in-process encodings, not API calls): of "
        "`coop-prompt-whitebox` (CoOp alone) for prompt-only methods when it ran, else of "
        "`coop-whitebox` (CoOp + the same adapter).",
        "",
        "| method | shots | runs | test acc | val acc | zero-shot test | items charged "
        "| items incl. features | calls | loss evals | wall s | % of white-box |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in table:
        tests = g.values("test_accuracy")
        ceiling = ceilings.get((g.shots, _prompt_only(g.method)), ceilings.get((g.shots, False)))
        share = f"{100 * statistics.fmean(tests) / ceiling:.0f}" if tests and ceiling else "–"
        name = g.method + ("" if METHODS.get(g.method) is None or METHODS[g.method].black_box else " †")
        budget_note = "" if g.budget in (None, cfg.budget) else f" (budget {g.budget})"
        lines.append(
            f"| {name}{budget_note} | {g.shots} | {len(g.runs)} | {_pm(tests)} "
            f"| {_pm(g.values('val_accuracy'))} "
            f"| {_pm(g.values('zero_shot_test_accuracy'))} | {_num(g.values('items_charged'))} "
            f"| {_num(g.values('items_including_features'))} | {_num(g.values('calls'))} "
            f"| {_num(g.values('loss_evaluations'))} | {_num(g.values('wall_seconds'))} | {share} |"
        )
    lines.append("")
    if any(g.method in METHODS and not METHODS[g.method].black_box for g in table):
        lines += ["† not black-box (a reference ceiling).", ""]
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["Failed runs:", ""]
        lines += [f"- {r['method']} {r['shots']}-shot seed {r['seed']}: {r.get('error')}" for r in failed]
        lines.append("")
    if passes:
        total = sum(int(p["queries"]["items"]) for p in passes)
        lines += [
            f"Feature passes (shared, charged to no run): {len(passes)} split(s), {total:,} image items, "
            f"{sum(float(p['wall_seconds']) for p in passes):.0f} s.",
            "",
        ]
    lines += ["What each method needs from the API:", "", "| method | needs | what it is |", "|---|---|---|"]
    for name in _method_order(records):
        spec = METHODS.get(name)
        if spec is not None:
            lines.append(f"| {name} | {spec.needs} | {spec.description} |")
    return "\n".join(lines) + "\n"


def _load_curve(record: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(items including features, best validation accuracy so far) along the run."""
    path = Path(record["run_dir"]) / "curve.json"
    if not path.exists():
        return []
    offset = int(record["items_including_features"]) - int(record["items_charged"])
    points = [p for p in json.loads(path.read_text()) if p.get("val_accuracy") is not None]
    out: list[tuple[float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["items"], p["step"])):
        best = max(best, float(p["val_accuracy"]))
        out.append((float(p["items"]) + offset, best))
    return out


def _mean_curve(curves: Sequence[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Average step functions (value held until the next point) over a shared x grid."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    xs = sorted({x for c in curves for x, _ in c if x >= max(c2[0][0] for c2 in curves)})
    ys = []
    for x in xs:
        values = []
        for c in curves:
            held = [y for cx, y in c if cx <= x]
            values.append(held[-1] if held else c[0][1])
        ys.append(statistics.fmean(values))
    return xs, ys


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = {"tune": "o", "feature": "s", "whitebox": "D"}


def _style(method: str, index: int) -> dict[str, Any]:
    """A distinct colour per method (tab20), a marker per kind, dashed for white-box references."""
    import matplotlib

    spec = METHODS.get(method)
    kind = spec.kind if spec is not None else "tune"
    return {
        # tab20's dark shades first (ten distinct hues), then its light ones.
        "color": matplotlib.colormaps["tab20"]((2 * index) % 20 + (2 * index // 20) % 2),
        "marker": _MARKERS.get(kind, "o"),
        "white_box": spec is not None and not spec.black_box,
    }


def plot_items(records: Sequence[Mapping[str, Any]], data_out: Path) -> None:
    plt = _pyplot()
    table = groups(records)
    order = _method_order(records)
    for shots in sorted({g.shots for g in table}):
        fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
        for g in (g for g in table if g.shots == shots):
            style = _style(g.method, order.index(g.method))
            tests = [100 * v for v in g.values("test_accuracy")]
            mean_t, std_t = _mean_std(tests)
            if style["white_box"]:
                ax.axhline(mean_t, color=style["color"], linestyle="--", label=f"{g.method} (not black-box)")
                continue
            xs, ys = _mean_curve([_load_curve(r) for r in g.runs])
            if len(xs) > 1:
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    color=style["color"],
                    linewidth=1.2,
                    alpha=0.8,
                    drawstyle="steps-post",
                )
            items = g.values("items_including_features")
            ax.errorbar(
                [statistics.fmean(items)],
                [mean_t],
                yerr=[std_t],
                color=style["color"],
                marker=style["marker"],
                capsize=3,
                label=g.method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("items spent, image features included (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(
            f"{shots}-shot: lines = validation accuracy of the checkpoint selected so far "
            "(mean over seeds);\n"
            "markers = final test accuracy (mean ± std); squares = zero-prompt-query feature methods",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(data_out / f"acc_vs_items_{shots}shot.png")
        plt.close(fig)


def plot_shots(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    table = groups(records)
    order = _method_order(records)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for method in _method_order([r for g in table for r in g.runs]):
        style = _style(method, order.index(method))
        rows = sorted((g for g in table if g.method == method), key=lambda g: g.shots)
        stats = [_mean_std(g.values("test_accuracy"), 100.0) for g in rows]
        ax.errorbar(
            [g.shots for g in rows],
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            color=style["color"],
            marker=style["marker"],
            linestyle="--" if style["white_box"] else "-",
            capsize=3,
            label=method + (" (not black-box)" if style["white_box"] else ""),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

_BENCH_OWN = {"method", "shots", "seed", "budget", "views"}


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="run methods x shots x seeds under one query counter; tables and plots"
    )
    _add_connection(bench)
    _add_data(bench)
    bench.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help=f"of: {', '.join(METHODS)}"
    )
    bench.add_argument("--shots", nargs="+", type=int, default=[16])
    bench.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    bench.add_argument("--budget", type=int, default=None, help="items per run, image features included")
    bench.add_argument("--views", type=int, default=2, help="cached views per training image")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--local", action="store_true", help="start a local server (and allow coop-whitebox)")
    bench.add_argument("--local-model", default=None, help="model the local server serves (default: devise)")
    bench.add_argument("--local-pretrained", default=None, help="its open_clip weights ('none': random)")
    bench.add_argument("--local-arg", action="append", default=[], help="another `serve` flag (repeatable)")
    bench.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=BASE:KEY=VALUE,...",
        help="add a method: BASE's spec with TuneConfig overrides (repeatable)",
    )
    bench.add_argument("--grid-only", action="store_true", help="summarise only this grid's runs")
    bench.add_argument(
        "--client-threads",
        type=int,
        default=1,
        help="torch threads for the client's local work (0: torch's choice); 1 leaves the local "
        "server a core, and the client's tensors are small",
    )
    bench.add_argument("--no-progress", action="store_true")
    for flag, name, kind, help_text in _TUNE_FLAGS:
        if name not in _BENCH_OWN:
            bench.add_argument(
                flag, dest=name, type=kind, default=None, help=f"(every tuner run) {help_text}"
            )


def bench_config(args: argparse.Namespace) -> BenchConfig:
    for text in args.define:
        name, base, overrides = parse_define(text)
        register_method(name, based_on=base, **overrides)
    tune_overrides = {
        name: getattr(args, name)
        for _, name, _, _ in _TUNE_FLAGS
        if name not in _BENCH_OWN and getattr(args, name, None) is not None
    }
    return BenchConfig(
        data=args.data,
        out=args.out,
        methods=tuple(args.methods),
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        budget=args.budget,
        views=args.views,
        test_per_class=args.test_per_class,
        data_dir=args.data_dir,
        tune_overrides=tune_overrides,
        grid_only=args.grid_only,
        progress=not args.no_progress,
    )


def command(args: argparse.Namespace, settings: ClientSettings) -> int:
    """`cbbt bench`: against --server, or a server started here with --local."""
    try:
        cfg = bench_config(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if args.client_threads > 0:
        torch.set_num_threads(args.client_threads)
    cache_path = (args.cache_dir or cfg.out / "cache") / CACHE_FILE
    bench = Bench(cfg, Service("http://unused", None, cache_path))
    # Only API runs need a server: finished runs are skipped, the white-box runs in-process.
    needs_server = any(METHODS[m].kind != "whitebox" for _, _, m in bench.pending())
    bench.close()
    local_model = (args.local_model or DEFAULT_LOCAL_MODEL, args.local_pretrained) if args.local else None
    if not args.local or not needs_server:
        service = Service(settings.server, settings.api_key, cache_path, local_model=local_model)
        records = run_bench(cfg, service)
    else:
        server_dir = cfg.out / "server"
        server_dir.mkdir(parents=True, exist_ok=True)
        extra: list[str] = []
        if args.local_model:
            extra += ["--model", args.local_model]
        if args.local_pretrained:
            extra += ["--pretrained", args.local_pretrained]
        extra += args.local_arg
        with LocalServer(
            db=server_dir / "server.db", log_path=server_dir / "server.log", extra_args=tuple(extra)
        ) as server:
            name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # key names are unique
            key = server.create_key(name, budget_items=LOCAL_KEY_BUDGET)
            service = Service(server.url, key, cache_path, local_model=local_model)
            records = run_bench(cfg, service)
    failed = [r for r in records if r.get("status") == "failed"]
    print(f"{len(records)} runs ({len(failed)} failed); summary: {cfg.data_out / 'results.md'}")
    return 1 if failed else 0
