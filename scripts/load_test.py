#!/usr/bin/env python
"""Load test: many concurrent clients on loopback against a real server, for a fixed time.

A script, not a test (its last results are recorded in docs/reliability.md). It starts
`cbbt-server serve` itself on 127.0.0.1 and runs two phases:

1. steady: `--clients` asyncio clients (httpx.AsyncClient) for `--duration` seconds, mixing
   image embeddings, text embeddings and prompt embeddings (soft prompts x class names), with
   the server's fault injection if asked (`--failure-rate`, `--drop-rate`, `--latency-ms`).
   Most clients share a key with a large budget; `--capped-clients` share a key whose budget
   (`--capped-budget`) is far smaller than what they would spend.
2. overload: the same clients against a server with a tiny queue (`--overload-queue-max-items`)
   for `--overload-duration` seconds: the server must refuse promptly with 503 + Retry-After
   (or 429) rather than queue without bound.

It records per traffic type: requests, throughput, p50/p99 latency, status counts; the server's
resident memory (VmRSS from /proc) over time; and it checks, on the server's database file:
every key's ledger sum equals its spent counter equals the items of the 200 answers the clients
saw, and no key is ever above its budget. It exits non-zero when an invariant fails or a 5xx
other than an injected one was seen.

    python scripts/load_test.py                        # tiny model, 64 clients, 60 s + 20 s
    python scripts/load_test.py --model default        # the real-weights default model
    python scripts/load_test.py --failure-rate 0.05 --drop-rate 0.02 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from client.server_process import ServerProcess  # noqa: E402
from server.store import SqliteStore  # noqa: E402
from shared.arrays import encode_array  # noqa: E402

TRAFFIC = ("image", "text", "prompt")
IMAGES_PER_REQUEST = 4
TEXTS_PER_REQUEST = 8
PROMPTS_PER_REQUEST = 2
CLASS_NAMES = [f"class {i}" for i in range(10)]  # 2 prompts x 10 names = 20 items
MAX_RETRY_AFTER_S = 1.0  # a well-behaved client waits what the server asks, capped for the test


# -- the server -------------------------------------------------------------------------------------
class Server(ServerProcess):
    """`cbbt-server serve` on loopback (client/server_process.py), plus its memory."""

    def __init__(self, db: Path, log: Path, model: str, extra: list[str]) -> None:
        super().__init__(
            db,
            model=None if model == "default" else model,
            pretrained=None if model == "default" else "none",
            extra_args=extra,
            log_path=log,
        )

    def rss_mib(self) -> float | None:
        try:
            for line in (
                Path(f"/proc/{self.process.pid if self.process else 0}/status").read_text().splitlines()
            ):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None


class MemorySampler(threading.Thread):
    def __init__(self, server: Server, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss = self.server.rss_mib()
            if rss is not None:
                self.samples.append((time.monotonic() - self.started_at, rss))
            self.stopped.wait(self.every_s)


# -- the traffic ---------------------------------------------------------------------------------------
def _image_uri(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Bodies:
    token_width: int
    images: list[str] = field(default_factory=lambda: [_image_uri(i) for i in range(32)])

    def make(self, kind: str, rng: random.Random) -> tuple[str, dict[str, Any], int]:
        if kind == "image":
            picks = rng.sample(self.images, IMAGES_PER_REQUEST)
            return (
                "/v1/embeddings",
                {"input": picks, "modality": "image", "encoding_format": "base64"},
                len(picks),
            )
        if kind == "text":
            texts = [f"a photo of a thing number {rng.randrange(10**6)}" for _ in range(TEXTS_PER_REQUEST)]
            return "/v1/embeddings", {"input": texts, "encoding_format": "base64"}, len(texts)
        prompts = [
            encode_array(np.asarray([[rng.gauss(0, 0.02) for _ in range(self.token_width)]], np.float32))
            for _ in range(PROMPTS_PER_REQUEST)
        ]
        body = {"prompts": prompts, "class_names": CLASS_NAMES, "encoding_format": "base64"}
        return "/v1/prompt-embeddings", body, PROMPTS_PER_REQUEST * len(CLASS_NAMES)


@dataclass
class Sample:
    kind: str
    key: str
    status: int  # 0: transport error (dropped connection, timeout)
    code: str | None
    seconds: float
    items: int
    retry_after: str | None


async def _client(
    index: int,
    url: str,
    key_name: str,
    secret: str,
    bodies: Bodies,
    until: float,
    samples: list[Sample],
) -> None:
    rng = random.Random(index)
    headers = {"Authorization": f"Bearer {secret}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as http:
        turn = index
        while time.monotonic() < until:
            kind = TRAFFIC[turn % len(TRAFFIC)]
            turn += 1
            path, body, items = bodies.make(kind, rng)
            started = time.perf_counter()
            try:
                response = await http.post(path, json=body)
            except httpx.TransportError:
                samples.append(Sample(kind, key_name, 0, None, time.perf_counter() - started, 0, None))
                continue
            seconds = time.perf_counter() - started
            code = None
            if response.status_code != 200:
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "unparseable"
            retry_after = response.headers.get("retry-after")
            samples.append(
                Sample(
                    kind,
                    key_name,
                    response.status_code,
                    code,
                    seconds,
                    items if response.is_success else 0,
                    retry_after,
                )
            )
            if code == "insufficient_quota":
                await asyncio.sleep(0.2)  # the budget is gone; keep knocking, gently
            elif retry_after is not None:
                await asyncio.sleep(min(float(retry_after), MAX_RETRY_AFTER_S))


async def _phase(
    url: str, keys: dict[str, str], plan: list[str], bodies: Bodies, duration_s: float
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    until = time.monotonic() + duration_s
    started = time.monotonic()
    await asyncio.gather(
        *(_client(i, url, name, keys[name], bodies, until, samples) for i, name in enumerate(plan))
    )
    return samples, time.monotonic() - started


# -- the figures ----------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def summarize(samples: list[Sample], elapsed: float, *, overload_expected: bool) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in TRAFFIC:
        mine = [s for s in samples if s.kind == kind]
        ok = [s.seconds for s in mine if s.status == 200]
        refused = [s.seconds for s in mine if s.status in (429, 503)]
        by_kind[kind] = {
            "requests": len(mine),
            "ok": len(ok),
            "ok_per_s": len(ok) / elapsed,
            "items_per_s": sum(s.items for s in mine) / elapsed,
            "p50_ms": 1000 * _percentile(ok, 50),
            "p99_ms": 1000 * _percentile(ok, 99),
            "refused_p50_ms": 1000 * _percentile(refused, 50),
            "refused_p99_ms": 1000 * _percentile(refused, 99),
        }
    statuses = Counter(f"{s.status} {s.code or ''}".strip() for s in samples)
    refusals = [s for s in samples if s.status in (429, 503) and s.code != "injected_failure"]
    return {
        "elapsed_s": elapsed,
        "requests": len(samples),
        "requests_per_s": len(samples) / elapsed,
        "ok_items_per_s": sum(s.items for s in samples) / elapsed,
        "by_kind": by_kind,
        "statuses": dict(sorted(statuses.items())),
        "refusals_without_retry_after": sum(
            1 for s in refusals if s.retry_after is None and s.code != "insufficient_quota"
        ),
        "unexpected_5xx": sum(
            1
            for s in samples
            if s.status >= 500
            and not (s.code == "injected_failure" or (overload_expected and s.code == "overloaded"))
        ),
    }


def check_ledger(db: Path, samples: list[Sample], budgets: dict[str, int]) -> dict[str, Any]:
    answered: dict[str, int] = defaultdict(int)
    for s in samples:
        answered[s.key] += s.items
    out: dict[str, Any] = {}
    with SqliteStore(db) as store:
        for name, budget in budgets.items():
            key = store.get_key(name)
            total = store.ledger_total(key.id)
            _, rows = store.usage(key.id, recent=10**7)
            out[name] = {
                "budget": budget,
                "spent_items": key.spent_items,
                "ledger_sum": total,
                "answered_items": answered[name],
                "unsettled_rows": sum(1 for r in rows if r.status is None),
                "balanced": key.spent_items == total == answered[name],
                "within_budget": key.spent_items <= budget,
            }
    return out


def memory_summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    values = [rss for _, rss in samples]
    if not values:
        return {}
    step = max(1, len(samples) // 24)
    return {
        "start_mib": values[0],
        "median_mib": statistics.median(values),
        "max_mib": max(values),
        "end_mib": values[-1],
        "series_mib": [[round(t, 1), round(rss, 1)] for t, rss in samples[::step]],
    }


def run_phase(
    name: str,
    args: argparse.Namespace,
    workdir: Path,
    extra: list[str],
    duration_s: float,
    *,
    overload_expected: bool = False,
) -> dict[str, Any]:
    db = workdir / f"{name}.db"
    server = Server(db, workdir / f"{name}.server.log", args.model, extra)
    budgets = {"load": 10**12, "capped": args.capped_budget}
    keys = {name_: server.create_key(name_, budget_items=budget) for name_, budget in budgets.items()}
    plan = ["capped"] * args.capped_clients + ["load"] * (args.clients - args.capped_clients)
    server.start()
    try:
        card = httpx.get(
            f"{server.url}/v1/models", headers={"Authorization": f"Bearer {keys['load']}"}
        ).json()
        bodies = Bodies(int(card["data"][0]["token_width"]))
        sampler = MemorySampler(server)
        sampler.start()
        print(f"[{name}] {args.clients} clients for {duration_s:.0f} s against {server.url} ...", flush=True)
        samples, elapsed = asyncio.run(_phase(server.url, keys, plan, bodies, duration_s))
        sampler.stopped.set()
        sampler.join()
    finally:
        server.stop()
    result = summarize(samples, elapsed, overload_expected=overload_expected)
    result["server_flags"] = extra
    result["memory"] = memory_summary(sampler.samples)
    result["ledger"] = check_ledger(db, samples, budgets)
    return result


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables docs/reliability.md records."""
    lines = [
        f"`{results['command']}` — {results['date']}, {results['machine']['uname']}, "
        f"nproc {results['machine']['nproc']}, model {results['model']}, {results['clients']} clients "
        f"({results['capped_clients']} on the capped key)",
        "",
        "| phase | traffic | requests | 200/s | items/s | p50 ms | p99 ms | 429/503 p50 | 429/503 p99 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, phase in results["phases"].items():
        for kind, row in phase["by_kind"].items():
            lines.append(
                f"| {name} | {kind} | {row['requests']} | {row['ok_per_s']:.1f} | {row['items_per_s']:.0f} "
                f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['refused_p50_ms']:.0f} "
                f"| {row['refused_p99_ms']:.0f} |"
            )
    lines += [
        "",
        "| phase | seconds | statuses | server RSS MiB (start / median / max / end) |",
        "| --- | ---: | --- | --- |",
    ]
    for name, phase in results["phases"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in phase["statuses"].items())
        memory = phase["memory"]
        rss = " / ".join(
            f"{memory.get(k, float('nan')):.0f}" for k in ("start_mib", "median_mib", "max_mib", "end_mib")
        )
        lines.append(f"| {name} | {phase['elapsed_s']:.0f} | {statuses} | {rss} |")
    lines += [
        "",
        "| phase | key | budget | spent | ledger sum | items of 200 answers | balanced | within budget |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, phase in results["phases"].items():
        for key, books in phase["ledger"].items():
            lines.append(
                f"| {name} | {key} | {books['budget']} | {books['spent_items']} | {books['ledger_sum']} "
                f"| {books['answered_items']} | {books['balanced']} | {books['within_budget']} |"
            )
    lines += ["", "failures: " + ("; ".join(results["failures"]) or "none")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="cbbt-tiny", help="cbbt-tiny (random init) or 'default' (real weights)"
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--capped-clients", type=int, default=8)
    parser.add_argument("--capped-budget", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the steady phase")
    parser.add_argument("--overload-duration", type=float, default=20.0, help="seconds; 0 skips the phase")
    parser.add_argument("--overload-queue-max-items", type=int, default=16)
    parser.add_argument("--queue-max-items", type=int, default=None, help="the steady phase's queue limit")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="databases and server logs (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or not 0 <= args.capped_clients < args.clients:
        parser.error("need --clients >= 1 and 0 <= --capped-clients < --clients")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cbbt-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    faults = []
    for flag in ("latency_ms", "latency_jitter_ms", "failure_rate", "drop_rate"):
        if getattr(args, flag):
            faults += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if faults:
        faults += ["--fault-seed", "1"]
    steady_flags = faults + (
        [] if args.queue_max_items is None else ["--queue-max-items", str(args.queue_max_items)]
    )
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"uname": " ".join(platform.uname()), "nproc": os.cpu_count()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "clients": args.clients,
        "capped_clients": args.capped_clients,
        "workdir": str(workdir),
        "phases": {},
    }
    results["phases"]["steady"] = run_phase("steady", args, workdir, steady_flags, args.duration)
    if args.overload_duration > 0:
        overload = ["--queue-max-items", str(args.overload_queue_max_items), "--batch-max-items", "8"]
        results["phases"]["overload"] = run_phase(
            "overload", args, workdir, overload, args.overload_duration, overload_expected=True
        )

    failures = []
    for name, phase in results["phases"].items():
        if phase["unexpected_5xx"]:
            failures.append(f"{name}: {phase['unexpected_5xx']} unexpected 5xx answers")
        if phase["refusals_without_retry_after"]:
            failures.append(f"{name}: {phase['refusals_without_retry_after']} 429/503 without Retry-After")
        for key, books in phase["ledger"].items():
            if not (books["balanced"] and books["within_budget"]) or books["unsettled_rows"]:
                failures.append(f"{name}: the books of key {key!r} do not balance: {books}")
    results["failures"] = failures
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
