"""Issue 9: one tenant never hurts another; unauthenticated traffic costs almost nothing.

One test per defect, each against a real server process on loopback (the batcher and the
tokenizer cache also have an in-process check of their mechanism). Memory and /health are
checked as properties (bounded growth, answered while an attack runs), never as tight timings.
"""

from __future__ import annotations

import json
import random
import select
import signal
import socket
import string
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.backends.base import TOKEN_CACHE_ENTRIES
from tests.helpers import ServerProcess, assert_error, image_data_uri, noise_image

SURROGATE = "\ud800"


def _post_raw(client: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    """json.dumps escapes to ASCII, so a lone surrogate travels as the (legal) JSON escape."""
    payload = json.dumps(body).encode()
    return client.post(path, content=payload, headers={"Content-Type": "application/json", **headers})


def _rss_kib(server: ServerProcess, field: str = "VmRSS") -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc status")


def _spent(client: httpx.Client) -> int:
    response = client.get("/v1/usage")
    assert response.status_code == 200, response.text
    return int(response.json()["spent_items"])


@pytest.fixture(scope="module")
def devise(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("hard-devise") / "cbbt.db", model=None, pretrained=None)
    server.create_key("tenant-a")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("hard-tiny") / "cbbt.db",
        extra_args=["--header-timeout-s", "2", "--body-idle-timeout-s", "2", "--max-connections", "24"],
    )
    server.create_key("tenant-a")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def token_width(tiny: ServerProcess) -> int:
    with tiny.client() as client:
        return int(client.get("/v1/models").json()["data"][0]["token_width"])


# -- 1. a poison item fails only its own request -----------------------------------------------
def test_poison_item_fails_only_its_own_request(devise: ServerProcess) -> None:
    attacker = devise.create_key("attacker", default=False)
    texts = [f"a photo of a {w}" for w in ("cat", "dog", "ship", "car", "tree", "bird")]

    def victim(i: int) -> int:
        with devise.client() as client:
            return client.post("/v1/embeddings", json={"input": texts[i % 6 :] + texts[: i % 6]}).status_code

    def poison(_: int) -> httpx.Response:
        with devise.client(attacker) as client:
            return _post_raw(client, "/v1/embeddings", {"input": ["a cat", f"a {SURROGATE} dog"]})

    with ThreadPoolExecutor(8) as pool:
        victims = [pool.submit(victim, i) for i in range(24)]
        poisons = [pool.submit(poison, i) for i in range(12)]
        statuses = [f.result() for f in victims]
        refusals = [f.result() for f in poisons]
    assert statuses == [200] * len(statuses)
    for response in refusals:
        assert_error(response, 400, "invalid_request")
    assert "batch of" not in devise.log_text()  # no model batch failed: the poison never reached it


def test_poison_item_in_a_shared_batch_fails_only_its_request() -> None:
    """The batcher's own guarantee (any model failure, not only tokenising): a batch mixing
    requests that fails is re-run per request, so only the request holding the bad item fails."""
    import asyncio

    import torch

    from server.batching import DynamicBatcher

    def model(items: list[float]) -> torch.Tensor:
        if any(x < 0 for x in items):
            raise RuntimeError("poison")
        return torch.tensor(items).unsqueeze(1)

    async def scenario() -> list[Any]:
        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher("test", model, pool, max_items=64, max_wait_s=0.05)
        batcher.start()
        try:
            return list(
                await asyncio.gather(
                    batcher.submit([1.0, 2.0]),
                    batcher.submit([-1.0]),
                    batcher.submit([3.0]),
                    return_exceptions=True,
                )
            )
        finally:
            await batcher.stop()
            pool.shutdown()

    first, poisoned, last = asyncio.run(scenario())
    assert isinstance(poisoned, RuntimeError)
    assert first.flatten().tolist() == [1.0, 2.0] and last.flatten().tolist() == [3.0]


