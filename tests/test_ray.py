"""Replicas on a real local Ray cluster (Ray Serve), in a network namespace with loopback only.

Ray probes public addresses to find its node's IP even when one is given, so the whole scenario
(a throwaway PostgreSQL cluster, `cbbt-server serve --ray --replicas 2`, the clients) runs as one
process inside `unshare -n` with only `lo` up: nothing can leave the machine. It runs once for
the module (Ray starts in tens of seconds on 2 cores); each test checks one claim of its report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.postgres]

SCENARIO_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.fail("ray is missing: the `ray` extra is part of the dev install (scripts/setup.sh --dev)")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("unshare (util-linux) and ip (iproute2) are needed: .ci/run installs them", pytrace=False)
    work = tmp_path_factory.mktemp("ray")
    out = work / "result.json"
    inner = f"ip link set lo up && exec {sys.executable} tests/ray_scenario.py {out} {work}"
    process = subprocess.Popen(
        ["unshare", "-n", "bash", "-c", inner],
        cwd=REPO_ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"},
        stdout=(work / "scenario.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        code = process.wait(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        # Whatever Ray left behind in the namespace goes with the session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    log = (work / "scenario.log").read_text(errors="replace")[-4000:]
    serve_log = work / "serve.log"
    serve_tail = serve_log.read_text(errors="replace")[-6000:] if serve_log.exists() else ""
    if not out.exists():
        pytest.fail(f"the scenario wrote no result (exit {code})\n{log}\n{serve_tail}", pytrace=False)
    result: dict[str, Any] = json.loads(out.read_text())
    result["_exit"], result["_log"] = code, f"{log}\n--- serve.log ---\n{serve_tail}"
    yield result


def _why(result: dict[str, Any]) -> str:
    shown = {k: v for k, v in result.items() if k != "_log"}
    return f"{json.dumps(shown, indent=1)}\n{result['_log']}"


def test_two_ray_replicas_answer_ready(scenario: dict[str, Any]) -> None:
    assert scenario["_exit"] == 0, _why(scenario)
    assert len(scenario["ready_replicas"]) == 2, _why(scenario)
    assert scenario["metrics_replica_label"], _why(scenario)
    # Every replica can be scraped on its own, through the http_sd targets.
    assert scenario["scraped_replicas"] == dict.fromkeys(scenario["ready_replicas"], True), _why(scenario)


def test_ray_replicas_share_one_budget_exactly(scenario: dict[str, Any]) -> None:
    assert scenario["served_items"] == scenario["spent"] == scenario["ledger"] == 100, _why(scenario)


def test_a_killed_ray_replica_is_replaced(scenario: dict[str, Any]) -> None:
    assert scenario.get("killed_pid") in scenario.get("replica_pids", []), _why(scenario)
    assert len(scenario["new_replicas"]) >= 1, _why(scenario)
    assert scenario["ready_after_kill"] == 200, _why(scenario)
    assert scenario["serve_exit"] == 0, _why(scenario)
