"""`cbbt tune` and `cbbt bench` on each API tier, through the real CLI against a real server
process (tiny model; shapes and counts, not accuracy): the prediction-only tier runs the
loss-only prompt tuners through /v1/classify with a predictions-tier key, every item counted as
the server's ledger has it; methods a tier cannot run are refused before anything is spent; and
every report and bench table says which tier the run used, measured from the routes it called."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import main
from server.store import SqliteStore
from tests.helpers import ServerProcess

pytestmark = pytest.mark.timeout(240)

LOSS_ONLY = ("cmaes-prompt", "spsa-gc-prompt", "zip-prompt", "cbbt-prompt")
SMALL = ["--data", "digits", "--shots", "2", "--test-per-class", "2", "--no-progress"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("tier-runs") / "t.db") as srv:
        yield srv


def _key(server: ServerProcess, name: str, tier: str) -> str:
    return server.keys("create", "--name", name, "--budget-items", "1000000", "--tier", tier)


def _spent(server: ServerProcess, name: str) -> int:
    with SqliteStore(server.db) as store:
        return store.ledger_total(store.get_key(name).id)


def _connection(server: ServerProcess, key: str, api: str, cache: Path) -> list[str]:
    return ["--server", server.url, "--api-key", key, "--api", api, "--cache-dir", str(cache)]


@pytest.mark.parametrize("name", LOSS_ONLY)
def test_tune_on_the_prediction_tier_counts_what_the_server_bills(
    server: ServerProcess, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _key(server, f"pred-{name}", "predictions")
    out = tmp_path / "run"
    argv = ["tune", *_connection(server, key, "predictions", tmp_path / "cache"), *SMALL,
            "--method", name, "--budget", "1500", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tier"] == "predictions"
    # Every call a predictions key made was allowed (a feature route would have been a 403),
    # and the client's count is the server's ledger, item for item.
    assert report["queries"]["items"] == _spent(server, f"pred-{name}") <= 1500
    assert report["feature_items_charged"] == 0
    assert report["prompt_steps"] >= 1 and report["queries"]["loss_evaluations"] >= 2
    plan = report["plan"]
    assert plan["total_items"] == report["queries"]["items"]  # the plan is what was spent
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert "predictions tier" in capsys.readouterr().out


def _refused_on_predictions(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str, key_name: str
) -> str:
    """Runs `method` on a predictions-tier key: it must fail before spending anything; returns
    the error the CLI logged."""
    key = _key(server, key_name, "predictions")
    argv = ["tune", *_connection(server, key, "predictions", tmp_path / "cache"), *SMALL,
            "--method", method, "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) != 0
    assert _spent(server, key_name) == 0
    return " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_a_feature_method_on_the_prediction_tier_is_refused_naming_its_tier(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    message = _refused_on_predictions(server, tmp_path, caplog, "linear-probe", "pred-refused")
    assert "linear-probe needs" in message and "the embeddings tier" in message
    assert "cmaes-prompt" in message  # what does run here


def test_a_soft_prompt_method_on_the_prediction_tier_is_refused(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    message = _refused_on_predictions(server, tmp_path, caplog, "adapter", "pred-adapter")
    assert "adapter needs" in message and "the full tier" in message


def test_bench_reports_the_tier_each_method_used(server: ServerProcess, tmp_path: Path) -> None:
    """Each tier's key runs the methods of its tier; the table's tier column and each report's
    field say which tier each run needed, from what it called."""
    expected = {
        "predictions": {"cmaes-prompt": "predictions", "zero-shot": "predictions"},
        "openai": {"linear-probe": "embeddings", "prompt-search": "embeddings"},
        "cbbt": {"linear-probe": "embeddings", "cbbt-prompt": "full", "adapter": "full"},
    }
    tiers = {"predictions": "predictions", "openai": "embeddings", "cbbt": "full"}
    for api, methods in expected.items():
        name = f"bench-{api}"
        key = _key(server, name, tiers[api])
        out = tmp_path / api
        argv = ["bench", *_connection(server, key, api, tmp_path / f"cache-{api}"), *SMALL[:-1],
                "--seeds", "1", "--methods", *methods, "--budget", "3000", "--epochs", "1",
                "--directions", "2", "--adapter-epochs", "1", "--out", str(out), "--no-progress",
                "--client-threads", "0"]  # fmt: skip
        assert main(argv) == 0, api
        results = json.loads((out / "digits" / "results.json").read_text())
        runs = {r["method"]: r for r in results["runs"]}
        assert {m: r["report"]["tier"] for m, r in runs.items()} == methods
        table = (out / "digits" / "results.md").read_text()
        for method, tier in methods.items():
            assert f"| {method} | {tier} | 2 | 1 |" in table, table
        # Client count == server ledger: the runs' own items plus the shared feature pass.
        passes = sum(p["queries"]["items"] for p in results["feature_passes"])
        assert sum(r["report"]["queries"]["items"] for r in runs.values()) + passes == _spent(server, name)
        if api == "predictions":  # no feature ever: no feature pass, none counted in any run
            assert passes == 0
            assert all(r["items_including_features"] == r["items_charged"] for r in runs.values())


def test_auto_detects_a_predictions_key_from_its_usage(server: ServerProcess, tmp_path: Path) -> None:
    key = _key(server, "pred-auto", "predictions")
    out = tmp_path / "run"
    argv = ["tune", *_connection(server, key, "auto", tmp_path / "cache"), *SMALL,
            "--method", "zero-shot", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tier"] == "predictions" and report["prompt_steps"] == 0
    assert report["queries"]["items"] == _spent(server, "pred-auto") > 0


def test_a_budget_below_the_scoring_cost_is_refused_before_spending(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = _key(server, "pred-poor", "predictions")
    argv = ["tune", *_connection(server, key, "predictions", tmp_path / "cache"), *SMALL,
            "--method", "cmaes-prompt", "--budget", "50", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) != 0
    assert any("cannot pay for the prediction tier's start" in r.getMessage() for r in caplog.records)
    assert _spent(server, "pred-poor") == 0
