"""Budgets, keys, rate limits and accounting against real server processes and real SQLite files.

Every test talks HTTP to a `cbbt-server serve` subprocess (the tiny random-init model) and,
where the claim is about money, opens the server's database file itself with SqliteStore and
checks the ledger against what the clients saw. No assertion depends on how fast anything is;
the few waits are the ones the server asks for in Retry-After.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.store import LedgerRow, SqliteStore
from tests.helpers import (
    HELD_ITEMS,
    REPO_ROOT,
    ServerProcess,
    assert_error,
    held_batch_args,
    image_data_uri,
    noise_image,
)

ADMIN_TOKEN = "budget-tests-admin-token"
EMBEDDINGS = "/v1/embeddings"
RESET_FORMAT = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$")
# Upper bound on the requests a "drain the bucket until 429" loop may take.
MAX_DRAIN_REQUESTS = 200


@dataclass(frozen=True)
class Key:
    name: str
    secret: str


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that do not restart it; each test makes its own keys."""
    proc = ServerProcess(tmp_path_factory.mktemp("budget") / "cbbt.db", env={"CBBT_ADMIN_TOKEN": ADMIN_TOKEN})
    with proc:
        yield proc


def _new_key(server: ServerProcess, budget_items: int, **limits: Any) -> Key:
    """A fresh key with a unique name, created with the real `keys create` CLI."""
    name = f"k{uuid.uuid4().hex[:12]}"
    return Key(name, server.create_key(name, budget_items=budget_items, default=False, **limits))


def _texts(n: int, tag: str = "") -> list[str]:
    return [f"a photo of thing {tag}{i}" for i in range(n)]


