"""One server per SQLite database, and crash recovery that never touches a live owner's requests.

The guarantee lives in the database (an owner row with a heartbeated lease, checked in the same
transaction as recovery), so every other path to the same file is refused too: a symlink, a hard
link, a deleted `.lock` file of the old scheme. Store-level tests use an injected clock for the
lease; server-level tests start real server processes.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.store import DatabaseInUse, SqliteStore, StoreError
from server.store.sqlite import SqliteStore as _Sqlite
from tests.helpers import (
    HELD_ITEMS,
    REPO_ROOT,
    FakeClock,
    ServerProcess,
    ServerStartError,
    held_batch_args,
)

EMBEDDINGS = "/v1/embeddings"


def _reserved(store: SqliteStore, name: str, items: int, request_id: str) -> int:
    key_id = store.get_key(name).id
    store.reserve(key_id, items, request_id, "embeddings")
    return key_id


# -- store level ------------------------------------------------------------------------------
def test_a_second_live_owner_is_refused_and_nothing_is_recovered(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    with SqliteStore(db) as first, SqliteStore(db) as second:
        first.create_key("alice", ["embed"], 100)
        first.claim_owner(30.0)
        key_id = _reserved(first, "alice", 7, "in-flight")
        with pytest.raises(DatabaseInUse, match="one server per database"):
            second.claim_owner(30.0)
        assert second.owner_id is None
        assert second.get_key(key_id).spent_items == 7 == second.ledger_total(key_id)
        first.release_owner()
        recovered = second.claim_owner(30.0)  # free again once the first left
        # It left a request unanswered (released without settling): refunded at that release.
        assert recovered.requests == 0 and second.get_key(key_id).spent_items == 0


def test_recovery_waits_for_the_lease_of_a_live_owner(tmp_path: Path) -> None:
    """Replicas sharing one database (exclusive=False): an owner's reservations are refunded by
    another only after its lease has run out, never while it is renewed."""
    db = tmp_path / "cbbt.db"
    clock = FakeClock()
    with SqliteStore(db, clock=clock) as a, SqliteStore(db, clock=clock) as b:
        a.create_key("alice", ["embed"], 100)
        a.claim_owner(10.0, exclusive=False)
        key_id = _reserved(a, "alice", 5, "a-1")
        assert a.begin_idempotent(key_id, "idem-a", "hash", 3600.0) is None
        b.claim_owner(10.0, exclusive=False)
        for _ in range(5):  # a keeps renewing; b sweeps every few seconds
            clock.now += 8.0
            assert a.renew_owner(10.0)
            assert b.renew_owner(10.0)
            assert b.recover_expired().requests == 0
        assert b.get_key(key_id).spent_items == 5
        in_progress = b.begin_idempotent(key_id, "idem-a", "hash", 3600.0)
        assert in_progress is not None and in_progress.in_progress

        clock.now += 10.5  # a stops renewing (a hung or partitioned process) and its lease ends
        assert b.renew_owner(10.0)
        recovered = b.recover_expired()
        assert (recovered.owners, recovered.requests, recovered.items) == (1, 1, 5)
        assert b.get_key(key_id).spent_items == 0 == b.ledger_total(key_id)
        assert b.begin_idempotent(key_id, "idem-a", "hash", 3600.0) is None  # a retry may run
        # a comes back: its lease was lost; it says so and registers again.
        assert a.renew_owner(10.0) is False
        assert {o.owner_id for o in b.owners()} == {a.owner_id, b.owner_id}


def test_an_owner_whose_process_died_is_recovered_at_once(tmp_path: Path) -> None:
    """On the same host the PID tells for certain: a SIGKILLed server's requests are refunded at
    the next start, without waiting for its lease (a restart right after a crash serves)."""
    db = tmp_path / "cbbt.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with SqliteStore(db) as store:
        store.create_key("alice", ["embed"], 100)
        store.claim_owner(3600.0)
        key_id = _reserved(store, "alice", 9, "orphan")
        # Pretend the owner was that exited process, with an hour of lease left.
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE owners SET pid = ?", (dead.pid,))
        store.owner_id = None
    with SqliteStore(db) as restarted:
        recovered = restarted.claim_owner(30.0)
        assert (recovered.owners, recovered.requests, recovered.items) == (1, 1, 9)
        assert restarted.get_key(key_id).spent_items == 0 == restarted.ledger_total(key_id)


def test_a_database_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    """A file written by the version before owners (schema 1) opens, keeps its keys and books,
    and is at the current version afterwards; a file from a newer version is refused."""
    db = tmp_path / "old.db"
    script = _Sqlite.MIGRATIONS[0][1]
    with sqlite3.connect(db) as raw:
        raw.executescript(script)
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (1)")
        raw.execute(
            "INSERT INTO api_keys (name, key_hash, prefix, scopes, budget_items, spent_items, spent_requests,"
            " created_at) VALUES ('old', 'h', 'cbbt-xx', '[\"embed\"]', 100, 4, 1, 0)"
        )
        raw.execute(
            "INSERT INTO ledger (request_id, key_id, endpoint, items, status, created_at)"
            " VALUES ('lost', 1, 'embeddings', 4, NULL, 0)"
        )
    with SqliteStore(db) as store:
        assert store.get_key("old").spent_items == 4
        # A reservation of the old server (no owner) is an orphan: the new server refunds it.
        assert store.claim_owner(30.0).requests == 1
        assert store.get_key("old").spent_items == 0
    with sqlite3.connect(db) as raw:
        assert (
            raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == _Sqlite.schema_version()
        )
        raw.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer than supported"):
        SqliteStore(db)


def test_a_damaged_schema_is_refused_at_start(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    SqliteStore(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute("DROP TABLE owners")
    with pytest.raises(StoreError, match="owners"):
        SqliteStore(db)


# -- real servers -----------------------------------------------------------------------------
def _second_server_is_refused(db: Path | str, log: Path, reason: str) -> None:
    second = ServerProcess(db, log_path=log, start_timeout_s=60)
    try:
        with pytest.raises(ServerStartError) as refused:
            second.start()
    finally:
        second.stop()  # should it have started after all, it must not outlive the test
    assert reason in str(refused.value), str(refused.value)


def _slow_request_in_flight(server: ServerProcess, secret: str) -> tuple[threading.Thread, list[int]]:
    """A request on held batches (see held_batch_args), caught with its items reserved."""
    statuses: list[int] = []

    def send() -> None:
        with server.client(secret) as client:
            statuses.append(
                client.post(EMBEDDINGS, json={"input": [f"t{i}" for i in range(HELD_ITEMS)]}).status_code
            )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 120
    with sqlite3.connect(server.db) as db:
        while db.execute("SELECT 1 FROM ledger WHERE status IS NULL").fetchone() is None:
            assert sender.is_alive() and time.monotonic() < deadline, "the request was never in flight"
            time.sleep(0.005)
    return sender, statuses


@pytest.mark.parametrize("alias", ["symlink", "hard link", "deleted lock file"])
def test_no_other_path_to_the_file_bypasses_the_owner(tmp_path: Path, alias: str) -> None:
    """Defect 9 of #9: a second server through another name for the file used to start, and its
    crash recovery refunded the live server's in-flight request (answered for free). A symlink
    or the same path finds the live owner row; a hard link is refused before SQLite opens it
    (it would get a write-ahead log of its own and miss the owner row)."""
    db = tmp_path / "cbbt.db"
    # Held long enough that the second server is refused while the request waits in flight.
    server = ServerProcess(db, extra_args=held_batch_args(20), log_path=tmp_path / "first.log")
    secret = server.create_key("victim", budget_items=10**6, default=False)
    with server:
        if alias == "symlink":
            other: Path | str = tmp_path / "alias.db"
            os.symlink(db, other)
        elif alias == "hard link":
            other = tmp_path / "linked.db"
            os.link(db, other)
        else:
            other = db
            Path(f"{db}.lock").unlink(missing_ok=True)  # the old scheme's lock file, gone
        sender, statuses = _slow_request_in_flight(server, secret)
        reason = "hard links" if alias == "hard link" else "one server per database"
        _second_server_is_refused(other, tmp_path / "second.log", reason)
        assert sender.is_alive(), "the request was answered before the second server tried"
        sender.join(timeout=180)
        assert statuses == [200]
        with server.client(secret) as client:
            usage = client.get("/v1/usage").json()
    # The live server's request was answered and stays charged: nobody refunded it.
    assert usage["spent_items"] == HELD_ITEMS
    if alias == "hard link":
        Path(other).unlink()
    with SqliteStore(db) as store:
        key = store.get_key("victim")
        assert key.spent_items == store.ledger_total(key.id) == HELD_ITEMS


def test_the_keys_cli_works_beside_a_live_server(tmp_path: Path) -> None:
    """Only serving takes ownership: administering keys while a server runs is fine."""
    server = ServerProcess(tmp_path / "cbbt.db", log_path=tmp_path / "server.log")
    server.create_key("first")
    with server:
        server.create_key("second", budget_items=5, default=True)
        with server.client() as client:
            assert client.post(EMBEDDINGS, json={"input": ["a"]}).status_code == 200
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "keys", "show", "second", "--db", str(server.db)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert '"spent_items": 1' in done.stdout
