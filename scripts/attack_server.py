"""Run the hostile inputs of issue 9 against a real server and print a Markdown table.

    .venv/bin/python scripts/attack_server.py [--default-model]

Each row: what was sent, what the server answered, its RSS before/after (MiB) and the slowest
/health answer seen while the attack ran (a probe polls it every 50 ms from another thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import ServerProcess


def rss_mib(server: ServerProcess) -> float:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw(server: ServerProcess, head: str, body: bytes = b"", wait_s: float = 30.0) -> str:
    with socket.create_connection(("127.0.0.1", server.port or 0), timeout=wait_s) as sock:
        sock.sendall(head.encode())
        try:
            for i in range(0, len(body), 1 << 20):
                sock.sendall(body[i : i + (1 << 20)])
        except OSError:
            pass
        try:
            answer = sock.recv(4096).decode("latin-1")
        except OSError:
            answer = ""
    return answer.split("\r\n")[0][9:] or "connection closed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--default-model", action="store_true")
    parser.add_argument("--random-requests", type=int, default=20, help="requests of the random-text attack")
    args = parser.parse_args()
    model = {"model": None, "pretrained": None} if args.default_model else {}
    tmp = Path(tempfile.mkdtemp())
    server = ServerProcess(tmp / "cbbt.db", **model)  # type: ignore[arg-type]
    victim = server.create_key("victim")
    attacker = server.create_key("attacker", default=False)
    server.start()
    auth = f"Authorization: Bearer {attacker}\r\n"
    post = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    client = server.client(attacker, timeout_s=120)

    def slow_bodies() -> str:
        socks = []
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", server.port or 0))
            s.sendall(f"{post}Content-Length: {16 << 20}\r\n\r\n".encode() + b"[")
            socks.append(s)
        answers = {s.recv(4096).split(b"\r\n")[0][9:].decode() for s in socks}
        for s in socks:
            s.close()
        return "6 conns: " + ", ".join(sorted(answers))

    def many_connections() -> str:
        socks = [socket.create_connection(("127.0.0.1", server.port or 0)) for _ in range(300)]
        time.sleep(0.5)
        refused = 0
        for s in socks:
            s.settimeout(0.05)
            with contextlib.suppress(OSError):
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            s.close()
        return f"{refused} of 300 got 503 overloaded"

    def random_text() -> str:
        rng = random.Random(0)
        for _ in range(args.random_requests):
            texts = [
                " ".join("".join(rng.choices(string.ascii_lowercase, k=9)) for _ in range(60))
                for _ in range(100)
            ]
            status = client.post("/v1/embeddings", json={"input": texts}).status_code
        return f"{status} ({args.random_requests * 6}k new words)"

    bomb = b"[" + b"{}," * (10 << 20) + b"{}]"
    attacks: list[tuple[str, Callable[[], str]]] = [
        (
            "JSON bomb 30 MiB `[{},...]`, no key",
            lambda: raw(server, f"{post}Content-Length: {len(bomb)}\r\n\r\n", bomb),
        ),
        (
            "JSON bomb 30 MiB, valid key",
            lambda: raw(server, f"{post}{auth}Content-Length: {len(bomb)}\r\n\r\n", bomb),
        ),
        ("16 MiB bodies announced, 1 byte sent, no key", slow_bodies),
        (
            "body stalls after 10 bytes, valid key",
            lambda: raw(server, f"{post}{auth}Content-Length: 999\r\n\r\n", b'{"input":'),
        ),
        ("headers never finish", lambda: raw(server, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")),
        ("300 idle connections", many_connections),
        (
            "lone surrogate in input",
            lambda: str(
                client.post(
                    "/v1/embeddings",
                    content=json.dumps({"input": ["\ud800"]}),
                    headers={"Content-Type": "application/json"},
                ).status_code
            ),
        ),
        (
            "2000-character word",
            lambda: str(client.post("/v1/embeddings", json={"input": ["y" * 2000]}).status_code),
        ),
        (f"random text, {args.random_requests} x 100 texts of 60 new words", random_text),
    ]
    columns = [
        "attack",
        "answer",
        "RSS before -> after (MiB)",
        "slowest /health (ms)",
        "slowest other tenant (ms, status)",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|")
    for name, attack in attacks:
        worst = {"health": 0.0, "tenant": 0.0}
        statuses: set[int] = set()
        done = threading.Event()

        def probe(
            done: threading.Event = done, worst: dict[str, float] = worst, statuses: set[int] = statuses
        ) -> None:
            with httpx.Client(base_url=server.url, timeout=30, headers=server.headers(victim)) as p:
                while True:  # at least one round, however short the attack
                    for what, call in (
                        ("health", lambda: p.get("/health")),
                        ("tenant", lambda: p.post("/v1/embeddings", json={"input": ["a photo of a cat"]})),
                    ):
                        started = time.perf_counter()
                        try:
                            status = call().status_code
                        except httpx.TimeoutException:
                            status = 0  # no answer within the probe's 30 s
                        worst[what] = max(worst[what], time.perf_counter() - started)
                        if what == "tenant":
                            statuses.add(status)
                    if done.wait(0.05):
                        return

        before = rss_mib(server)
        thread = threading.Thread(target=probe)
        thread.start()
        answer = attack()
        done.set()
        thread.join()
        time.sleep(1.0)
        tenant = f"{worst['tenant'] * 1000:.0f} ({', '.join(map(str, sorted(statuses)))})"
        rss = f"{before:.0f} -> {rss_mib(server):.0f}"
        print(f"| {name} | {answer} | {rss} | {worst['health'] * 1000:.0f} | {tenant} |")
    client.close()
    server.stop()


if __name__ == "__main__":
    main()
