"""The Ray Serve scenario, run inside a loopback-only network namespace by tests/test_ray.py.

    unshare -n bash -c 'ip link set lo up; exec python tests/ray_scenario.py OUT.json WORKDIR'

Starts everything it uses inside the namespace (a throwaway PostgreSQL cluster, then
`cbbt-server serve --ray --replicas 2` on it), then: both replicas answer /ready; 40 clients
through Serve's proxy share one 100-item budget; /metrics carries the replica label; one
replica is SIGKILLed and Serve replaces it. Every replica's metrics are scraped through the
targets that `/metrics/targets` lists. Writes what it saw as JSON (asserted by the test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from tests.helpers import free_port  # noqa: E402
from tests.pg import PostgresCluster  # noqa: E402

BUDGET = 100
CLIENTS = 40
REPLICAS = 2


def _keys_create(url: str, name: str, budget: int, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "server.cli", "keys", "create", "--db", url, "--name", name]
    done = subprocess.run(
        [*cmd, "--budget-items", str(budget)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def _replica_ids(client: httpx.Client, tries: int = 40) -> set[str]:
    """The replicas that answer /ready with 200 through the proxy (it spreads the probes)."""
    seen: set[str] = set()
    for _ in range(tries):
        try:
            response = client.get("/ready")
        except httpx.TransportError:
            continue
        if response.status_code == 200 and "replica" in response.json():
            seen.add(response.json()["replica"])
    return seen


def _wait_replicas(client: httpx.Client, want: int, exclude: set[str], timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = _replica_ids(client)
        if len(seen - exclude) >= want:
            return seen
        time.sleep(1.0)
    return seen


def _replica_pids() -> list[int]:
    """Ray titles a replica's worker process `ray::ServeReplica:<app>:<deployment>`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:cbbt" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def _spend_budget(client_url: str, secret: str) -> list[int]:
    served: list[int] = []
    lock = threading.Lock()

    def one_client(i: int) -> None:
        with httpx.Client(
            base_url=client_url, headers={"Authorization": f"Bearer {secret}"}, timeout=120
        ) as http:
            while True:
                n = 1 + i % 3
                response = http.post("/v1/embeddings", json={"input": [f"c{i}-{k}" for k in range(n)]})
                if response.status_code == 429:
                    return
                if response.status_code == 503:  # Serve's outer guard: back off and retry
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                response.raise_for_status()
                with lock:
                    served.append(len(response.json()["data"]))

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one_client, range(CLIENTS)))
    return served


def _books(url: str, name: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        key_id, spent = conn.execute(
            "SELECT id, spent_items FROM api_keys WHERE name = %s", (name,)
        ).fetchone()
        total = conn.execute(
            "SELECT COALESCE(SUM(items), 0) FROM ledger WHERE key_id = %s AND refunded = 0", (key_id,)
        ).fetchone()[0]
    return int(spent), int(total)


def main(out: Path, workdir: Path) -> int:
    result: dict[str, Any] = {"steps": []}
    started = time.monotonic()

    def step(name: str) -> None:
        result["steps"].append([name, round(time.monotonic() - started, 1)])
        out.write_text(json.dumps(result, indent=2))

    cluster = PostgresCluster().start()
    server: subprocess.Popen[bytes] | None = None
    try:
        url = cluster.new_database()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        env.update({"CBBT_LEASE_TTL_S": "5", "CBBT_LEASE_RENEW_S": "1"})
        secret = _keys_create(url, "shared", BUDGET, env)
        step("postgres and key")
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--ray", "--replicas", str(REPLICAS)]
        cmd += [
            "--db",
            url,
            "--model",
            "cbbt-tiny",
            "--pretrained",
            "none",
            "--threads",
            "1",
            "--port",
            str(port),
        ]
        with (workdir / "serve.log").open("wb") as log:
            server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            ready = _wait_replicas(client, REPLICAS, set(), 600)
            result["ready_replicas"] = sorted(ready)
            step("replicas ready")
            if len(ready) < REPLICAS:
                return 1

            served = _spend_budget(base, secret)
            result["served_items"] = sum(served)
            result["spent"], result["ledger"] = _books(url, "shared")
            step("budget spent")

            metrics = client.get("/metrics").text
            result["metrics_replica_label"] = any(f'replica="{r}"' in metrics for r in ready)
            # Scraping all: the targets for Prometheus' http_sd, each replica's own /metrics.
            targets = client.get("/metrics/targets").json()
            result["metrics_targets"] = targets
            scraped = {}
            for group in targets:
                replica = group["labels"]["replica"]
                text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=10).text
                scraped[replica] = f'replica="{replica}"' in text and "cbbt_items_charged" in text
            result["scraped_replicas"] = scraped
            step("metrics scraped")

            pids = _replica_pids()
            result["replica_pids"] = pids
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                result["killed_pid"] = pids[0]
                step("replica killed")
                after = _wait_replicas(client, 1, ready, 600)
                result["replicas_after_kill"] = sorted(after)
                result["new_replicas"] = sorted(after - ready)
                result["ready_after_kill"] = client.get("/ready").status_code
                step("replica replaced")
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                result["serve_exit"] = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                result["serve_exit"] = "killed"
        cluster.stop()
        step("stopped")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
