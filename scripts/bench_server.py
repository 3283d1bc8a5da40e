#!/usr/bin/env python
"""Benchmark: items/s through the HTTP API against the same backend called in-process.

A benchmark, not a test: it measures, in one run on one machine,
- in-process: this process loads the backend and calls `encode_prompts` / `encode_images`
  directly at the server's model batch size (images go PIL -> `preprocess` -> `encode_images`);
- HTTP: `--concurrency` asyncio clients post fixed-size requests to a real server subprocess
  (`/v1/prompt-embeddings` with base64 contexts, `/v1/embeddings` with JPEG data URIs),
  once with `--no-auth` and once with an API key (the accounting overhead).
The three measurements alternate within every round (in-process, HTTP no-auth, HTTP auth, per
traffic type) so that drift of the machine affects them alike; the table reports the mean
over rounds and writes it into docs/benchmarks/server.md between marker comments.

Caveat printed with the results: the load-generating client runs on the same cores as the
server, so the HTTP figures include the client's CPU use; the in-process figures do not.

    python scripts/bench_server.py                       # default model, ~3 minutes on 2 vCPUs
    python scripts/bench_server.py --model cbbt-tiny     # the tiny random-init model
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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The server's default (server/cli.py), set here too before torch loads so that both sides
# run OpenMP the same way; export OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from client.server_process import ServerProcess  # noqa: E402
from server.backends.base import Backend, PromptItem  # noqa: E402
from server.backends.registry import create_backend  # noqa: E402
from shared.arrays import encode_array  # noqa: E402

DEFAULT_MODEL = "devise-effnet-minilm"
BEGIN = "<!-- bench_server:begin -->"
END = "<!-- bench_server:end -->"
BUDGET = 10**12
# Every measurement lasts --duration seconds and covers at least this many model batches.
MIN_BATCHES = 4
CLASS_NAMES = ["cat", "dog", "cup of coffee", "rocket", "astronaut", "car", "tree", "pizza"]


# -- the server subprocess ---------------------------------------------------------------
class Server(ServerProcess):
    """`cbbt-server serve` on loopback (client/server_process.py); `key` is None when auth is off."""

    def __init__(self, args: list[str], db: Path, auth: bool, log: Path) -> None:
        super().__init__(db, auth=auth, extra_args=[*args, "--log-level", "warning"], log_path=log)
        self.key: str | None = None

    def start(self, *, wait: bool = False) -> ServerProcess:
        """Start without waiting (the in-process model loads meanwhile); `wait_ready` later."""
        if self.auth and self.key is None:
            self.key = self.create_key("bench", budget_items=BUDGET)
        return super().start(wait=wait)

    @property
    def request_headers(self) -> dict[str, str]:
        base = {"content-type": "application/json"}
        return base | ({"authorization": f"Bearer {self.key}"} if self.key else {})


# -- workloads ---------------------------------------------------------------------------
def _photos(count: int, size: int) -> list[Image.Image]:
    """Real photos from scikit-image (no download), centre-cropped and resized to size x size."""
    from skimage import data

    names = ["chelsea", "coffee", "astronaut", "rocket", "cat", "motorcycle_left", "immunohistochemistry"]
    images = []
    for name in names:
        try:
            pixels = getattr(data, name)()
        except Exception:  # a photo this scikit-image lacks
            continue
        image = Image.fromarray(np.asarray(pixels)).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images.append(image.crop((left, top, left + side, top + side)).resize((size, size)))
    return [images[i % len(images)] for i in range(count)]


def _jpeg_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Traffic:
    """One kind of traffic: a pre-encoded HTTP request and the equivalent in-process call."""

    name: str
    modality: str  # the server's batcher that serves it
    path: str
    body: bytes
    items_per_request: int
    inprocess: Callable[[], torch.Tensor]
    items_per_call: int
    description: str


def build_traffic(backend: Backend, args: argparse.Namespace) -> list[Traffic]:
    rng = np.random.default_rng(0)
    _, phrase = backend.token_embeddings("a photo of a")
    base_ctx = phrase.numpy()
    classes = CLASS_NAMES[: args.prompt_classes]
    n_prompts = args.prompt_items // len(classes)

    def contexts(count: int) -> list[np.ndarray]:
        return [
            (base_ctx + 0.01 * rng.standard_normal(base_ctx.shape)).astype(np.float32) for _ in range(count)
        ]

    request_contexts = contexts(n_prompts)
    prompt_body = json.dumps(
        {"prompts": [encode_array(c) for c in request_contexts], "class_names": classes}
    ).encode()
    batch_contexts = [torch.from_numpy(c) for c in contexts(max(1, args.batch // len(classes)))]
    prompt_items = [PromptItem(c, name) for c in batch_contexts for name in classes][: args.batch]

    photos = _photos(max(args.image_items, args.batch), args.image_size)
    image_body = json.dumps(
        {"input": [_jpeg_data_uri(im) for im in photos[: args.image_items]], "modality": "image"}
    ).encode()
    batch_photos = photos[: args.batch]

    def encode_images() -> torch.Tensor:
        return backend.encode_images(torch.stack([backend.preprocess(im) for im in batch_photos]))

    return [
        Traffic(
            name="prompt-embeddings",
            modality="prompt",
            path="/v1/prompt-embeddings",
            body=prompt_body,
            items_per_request=n_prompts * len(classes),
            inprocess=lambda: backend.encode_prompts(prompt_items),
            items_per_call=len(prompt_items),
            description=(
                f"{n_prompts} prompts x {len(classes)} classes = {n_prompts * len(classes)} items/request, "
                f"{base_ctx.shape[0]} context vectors each, base64 in and out"
            ),
        ),
        Traffic(
            name="image-embeddings",
            modality="image",
            path="/v1/embeddings",
            body=image_body,
            items_per_request=args.image_items,
            inprocess=encode_images,
            items_per_call=len(batch_photos),
            description=(
                f"{args.image_items} JPEG data URIs ({args.image_size}x{args.image_size}) per request; "
                "in-process starts from decoded PIL images (preprocess + encode)"
            ),
        ),
    ]


# -- measurements ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    items_per_s: float
    cpu_ms_per_item: float  # CPU time of the process doing the work (server or this one)
    batch: float  # mean model batch size (observed on the server's /metrics over HTTP)


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_inprocess(traffic: Traffic, duration_s: float) -> Sample:
    traffic.inprocess()  # warm
    items, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < duration_s or items < MIN_BATCHES * traffic.items_per_call:
        traffic.inprocess()
        items += traffic.items_per_call
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Sample(items / elapsed, 1000 * cpu / items, traffic.items_per_call)


def _batch_totals(server: Server, modality: str) -> tuple[float, float]:
    """(sum, count) of the server's cbbt_batch_size histogram for one modality."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "cbbt_batch_size":
            for sample in family.samples:
                suffix = sample.name.rsplit("_", 1)[-1]
                if suffix in totals and sample.labels.get("modality") == modality:
                    totals[suffix] = sample.value
    return totals["sum"], totals["count"]


