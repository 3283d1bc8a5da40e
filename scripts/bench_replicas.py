#!/usr/bin/env python
"""Benchmark: replicas behind one budget (Ray Serve, PostgreSQL). A benchmark, not a test.

- scaling: items/s through Serve's proxy for N = 1, 2, 4 replicas of a latency-bound model:
  the tiny model with `--latency-ms` injected (default 1 s: a backend whose cost is waiting,
  like a remote GPU) and `max_ongoing_requests` = 4 per replica as its concurrency (a GPU's
  slots); 32 clients of 8 items. On 2 cores only such a model can show the mechanism scaling
  (the CPU per request must stay far below the waiting); the target is >= 0.8 N x one replica.
- proxy: the default model, plain `cbbt-server serve` against one Ray replica, both on
  PostgreSQL: what Serve's proxy costs.
- store: SQLite against PostgreSQL per charge (reserve + settle), 1 and 4 threads.

Ray must run in a loopback-only network namespace here (it probes public addresses):

    unshare -n bash -c 'ip link set lo up; exec .venv/bin/python scripts/bench_replicas.py all'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from server.store.postgres import PostgresStore  # noqa: E402
from server.store.sqlite import SqliteStore  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.pg import PostgresCluster  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _key(db: str) -> str:
    cmd = [sys.executable, "-m", "server.cli", "keys", "create", "--db", db, "--name", "bench"]
    cmd += ["--budget-items", str(10**12)]
    return subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


class Served:
    """A `cbbt-server serve ...` subprocess, ready once `replicas` distinct replicas answer."""

    def __init__(self, args: list[str], db: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--db", db, "--port", str(self.port), *args]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env={**ENV, **(env or {})}, stdout=out, stderr=out
            )

    def wait(self, replicas: int, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "the server exited"
                try:
                    answer = client.get("/ready")
                    if answer.status_code == 200:
                        seen.add(answer.json().get("replica", "plain"))
                        if len(seen) >= replicas:
                            return
                        continue
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"only {len(seen)} of {replicas} replicas became ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _load(url: str, key: str, items: int, concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients posting `items` texts each, back to back, for `seconds`."""
    done = {"requests": 0, "items": 0, "errors": 0}
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []

    async def client(i: int) -> None:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            k = 0
            while time.monotonic() < stop_at:
                body = {"input": [f"a photo of item {i}-{k}-{j}" for j in range(items)]}
                started = time.monotonic()
                answer = await http.post("/v1/embeddings", json=body)
                k += 1
                if answer.status_code == 200:
                    done["requests"] += 1
                    done["items"] += items
                    latencies.append(time.monotonic() - started)
                else:
                    done["errors"] += 1
                    await asyncio.sleep(0.05)

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "items_per_s": done["items"] / elapsed,
        "requests_per_s": done["requests"] / elapsed,
        "errors": done["errors"],
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
    }


def _measure(url: str, key: str, items: int, concurrency: int, seconds: float) -> dict[str, float]:
    asyncio.run(_load(url, key, 1, 4, 3.0))  # warm-up: batchers, connections, caches
    return asyncio.run(_load(url, key, items, concurrency, seconds))


def scaling(
    cluster: PostgresCluster, work: Path, seconds: float, counts: list[int], latency_ms: float
) -> list[dict[str, Any]]:
    rows = []
    for replicas in counts:
        db = cluster.new_database()
        key = _key(db)
        args = ["--ray", "--replicas", str(replicas), "--threads", "1", "--latency-ms", str(latency_ms)]
        args += ["--model", "cbbt-tiny", "--pretrained", "none"]
        served = Served(args, db, work / "scaling.log", env={"CBBT_RAY_MAX_ONGOING_REQUESTS": "4"})
        try:
            served.wait(replicas)
            row = {"replicas": replicas, **_measure(served.url, key, 8, 32, seconds)}
        finally:
            served.stop()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def proxy(cluster: PostgresCluster, work: Path, seconds: float, rounds: int = 3) -> list[dict[str, Any]]:
    """Both servers run side by side; the load alternates between them, round after round, so
    that the machine's drift (other users' load) hits both alike."""
    setups = {"plain cbbt-server": [], "one Ray replica": ["--ray", "--replicas", "1"]}
    servers: dict[str, tuple[Served, str]] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        for name, args in setups.items():
            db = cluster.new_database()
            servers[name] = (Served(args, db, work / "proxy.log"), _key(db))
        for served, _ in servers.values():
            served.wait(1)
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                served, key = servers[name]
                samples[name].append(_measure(served.url, key, 16, 8, seconds))
                print(json.dumps({"round": r, "server": name, **samples[name][-1]}), flush=True)
    finally:
        for served, _ in servers.values():
            served.stop()
    return [
        {"server": name, **{k: sum(s[k] for s in runs) / len(runs) for k in runs[0]}}
        for name, runs in samples.items()
    ]


def _charges(store: Any, threads: int, per_thread: int) -> float:
    """ms per charge (reserve + settle), `threads` threads charging one key at once."""
    _, key = store.create_key(f"k{uuid.uuid4().hex[:8]}", ["embed"], None)

    def run(t: int) -> None:
        for i in range(per_thread):
            rid = f"{t}-{i}-{uuid.uuid4().hex}"
            store.reserve(key.id, 1, rid, "embeddings")
            store.settle(rid, 200)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    assert store.get_key(key.id).spent_items == threads * per_thread == store.ledger_total(key.id)
    return 1000 * elapsed / (threads * per_thread)


def stores(cluster: PostgresCluster, work: Path, per_thread: int) -> list[dict[str, Any]]:
    rows = []
    for threads in (1, 4):
        with SqliteStore(work / f"bench-{threads}.db") as lite, PostgresStore(cluster.new_database()) as pg:
            row = {
                "threads": threads,
                "sqlite_ms": _charges(lite, threads, per_thread),
                "postgres_ms": _charges(pg, threads, per_thread),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["scaling", "proxy", "store", "all"])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement per configuration")
    parser.add_argument("--charges", type=int, default=500, help="charges per thread (store)")
    parser.add_argument("--latency-ms", type=float, default=1000.0, help="injected latency (scaling)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="replica counts (scaling)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cbbt-bench-"))
    cluster = PostgresCluster().start()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    try:
        if args.what in ("scaling", "all"):
            report["scaling"] = scaling(cluster, work, args.seconds, args.replicas, args.latency_ms)
        if args.what in ("proxy", "all"):
            report["proxy"] = proxy(cluster, work, args.seconds)
        if args.what in ("store", "all"):
            report["store"] = stores(cluster, work, args.charges)
    finally:
        cluster.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