# -- 2. lone surrogates: 400 naming the field, on every route, with or without Idempotency-Key ---
def test_lone_surrogates_are_400_naming_the_field(devise: ServerProcess, tmp_path: Path) -> None:
    with devise.client() as client:
        width = int(client.get("/v1/models").json()["data"][0]["token_width"])
        context = [[0.01] * width]
        image = image_data_uri(noise_image())
        cases = [
            ("/v1/embeddings", {"input": SURROGATE}, "input"),
            ("/v1/embeddings", {"input": ["ok", f"x{SURROGATE}"]}, "input[1]"),
            ("/v1/embeddings", {"input": ["ok"], "user": SURROGATE}, "user"),
            ("/v1/token-embeddings", {"text": f"a {SURROGATE}"}, "text"),
            (
                "/v1/prompt-embeddings",
                {"prompts": [context], "class_names": ["cat", SURROGATE]},
                "class_names[1]",
            ),
            ("/v1/classify", {"images": [image], "texts": [SURROGATE, "dog"]}, "texts[0]"),
            (
                "/v1/classify",
                {"images": [image], "context": context, "class_names": [SURROGATE]},
                "class_names[0]",
            ),
        ]
        before = _spent(client)
        for path, body, field in cases:
            for headers in ({}, {"Idempotency-Key": uuid.uuid4().hex}):
                error = assert_error(_post_raw(client, path, body, **headers), 400, "invalid_request")
                assert error["param"] == field, (path, error)
        assert _spent(client) == before
    # The client reads class names from folder names, where undecodable bytes become surrogates.
    from client.data import load_dataset

    root = tmp_path / "folders"
    for name in (b"cat", b"caf\xe9"):  # Latin-1 bytes: not UTF-8
        folder = root / name.decode("utf-8", "surrogateescape")
        folder.mkdir(parents=True)
        noise_image().save(folder / "a.png")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_dataset(f"imagefolder:{root}")


# -- 3. idempotent replays count against the request rate limit ---------------------------------
def test_idempotent_replays_count_against_rate_limits(tiny: ServerProcess) -> None:
    key = tiny.create_key(f"rpm-{uuid.uuid4().hex[:6]}", rpm=3, default=False)
    with tiny.client(key) as client:
        first = client.post("/v1/embeddings", json={"input": ["a cat"]}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 200, first.text
        spent = _spent(client)
        statuses = [
            client.post(
                "/v1/embeddings", json={"input": ["a cat"]}, headers={"Idempotency-Key": "k1"}
            ).status_code
            for _ in range(6)
        ]
        assert statuses[:2] == [200, 200], statuses  # replays, within the 3 requests a minute
        assert set(statuses[2:]) == {429}, statuses
        assert _spent(client) == spent  # and never charged


# -- 4. the budget is checked before any per-item CPU work --------------------------------------
def test_budget_is_checked_before_per_item_work(tiny: ServerProcess, token_width: int) -> None:
    key = tiny.create_key(f"poor-{uuid.uuid4().hex[:6]}", budget_items=3, default=False)
    with tiny.client(key) as client:
        # Images that would fail decoding, names that would fail tokenising: the budget answers first.
        response = client.post("/v1/classify", json={"images": ["not an image"] * 8, "texts": ["a", "b"]})
        assert_error(response, 429, "insufficient_quota")
        names = ["🐱" * 150] * 2048  # within the characters, over the text tower's tokens
        response = client.post(
            "/v1/prompt-embeddings", json={"prompts": [[[0.01] * token_width]], "class_names": names}
        )
        assert_error(response, 429, "insufficient_quota")
        assert _spent(client) == 0
    # A funded key's CPU-costly validation runs off the event loop: /health answers meanwhile.
    with tiny.client() as funded, httpx.Client(base_url=tiny.url, timeout=30) as probe:
        body = {"prompts": [[[0.01] * token_width]], "class_names": [f"{'ab ' * 60}{i}" for i in range(4096)]}
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(funded.post, "/v1/prompt-embeddings", json=body)
            answered = 0
            while not big.done():
                answered += probe.get("/health").status_code == 200
        assert big.result().status_code == 200
        assert answered >= 1


# -- 5. characters per word are bounded before tokenising, and advertised -----------------------
def test_word_length_is_bounded_before_tokenising(tiny: ServerProcess) -> None:
    with tiny.client() as client:
        limits = client.get("/v1/models").json()["data"][0]["limits"]
        bound = limits["max_word_chars"]
        assert isinstance(bound, int) and 0 < bound < limits["max_text_chars"]
        error = assert_error(
            client.post("/v1/embeddings", json={"input": ["ok", "y" * 2000]}), 400, "invalid_request"
        )
        assert error["param"] == "input[1]"
        assert client.post("/v1/embeddings", json={"input": [("y" * bound + " ") * 5]}).status_code == 200


# -- 6. the tokenizer's word cache is bounded -------------------------------------------------
def _random_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(6, 12))) for _ in range(n)]


