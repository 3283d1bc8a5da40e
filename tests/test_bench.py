"""`cbbt bench` smoke test: a tiny grid against a local tiny-model server checks the harness
(results.json, results.md, plots, skipping finished runs), never the numbers; plus the
white-box reference's grad-enabled forward and a short white-box run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.cli import main
from client.errors import RequestError
from client.methods import METHODS, parse_define, register_method

METHODS_UNDER_TEST = ("zero-shot", "linear-probe", "tip-adapter", "cbbt-prompt")
# The narrowest API tier offering every route each one called (a full-tier key runs them all).
TIERS = {"zero-shot": "full", "linear-probe": "embeddings", "tip-adapter": "embeddings",
         "cbbt-prompt": "full"}  # fmt: skip


def _bench(out: Path) -> int:
    return main(
        [
            "bench",
            "--local",
            "--local-model",
            "cbbt-tiny",
            "--local-pretrained",
            "none",
            "--data",
            "digits",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--methods",
            *METHODS_UNDER_TEST,
            "--directions",
            "4",
            "--epochs",
            "1",
            "--adapter-epochs",
            "1",
            "--budget",
            "2000",
            "--test-per-class",
            "5",
            "--out",
            str(out),
            "--no-progress",
            "--client-threads",
            "0",  # leave the pytest process's torch threads alone
        ]
    )


@pytest.mark.timeout(90)
def test_bench_writes_results_and_skips_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert _bench(out) == 0
    data_out = out / "digits"
    results = json.loads((data_out / "results.json").read_text())
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(METHODS_UNDER_TEST)
    for record in runs:
        assert record["status"] == "done"
        report = record["report"]
        for key in ("val_accuracy", "test_accuracy", "zero_shot_test_accuracy", "wall_seconds"):
            assert isinstance(report[key], float), (record["method"], key)
        assert set(report["queries"]) >= {"calls", "items", "loss_evaluations"}
        # 20 shots x 2 views + 20 val + 50 test images, whether or not this run paid for them.
        assert record["feature_items_if_uncached"] == 110
        assert record["items_including_features"] <= 2000
        assert (Path(record["run_dir"]) / "report.json").exists()
    # One shared feature pass paid for the images; the runs themselves were charged for none.
    assert sum(p["queries"]["items"] for p in results["feature_passes"]) == 110
    assert all(r["feature_items_charged"] == 0 for r in runs)
    table = (data_out / "results.md").read_text()
    for method in METHODS_UNDER_TEST:
        assert f"| {method} | {TIERS[method]} | 2 | 1 |" in table  # the tier each run used
    assert "items incl. features" in table
    assert (data_out / "acc_vs_items_2shot.png").stat().st_size > 0
    assert (data_out / "acc_vs_shots.png").stat().st_size > 0

    reports = {r["method"]: Path(r["run_dir"]) / "report.json" for r in runs}
    stamps = {m: p.stat().st_mtime_ns for m, p in reports.items()}
    assert _bench(out) == 0  # everything finished: no server, no run
    again = json.loads((data_out / "results.json").read_text())
    assert sorted(r["status"] for r in again["runs"]) == ["cached"] * len(METHODS_UNDER_TEST)
    assert {m: p.stat().st_mtime_ns for m, p in reports.items()} == stamps
    assert again["feature_passes"] == results["feature_passes"]  # no new pass: nothing was fetched
    first = {r["method"]: r["items_including_features"] for r in runs}
    assert {r["method"]: r["items_including_features"] for r in again["runs"]} == first


def test_define_adds_a_tuner_variant() -> None:
    name, base, overrides = parse_define("cbbt-fast=cbbt:antithetic=true,directions=16,mu=none")
    assert (name, base, overrides) == (
        "cbbt-fast",
        "cbbt",
        {"antithetic": True, "directions": 16, "mu": None},
    )
    spec = register_method("cbbt-test-variant", based_on="cbbt-paper", antithetic=True, directions=16)
    try:
        assert spec.kind == "tune"
        assert spec.settings == {
            "method": "cbbt",
            "estimator": "faithful",
            "antithetic": True,
            "directions": 16,
        }
        with pytest.raises(RequestError, match="unknown TuneConfig fields"):
            register_method("bad", based_on="cbbt-paper", no_such_field=1)
        collab = register_method("cbbt-test-collab", based_on="cbbt", patience=3)
        assert collab.kind == "collab" and collab.settings == {"views": 1, "patience": 3}
        with pytest.raises(RequestError, match="unknown CollabConfig fields"):
            register_method("bad", based_on="cbbt", adapter_epochs=3)
        from client.collab import collab_config

        with pytest.raises(RequestError, match="linear heads only"):
            collab_config({"methods": ["gda", "tip-adapter"]})
    finally:
        METHODS.pop("cbbt-test-variant", None)
        METHODS.pop("cbbt-test-collab", None)


def test_whitebox_forward_matches_the_served_features_and_runs(tmp_path: Path) -> None:
    from benchmarks.whitebox import check_forward, run_coop, text_encoder, tune_config
    from client.data import few_shot_split, load_dataset
    from client.features import FeatureCache
    from server.backends.registry import create_backend

    torch.manual_seed(0)
    backend = create_backend("cbbt-tiny", "none")
    split = few_shot_split(load_dataset("digits"), 2, 1, max_test_per_class=3)
    encode = text_encoder(backend, split.class_names)
    theta = backend.token_embeddings("a")[1].float()
    assert check_forward(backend, encode, theta, split.class_names) < 1e-5
    # Gradients reach the context vectors.
    context = theta.clone().requires_grad_(True)
    encode(context).sum().backward()
    assert context.grad is not None and float(context.grad.abs().sum()) > 0

    cfg = tune_config(2, 1, 2, {"epochs": 2, "adapter_epochs": 1})
    cache = FeatureCache(tmp_path / "features.sqlite")
    try:
        report = run_coop(backend, cache, split, cfg, tmp_path / "coop")
    finally:
        cache.close()
    assert report.method == "coop-whitebox" and report.white_box is True
    assert report.prompt_steps == 2
    assert (tmp_path / "coop" / "report.json").exists()
