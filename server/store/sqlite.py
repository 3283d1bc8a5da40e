"""The default store: one SQLite file in WAL mode, safe across threads and processes.

Every charge is one conditional UPDATE plus a ledger INSERT inside a BEGIN IMMEDIATE
transaction, so SQLite's single-writer lock is what makes overspending impossible: no
read-modify-write happens in Python.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from server.store.base import (
    DISPLAY_PREFIX_LEN,
    KEY_PREFIX,
    MAX_COUNT,
    ApiKey,
    DuplicateKeyName,
    IdempotencyRecord,
    KeyNotFound,
    LedgerRow,
    QuotaExceeded,
    Reservation,
    ReservationNotFound,
    Store,
    StoreError,
    StoreUnavailable,
    validate_key_name,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    budget_items INTEGER,
    budget_requests INTEGER,
    spent_items INTEGER NOT NULL DEFAULT 0,
    spent_requests INTEGER NOT NULL DEFAULT 0,
    rpm INTEGER,
    ipm INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    key_id INTEGER NOT NULL REFERENCES api_keys(id),
    endpoint TEXT NOT NULL,
    items INTEGER NOT NULL,
    status INTEGER,
    refunded INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    settled_at REAL
);
CREATE INDEX IF NOT EXISTS ledger_by_key ON ledger (key_id, created_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id INTEGER NOT NULL,
    idem_key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    status INTEGER,
    body BLOB,
    headers TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at);
"""

_KEY_COLUMNS = (
    "id, name, prefix, scopes, budget_items, budget_requests, spent_items, spent_requests, "
    "rpm, ipm, revoked, created_at"
)

# The whole budget check is in the WHERE clause, so the check and the charge are one atomic step.
_RESERVE_SQL = """
UPDATE api_keys
SET spent_items = spent_items + ?, spent_requests = spent_requests + 1
WHERE id = ? AND revoked = 0
  AND (budget_items IS NULL OR spent_items + ? <= budget_items)
  AND (budget_requests IS NULL OR spent_requests + 1 <= budget_requests)
"""


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn sqlite3 failures into store errors the server can map to HTTP statuses."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise StoreError(f"{action}: integrity error: {exc}") from exc
    except sqlite3.Error as exc:
        reason = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        logger.warning("store unavailable during %s: %s (%s)", action, exc, reason)
        raise StoreUnavailable(f"store unavailable during {action}: {exc} ({reason})") from exc


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself on some errors (disk full, I/O); a second rollback then fails.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.debug("rollback failed", exc_info=True)


def _row_to_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=frozenset(json.loads(row["scopes"])),
        budget_items=row["budget_items"],
        budget_requests=row["budget_requests"],
        spent_items=row["spent_items"],
        spent_requests=row["spent_requests"],
        rpm=row["rpm"],
        ipm=row["ipm"],
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
    )


def _row_to_ledger(row: sqlite3.Row) -> LedgerRow:
    return LedgerRow(
        request_id=row["request_id"],
        endpoint=row["endpoint"],
        items=row["items"],
        status=row["status"],
        refunded=bool(row["refunded"]),
        created_at=row["created_at"],
    )


def _row_to_idempotency(row: sqlite3.Row) -> IdempotencyRecord:
    return IdempotencyRecord(
        key_id=row["key_id"],
        idem_key=row["idem_key"],
        body_hash=row["body_hash"],
        status=row["status"],
        body=row["body"],
        headers=json.loads(row["headers"]),
        expires_at=row["expires_at"],
    )


def _check_non_negative(**values: int | None) -> None:
    """Counts are 0..MAX_COUNT (a larger Python int would not even fit an SQLite INTEGER)."""
    for name, value in values.items():
        if value is not None and not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be between 0 and {MAX_COUNT}, got {value}")


def _normalize_scopes(scopes: Iterable[str]) -> frozenset[str]:
    normalized = frozenset(s.strip() for s in scopes)
    if not normalized or any(not s or any(c.isspace() for c in s) for s in normalized):
        raise ValueError(f"scopes must be non-empty words, got {sorted(normalized)!r}")
    return normalized