def test_tokenizer_cache_is_bounded(tiny: ServerProcess) -> None:
    from server.backends.registry import create_backend

    backend: Any = create_backend("cbbt-tiny", "none")
    for chunk in range(0, 3 * TOKEN_CACHE_ENTRIES, 50):
        backend.tokenize([" ".join(_random_words(50, seed=100 + chunk))])
    assert len(backend.tokenizer.cache) <= TOKEN_CACHE_ENTRIES + 2  # + its pinned special tokens
    # The server: memory flat under random text (a generous bound; unbounded, it grows ~28 MiB
    # per 300k new words and never shrinks).
    with tiny.client() as client:

        def send(seed: int) -> None:
            texts = [" ".join(_random_words(60, seed * 1000 + i)) for i in range(100)]
            assert client.post("/v1/embeddings", json={"input": texts}).status_code == 200

        send(0)
        before = _rss_kib(tiny)
        for seed in range(1, 41):  # 240k new words
            send(seed)
        grown_mib = (_rss_kib(tiny) - before) / 1024
    assert grown_mib < 50, f"RSS grew {grown_mib:.0f} MiB under random text"


# -- 7. slow bodies and slow headers are cut off; connections are capped -----------------------
def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port or 0), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while part := sock.recv(65536):
            data += part
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_slow_bodies_and_headers_are_cut_off(tiny: ServerProcess) -> None:
    head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Unauthenticated, 16 MiB announced, 10 bytes sent: answered 401 at once, connection closed.
    with _connect(tiny) as sock:
        sock.sendall(f"{head}Content-Length: {16 << 20}\r\n\r\n".encode() + b'{"input": ')
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"invalid_api_key"' in answer
    # Authenticated, but the body stalls: 408 in the envelope once the idle deadline passes.
    with _connect(tiny) as sock:
        auth = f"Authorization: Bearer {tiny.api_key}\r\n"
        sock.sendall(f"{head}{auth}Content-Length: 1000\r\n\r\n".encode() + b'{"input": ')
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    # Headers that never finish: the connection is closed.
    with _connect(tiny) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
        assert _read_all(sock) == b""
    # Held-open connections lock nobody out: past the cap (24 here), the oldest connection
    # with no request in progress is closed to make room, so /health still answers.
    held = [_connect(tiny) for _ in range(40)]
    try:
        with httpx.Client(base_url=tiny.url, timeout=30) as fresh:
            assert fresh.get("/health").status_code == 200
    finally:
        for sock in held:
            sock.close()
    # Only when every connection has a request in progress is a newcomer refused: 503
    # overloaded in the envelope.
    busy = [_connect(tiny) for _ in range(24)]
    try:
        for sock in busy:
            sock.sendall(f"{head}{auth}Content-Length: 1000\r\n\r\n".encode() + b"{")
        time.sleep(0.3)
        with _connect(tiny) as newcomer:
            newcomer.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _read_all(newcomer)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b'"overloaded"' in answer
    finally:
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the cap frees as soon as they close
        try:
            with httpx.Client(base_url=tiny.url, timeout=30) as fresh:
                if fresh.get("/health").status_code == 200:
                    break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


# -- 8. unauthenticated JSON bombs are refused before parsing; bodies are bounded in values ----
def _send_body(server: ServerProcess, body: bytes, auth: str = "") -> bytes:
    """Send the headers; send the body only while no answer has come (an early one is the point)."""
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _connect(server) as sock:
        sock.sendall(head)
        if not select.select([sock], [], [], 1.0)[0]:
            try:
                for i in range(0, len(body), 1 << 20):
                    if select.select([sock], [], [], 0)[0]:
                        break
                    sock.sendall(body[i : i + (1 << 20)])
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered (and closed) before the body was sent whole
        return _read_all(sock)