def _embed(
    client: httpx.Client, n: int, *, tag: str = "", headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(EMBEDDINGS, json={"input": _texts(n, tag)}, headers=headers or {})


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    assert "x-budget-remaining-items" in response.headers, dict(response.headers)
    return response


def _remaining_header(response: httpx.Response) -> int:
    return int(response.headers["x-budget-remaining-items"])


def _usage(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/usage", params={"recent": 1000})
    assert response.status_code == 200, response.text
    return response.json()


def _ledger(db: Path | str, name: str) -> tuple[int, int, int, list[LedgerRow]]:
    """(spent_items, spent_requests, ledger_total, rows) of a key, read from the file itself."""
    with SqliteStore(db) as store:
        key = store.get_key(name)
        _, rows = store.usage(key.id, recent=100_000)
        return key.spent_items, key.spent_requests, store.ledger_total(key.id), rows


def _assert_books_balance(db: Path | str, name: str, answered_items: int) -> list[LedgerRow]:
    """The key's spent counters, its ledger and the items of the 200 answers all agree."""
    spent, spent_requests, total, rows = _ledger(db, name)
    charged = [row for row in rows if not row.refunded]
    assert spent == total == answered_items, (spent, total, answered_items)
    assert spent_requests == len(charged)
    assert all(row.status == 200 for row in charged), charged
    return rows


def _keys_cli(db: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", args[0], "--db", str(db), *args[1:]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _quota_refused(response: httpx.Response) -> dict[str, Any]:
    error = assert_error(response, 429, "insufficient_quota")
    assert response.headers.get("x-should-retry") == "false", dict(response.headers)
    return error


def _drain_until_rate_limited(client: httpx.Client, items: int) -> httpx.Response:
    """Send `items`-item requests until the key's bucket refuses one; returns that 429."""
    for _ in range(MAX_DRAIN_REQUESTS):
        response = _embed(client, items)
        if response.status_code != 200:
            assert_error(response, 429, "rate_limit_exceeded")
            return response
    raise AssertionError(f"no 429 after {MAX_DRAIN_REQUESTS} requests")


def _model_id(server: ServerProcess, secret: str) -> str:
    response = httpx.get(f"{server.url}/v1/models", headers=server.headers(secret), timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _metric(server: ServerProcess, family: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- 1. concurrent clients racing a small budget -----------------------------------------
@pytest.mark.parametrize(("budget", "left"), [(30, 0), (31, 1)])
def test_concurrent_clients_never_overspend(server: ServerProcess, budget: int, left: int) -> None:
    key = _new_key(server, budget)
    n_threads, items = 24, 3
    barrier = threading.Barrier(n_threads)

    def one(i: int) -> httpx.Response:
        with server.client(key.secret) as client:
            barrier.wait(timeout=60)
            return _embed(client, items, tag=f"{i}-")

    with ThreadPoolExecutor(n_threads) as pool:
        responses = list(pool.map(one, range(n_threads)))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) * items == budget - left
    for response in refused:
        _quota_refused(response)
        # Nothing is refunded in this race, so every refusal saw the final remainder.
        assert _remaining_header(response) == left
    # Each success reports the budget left right after its own charge: all different.
    assert sorted(_remaining_header(_ok(r)) for r in ok) == list(range(left, budget, items))
    with server.client(key.secret) as client:
        usage = _usage(client)
    assert usage["spent_items"] == len(ok) * items
    assert usage["remaining_items"] == left
    assert usage["spent_requests"] == len(ok)
    rows = _assert_books_balance(server.db, key.name, len(ok) * items)
    assert len(rows) == len(ok)
    assert {row.request_id for row in rows} == {r.headers["x-request-id"] for r in ok}


# -- 2. durability across a graceful restart and a crash ---------------------------------
def test_spent_budget_survives_restart_and_crash(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "cbbt.db")
    secret = proc.create_key("durable", budget_items=10, default=False)
    crash_secret = proc.create_key("crash", budget_items=10**6, default=False)
    with proc:
        with proc.client(secret) as client:
            assert _remaining_header(_ok(_embed(client, 4))) == 6
        proc.restart()  # SIGTERM: graceful shutdown, then a fresh process on the same file
        with proc.client(secret) as client:
            usage = _usage(client)
            assert (usage["spent_items"], usage["remaining_items"]) == (4, 6)
            _quota_refused(_embed(client, 7))
            assert _remaining_header(_ok(_embed(client, 3))) == 3

        # SIGKILL with requests in flight on another key: whatever was charged is in the
        # ledger, and every 200 a client saw was settled before it was sent.
        answered = 0
        lock = threading.Lock()
        stop = threading.Event()

        def hammer() -> None:
            nonlocal answered
            with proc.client(crash_secret, timeout_s=30) as client:
                while not stop.is_set():
                    try:
                        response = _embed(client, 2)
                    except httpx.TransportError:
                        return
                    if response.status_code == 200:
                        with lock:
                            answered += 1

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while answered < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert answered >= 20
        spent, spent_requests, total, rows = _ledger(proc.db, "crash")
        assert spent == total
        assert spent_requests == len(rows)
        assert len([row for row in rows if row.status == 200]) >= answered
        # A request cut off by the crash may stay reserved (status None); nothing else is possible.
        assert all(row.status in (200, None) and not row.refunded for row in rows)

        proc.start()
        with proc.client(secret) as client:
            usage = _usage(client)
            assert (usage["spent_items"], usage["remaining_items"]) == (7, 3)
            _quota_refused(_embed(client, 4))
        with proc.client(crash_secret) as client:
            # Reservations the crash left unanswered were refunded at start-up; answered ones stand.
            settled = sum(row.items for row in rows if row.status == 200)
            assert _usage(client)["spent_items"] == settled <= spent
    _assert_books_balance(proc.db, "durable", 7)


def test_crash_mid_request_is_recovered_on_restart(tmp_path: Path) -> None:
    # Held batches keep the request in flight long enough to be caught with its items reserved.
    proc = ServerProcess(tmp_path / "cbbt.db", extra_args=held_batch_args(5))
    secret = proc.create_key("interrupted", budget_items=10**6, default=False)
    body = {"input": _texts(HELD_ITEMS)}
    idem = {"Idempotency-Key": "crash-retry"}
    with proc:

        def send() -> None:
            with proc.client(secret) as client, pytest.raises(httpx.TransportError):
                client.post(EMBEDDINGS, json=body, headers=idem)

        sender = threading.Thread(target=send)
        sender.start()
        with sqlite3.connect(proc.db) as db:
            deadline = time.monotonic() + 60
            while db.execute("SELECT 1 FROM ledger WHERE status IS NULL").fetchone() is None:
                assert sender.is_alive() and time.monotonic() < deadline, "the request was never in flight"
                time.sleep(0.002)
        proc.kill()
        sender.join(timeout=120)
        spent, _, total, rows = _ledger(proc.db, "interrupted")
        assert spent == total == HELD_ITEMS and [row.status for row in rows] == [None]

        proc.start()
        with proc.client(secret) as client:
            # Wanted: the interrupted request was never answered, so it costs nothing ...
            assert _usage(client)["spent_items"] == 0
            # ... and the client's retry with the same Idempotency-Key runs instead of a 409.
            _ok(client.post(EMBEDDINGS, json=body, headers=idem))
    _assert_books_balance(proc.db, "interrupted", HELD_ITEMS)


# -- 3. idempotency ----------------------------------------------------------------------
def test_idempotent_retry_is_charged_once(server: ServerProcess) -> None:
    key = _new_key(server, 100)
    other = _new_key(server, 100)
    body = {"input": _texts(3)}
    idem = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    with server.client(key.secret) as client:
        first = _ok(client.post(EMBEDDINGS, json=body, headers=idem))
        assert "x-idempotent-replayed" not in first.headers
        second = _ok(client.post(EMBEDDINGS, json=body, headers=idem))
        assert second.headers["x-idempotent-replayed"] == "true"
        assert second.content == first.content
        assert second.headers["x-request-id"] == first.headers["x-request-id"]
        assert second.headers["x-budget-remaining-items"] == first.headers["x-budget-remaining-items"] == "97"
        assert _usage(client)["spent_items"] == 3

        conflict = client.post(EMBEDDINGS, json={"input": _texts(3, "other")}, headers=idem)
        assert assert_error(conflict, 409, "idempotency_conflict")["param"] == "Idempotency-Key"
        assert _usage(client)["spent_items"] == 3

        fresh = _ok(
            client.post(EMBEDDINGS, json=body, headers={"Idempotency-Key": f"new-{uuid.uuid4().hex}"})
        )
        assert "x-idempotent-replayed" not in fresh.headers
        assert _usage(client)["spent_items"] == 6
    # Idempotency keys belong to one API key: another caller's identical header is its own request.
    with server.client(other.secret) as client:
        theirs = _ok(client.post(EMBEDDINGS, json=body, headers=idem))
        assert "x-idempotent-replayed" not in theirs.headers
        assert theirs.headers["x-request-id"] != first.headers["x-request-id"]
        assert _usage(client)["spent_items"] == 3
    assert len(_assert_books_balance(server.db, key.name, 6)) == 2
    _assert_books_balance(server.db, other.name, 3)


# -- 4. revoked keys ---------------------------------------------------------------------
def test_key_revoked_with_the_cli_gets_401(server: ServerProcess) -> None:
    key = _new_key(server, 100)
    with server.client(key.secret) as client:
        _ok(_embed(client, 1))
        done = _keys_cli(server.db, "revoke", key.name)
        assert done.returncode == 0, done.stderr
        assert '"revoked": true' in done.stdout
        assert_error(_embed(client, 1), 401, "invalid_api_key")
        assert_error(client.get("/v1/usage"), 401, "invalid_api_key")
    _assert_books_balance(server.db, key.name, 1)


def test_admin_routes_create_top_up_and_revoke(server: ServerProcess) -> None:
    name = f"admin{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=server.url, timeout=60) as anon:
        assert_error(anon.get("/admin/keys"), 401, "invalid_api_key")
        wrong = anon.get("/admin/keys", headers={"Authorization": "Bearer not-the-token"})
        assert_error(wrong, 401, "invalid_api_key")
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    with admin:
        created = admin.post("/admin/keys", json={"name": name, "budget_items": 3, "scopes": ["embed"]})
        assert created.status_code == 201, created.text
        secret = created.json()["key"]
        assert created.json()["record"]["remaining_items"] == 3
        # An API key is not an admin token.
        assert_error(
            admin.get("/admin/keys", headers={"Authorization": f"Bearer {secret}"}), 401, "invalid_api_key"
        )
        with server.client(secret) as client:
            _ok(_embed(client, 3))
            _quota_refused(_embed(client, 1))
            topped = admin.post(f"/admin/keys/{name}/top-up", json={"items": 2})
            assert topped.status_code == 200, topped.text
            assert topped.json()["remaining_items"] == 2
            assert _remaining_header(_ok(_embed(client, 2))) == 0
            shown = admin.get(f"/admin/keys/{name}").json()
            assert (shown["spent_items"], shown["budget_items"], shown["revoked"]) == (5, 5, False)
            revoked = admin.post(f"/admin/keys/{name}/revoke")
            assert revoked.status_code == 200 and revoked.json()["revoked"] is True
            assert_error(_embed(client, 1), 401, "invalid_api_key")
    _assert_books_balance(server.db, name, 5)


# -- 5. rate limits ----------------------------------------------------------------------
def test_rpm_third_quick_request_is_rate_limited(server: ServerProcess) -> None:
    key = _new_key(server, 100, rpm=2)
    with server.client(key.secret) as client:
        first, second = _ok(_embed(client, 1)), _ok(_embed(client, 1))
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert [
            first.headers["x-ratelimit-remaining-requests"],
            second.headers["x-ratelimit-remaining-requests"],
        ] == [
            "1",
            "0",
        ]
        third = _embed(client, 1)
        assert_error(third, 429, "rate_limit_exceeded")
        assert third.headers.get("x-should-retry") != "false"  # a rate limit passes: retry it
        retry_s, retry_ms = int(third.headers["retry-after"]), int(third.headers["retry-after-ms"])
        # 2 per minute refill at one request per 30 s.
        assert 1 <= retry_s <= 30 and 0 < retry_ms <= 30_000
        assert retry_ms <= retry_s * 1000 < retry_ms + 1001
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
        assert _usage(client)["spent_items"] == 2
    _assert_books_balance(server.db, key.name, 2)


def test_rate_limited_request_succeeds_after_retry_after(server: ServerProcess) -> None:
    # 20 per minute: one request back every 3 s, so the wait asked for is short.
    key = _new_key(server, 10_000, rpm=20)
    with server.client(key.secret) as client:
        refused = _drain_until_rate_limited(client, 1)
        retry_s = int(refused.headers["retry-after"])
        assert 1 <= retry_s <= 3 and 0 < int(refused.headers["retry-after-ms"]) <= 3000
        time.sleep(retry_s)
        _ok(_embed(client, 1))
        spent = _usage(client)["spent_items"]
    _assert_books_balance(server.db, key.name, spent)


def test_items_per_minute(server: ServerProcess) -> None:
    key = _new_key(server, 10_000, ipm=60)  # one item back per second
    with server.client(key.secret) as client:
        # More items than a whole minute allows can never pass: refused for good, not charged.
        never = _embed(client, 61)
        assert_error(never, 429, "rate_limit_exceeded")
        assert never.headers.get("x-should-retry") == "false"
        assert "retry-after" not in never.headers
        assert _usage(client)["spent_items"] == 0

        ok = _ok(_embed(client, 60))  # a whole minute's items at once is allowed
        assert ok.headers["x-ratelimit-limit-items"] == "60"
        assert "x-ratelimit-limit-requests" not in ok.headers
        refused = _drain_until_rate_limited(client, 3)
        assert refused.headers.get("x-should-retry") != "false"
        retry_s = int(refused.headers["retry-after"])
        assert 1 <= retry_s <= 3
        time.sleep(retry_s)
        _ok(_embed(client, 3))
        spent = _usage(client)["spent_items"]
    _assert_books_balance(server.db, key.name, spent)


# -- 6. exhausted budget ----------------------------------------------------------------
def test_exhausted_budget_refuses_whole_requests(server: ServerProcess) -> None:
    key = _new_key(server, 5)
    idem = {"Idempotency-Key": f"big-{uuid.uuid4().hex}"}
    with server.client(key.secret) as client:
        assert _remaining_header(_ok(_embed(client, 3))) == 2
        # Larger than what is left: refused whole, nothing charged, never half-served.
        too_big = _embed(client, 3, headers=idem)
        error = _quota_refused(too_big)
        assert error["code"] == "insufficient_quota" and too_big.headers["x-budget-remaining-items"] == "2"
        usage = _usage(client)
        assert (usage["spent_items"], usage["remaining_items"], usage["spent_requests"]) == (3, 2, 1)
        assert _remaining_header(_ok(_embed(client, 2))) == 0
        _quota_refused(_embed(client, 1))
        # A top-up revives the key; the refused idempotent request was not stored, so it now runs.
        done = _keys_cli(server.db, "top-up", key.name, "--items", "3")
        assert done.returncode == 0, done.stderr
        retried = _ok(_embed(client, 3, headers=idem))
        assert "x-idempotent-replayed" not in retried.headers
        assert _remaining_header(retried) == 0
        _quota_refused(_embed(client, 1))
    assert len(_assert_books_balance(server.db, key.name, 8)) == 3


# -- 7. budget and rate-limit headers ----------------------------------------------------
def test_headers_track_budget_and_limits(server: ServerProcess) -> None:
    rpm, ipm, items = 10, 60, 3
    key = _new_key(server, 20, rpm=rpm, ipm=ipm)
    plain = _new_key(server, 20)
    with server.client(key.secret) as client:
        started = time.monotonic()
        responses = [_ok(_embed(client, items)) for _ in range(4)]
        elapsed = time.monotonic() - started
    for k, response in enumerate(responses, start=1):
        h = response.headers
        assert _remaining_header(response) == 20 - items * k
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-items"]) == (str(rpm), str(ipm))
        # The buckets refill continuously; at most what the elapsed time refilled comes back.
        remaining_requests = int(h["x-ratelimit-remaining-requests"])
        remaining_items = int(h["x-ratelimit-remaining-items"])
        assert rpm - k <= remaining_requests <= min(rpm, rpm - k + elapsed * rpm / 60)
        assert ipm - items * k <= remaining_items <= min(ipm, ipm - items * k + elapsed * ipm / 60)
        assert RESET_FORMAT.match(h["x-ratelimit-reset-requests"]), h["x-ratelimit-reset-requests"]
        assert RESET_FORMAT.match(h["x-ratelimit-reset-items"]), h["x-ratelimit-reset-items"]
    with server.client(plain.secret) as client:
        response = _ok(_embed(client, 2))
        assert _remaining_header(response) == 18
        assert not [name for name in response.headers if name.startswith("x-ratelimit-")]


# -- 8. injected failures are not charged ------------------------------------------------
def test_injected_failures_are_not_charged(tmp_path: Path) -> None:
    proc = ServerProcess(
        tmp_path / "cbbt.db",
        extra_args=[
            "--failure-rate", "0.5", "--drop-rate", "0.1", "--fault-seed", "1",
            "--latency-ms", "5", "--latency-jitter-ms", "5",
        ],
    )  # fmt: skip
    secret = proc.create_key("flaky", budget_items=10_000, default=False)
    counts = {"ok": 0, "failed": 0, "dropped": 0}
    with proc:
        with proc.client(secret) as client:
            for _ in range(40):
                try:
                    response = _embed(client, 2)
                except httpx.TransportError:
                    counts["dropped"] += 1
                    continue
                if response.status_code == 200:
                    counts["ok"] += 1
                else:
                    assert response.status_code in (500, 503), response.text
                    assert_error(response, response.status_code, "injected_failure")
                    counts["failed"] += 1
        assert counts["ok"] > 0 and counts["failed"] > 0 and counts["dropped"] > 0, counts
        assert _metric(proc, "cbbt_injected_failures_total", kind="error") == counts["failed"]
        assert _metric(proc, "cbbt_injected_failures_total", kind="drop") == counts["dropped"]
        assert _metric(proc, "cbbt_items_charged_total") == 2 * counts["ok"]
        # Admin routes are off when no admin token is configured.
        assert_error(httpx.get(f"{proc.url}/admin/keys", timeout=30), 404)
    rows = _assert_books_balance(proc.db, "flaky", 2 * counts["ok"])
    assert len(rows) == counts["ok"]


# -- 9. the official OpenAI client -------------------------------------------------------
def test_openai_client_sees_quota_error_as_rate_limit_and_does_not_retry(server: ServerProcess) -> None:
    key = _new_key(server, 2)
    with server.client(key.secret) as client:
        _ok(_embed(client, 2))
    attempts: list[str] = []
    http_client = openai.DefaultHttpxClient(
        event_hooks={"request": [lambda request: attempts.append(str(request.url))]}
    )
    oa = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=key.secret, max_retries=2, http_client=http_client
    )
    refused_before = _metric(server, "cbbt_requests_total", route=EMBEDDINGS, status="429")
    with pytest.raises(openai.RateLimitError) as caught:
        oa.embeddings.create(model=_model_id(server, key.secret), input=["a photo of a cat"])
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert len(attempts) == 1, attempts
    assert _metric(server, "cbbt_requests_total", route=EMBEDDINGS, status="429") == refused_before + 1
    _assert_books_balance(server.db, key.name, 2)


def test_openai_client_retries_a_rate_limit_after_the_asked_delay(server: ServerProcess) -> None:
    """The counterpart: a passing rate limit (no x-should-retry: false) is retried and succeeds."""
    key = _new_key(server, 10_000, rpm=20)
    with server.client(key.secret) as client:
        _drain_until_rate_limited(client, 1)
    attempts: list[str] = []
    http_client = openai.DefaultHttpxClient(
        event_hooks={"request": [lambda request: attempts.append(str(request.url))]}
    )
    oa = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=key.secret, max_retries=2, http_client=http_client
    )
    result = oa.embeddings.create(model=_model_id(server, key.secret), input=["a photo of a cat"])
    assert len(result.data) == 1
    assert len(attempts) == 2, attempts


# -- 10. scopes --------------------------------------------------------------------------
def test_scopes_limit_routes(server: ServerProcess) -> None:
    classify_only = _new_key(server, 100, scopes=["classify"])
    embed_only = _new_key(server, 100, scopes=["embed"])
    classify_body = {"images": [image_data_uri(noise_image(seed=1))], "texts": ["a cat", "a dog"]}
    with server.client(classify_only.secret) as client:
        assert_error(_embed(client, 2), 403, "permission_denied")
        response = client.post("/v1/classify", json=classify_body)
        assert response.status_code == 200, response.text
        spent = _usage(client)["spent_items"]
        assert spent > 0
    with server.client(embed_only.secret) as client:  # {embed} is the embeddings tier
        assert_error(client.post("/v1/classify", json=classify_body), 403, "tier_not_allowed")
        _ok(_embed(client, 2))
    _assert_books_balance(server.db, classify_only.name, spent)
    _assert_books_balance(server.db, embed_only.name, 2)


# -- 11. store trouble -------------------------------------------------------------------
def test_locked_database_answers_503_and_recovers(server: ServerProcess) -> None:
    key = _new_key(server, 100)
    with server.client(key.secret) as client:
        _ok(_embed(client, 3))
        # Another process holds SQLite's write lock: the charge waits out the server's busy
        # timeout (5 s), then the request is refused with 503 and nothing is charged. (A lock,
        # not chmod: file modes do not stop root, and these tests may well run as root.)
        blocker = sqlite3.connect(server.db, isolation_level=None, timeout=30)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            locked = _embed(client, 3)
            assert_error(locked, 503, "store_unavailable")
            assert "retry-after" in locked.headers
            # Reads still work in WAL mode while a writer holds the lock.
            assert _usage(client)["spent_items"] == 3
        finally:
            if blocker.in_transaction:
                blocker.execute("COMMIT")
            blocker.close()
        _ok(_embed(client, 3))
        assert _usage(client)["spent_items"] == 6
    assert len(_assert_books_balance(server.db, key.name, 6)) == 2


def test_read_only_database_answers_503(tmp_path: Path) -> None:
    """A server on a read-only copy of the database authenticates but charges nothing."""
    source = ServerProcess(tmp_path / "source.db")
    secret = source.create_key("reader", budget_items=100, default=False)
    copy = tmp_path / "copy.db"
    shutil.copyfile(source.db, copy)
    proc = ServerProcess(f"file:{copy}?mode=ro", log_path=tmp_path / "ro.server.log")
    with proc, proc.client(secret) as client:
        assert_error(_embed(client, 2), 503, "store_unavailable")
        usage = _usage(client)
        assert (usage["spent_items"], usage["remaining_items"]) == (0, 100)
    _assert_books_balance(copy, "reader", 0)
