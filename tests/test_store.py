"""The SQLite store on a real file: keys, exact budgets under thread and process races, refunds,
durability, unavailability, idempotency records."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import random
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from server.store import (
    DuplicateKeyName,
    KeyNotFound,
    QuotaExceeded,
    ReservationNotFound,
    SqliteStore,
    Store,
    StoreUnavailable,
)
from tests.helpers import FakeClock

ENDPOINT = "/v1/embeddings"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cbbt.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_sqlite_store_satisfies_the_protocol(store: SqliteStore) -> None:
    assert isinstance(store, Store)


# -- keys ----------------------------------------------------------------------------------------


def test_create_and_authenticate(store: SqliteStore, db_path: Path) -> None:
    plaintext, key = store.create_key("alice", ["embed", "classify"], 100, rpm=60, ipm=600)
    assert plaintext.startswith("cbbt-") and len(plaintext) > 40
    assert key.prefix == plaintext[:8]
    assert key.scopes == frozenset({"embed", "classify"})
    assert (key.budget_items, key.spent_items, key.remaining_items) == (100, 0, 100)
    assert key.remaining_requests is None
    assert (key.rpm, key.ipm, key.revoked) == (60, 600, False)

    assert store.authenticate(plaintext) == key
    assert store.authenticate(plaintext + "x") is None
    assert store.authenticate("") is None
    assert store.authenticate("cbbt-ünïcode") is None

    # Only the hash is stored: the plaintext appears nowhere in the database.
    with sqlite3.connect(db_path) as raw:
        (stored_hash,) = raw.execute("SELECT key_hash FROM api_keys").fetchone()
        dump = "\n".join(raw.iterdump())
    assert stored_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in dump


def test_keys_are_unique_and_names_validated(store: SqliteStore) -> None:
    first, _ = store.create_key("a", ["embed"], 1)
    second, _ = store.create_key("b", ["embed"], 1)
    assert first != second
    with pytest.raises(DuplicateKeyName):
        store.create_key("a", ["embed"], 1)
    for bad in ("", "1abc", "has space", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            store.create_key(bad, ["embed"], 1)
    with pytest.raises(ValueError):
        store.create_key("c", ["embed"], -1)
    with pytest.raises(ValueError):
        store.create_key("c", [], 1)


def test_get_list_revoke(store: SqliteStore) -> None:
    plaintext, key = store.create_key("alice", ["embed"], 10)
    store.create_key("bob", ["classify"], None)
    assert store.get_key("alice") == key
    assert store.get_key(key.id) == key
    assert store.get_key(str(key.id)) == key
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]
    with pytest.raises(KeyNotFound):
        store.get_key("carol")

    revoked = store.revoke("alice")
    assert revoked.revoked
    assert store.authenticate(plaintext) is None
    assert store.get_key("alice").revoked
    with pytest.raises(KeyNotFound):
        store.reserve(key.id, 1, "r1", ENDPOINT)
    with pytest.raises(KeyNotFound):
        store.revoke("carol")


def test_top_up(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], 5, budget_requests=1)
    _, unlimited = store.create_key("bob", ["embed"], None)
    store.reserve(key.id, 5, "r1", ENDPOINT)
    with pytest.raises(QuotaExceeded):
        store.reserve(key.id, 1, "r2", ENDPOINT)

    topped = store.top_up("alice", items=3, requests=2)
    assert (topped.budget_items, topped.remaining_items) == (8, 3)
    assert (topped.budget_requests, topped.remaining_requests) == (3, 2)
    store.reserve(key.id, 3, "r3", ENDPOINT)

    assert store.top_up("bob", items=10).budget_items is None
    assert unlimited.remaining_items is None
    with pytest.raises(ValueError):
        store.top_up("alice", items=-1)
    with pytest.raises(KeyNotFound):
        store.top_up("carol", items=1)


# -- charging ------------------------------------------------------------------------------------


def test_reserve_refuses_a_request_larger_than_the_remaining_budget_whole(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], 10)
    store.reserve(key.id, 7, "r1", ENDPOINT)
    with pytest.raises(QuotaExceeded) as refused:
        store.reserve(key.id, 4, "r2", ENDPOINT)
    assert refused.value.remaining_items == 3
    assert refused.value.remaining_requests is None
    assert store.get_key("alice").spent_items == 7
    store.reserve(key.id, 3, "r3", ENDPOINT)
    assert store.get_key("alice").remaining_items == 0
    assert store.ledger_total(key.id) == 10


def test_request_budget(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], None, budget_requests=2)
    store.reserve(key.id, 100, "r1", ENDPOINT)
    store.reserve(key.id, 100, "r2", ENDPOINT)
    with pytest.raises(QuotaExceeded) as refused:
        store.reserve(key.id, 1, "r3", ENDPOINT)
    assert refused.value.remaining_requests == 0
    assert refused.value.remaining_items is None


def test_duplicate_request_id_charges_nothing(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], 10)
    store.reserve(key.id, 2, "r1", ENDPOINT)
    with pytest.raises(Exception, match="already reserved"):
        store.reserve(key.id, 2, "r1", ENDPOINT)
    assert store.get_key("alice").spent_items == 2


def test_settle_refund_and_usage(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], 10)
    store.reserve(key.id, 4, "r1", ENDPOINT)
    store.reserve(key.id, 5, "r2", "/v1/classify")
    store.settle("r1", 200)

    assert store.refund("r2", 500) is True
    after = store.get_key("alice")
    assert (after.spent_items, after.spent_requests) == (4, 1)
    # Refunding twice, or settling a refunded request, changes nothing.
    assert store.refund("r2", 500) is False
    store.settle("r2", 200)
    assert store.get_key("alice") == after
    assert store.ledger_total(key.id) == 4

    usage_key, rows = store.usage(key.id)
    assert usage_key == after
    assert [(r.request_id, r.items, r.status, r.refunded) for r in rows] == [
        ("r2", 5, 500, True),
        ("r1", 4, 200, False),
    ]
    assert len(store.usage(key.id, recent=1)[1]) == 1

    with pytest.raises(ReservationNotFound):
        store.settle("nope", 200)
    with pytest.raises(ReservationNotFound):
        store.refund("nope", 500)
    with pytest.raises(KeyNotFound):
        store.usage(9999)


def test_spent_budget_survives_reopening(db_path: Path) -> None:
    with SqliteStore(db_path) as first:
        plaintext, key = first.create_key("alice", ["embed"], 10)
        first.reserve(key.id, 6, "r1", ENDPOINT)
        first.settle("r1", 200)
    with SqliteStore(db_path) as second:
        again = second.authenticate(plaintext)
        assert again is not None
        assert (again.spent_items, again.remaining_items) == (6, 4)
        with pytest.raises(QuotaExceeded):
            second.reserve(key.id, 5, "r2", ENDPOINT)
        assert second.ledger_total(key.id) == 6


# -- races: threads and processes ------------------------------------------------------------------


def _reserve_until_exhausted(store: SqliteStore, key_id: int, tag: str) -> list[int]:
    """Reserve random sizes until the budget is exactly used up; returns the sizes granted."""
    rng = random.Random(tag)
    granted: list[int] = []
    attempt = 0
    while True:
        items = rng.choice((1, 2, 3))
        attempt += 1
        try:
            store.reserve(key_id, items, f"{tag}-{attempt}", ENDPOINT)
        except QuotaExceeded as exc:
            if exc.remaining_items == 0:
                return granted
            continue
        granted.append(items)


def _race_threads(store: SqliteStore, key_id: int, n_threads: int, tag: str) -> list[int]:
    start = threading.Barrier(n_threads)

    def worker(i: int) -> list[int]:
        start.wait()
        return _reserve_until_exhausted(store, key_id, f"{tag}-t{i}")

    with ThreadPoolExecutor(n_threads) as pool:
        return [items for granted in pool.map(worker, range(n_threads)) for items in granted]


def _race_process(path: str, key_id: int, n_threads: int, tag: str, start: Any, results: Any) -> None:
    with SqliteStore(path) as store:
        start.wait()
        results.put(_race_threads(store, key_id, n_threads, tag))


def _assert_books_balance(store: SqliteStore, key_id: int, granted: list[int], budget: int) -> None:
    key = store.get_key(key_id)
    assert sum(granted) == budget  # never more, and exactly everything
    assert key.spent_items == budget
    assert key.spent_requests == len(granted)
    assert store.ledger_total(key_id) == key.spent_items


def test_threads_racing_a_small_budget_spend_it_exactly(store: SqliteStore) -> None:
    _, key = store.create_key("alice", ["embed"], 150)
    granted = _race_threads(store, key.id, 16, "threads")
    _assert_books_balance(store, key.id, granted, 150)


def test_processes_and_threads_racing_a_small_budget_spend_it_exactly(
    store: SqliteStore, db_path: Path
) -> None:
    budget = 300
    _, key = store.create_key("alice", ["embed"], budget)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited SQLite handles or locks
    start = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race_process, args=(str(db_path), key.id, 4, f"p{i}", start, results))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=60)
        granted = _race_threads(store, key.id, 8, "main")
        for _ in procs:
            granted += results.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    _assert_books_balance(store, key.id, granted, budget)


# -- unavailability ------------------------------------------------------------------------------


def test_read_only_database_is_unavailable_and_charges_nothing(db_path: Path) -> None:
    with SqliteStore(db_path) as writable:
        plaintext, key = writable.create_key("alice", ["embed"], 10)
    with SqliteStore(f"file:{db_path}?mode=ro") as read_only:
        assert read_only.authenticate(plaintext) is not None  # reads still work
        with pytest.raises(StoreUnavailable, match="readonly"):
            read_only.reserve(key.id, 1, "r1", ENDPOINT)
    with SqliteStore(db_path) as writable:
        assert writable.get_key("alice").spent_items == 0
        assert writable.ledger_total(key.id) == 0


def test_locked_database_is_unavailable(db_path: Path) -> None:
    with SqliteStore(db_path, busy_timeout_ms=50) as store:
        _, key = store.create_key("alice", ["embed"], 10)
        holder = sqlite3.connect(db_path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past our timeout
            with pytest.raises(StoreUnavailable, match="locked"):
                store.reserve(key.id, 1, "r1", ENDPOINT)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        store.reserve(key.id, 1, "r1", ENDPOINT)  # the lock is gone: the same request now passes
        assert store.get_key("alice").spent_items == 1


def test_closed_store_is_unavailable(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.close()
    with pytest.raises(StoreUnavailable):
        store.list_keys()


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SqliteStore(tmp_path / "missing-dir" / "x.db")


# -- idempotency ---------------------------------------------------------------------------------


def test_idempotency_begin_finish_replay_conflict(db_path: Path) -> None:
    clock = FakeClock()
    with SqliteStore(db_path, clock=clock) as store:
        _, key = store.create_key("alice", ["embed"], 10)
        assert store.begin_idempotent(key.id, "k1", "hash-a", ttl_s=60) is None

        running = store.begin_idempotent(key.id, "k1", "hash-a", ttl_s=60)
        assert running is not None and running.in_progress

        store.finish_idempotent(key.id, "k1", 200, b'{"ok": true}', {"x-request-id": "r1"})
        done = store.begin_idempotent(key.id, "k1", "hash-a", ttl_s=60)
        assert done is not None and not done.in_progress
        assert (done.status, done.body, done.headers) == (200, b'{"ok": true}', {"x-request-id": "r1"})
        assert done.expires_at == clock.now + 60

        # Same key, different body: the record is returned and the caller sees the other hash.
        other = store.begin_idempotent(key.id, "k1", "hash-b", ttl_s=60)
        assert other is not None and other.body_hash == "hash-a"

        # Idempotency keys are per API key.
        _, bob = store.create_key("bob", ["embed"], 10)
        assert store.begin_idempotent(bob.id, "k1", "hash-b", ttl_s=60) is None


def test_idempotency_records_expire(db_path: Path) -> None:
    clock = FakeClock()
    with SqliteStore(db_path, clock=clock) as store:
        _, key = store.create_key("alice", ["embed"], 10)
        assert store.begin_idempotent(key.id, "k1", "hash-a", ttl_s=60) is None
        store.finish_idempotent(key.id, "k1", 200, b"{}", {})
        clock.now += 61
        assert store.begin_idempotent(key.id, "k1", "hash-b", ttl_s=60) is None
        fresh = store.begin_idempotent(key.id, "k1", "hash-b", ttl_s=60)
        assert fresh is not None and fresh.in_progress and fresh.body_hash == "hash-b"


def test_idempotency_abandon_lets_a_retry_run(db_path: Path) -> None:
    with SqliteStore(db_path) as store:
        _, key = store.create_key("alice", ["embed"], 10)
        assert store.begin_idempotent(key.id, "k1", "h", ttl_s=60) is None
        store.abandon_idempotent(key.id, "k1")
        assert store.begin_idempotent(key.id, "k1", "h", ttl_s=60) is None
        store.finish_idempotent(key.id, "k1", 200, b"{}", {})
        # A finished answer is kept: abandoning only drops in-progress records.
        store.abandon_idempotent(key.id, "k1")
        replay = store.begin_idempotent(key.id, "k1", "h", ttl_s=60)
        assert replay is not None and replay.status == 200


def test_recover_unsettled_refunds_unanswered_requests_after_a_crash(store: SqliteStore) -> None:
    _, key = store.create_key("crashy", ["embed"], budget_items=100)
    store.reserve(key.id, 10, "answered", "embeddings")
    store.settle("answered", 200)
    store.reserve(key.id, 7, "in-flight", "embeddings")
    assert store.begin_idempotent(key.id, "idem", "hash", 60.0) is None  # in progress

    recovered = store.recover_unsettled()
    assert (recovered.requests, recovered.items) == (1, 7)

    assert store.get_key(key.id).spent_items == 10 == store.ledger_total(key.id)
    assert store.begin_idempotent(key.id, "idem", "hash", 60.0) is None  # a retry may run again
    assert store.recover_unsettled().requests == 0  # idempotent