def test_unauthenticated_json_bombs_cost_nothing(tiny: ServerProcess) -> None:
    bomb = b"[" + b"{}," * (10 << 20) + b"{}]"  # 30 MiB, 10M objects: ~1 GB once parsed
    peak_before = _rss_kib(tiny, "VmHWM")
    answer = _send_body(tiny, bomb)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert (_rss_kib(tiny, "VmHWM") - peak_before) / 1024 < 50
    # With a key the body is read, but counted before it is parsed: 413, and memory stays bounded.
    answer = _send_body(tiny, bomb, auth=f"Authorization: Bearer {tiny.api_key}\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    assert (_rss_kib(tiny, "VmHWM") - peak_before) / 1024 < 200
    with httpx.Client(base_url=tiny.url, timeout=30) as probe:
        assert probe.get("/health").status_code == 200


def test_memory_under_bursts_of_large_bodies_stays_bounded(tiny: ServerProcess) -> None:
    """Bursts of large bodies reuse the memory the first ones took. The server keeps glibc's
    adaptive allocator with two arenas (server/malloc.py::limit_arenas; a fixed
    1 MiB mmap threshold returned every body at once but made each model activation page-fault
    afresh: docs/reliability.md); a body kept per request would add ~96 MiB per burst here."""
    body = json.dumps({"input": ["x" * (12 << 20)]}).encode()  # read, parsed, then refused (400)
    headers = {"Authorization": f"Bearer {tiny.api_key}", "Content-Type": "application/json"}

    def burst() -> float:
        def send(_: int) -> int:
            with httpx.Client(base_url=tiny.url, timeout=60) as client:
                return client.post("/v1/embeddings", content=body, headers=headers).status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(send, range(8))) == {400}
        return _rss_kib(tiny) / 1024

    before = _rss_kib(tiny) / 1024
    rss = [burst() for _ in range(12)]
    assert max(rss) - before < 160, f"RSS +{max(rss) - before:.0f} MiB: {rss}"
    assert max(rss[6:]) <= max(rss[:6]) + 24, f"RSS still growing after 6 bursts: {rss}"


# -- shutdown: in-flight requests drain, new ones get 503 shutting_down ------------------------
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    # 6 s of injected latency per request: longer than uvicorn's own 5 s grace period.
    server = ServerProcess(tmp_path / "cbbt.db", extra_args=["--latency-ms", "6000"])
    server.create_key("drain")
    server.start()
    try:
        results: list[httpx.Response | Exception] = []

        def call() -> None:
            try:
                with server.client() as client:
                    results.append(client.post("/v1/embeddings", json={"input": ["a", "b"]}))
            except httpx.HTTPError as exc:
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with server.client() as client:
            late = client.post("/v1/embeddings", json={"input": ["c"]})
        for thread in threads:
            thread.join(60)
        server.process.wait(60)
    finally:
        server.stop()
    assert_error(late, 503, "shutting_down")
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4
    from server.store import SqliteStore

    with SqliteStore(server.db) as store:
        assert store.get_key("drain").spent_items == 8  # every answer charged, nothing else


def test_long_texts_make_smaller_model_batches() -> None:
    """Defect 5's other half: the model thread is shared, so a batch is bounded in tokens, not only
    in items, and filled round-robin across requests: one tenant's long texts hold it (and its
    memory) for a bounded time, and a small request that comes after them is in the next batch."""
    import asyncio

    import torch

    from server.batching import DynamicBatcher

    batches: list[list[int]] = []

    def model(rows: list[tuple[int, ...]]) -> torch.Tensor:
        batches.append([len(row) for row in rows])
        return torch.zeros(len(rows), 1)

    async def scenario() -> None:
        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(
            "text", model, pool, max_items=64, max_wait_s=0.05, cost=len, max_cost=64 * 77, fair=True
        )
        batcher.start()
        try:
            await asyncio.gather(batcher.submit([(1,) * 500] * 40), batcher.submit([(1,) * 10] * 3))
        finally:
            await batcher.stop()
            pool.shutdown()

    asyncio.run(scenario())
    assert all(sum(batch) <= 64 * 77 for batch in batches) and sum(map(len, batches)) == 43
    assert 10 in batches[0]  # the small request did not wait behind the 40 long texts
