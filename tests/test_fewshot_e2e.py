"""`cbbt tune --method fewshot-cv` end to end: a real server (the tiny random-init model) over
HTTP, budgets in its real database. Shapes, counts and budgets only: the tiny model has no
semantics, so no accuracy is asserted here (benchmarks/fewshot_eval.py measures the real one)."""

from __future__ import annotations

from pathlib import Path

from client.cli import main as cbbt
from tests.helpers import ServerProcess
from tests.test_client_e2e import TINY_DATA, assert_ledger_matches, ledger, new_key, read_report, tune_argv

# 4 shots x 10 classes, 1 view + 40 validation + 50 test images; 80 templates x 10 classes.
IMAGES = 40 + 40 + 50
TEXTS = 80 * 10


def test_fewshot_cv_runs_through_a_real_server_within_its_budget(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    argv = tune_argv(tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA)
    assert cbbt([*argv, "--method", "fewshot-cv", "--budget", str(IMAGES + TEXTS)]) == 0
    report = read_report(tmp_path / "run")
    assert report["method"] == "fewshot-cv"
    assert report["queries"]["items"] == IMAGES + TEXTS  # exactly the plan: one view, 80 templates
    assert report["queries"]["loss_evaluations"] == 80
    selected = report["selected"]
    assert selected["labelled_images"] == 80 and selected["cv_folds"] == 5  # train + val pooled
    assert report["val_accuracy"] == selected["cv_accuracy"]  # the report carries the CV estimate
    assert set(selected["cv_accuracy_by_method"]) == {
        "zero-shot",
        "gda",
        "clap",
        "linear-probe",
        "tip-adapter",
    }
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_fewshot_cv_refuses_a_budget_that_cannot_pay_for_its_templates(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    argv = tune_argv(tiny_server, key, tmp_path / "cache", tmp_path / "run", *TINY_DATA)
    assert cbbt([*argv, "--method", "fewshot-cv", "--budget", str(IMAGES + TEXTS - 1)]) == 2
    assert ledger(tiny_server, key).spent_items == 0  # refused before anything was bought
