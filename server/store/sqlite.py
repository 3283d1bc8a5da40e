"""The default store: one SQLite file in WAL mode, safe across threads and processes.

The statements are SqlStore's (server.store.sql); this module supplies connections (one per
thread), BEGIN IMMEDIATE transactions (SQLite's single-writer lock serialises every charge),
error translation and the schema's migrations. SQLite serves one live server at a time: the
owner row in the database, not a lock file next to it, is what refuses a second one.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from server.store.base import Store, StoreError, StoreReadOnly, StoreUnavailable
from server.store.sql import Connection, Migration, SqlStore

logger = logging.getLogger(__name__)

# Version 1 is the original schema (IF NOT EXISTS: files made before versioning carry it
# already); version 2 adds owners with leases and stamps reservations with their owner.
_MIGRATIONS: tuple[Migration, ...] = (
    (
        1,
        """
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
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at)
""",
    ),
    (
        2,
        """
CREATE TABLE owners (
    owner_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
ALTER TABLE ledger ADD COLUMN owner TEXT;
ALTER TABLE idempotency ADD COLUMN owner TEXT;
CREATE INDEX ledger_unsettled ON ledger (owner) WHERE status IS NULL AND refunded = 0
""",
    ),
)


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
        kind = StoreReadOnly if str(reason).startswith("SQLITE_READONLY") else StoreUnavailable
        raise kind(f"store unavailable during {action}: {exc} ({reason})") from exc


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself on some errors (disk full, I/O); a second rollback then fails.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.debug("rollback failed", exc_info=True)


def database_file(db: str) -> Path:
    """The file behind a database path or an SQLite `file:` URI (`file:/x/cbbt.db?mode=ro`)."""
    return Path(unquote(urlsplit(db).path)) if db.startswith("file:") else Path(db)


def _refuse_hard_links(db: str) -> None:
    """SQLite names its write-ahead log after the path it was given, so two hard links to one
    file get two logs: each side misses the other's commits (owner rows included), and the file
    is corrupted. A symlink is safe (SQLite resolves it); a second hard link is refused."""
    try:
        links = database_file(db).stat().st_nlink
    except OSError:
        return  # not created yet (or unreadable: opening reports that)
    if links > 1:
        raise StoreError(
            f"{db} has {links} hard links: SQLite cannot share a database between links "
            "(each would get its own write-ahead log); use one path, or a symlink"
        )


class SqliteStore(SqlStore, Store):
    """Store on one SQLite file; one connection per thread, many processes may share the file.

    `path` is a filesystem path or a `file:` URI (e.g. `file:x.db?mode=ro`).
    """

    MIGRATIONS: ClassVar[tuple[Migration, ...]] = _MIGRATIONS
    INTEGRITY_ERRORS: ClassVar[tuple[type[Exception], ...]] = (sqlite3.IntegrityError,)
    LEDGER_ORDER: ClassVar[str] = "created_at DESC, rowid DESC"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock=clock)
        self._path = os.fspath(path)
        self._uri = self._path.startswith("file:")
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        _refuse_hard_links(self._path)
        self._migrate()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._path

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
    def _transaction(self, action: str, *, write: bool = True) -> Iterator[Connection]:
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

    def _has_version_table(self, conn: Connection) -> bool:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._all_connections = self._all_connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                logger.debug("closing a connection failed", exc_info=True)
