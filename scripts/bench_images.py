"""Image-embedding throughput of running servers, side by side, as the client fetches features.

Every round sends the same JPEG files to every server in turn, in the client's own way
(`CbbtClient.embed_images`, one request of up to 64 images after another, as `FeatureStore`
does), alternating the servers' order between rounds so drift on a shared machine falls on
all of them alike. Start the servers yourself (one per code version or flag set), each with a
key, then:

    python scripts/bench_images.py --images 'runs/mix18/**/*.jpg' --limit 384 --rounds 6 \\
        --server old=http://127.0.0.1:8201 --server new=http://127.0.0.1:8202

Keys: `--key NAME=KEY`, or CBBT_API_KEY for every server.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from client.api import CbbtClient

REQUEST_IMAGES = 64  # FeatureStore's batch


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"--{what} takes NAME=VALUE, got {value!r}")
        out[name] = rest
    return out


def images_per_second(url: str, key: str | None, payloads: list[bytes]) -> float:
    with CbbtClient(url, key) as client:
        started = time.perf_counter()
        for start in range(0, len(payloads), REQUEST_IMAGES):
            client.embed_images(payloads[start : start + REQUEST_IMAGES])
        return len(payloads) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="a glob of image files (recursive **)")
    parser.add_argument("--limit", type=int, default=384, help="images per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--server", action="append", default=[], help="NAME=URL (repeat)")
    parser.add_argument("--key", action="append", default=[], help="NAME=KEY (default: CBBT_API_KEY)")
    args = parser.parse_args(argv)
    servers, keys = _pairs(args.server, "server"), _pairs(args.key, "key")
    if not servers:
        raise SystemExit("give at least one --server NAME=URL")
    files = sorted(glob.glob(args.images, recursive=True))[: args.limit]
    if not files:
        raise SystemExit(f"no files match {args.images!r}")
    payloads = [Path(f).read_bytes() for f in files]
    machine = f"{platform.platform()}, nproc {os.cpu_count()}"
    print(f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine}")
    print(f"- {len(payloads)} images per round, {REQUEST_IMAGES} per request, {args.rounds} rounds")
    print(f"- load average before: {os.getloadavg()[0]:.2f}")
    rates: dict[str, list[float]] = {name: [] for name in servers}
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for name in order:
            key = keys.get(name, os.environ.get("CBBT_API_KEY"))
            rates[name].append(images_per_second(servers[name], key, payloads))
        print(f"  round {round_}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in servers), flush=True)
    print(f"- load average after: {os.getloadavg()[0]:.2f}")
    first = next(iter(servers))
    print("\n| server | images/s (mean over rounds) | min | max | ratio to " + first + " |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.fmean(rates[first])
    for name, values in rates.items():
        mean = statistics.fmean(values)
        print(f"| {name} | {mean:.1f} | {min(values):.1f} | {max(values):.1f} | {mean / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
