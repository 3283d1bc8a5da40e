"""Run one registered method on one few-shot split into one run folder.

The single entry point for `cbbt tune` and for every cell of `cbbt bench`: the registry says
how the method runs (client/methods.py), this module dispatches it:
- `tune`: the tuning loop (`Tuner`), resumable from its checkpoint; on the prediction-only
  tier (a `ClassifyClient`), the loss-only prompt tuners through /v1/classify instead
  (`run_on_predictions`), never seeing a feature;
- `feature`: a feature method (`run_feature_method`);
- `whitebox`: the in-process CoOp reference, launched as its own process
  (`python -m benchmarks.whitebox`) because it loads the model, which a black-box client never does;
- `collab`: the default `cbbt` (`run_collaborative`), or with `--estimator faithful` CBBT's
  released recipe (`cbbt-paper`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.api import ModelApi
from client.collab import run_collaborative
from client.data import FewShotSplit
from client.errors import CbbtError, RequestError
from client.feature_methods import run_feature_method
from client.features import FeatureStore
from client.methods import (
    METHODS,
    MethodSpec,
    collab_config_for,
    feature_config_for,
    runs_paper_recipe,
    tune_config_for,
    whitebox_settings,
)
from client.prediction_tier import DEFAULT_BATCH, run_on_predictions
from client.progress import NO_PROGRESS, Progress
from client.report import RunReport
from client.run_context import RunContext
from client.run_folder import RunFolder
from client.server_process import REPO_ROOT
from client.tiers import check_runs_on, tier_of_client
from client.train import Tuner
from shared.tiers import Tier

logger = logging.getLogger(__name__)

WHITEBOX_MODULE = "benchmarks.whitebox"
WHITEBOX_SCRIPT = REPO_ROOT / "benchmarks" / "whitebox.py"


@dataclass(frozen=True)
class LocalModel:
    """The model the local server serves, for the in-process white-box reference."""

    model: str
    pretrained: str | None
    cache_path: Path


@dataclass(frozen=True)
class DataSpec:
    """A data set as the user named it (client.data.load_dataset's spec) and its options."""

    spec: str
    data_dir: Path | None = None
    test_per_class: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run: a method on a split, with the flags the user typed and the run's own settings."""

    method: MethodSpec
    split: FewShotSplit
    folder: RunFolder
    data: DataSpec
    views: int | None = None
    budget: int | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_settings(self) -> dict[str, Any]:
        values = {
            "shots": self.split.shots,
            "seed": self.split.seed,
            "views": self.views,
            "budget": self.budget,
        }
        return {k: v for k, v in values.items() if v is not None}


def run_method(
    run: RunSpec,
    api: ModelApi | None,
    features: FeatureStore | None,
    *,
    resume: bool = False,
    progress: Progress = NO_PROGRESS,
    local_model: LocalModel | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> RunReport:
    """Run it; returns its report (also in `run.folder`). `on_plan` hears the run's planned
    cost before anything is spent."""
    spec = run.method
    if runs_paper_recipe(spec, run.flags):
        logger.info("%s --estimator faithful: CBBT's released recipe (cbbt-paper)", spec.name)
        spec = METHODS["cbbt-paper"]
    if spec.kind == "whitebox":
        return run_whitebox(run, local_model)
    if api is None or features is None:
        raise RequestError(f"{spec.name} needs a server")
    check_runs_on(spec, api)  # before anything is spent
    ctx = RunContext(api, features, run.split, run.folder, spec.name, progress, on_plan)
    if spec.kind == "feature":
        return run_feature_method(ctx, feature_config_for(spec, run.run_settings))
    if spec.kind == "collab":
        if resume:
            logger.warning("%s keeps no checkpoint: features come from the cache, the rest reruns", spec.name)
        return run_collaborative(ctx, collab_config_for(spec, run.flags, run.run_settings))
    cfg = tune_config_for(spec, run.flags, run.run_settings)
    if tier_of_client(api) == Tier.predictions:
        batch = cfg.batch_size if cfg.batch_size > 0 else DEFAULT_BATCH
        faithful = math.ceil(len(run.split.train) / batch) * cfg.epochs
        return run_on_predictions(ctx, cfg, faithful_steps=faithful)
    return Tuner(ctx, cfg).run(resume=resume).report


def run_whitebox(run: RunSpec, local: LocalModel | None) -> RunReport:
    """CoOp in its own process on the local model; its report lands in the run folder."""
    spec, split, folder = run.method, run.split, run.folder
    if local is None:
        raise RequestError(
            f"{spec.name} runs the model in-process: use `cbbt bench --local`, or run "
            f"`python -m {WHITEBOX_MODULE} ...` yourself (its report.json is then picked up)"
        )
    if not WHITEBOX_SCRIPT.exists():
        raise RequestError(f"{WHITEBOX_SCRIPT} not found (the white-box script lives in the repository)")
    command = [
        sys.executable, "-m", WHITEBOX_MODULE,
        "--data", run.data.spec, "--shots", str(split.shots), "--seed", str(split.seed),
        "--views", str(run.views if run.views is not None else 2), "--cache", str(local.cache_path),
        "--out", str(folder.path), "--model", local.model,
        "--config-json", json.dumps(whitebox_settings(spec, run.flags)), "--name", spec.name,
    ]  # fmt: skip
    if local.pretrained is not None:
        command += ["--pretrained", local.pretrained]
    if run.data.test_per_class is not None:
        command += ["--test-per-class", str(run.data.test_per_class)]
    if run.data.data_dir is not None:
        command += ["--data-dir", str(run.data.data_dir)]
    folder.create()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with folder.whitebox_log.open("wb") as log:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise CbbtError(f"the white-box run exited with {done.returncode}; see {folder.whitebox_log}")
    return RunReport.load(folder)
