"""PostgreSQL: the shared store behind the same Store protocol, and replicas on one database.

A real throwaway cluster (tests/pg.py, session fixture `postgres`): no mocks. Store-level
tests check SQLite's guarantees on PostgreSQL; the replica tests run two or three plain
`cbbt-server serve` processes on one database and check the books in the database itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server.ratelimit import SharedRateLimiter
from server.store import DatabaseInUse, QuotaExceeded, StoreError
from server.store.factory import open_store
from server.store.postgres import PostgresStore
from tests.helpers import HELD_ITEMS, FakeClock, ServerProcess, assert_error, held_batch_args
from tests.pg import PostgresCluster, wait_for

pytestmark = pytest.mark.postgres

EMBEDDINGS = "/v1/embeddings"
# Short leases so that a killed replica's requests are recovered within seconds.
LEASE_ENV = {"CBBT_LEASE_TTL_S": "2", "CBBT_LEASE_RENEW_S": "0.5"}


@pytest.fixture
def url(postgres: PostgresCluster) -> str:
    return postgres.new_database()


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    with PostgresStore(url) as s:
        yield s


def _books(url: str, name: str) -> tuple[int, int, list[tuple[int, int | None, int]]]:
    """(spent_items, ledger total, ledger rows (items, status, refunded)) read straight from SQL."""
    with psycopg.connect(url) as conn:
        key_id, spent = conn.execute(
            "SELECT id, spent_items FROM api_keys WHERE name = %s", (name,)
        ).fetchone()
        rows = conn.execute(
            "SELECT items, status, refunded FROM ledger WHERE key_id = %s ORDER BY seq", (key_id,)
        ).fetchall()
    total = sum(items for items, _, refunded in rows if not refunded)
    return int(spent), int(total), [tuple(r) for r in rows]


# -- the store ----------------------------------------------------------------------------------
def test_open_store_picks_the_backend_from_the_url(url: str, tmp_path: Path) -> None:
    pg = open_store(url)
    lite = open_store(tmp_path / "cbbt.db")
    try:
        assert isinstance(pg, PostgresStore) and type(lite).__name__ == "SqliteStore"
    finally:
        pg.close()
        lite.close()


def test_charges_refunds_and_idempotency_keep_the_books(store: PostgresStore) -> None:
    _, key = store.create_key("alice", ["embed"], budget_items=10, budget_requests=3)
    assert store.reserve(key.id, 4, "r1", "embeddings").remaining_items == 6
    store.settle("r1", 200)
    store.reserve(key.id, 5, "r2", "embeddings")
    assert store.refund("r2", 500) and not store.refund("r2", 500)  # returned once
    with pytest.raises(QuotaExceeded):
        store.reserve(key.id, 7, "r3", "embeddings")  # 6 left
    with pytest.raises(StoreError, match="already reserved"):
        store.reserve(key.id, 1, "r1", "embeddings")
    assert store.begin_idempotent(key.id, "i", "h", 60.0) is None
    store.reserve(key.id, 2, "r4", "embeddings")
    store.settle("r4", 200, ("i", b"answer", {"x-a": "1"}))
    replay = store.begin_idempotent(key.id, "i", "h", 60.0)
    assert replay is not None and (replay.status, replay.body, replay.headers) == (
        200,
        b"answer",
        {"x-a": "1"},
    )
    spent, rows = store.usage(key.id)
    assert spent.spent_items == 6 == store.ledger_total(key.id)
    assert [r.request_id for r in rows] == ["r4", "r2", "r1"]


def test_concurrent_charges_never_overspend(url: str) -> None:
    with PostgresStore(url) as setup:
        _, key = setup.create_key("crowd", ["embed"], budget_items=100)
    stores = [PostgresStore(url) for _ in range(3)]
    granted: list[int] = []
    lock = threading.Lock()

    def charge(i: int) -> None:
        try:
            stores[i % 3].reserve(key.id, 1 + i % 3, f"c{i}", "embeddings")
        except QuotaExceeded:
            return
        with lock:
            granted.append(1 + i % 3)

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(charge, range(200)))
        assert sum(granted) <= 100
        assert stores[0].get_key(key.id).spent_items == sum(granted) == stores[0].ledger_total(key.id)
        assert sum(granted) >= 98  # nothing is refused while 3 or more items remain
    finally:
        for s in stores:
            s.close()


def test_replicas_share_the_database_and_recover_only_expired_owners(url: str) -> None:
    clock = FakeClock()
    with PostgresStore(url, clock=clock) as a, PostgresStore(url, clock=clock) as b:
        _, key = a.create_key("alice", ["embed"], 100)
        a.claim_owner(10.0)
        b.claim_owner(10.0)  # PostgreSQL serves many: no DatabaseInUse
        a.reserve(key.id, 5, "a-live", "embeddings")
        for _ in range(4):
            clock.now += 8.0
            assert a.renew_owner(10.0) and b.renew_owner(10.0)
            assert b.recover_expired().requests == 0
        clock.now += 11.0
        b.renew_owner(10.0)
        recovered = b.recover_expired()
        assert (recovered.owners, recovered.requests, recovered.items) == (1, 1, 5)
        assert b.get_key(key.id).spent_items == 0 == b.ledger_total(key.id)
        with pytest.raises(DatabaseInUse):
            PostgresStore(url, clock=clock).claim_owner(10.0, exclusive=True)


def test_rate_buckets_are_shared_between_stores(url: str) -> None:
    with PostgresStore(url) as a, PostgresStore(url) as b:
        _, key = a.create_key("limited", ["embed"], None)
        limiters = [SharedRateLimiter(a), SharedRateLimiter(b)]
        allowed = [limiters[i % 2].check_and_consume(key.id, 4, None, 1).allowed for i in range(8)]
        assert allowed.count(True) == 4 and allowed[:4] == [True] * 4


def test_the_schema_is_checked_on_the_next_start(url: str) -> None:
    PostgresStore(url).close()
    PostgresStore(url).close()  # already current: opens without migrating
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer than supported"):
        PostgresStore(url)


# -- replicas: plain servers on one database ------------------------------------------------------
def _replicas(url: str, tmp_path: Path, n: int, extra: list[str] | None = None) -> list[ServerProcess]:
    return [
        ServerProcess(url, log_path=tmp_path / f"replica{i}.log", extra_args=extra or [], env=LEASE_ENV)
        for i in range(n)
    ]


def _start_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_ready()


def _stop_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.stop()


def _embed(
    server: ServerProcess, secret: str, n: int, headers: dict[str, str] | None = None
) -> httpx.Response:
    with server.client(secret, timeout_s=120) as client:
        return client.post(EMBEDDINGS, json={"input": [f"x{i}" for i in range(n)]}, headers=headers or {})


def test_many_clients_on_replicas_spend_one_budget_exactly(url: str, tmp_path: Path) -> None:
    servers = _replicas(url, tmp_path, 3)
    secret = servers[0].create_key("shared", budget_items=100, default=False)
    _start_all(servers)
    try:
        served: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            # Each client keeps asking one replica until the budget refuses it.
            with servers[i % 3].client(secret, timeout_s=120) as http:
                while True:
                    n = 1 + i % 3
                    response = http.post(EMBEDDINGS, json={"input": [f"c{i}-{k}" for k in range(n)]})
                    if response.status_code == 429:
                        assert_error(response, 429, "insufficient_quota")
                        return
                    assert response.status_code == 200, response.text
                    assert len(response.json()["data"]) == n
                    with lock:
                        served.append(n)

        with ThreadPoolExecutor(45) as pool:
            list(pool.map(client, range(45)))
    finally:
        _stop_all(servers)
    spent, total, rows = _books(url, "shared")
    assert sum(served) == spent == total == 100
    assert len(served) == sum(1 for _, status, refunded in rows if status == 200 and not refunded)


def test_a_killed_replica_is_recovered_and_a_live_one_never_is(url: str, tmp_path: Path) -> None:
    hold_s, n = 20, HELD_ITEMS  # every request stays in flight at least hold_s
    servers = _replicas(url, tmp_path, 2, held_batch_args(hold_s))
    secret = servers[0].create_key("victim", budget_items=10**6, default=False)
    _start_all(servers)
    killed, live = servers
    try:
        live_result: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: live_result.append(_embed(live, secret, n)))
        slow.start()
        assert wait_for(lambda: _unsettled(url) == 1, 60, 0.01), "the live request was never in flight"
        doomed = threading.Thread(target=lambda: _quiet(lambda: _embed(killed, secret, n)))
        doomed.start()
        assert wait_for(lambda: _unsettled(url) == 2, 60, 0.01), "both requests were never in flight"
        killed.kill()
        doomed.join(timeout=60)
        # The dead replica's reservation is refunded by the live one's sweep, while the live
        # replica's own request is still in flight across those sweeps, and left alone ...
        assert wait_for(lambda: _refunded(url) == 1, hold_s / 2), (
            "the dead replica's request was never refunded"
        )
        assert _unsettled(url) == 1, "the live request settled before the sweep: the test proved nothing"
        slow.join(timeout=180)
        assert [r.status_code for r in live_result] == [200]
    finally:
        _stop_all(servers)
    spent, total, rows = _books(url, "victim")
    # ... and once answered, it stays charged: never refunded by anyone.
    assert spent == total == n
    assert sorted((items, status, refunded) for items, status, refunded in rows) == [
        (n, 0, 1),
        (n, 200, 0),
    ]


def _quiet(call: Any) -> None:
    with contextlib.suppress(httpx.TransportError):  # the replica was killed under it: expected
        call()


def _unsettled(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(
            conn.execute("SELECT COUNT(*) FROM ledger WHERE status IS NULL AND refunded = 0").fetchone()[0]
        )


def _refunded(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM ledger WHERE refunded = 1").fetchone()[0])


def test_idempotent_retries_across_replicas_are_charged_once(url: str, tmp_path: Path) -> None:
    servers = _replicas(url, tmp_path, 2)
    secret = servers[0].create_key("retrier", budget_items=1000, default=False)
    _start_all(servers)
    try:
        idem = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
        first = _embed(servers[0], secret, 3, idem)
        second = _embed(servers[1], secret, 3, idem)  # the retry lands on the other replica
        assert first.status_code == second.status_code == 200
        assert second.headers.get("x-idempotent-replayed") == "true"
        assert second.content == first.content
        # Concurrent duplicates on both replicas: one runs, the other replays or waits (409).
        idem = {"Idempotency-Key": f"race-{uuid.uuid4().hex}"}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _embed(servers[i % 2], secret, 5, idem), range(8)))
        assert {a.status_code for a in answers} <= {200, 409}
        assert (
            sum(1 for a in answers if a.status_code == 200 and "x-idempotent-replayed" not in a.headers) == 1
        )
    finally:
        _stop_all(servers)
    spent, total, _ = _books(url, "retrier")
    assert spent == total == 3 + 5


def test_a_rate_limit_holds_across_replicas(url: str, tmp_path: Path) -> None:
    servers = _replicas(url, tmp_path, 2)
    secret = servers[0].create_key("limited", budget_items=1000, rpm=4, default=False)
    _start_all(servers)
    try:
        started = time.monotonic()
        answers = [_embed(servers[i % 2], secret, 1) for i in range(10)]
        elapsed = time.monotonic() - started
    finally:
        _stop_all(servers)
    statuses = [a.status_code for a in answers]
    # 4 per minute in all, whichever replica: a token refills every 15 s.
    assert statuses.count(200) == 4 + int(elapsed // 15), statuses
    for refused in (a for a in answers if a.status_code == 429):
        assert_error(refused, 429, "rate_limit_exceeded")
    spent, total, _ = _books(url, "limited")
    assert spent == total == statuses.count(200)
