"""The tuning client end to end, against real server processes on loopback, through the CLI.

- the default real-weights model on Fashion-MNIST: a small budget improves validation accuracy
  over zero-shot, is never exceeded, and the client's counts equal the server's ledger; the
  artifact then serves `cbbt eval` and `cbbt predict`, and `cbbt usage` shows the budget;
- the tiny model behind injected 500/503s and cut connections: the run completes, no double charge;
- `--resume` after a SIGKILL: the same artifact as an uninterrupted run, nothing charged twice;
- a budget that cannot pay for the features: a clear error before anything is spent.

Runs go through `client.cli.main` in this process where that is enough, and through
`python -m client.cli` subprocesses where a process has to die.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from client.api import CbbtClient
from client.artifact import TENSORS_FILE
from client.cli import main as cbbt
from client.data import load_dataset
from client.run_folder import RunFolder
from shared.schemas import UsageReport
from tests.helpers import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.slow

# Small runs: 4 shots x 10 classes, 4 validation images per class, q = 8 directions (90 items a
# step), one view per image, 2 prompt steps per epoch.
# The faithful estimator preset, so the step arithmetic below is the documented one; the
# fast preset has its own end-to-end test below.
SMALL = [
    "--estimator",
    "faithful",
    "--shots",
    "4",
    "--views",
    "1",
    "--directions",
    "8",
    "--seed",
    "1",
    "--no-progress",
]


@dataclass(frozen=True)
class Key:
    name: str
    secret: str


def new_key(server: ServerProcess, budget_items: int = 10**9) -> Key:
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    return Key(name, server.create_key(name, budget_items=budget_items, default=False))


def ledger(server: ServerProcess, key: Key) -> UsageReport:
    with CbbtClient(server.url, key.secret) as client:  # retries, should the server inject faults
        return client.usage()


def tune_argv(server: ServerProcess, key: Key, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "tune",
        "--server",
        server.url,
        "--api-key",
        key.secret,
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


def read_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


def assert_ledger_matches(report: dict[str, Any], usage: UsageReport) -> None:
    queries = report["queries"]
    assert (queries["items"], queries["calls"]) == (usage.spent_items, usage.spent_requests), (
        queries,
        usage.model_dump(exclude={"recent"}),
    )


# -- the default model on real data -------------------------------------------------------

DEVISE_BUDGET = 800  # features 40 + 40 + 20 images, init 11 items, then 7 steps of 90 items
DEVISE_DATA = ["--data", "fashion-mnist", "--test-per-class", "2"]


@dataclass(frozen=True)
class DeviseRun:
    server: ServerProcess
    key: Key
    cache: Path
    out: Path
    report: dict[str, Any]
    usage: UsageReport


@pytest.fixture(scope="module")
def devise_run(devise_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> DeviseRun:
    try:
        load_dataset("fashion-mnist")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    root = tmp_path_factory.mktemp("devise-run")
    key = new_key(devise_server)
    argv = tune_argv(devise_server, key, root / "cache", root / "run", *DEVISE_DATA)
    argv += ["--budget", str(DEVISE_BUDGET), "--epochs", "5", "--adapter-start-epoch", "1"]
    argv += ["--adapter-epochs", "30"]
    assert cbbt(argv) == 0
    report = read_report(root / "run")
    return DeviseRun(devise_server, key, root / "cache", root / "run", report, ledger(devise_server, key))


def test_tuning_improves_validation_accuracy_within_the_budget(devise_run: DeviseRun) -> None:
    report = devise_run.report
    # `--estimator faithful` (SMALL) runs CBBT's released recipe, recorded under its own name.
    assert report["method"] == "cbbt-paper" and report["shots"] == 4 and report["seed"] == 1
    assert report["val_accuracy"] > report["zero_shot_val_accuracy"], report
    assert report["plan"]["scaled"] and report["prompt_steps"] == report["plan"]["steps"] > 0
    assert report["queries"]["items"] <= DEVISE_BUDGET
    assert devise_run.usage.spent_items <= DEVISE_BUDGET
    # A fresh key and a fresh cache: every charged call was counted, and nothing else.
    assert_ledger_matches(report, devise_run.usage)
    assert report["queries"]["loss_evaluations"] == 1 + 9 * report["prompt_steps"]
    for name in ("zero_shot_test_accuracy", "test_accuracy", "wall_seconds"):
        assert isinstance(report[name], float)
    assert (devise_run.out / "curve.png").stat().st_size > 0
    curve = json.loads((devise_run.out / "curve.json").read_text())
    assert max(p["items"] for p in curve) <= DEVISE_BUDGET


def test_eval_reproduces_the_reported_test_accuracy(
    devise_run: DeviseRun, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    argv = ["eval", "--server", devise_run.server.url, "--api-key", devise_run.key.secret]
    argv += ["--cache-dir", str(devise_run.cache), "--artifact", str(devise_run.out / "artifact")]
    assert cbbt([*argv, *DEVISE_DATA]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_images"] == devise_run.report["test_images"] == 20
    assert result["test_accuracy"] == pytest.approx(devise_run.report["test_accuracy"], abs=1e-6)
    # The test images' features were cached by the run: evaluating spent nothing more.
    assert ledger(devise_run.server, devise_run.key).spent_items == devise_run.usage.spent_items


def test_predict_prints_a_label_and_probability_per_image(
    devise_run: DeviseRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = load_dataset("fashion-mnist")
    images = []
    for i, example in enumerate(dataset.test[:3]):
        path = tmp_path / f"image{i}.png"
        path.write_bytes(example.image_bytes())
        images.append(path)
    capsys.readouterr()
    argv = ["predict", "--server", devise_run.server.url, "--api-key", devise_run.key.secret]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--artifact", str(devise_run.out / "artifact")]
    assert cbbt([*argv, *map(str, images)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert line["label"] in dataset.class_names
        assert 1 / len(dataset.class_names) <= line["probability"] <= 1.0


def test_usage_prints_the_budget(devise_run: DeviseRun, capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key(devise_run.server, budget_items=4321)
    capsys.readouterr()
    assert cbbt(["usage", "--server", devise_run.server.url, "--api-key", key.secret]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage["key_name"] == key.name
    assert (usage["budget_items"], usage["spent_items"], usage["remaining_items"]) == (4321, 0, 4321)


# -- the tiny model: faults, resume, a budget too small ------------------------------------

TINY_DATA = ["--data", "digits", "--test-per-class", "5"]


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("faulty") / "cbbt.db"
    faults = ["--failure-rate", "0.2", "--drop-rate", "0.05", "--fault-seed", "3"]
    with ServerProcess(db, extra_args=faults) as server:
        yield server


def test_tuning_survives_injected_failures_without_double_charge(
    faulty_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(faulty_server)
    argv = tune_argv(faulty_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA)
    assert cbbt([*argv, "--budget", "1500", "--epochs", "5", "--adapter-epochs", "5"]) == 0
    report = read_report(tmp_path / "run")
    assert report["queries"]["retries"] > 0, "no fault was injected: the test proves nothing"
    assert report["prompt_steps"] == report["plan"]["steps"] > 0
    assert report["queries"]["items"] <= 1500
    assert_ledger_matches(report, ledger(faulty_server, key))


# 20 faithful steps; the budget affords 15 of them after 130 images and the initial prompt.
RESUME_ARGS = [*TINY_DATA, "--budget", "1500", "--epochs", "10", "--adapter-start-epoch", "2"]
RESUME_ARGS += ["--adapter-epochs", "5", "--checkpoint-every", "1"]


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _checkpoint_step(out: Path) -> int:
    try:
        return int(torch.load(RunFolder(out).checkpoint, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.mark.parametrize(
    "stepper", [[], ["--optimizer", "surrogate", "--directions", "4"]], ids=["estimator", "surrogate"]
)
def test_resume_after_a_kill_finishes_with_the_same_artifact(
    tiny_server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture, stepper: list[str]
) -> None:
    # The uninterrupted reference: its own key, cache and output folder (so its own run id).
    # Separate caches, both cold at the start: a run that starts with the features cached
    # plans more prompt steps, so sharing one cache would compare two different schedules.
    ref_key = new_key(tiny_server)
    ref_out = tmp_path / "reference"
    assert (
        cbbt([*tune_argv(tiny_server, ref_key, tmp_path / "ref-cache", ref_out), *RESUME_ARGS, *stepper]) == 0
    )
    reference = read_report(ref_out)
    assert reference["plan"]["scaled"] and reference["prompt_steps"] == 15
    assert_ledger_matches(reference, ledger(tiny_server, ref_key))

    # The same run in a subprocess, killed (no chance to checkpoint) a few steps in.
    key = new_key(tiny_server)
    out, cache = tmp_path / "killed", tmp_path / "cache"
    argv = [
        sys.executable,
        "-m",
        "client.cli",
        *tune_argv(tiny_server, key, cache, out),
        *RESUME_ARGS,
        *stepper,
    ]
    log = (tmp_path / "killed.log").open("wb")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=_subprocess_env(), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_step(out) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()
    killed_at = _checkpoint_step(out)
    assert 3 <= killed_at < 15 and not (out / "report.json").exists()

    # Resume (in this process: it is the checkpoint that has to carry everything over).
    with caplog.at_level(logging.INFO, logger="client.train"):
        assert cbbt([*argv[3:], "--resume"]) == 0
    assert "resumed at step" in caplog.text
    resumed = read_report(out)
    for name in ("prompt_steps", "selected_step", "adapter_epochs", "stopped_reason"):
        assert resumed[name] == reference[name], name
    assert resumed["val_accuracy"] == pytest.approx(reference["val_accuracy"])
    assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"])
    assert resumed["queries"]["items"] == reference["queries"]["items"]

    # The same artifact, to float tolerance.
    ref_tensors = load_file(str(ref_out / "artifact" / TENSORS_FILE))
    tensors = load_file(str(out / "artifact" / TENSORS_FILE))
    assert tensors.keys() == ref_tensors.keys()
    assert {"context", "class_text_features"} < set(tensors) and any(
        k.startswith("adapter.") for k in tensors
    )
    for name, value in ref_tensors.items():
        torch.testing.assert_close(tensors[name], value, atol=1e-4, rtol=1e-4, msg=name)

    # Redone steps were replayed by the server, not charged again.
    assert_ledger_matches(resumed, ledger(tiny_server, key))


def test_a_budget_too_small_for_the_features_stops_before_spending(
    tiny_server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key(tiny_server)
    argv = tune_argv(tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA, "--budget", "100")
    with caplog.at_level(logging.ERROR):
        code = cbbt(argv)
    assert code != 0
    assert "cannot pay for the image features" in caplog.text
    usage = ledger(tiny_server, key)
    assert (usage.spent_items, usage.spent_requests) == (0, 0)
    assert not (tmp_path / "run" / "report.json").exists()


def test_the_servers_quota_stops_the_run_cleanly(tiny_server: ServerProcess, tmp_path: Path) -> None:
    # No --budget: the key's 600 items pay for 130 images, the initial prompt (11) and 5 steps.
    key = new_key(tiny_server, budget_items=600)
    argv = tune_argv(tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA)
    assert cbbt([*argv, "--epochs", "10", "--adapter-epochs", "3"]) == 0
    report = read_report(tmp_path / "run")
    assert report["stopped_reason"] == "server quota"
    assert report["prompt_steps"] == 5 and report["adapter_epochs"] == 3
    assert (tmp_path / "run" / "artifact" / TENSORS_FILE).exists()
    usage = ledger(tiny_server, key)
    assert usage.spent_items == 130 + 11 + 5 * 90 <= 600
    assert_ledger_matches(report, usage)


def test_the_fast_estimator_runs_end_to_end(tiny_server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(tiny_server)
    argv = [
        "tune", "--server", tiny_server.url, "--api-key", key.secret,
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
        "--shots", "4", "--views", "2", "--seed", "2", "--no-progress", *TINY_DATA,
        "--budget", "1200", "--adapter-epochs", "3", "--method", "cbbt-paper", "--estimator", "fast",
    ]  # fmt: skip
    assert cbbt(argv) == 0
    report = read_report(tmp_path / "run")
    config = report["config"]
    assert config["estimator"] == "fast" and config["batch_size"] == 0 and config["adapter"] == "tip"
    # 4 antithetic directions: the base prompt + 8 perturbed prompts per step, in one call each.
    assert report["queries"]["loss_evaluations"] == 1 + 9 * report["prompt_steps"]
    assert report["prompt_steps"] == report["plan"]["steps"] > 0
    assert report["queries"]["items"] <= 1200
    assert_ledger_matches(report, ledger(tiny_server, key))


# -- one registry: tune runs any method the bench runs, and a new feature method plugs in -----


def test_tune_runs_a_feature_method_of_the_registry(tiny_server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(tiny_server)
    argv = tune_argv(
        tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA, "--method", "tip-adapter"
    )
    assert cbbt([*argv, "--budget", "1000"]) == 0
    report = read_report(tmp_path / "run")
    assert report["method"] == "tip-adapter" and set(report["selected"]) == {"alpha", "beta"}
    # 40 training views, 40 val and 50 test images, then the template's 10 class texts.
    assert report["queries"]["items"] == 130 + 10 and report["queries"]["calls"] == 3 + 1
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_a_new_feature_method_is_a_fit_function_and_a_registry_entry(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    """The extension point docs/architecture.md describes, end to end through the CLI."""
    from client.feature_methods import FITS, FeatureConfig, FeatureData, Fit
    from client.methods import METHODS, MethodSpec
    from client.model import score

    def fit_class_means(cfg: FeatureConfig, data: FeatureData) -> Fit:
        x, y = data.flat_train
        means = torch.stack([x[y == c].mean(0) for c in range(data.classes)])
        best = None
        for blend in (0.0, 0.5, 1.0):  # its hyperparameter, selected on validation
            weights = torch.nn.functional.normalize(blend * means + (1 - blend) * data.text, dim=-1)
            acc, loss = score(data.scale * data.val @ weights.T, data.val_labels)
            if best is None or (acc, -loss) > (best.val_accuracy, -best.val_loss):
                best = Fit(lambda f, w=weights: data.scale * f @ w.T, acc, loss, {"blend": blend})
        assert best is not None
        return best

    FITS["class-means"] = fit_class_means
    METHODS["class-means"] = MethodSpec("class-means", "feature", {"method": "class-means"})
    try:
        key = new_key(tiny_server)
        argv = tune_argv(tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA)
        assert cbbt([*argv, "--method", "class-means"]) == 0
    finally:
        FITS.pop("class-means")
        METHODS.pop("class-means")
    report = read_report(tmp_path / "run")
    assert report["method"] == "class-means" and report["selected"]["blend"] in (0.0, 0.5, 1.0)
    assert_ledger_matches(report, ledger(tiny_server, key))