class SqliteStore(Store):
    """Store on one SQLite file; one connection per thread, many processes may share the file.

    `path` is a filesystem path or a `file:` URI (e.g. `file:x.db?mode=ro`). `clock` is
    injectable so that tests can expire idempotency records without sleeping.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = os.fspath(path)
        self._uri = self._path.startswith("file:")
        self._busy_timeout_ms = busy_timeout_ms
        self._clock = clock
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._init_schema()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

    # -- connections and transactions ---------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so the sqlite3 module never opens a
        # deferred transaction behind our back (deferred writers can deadlock into SQLITE_BUSY).
        conn = sqlite3.connect(
            self._path,
            uri=self._uri,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._all_connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self, action: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE for writes: take the write lock up front, waiting up to busy_timeout."""
        with _translated(action):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(conn)
                raise

    def _init_schema(self) -> None:
        with _translated("schema check"):
            conn = self._connection()
            if self._schema_version(conn) == SCHEMA_VERSION:
                return
        with self._transaction("schema creation") as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            version = self._schema_version(conn)
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StoreError(f"database schema version {version} is newer than supported")

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if exists is None:
            return None
        row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
        return None if row is None or row["v"] is None else int(row["v"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._all_connections = self._all_connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                logger.debug("closing a connection failed", exc_info=True)

    # -- keys ----------------------------------------------------------------------------------

    @staticmethod
    def _find_key_row(conn: sqlite3.Connection, name_or_id: str | int) -> sqlite3.Row:
        if isinstance(name_or_id, int):
            row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (name_or_id,)).fetchone()
        else:
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE name = ?", (name_or_id,)
            ).fetchone()
            # Names start with a letter, so an all-digit string can only be an id (from the CLI).
            if row is None and name_or_id.isdigit():
                return SqliteStore._find_key_row(conn, int(name_or_id))
        if row is None:
            raise KeyNotFound(f"no API key {name_or_id!r}")
        return row

    def create_key(
        self,
        name: str,
        scopes: frozenset[str] | set[str] | list[str] | tuple[str, ...],
        budget_items: int | None,
        budget_requests: int | None = None,
        rpm: int | None = None,
        ipm: int | None = None,
    ) -> tuple[str, ApiKey]:
        validate_key_name(name)
        _check_non_negative(budget_items=budget_items, budget_requests=budget_requests, rpm=rpm, ipm=ipm)
        scope_set = _normalize_scopes(scopes)
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._transaction("create key") as conn:
            try:
                cur = conn.execute(
                    "INSERT INTO api_keys (name, key_hash, prefix, scopes, budget_items, budget_requests,"
                    " rpm, ipm, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        hash_key(plaintext),
                        plaintext[:DISPLAY_PREFIX_LEN],
                        json.dumps(sorted(scope_set)),
                        budget_items,
                        budget_requests,
                        rpm,
                        ipm,
                        self._clock(),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateKeyName(f"an API key named {name!r} already exists") from exc
            key = _row_to_key(self._find_key_row(conn, int(cur.lastrowid or 0)))
        logger.info("created API key %r (id %d)", name, key.id)
        return plaintext, key

    def authenticate(self, plaintext: str) -> ApiKey | None:
        digest = hash_key(plaintext)
        with _translated("authenticate"):
            row = (
                self._connection()
                .execute(f"SELECT {_KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ?", (digest,))
                .fetchone()
            )
        # The indexed lookup already matched; the constant-time compare is defence in depth.
        if row is None or not hmac.compare_digest(row["key_hash"], digest) or row["revoked"]:
            return None
        return _row_to_key(row)

    def get_key(self, name_or_id: str | int) -> ApiKey:
        with _translated("get key"):
            return _row_to_key(self._find_key_row(self._connection(), name_or_id))

    def list_keys(self) -> list[ApiKey]:
        with _translated("list keys"):
            rows = self._connection().execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY id").fetchall()
        return [_row_to_key(row) for row in rows]

    def revoke(self, name_or_id: str | int) -> ApiKey:
        with self._transaction("revoke key") as conn:
            key_id = self._find_key_row(conn, name_or_id)["id"]
            conn.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))
            key = _row_to_key(self._find_key_row(conn, key_id))
        logger.info("revoked API key %r (id %d)", key.name, key.id)
        return key

    def top_up(self, name_or_id: str | int, items: int = 0, requests: int = 0) -> ApiKey:
        _check_non_negative(items=items, requests=requests)
        with self._transaction("top up") as conn:
            row = self._find_key_row(conn, name_or_id)
            key_id = row["id"]
            for budget, extra, what in (
                (row["budget_items"], items, "items"),
                (row["budget_requests"], requests, "requests"),
            ):
                if budget is not None and budget + extra > MAX_COUNT:
                    raise ValueError(f"a budget of more than {MAX_COUNT} {what} is not supported")
            # NULL + n is NULL in SQL, so an unlimited budget stays unlimited.
            conn.execute(
                "UPDATE api_keys SET budget_items = budget_items + ?, budget_requests = budget_requests + ?"
                " WHERE id = ?",
                (items, requests, key_id),
            )
            key = _row_to_key(self._find_key_row(conn, key_id))
        logger.info("topped up API key %r by %d items, %d requests", key.name, items, requests)
        return key

    # -- charging ------------------------------------------------------------------------------

    def reserve(self, key_id: int, items: int, request_id: str, endpoint: str) -> Reservation:
        _check_non_negative(items=items)
        if not request_id:
            raise ValueError("request_id must be non-empty")
        with self._transaction("reserve") as conn:
            if conn.execute(_RESERVE_SQL, (items, key_id, items)).rowcount == 0:
                raise self._refusal(conn, key_id, items)
            try:
                conn.execute(
                    "INSERT INTO ledger (request_id, key_id, endpoint, items, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (request_id, key_id, endpoint, items, self._clock()),
                )
            except sqlite3.IntegrityError as exc:
                # Rolling back also undoes the charge made just above.
                raise StoreError(f"request id {request_id!r} was already reserved") from exc
            # Read inside the charging transaction: the budget left after exactly this charge.
            key = _row_to_key(self._find_key_row(conn, key_id))
        return Reservation(
            request_id=request_id,
            key_id=key_id,
            items=items,
            endpoint=endpoint,
            remaining_items=key.remaining_items,
            remaining_requests=key.remaining_requests,
        )

    def _refusal(self, conn: sqlite3.Connection, key_id: int, items: int) -> StoreError:
        """Why the conditional charge matched no row: unknown, revoked, or out of budget."""
        key = _row_to_key(self._find_key_row(conn, key_id))
        if key.revoked:
            return KeyNotFound(f"API key {key.name!r} has been revoked")
        return QuotaExceeded(
            f"request needs {items} items and 1 request; remaining budget: "
            f"{_describe(key.remaining_items)} items, {_describe(key.remaining_requests)} requests",
            remaining_items=key.remaining_items,
            remaining_requests=key.remaining_requests,
        )

    def settle(
        self, request_id: str, status: int, idempotent: tuple[str, bytes, dict[str, str]] | None = None
    ) -> None:
        with self._transaction("settle") as conn:
            conn.execute(
                "UPDATE ledger SET status = ?, settled_at = ? WHERE request_id = ? AND refunded = 0",
                (status, self._clock(), request_id),
            )
            row = self._ledger_row(conn, request_id)  # raises if unknown; a refunded row stays as is
            if idempotent is not None:  # the answer to replay, committed with the charge
                idem_key, body, headers = idempotent
                self._store_answer(conn, int(row["key_id"]), idem_key, status, body, headers)

    def refund(self, request_id: str, status: int) -> bool:
        with self._transaction("refund") as conn:
            row = self._ledger_row(conn, request_id)
            if row["refunded"]:
                return False
            conn.execute(
                "UPDATE api_keys SET spent_items = spent_items - ?, spent_requests = spent_requests - 1"
                " WHERE id = ?",
                (row["items"], row["key_id"]),
            )
            conn.execute(
                "UPDATE ledger SET refunded = 1, status = ?, settled_at = ? WHERE request_id = ?",
                (status, self._clock(), request_id),
            )
        logger.info("refunded %d items of request %s (status %d)", row["items"], request_id, status)
        return True

    def recover_unsettled(self) -> tuple[int, int]:
        """After a crash: refund every reservation that was never settled and drop in-progress
        idempotency records, so that each charge belongs to an answered request and a retry
        of a lost request runs (and is charged) exactly once. Returns (requests, items).

        Only safe while no other server process uses this database: the server holds an
        exclusive lock (see server.store.lock) before calling it.
        """
        unsettled = "status IS NULL AND refunded = 0"
        with _translated("recover"):
            # Write only when there is something to recover: a read-only database (a replica,
            # `file:...?mode=ro`) with nothing pending must not keep the server from starting.
            pending = (
                self._connection()
                .execute(
                    f"SELECT EXISTS (SELECT 1 FROM ledger WHERE {unsettled})"
                    " OR EXISTS (SELECT 1 FROM idempotency WHERE status IS NULL)"
                )
                .fetchone()[0]
            )
        if not pending:
            return 0, 0
        with self._transaction("recover") as conn:
            rows = conn.execute(f"SELECT request_id, key_id, items FROM ledger WHERE {unsettled}").fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE api_keys SET spent_items = spent_items - ?, spent_requests = spent_requests - 1"
                    " WHERE id = ?",
                    (row["items"], row["key_id"]),
                )
            conn.execute(
                f"UPDATE ledger SET refunded = 1, status = 0, settled_at = ? WHERE {unsettled}",
                (self._clock(),),
            )
            conn.execute("DELETE FROM idempotency WHERE status IS NULL")
        items = sum(int(r["items"]) for r in rows)
        if rows:
            logger.warning("crash recovery: refunded %d unanswered requests (%d items)", len(rows), items)
        return len(rows), items

    @staticmethod
    def _ledger_row(conn: sqlite3.Connection, request_id: str) -> sqlite3.Row:
        row = conn.execute(
            "SELECT key_id, items, refunded FROM ledger WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is None:
            raise ReservationNotFound(f"no reservation for request id {request_id!r}")
        return row

    def usage(self, key_id: int, recent: int = 20) -> tuple[ApiKey, list[LedgerRow]]:
        # A read transaction so that the key's totals and its ledger rows are one snapshot.
        with self._transaction("usage", write=False) as conn:
            key = _row_to_key(self._find_key_row(conn, key_id))
            rows = conn.execute(
                "SELECT request_id, endpoint, items, status, refunded, created_at FROM ledger"
                " WHERE key_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (key_id, max(recent, 0)),
            ).fetchall()
        return key, [_row_to_ledger(row) for row in rows]

    def ledger_total(self, key_id: int) -> int:
        with _translated("ledger total"):
            row = (
                self._connection()
                .execute(
                    "SELECT COALESCE(SUM(items), 0) AS total FROM ledger WHERE key_id = ? AND refunded = 0",
                    (key_id,),
                )
                .fetchone()
            )
        return int(row["total"])

    # -- idempotency ---------------------------------------------------------------------------

    def begin_idempotent(
        self, key_id: int, idem_key: str, body_hash: str, ttl_s: float
    ) -> IdempotencyRecord | None:
        now = self._clock()
        with self._transaction("begin idempotent request") as conn:
            # Lazy purge: expired records are dead, and deleting them here keeps the table small.
            conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            row = conn.execute(
                "SELECT * FROM idempotency WHERE key_id = ? AND idem_key = ?", (key_id, idem_key)
            ).fetchone()
            if row is not None:
                return _row_to_idempotency(row)
            conn.execute(
                "INSERT INTO idempotency (key_id, idem_key, body_hash, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key_id, idem_key, body_hash, now, now + ttl_s),
            )
        return None

    def finish_idempotent(
        self, key_id: int, idem_key: str, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        with self._transaction("finish idempotent request") as conn:
            self._store_answer(conn, key_id, idem_key, status, body, headers)

    @staticmethod
    def _store_answer(
        conn: sqlite3.Connection,
        key_id: int,
        idem_key: str,
        status: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        cur = conn.execute(
            "UPDATE idempotency SET status = ?, body = ?, headers = ? WHERE key_id = ? AND idem_key = ?",
            (status, body, json.dumps(dict(headers)), key_id, idem_key),
        )
        if cur.rowcount == 0:
            # The record expired (TTL shorter than the request) and was purged: nothing to replay.
            logger.warning(
                "idempotency record %r of key %d vanished before it was finished", idem_key, key_id
            )

    def abandon_idempotent(self, key_id: int, idem_key: str) -> None:
        with self._transaction("abandon idempotent request") as conn:
            conn.execute(
                "DELETE FROM idempotency WHERE key_id = ? AND idem_key = ? AND status IS NULL",
                (key_id, idem_key),
            )


def _describe(remaining: int | None) -> str:
    return "unlimited" if remaining is None else str(remaining)