async def _http_run(
    server: Server, traffic: Traffic, duration_s: float, concurrency: int, batch: int
) -> Sample:
    assert server.process is not None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.request_headers, timeout=300, limits=limits
    ) as client:

        async def one() -> None:
            response = await client.post(traffic.path, content=traffic.body)
            if response.status_code != 200:
                raise RuntimeError(f"{traffic.path}: {response.status_code} {response.text[:300]}")

        await one()  # warm: the model already is (the server's warm-up), so one request is enough
        deadline = time.perf_counter() + duration_s
        done = 0

        at_least = MIN_BATCHES * batch

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline or done < at_least:
                await one()
                done += traffic.items_per_request

        batches = _batch_totals(server, traffic.modality)
        started, cpu = time.perf_counter(), _process_cpu_s(server.process.pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, _process_cpu_s(server.process.pid) - cpu
        after = _batch_totals(server, traffic.modality)
        mean_batch = (after[0] - batches[0]) / max(after[1] - batches[1], 1.0)
        return Sample(done / elapsed, 1000 * cpu / done, mean_batch)


def measure_http(server: Server, traffic: Traffic, duration_s: float, concurrency: int, batch: int) -> Sample:
    return asyncio.run(_http_run(server, traffic, duration_s, concurrency, batch))


def check_equivalence(server: Server, backend: Backend, traffic: list[Traffic]) -> None:
    """The server answers what the in-process backend computes (a sanity check, not timed)."""
    prompt = next(t for t in traffic if t.name == "prompt-embeddings")
    body = json.loads(prompt.body)
    response = httpx.post(
        f"{server.url}{prompt.path}", content=prompt.body, headers=server.request_headers, timeout=120
    ).json()
    from shared.arrays import decode_array

    served = decode_array(response["embeddings"], response["shape"])
    contexts = [torch.from_numpy(decode_array(p, width=backend.card.token_width)) for p in body["prompts"]]
    local = backend.encode_prompts([PromptItem(c, n) for c in contexts for n in body["class_names"]])
    if not np.allclose(served.reshape(local.shape), local.numpy(), atol=1e-4):
        raise RuntimeError("served prompt features differ from the in-process backend")


# -- report ------------------------------------------------------------------------------
KINDS = ("inprocess", "http", "http_auth")


@dataclass
class Result:
    model: str
    traffic: str
    samples: dict[str, list[Sample]]

    def rate(self, kind: str) -> float:
        return statistics.fmean(s.items_per_s for s in self.samples[kind])

    def cpu(self, kind: str) -> float:
        return statistics.fmean(s.cpu_ms_per_item for s in self.samples[kind])

    def batch(self, kind: str) -> float:
        return statistics.fmean(s.batch for s in self.samples[kind])

    def ratio(self, kind: str) -> float:
        return self.rate(kind) / self.rate("inprocess")


def machine_lines(threads: int) -> list[str]:
    return [
        f"- machine: `{' '.join(platform.uname())}`",
        f"- CPUs (nproc): {os.cpu_count()}; torch threads: {threads} (server `--threads` and in-process)",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (both sides)",
    ]


def render(
    args: argparse.Namespace, command: str, results: list[Result], notes: list[str], loads: list[float]
) -> str:
    busy = max(loads) > 0.5 * (os.cpu_count() or 1)
    lines = [
        BEGIN,
        "## HTTP vs in-process throughput (`scripts/bench_server.py`)",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        *machine_lines(args.threads),
        f"- 1-minute load average before / after the run: {loads[0]:.2f} / {loads[-1]:.2f}"
        + (" (**the machine was busy with other work: treat the figures as rough**)" if busy else ""),
        f"- server: `--batch-max-items {args.batch} --batch-max-wait-ms {args.batch_wait_ms:g} "
        f"--threads {args.threads}`; in-process batch size {args.batch}",
        f"- HTTP load: {args.concurrency} concurrent httpx AsyncClient tasks in one process, "
        f"{args.rounds} rounds x {args.duration:g} s (and >= {MIN_BATCHES} batches) per measurement, "
        "alternated; mean over rounds",
        "- the client runs on the same cores as the server: the HTTP columns pay for the load "
        "generator's CPU too, the in-process column does not",
        "",
        "| model | traffic | in-process items/s | HTTP no-auth items/s | ratio | HTTP auth items/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.traffic} | {r.rate('inprocess'):.1f} | {r.rate('http'):.1f} | "
            f"{r.ratio('http'):.2f} | {r.rate('http_auth'):.1f} | {r.ratio('http_auth'):.2f} |"
        )
    lines += [
        "",
        "CPU time per item of the process doing the work (this process in-process; the server process "
        "over HTTP, the client excluded), in ms, and the mean model batch size (the server's, from its "
        "/metrics, over HTTP):",
        "",
        "| model | traffic | in-process CPU ms/item | HTTP no-auth | HTTP auth | batch in-process "
        "| batch HTTP no-auth | batch HTTP auth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.traffic} | {r.cpu('inprocess'):.2f} | {r.cpu('http'):.2f} | "
            f"{r.cpu('http_auth'):.2f} | {r.batch('inprocess'):.0f} | {r.batch('http'):.1f} | "
            f"{r.batch('http_auth'):.1f} |"
        )
    lines += ["", "Traffic:", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "Goal (issue 2): HTTP >= 0.9 x in-process.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- main --------------------------------------------------------------------------------
def server_args(model: str, args: argparse.Namespace) -> list[str]:
    flags = ["--threads", str(args.threads), "--batch-max-items", str(args.batch)]
    flags += ["--batch-max-wait-ms", str(args.batch_wait_ms)]
    if model != DEFAULT_MODEL:
        flags += ["--model", model, "--pretrained", "none"]
    return flags


def bench_model(model: str, args: argparse.Namespace, workdir: Path) -> tuple[list[Result], list[str]]:
    print(f"== {model}: loading in-process and starting two servers (no-auth, auth)", flush=True)
    slug = model.replace("/", "_")
    servers = [
        Server(server_args(model, args), workdir / f"{slug}-{auth}.db", auth, workdir / f"{slug}-{auth}.log")
        for auth in (False, True)
    ]
    for server in servers:
        server.start()
    try:
        backend = create_backend(model, None if model == DEFAULT_MODEL else "none")
        backend.warm_up()
        for server in servers:
            server.wait_ready()
        traffic = build_traffic(backend, args)
        if backend.card.has_semantics:  # random-init weights differ between processes
            check_equivalence(servers[0], backend, traffic)
        results = [Result(backend.card.id, t.name, {k: [] for k in KINDS}) for t in traffic]
        for round_index in range(args.rounds):
            for t, result in zip(traffic, results, strict=True):
                runs = [
                    ("inprocess", lambda t=t: measure_inprocess(t, args.duration)),
                    (
                        "http",
                        lambda t=t: measure_http(servers[0], t, args.duration, args.concurrency, args.batch),
                    ),
                    (
                        "http_auth",
                        lambda t=t: measure_http(servers[1], t, args.duration, args.concurrency, args.batch),
                    ),
                ]
                if round_index % 2:  # alternate the order between rounds
                    runs.reverse()
                for kind, run in runs:
                    sample = run()
                    result.samples[kind].append(sample)
                    print(
                        f"   round {round_index + 1} {t.name:18s} {kind:10s} "
                        f"{sample.items_per_s:9.1f} items/s {sample.cpu_ms_per_item:7.2f} CPU ms/item "
                        f"batch {sample.batch:5.1f}",
                        flush=True,
                    )
        notes = [f"{backend.card.id} {t.name}: {t.description}" for t in traffic]
        return results, notes
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help=f"model(s) to bench (default {DEFAULT_MODEL})")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--prompt-items", type=int, default=32, help="prompt items per request (P x C)")
    parser.add_argument("--prompt-classes", type=int, default=8, help="C: class names per prompt request")
    parser.add_argument("--image-items", type=int, default=8, help="images per request")
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEGs sent")
    parser.add_argument("--batch", type=int, default=32, help="model batch size (server and in-process)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="server --batch-max-wait-ms")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks" / "server.md")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    args = parser.parse_args(argv)
    models = args.model or [DEFAULT_MODEL]
    torch.set_num_threads(args.threads)
    command = "python scripts/bench_server.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    loads = [os.getloadavg()[0]]
    all_results: list[Result] = []
    all_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cbbt-bench-") as tmp:
        for model in models:
            results, notes = bench_model(model, args, Path(tmp))
            all_results += results
            all_notes += notes
    loads.append(os.getloadavg()[0])
    section = render(args, command.strip(), all_results, all_notes, loads)
    print()
    print(section)
    if not args.no_write:
        write_section(args.output, section)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
