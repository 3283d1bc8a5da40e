"""The accounting logic shared by the SQL stores (SQLite, PostgreSQL): one set of statements.

Every charge is one conditional UPDATE (the budget check is its WHERE clause) plus a ledger
INSERT in one transaction, so no read-modify-write happens in Python and the database's row
lock is what makes overspending impossible, however many threads or replicas charge at once.

Subclasses supply connections and transactions (`_transaction`), error translation, the
clock of the leases and the schema migrations; statements are written with `?` placeholders.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

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
    StoreError,
    validate_key_name,
)
from server.store.owners import (
    DatabaseInUse,
    OwnerRecord,
    Recovery,
    host_identity,
    is_dead,
    new_owner_id,
)

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the shared statements need from a DB-API connection (sqlite3's, or a psycopg adapter)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


# A migration: (version, statements separated by ';'). Applied in order, in one transaction.
Migration = tuple[int, str]

KEY_COLUMNS = (
    "id, name, prefix, scopes, budget_items, budget_requests, spent_items, spent_requests, "
    "rpm, ipm, revoked, created_at"
)
# Probed on every start: a database that claims the current version but lacks these is refused.
SCHEMA_COLUMNS: dict[str, str] = {
    "api_keys": KEY_COLUMNS + ", key_hash",
    "ledger": "request_id, key_id, endpoint, items, status, refunded, created_at, settled_at, owner",
    "idempotency": "key_id, idem_key, body_hash, status, body, headers, created_at, expires_at, owner",
    "owners": "owner_id, host, pid, started_at, expires_at",
}

# The whole budget check is in the WHERE clause, so the check and the charge are one atomic step.
_RESERVE_SQL = """
UPDATE api_keys
SET spent_items = spent_items + ?, spent_requests = spent_requests + 1
WHERE id = ? AND revoked = 0
  AND (budget_items IS NULL OR spent_items + ? <= budget_items)
  AND (budget_requests IS NULL OR spent_requests + 1 <= budget_requests)
"""
# A reservation or an in-progress idempotency record whose owner is gone (or never had one).
_ORPHANED = "(owner IS NULL OR owner NOT IN (SELECT owner_id FROM owners))"
_UNSETTLED = "status IS NULL AND refunded = 0"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def split_statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]


def _row_to_key(row: Row) -> ApiKey:
    return ApiKey(
        id=int(row["id"]),
        name=row["name"],
        prefix=row["prefix"],
        scopes=frozenset(json.loads(row["scopes"])),
        budget_items=row["budget_items"],
        budget_requests=row["budget_requests"],
        spent_items=int(row["spent_items"]),
        spent_requests=int(row["spent_requests"]),
        rpm=row["rpm"],
        ipm=row["ipm"],
        revoked=bool(row["revoked"]),
        created_at=float(row["created_at"]),
    )


def _row_to_ledger(row: Row) -> LedgerRow:
    return LedgerRow(
        request_id=row["request_id"],
        endpoint=row["endpoint"],
        items=int(row["items"]),
        status=row["status"],
        refunded=bool(row["refunded"]),
        created_at=float(row["created_at"]),
    )


def _row_to_idempotency(row: Row) -> IdempotencyRecord:
    body = row["body"]
    return IdempotencyRecord(
        key_id=int(row["key_id"]),
        idem_key=row["idem_key"],
        body_hash=row["body_hash"],
        status=row["status"],
        body=None if body is None else bytes(body),
        headers=json.loads(row["headers"]),
        expires_at=float(row["expires_at"]),
    )


def _check_non_negative(**values: int | None) -> None:
    """Counts are 0..MAX_COUNT (a larger Python int would not even fit a 64-bit INTEGER)."""
    for name, value in values.items():
        if value is not None and not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be between 0 and {MAX_COUNT}, got {value}")


def _normalize_scopes(scopes: Iterable[str]) -> frozenset[str]:
    normalized = frozenset(s.strip() for s in scopes)
    if not normalized or any(not s or any(c.isspace() for c in s) for s in normalized):
        raise ValueError(f"scopes must be non-empty words, got {sorted(normalized)!r}")
    return normalized


def _describe(remaining: int | None) -> str:
    return "unlimited" if remaining is None else str(remaining)


class SqlStore(ABC):
    """The Store protocol on any SQL database with row locks, RETURNING and `?` placeholders.

    `clock` (wall seconds) is injectable so that tests can expire idempotency records without
    sleeping. `owner_id` is set by `claim_owner`: every reservation made through this object
    is then stamped with it, so that recovery can tell a live owner's requests from a dead one's.
    """

    MIGRATIONS: ClassVar[tuple[Migration, ...]]
    # Several live servers may share the database (PostgreSQL); SQLite serves one at a time.
    SHARED_SERVING: ClassVar[bool] = False
    # Integrity errors of the driver (unique violations): turned into domain errors.
    INTEGRITY_ERRORS: ClassVar[tuple[type[Exception], ...]] = ()
    # Ordering tie-breaker for ledger rows created in the same instant.
    LEDGER_ORDER: ClassVar[str] = "created_at DESC"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._host = host_identity()
        self.owner_id: str | None = None

    # -- what a backend supplies -----------------------------------------------------------

    @abstractmethod
    def _transaction(self, action: str, *, write: bool = True) -> AbstractContextManager[Connection]:
        """A connection inside one transaction; driver errors leave it as StoreError/StoreUnavailable."""

    @abstractmethod
    def _has_version_table(self, conn: Connection) -> bool: ...

    def _lock_schema(self, conn: Connection) -> None:  # noqa: B027 (optional hook)
        """Serialise concurrent migrations (a no-op where the transaction already does)."""

    def _lease_now(self, conn: Connection) -> float:
        """The clock leases are measured on: every owner must read the same one."""
        return self._clock()

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def path(self) -> str:
        """Where the data lives, for messages (a file path, or a URL without its password)."""

    # -- schema ----------------------------------------------------------------------------

    @classmethod
    def schema_version(cls) -> int:
        return cls.MIGRATIONS[-1][0]

    def _migrate(self) -> None:
        """Bring the schema to the current version (created on first start), then check it."""
        with self._transaction("schema check", write=False) as conn:
            current = self._version(conn) if self._has_version_table(conn) else 0
        if current == self.schema_version():
            self._check_schema()
            return  # nothing to write: a read-only database opens too
        with self._transaction("schema migration") as conn:
            self._lock_schema(conn)
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self._version(conn)
            if current > self.schema_version():
                raise StoreError(
                    f"database schema version {current} is newer than supported ({self.schema_version()})"
                )
            for version, script in self.MIGRATIONS:
                if version > current:
                    for statement in split_statements(script):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    logger.info("database schema migrated to version %d", version)
        self._check_schema()

    @staticmethod
    def _version(conn: Connection) -> int:
        row = conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
        return 0 if row is None or row["v"] is None else int(row["v"])

    def _check_schema(self) -> None:
        version = None
        with self._transaction("schema check", write=False) as conn:
            version = self._version(conn)
            if version > self.schema_version():
                raise StoreError(
                    f"database schema version {version} is newer than supported ({self.schema_version()})"
                )
        for table, columns in SCHEMA_COLUMNS.items():
            try:
                with self._transaction("schema check", write=False) as conn:
                    conn.execute(f"SELECT {columns} FROM {table} LIMIT 0").fetchall()
            except StoreError as exc:
                raise StoreError(
                    f"database claims schema version {version} but its table {table} is not as expected: "
                    f"{exc}"
                ) from exc

    # -- keys ------------------------------------------------------------------------------

    @classmethod
    def _find_key_row(cls, conn: Connection, name_or_id: str | int) -> Row:
        if isinstance(name_or_id, int):
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", (name_or_id,)).fetchone()
        else:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?", (name_or_id,)).fetchone()
            # Names start with a letter, so an all-digit string can only be an id (from the CLI).
            if row is None and name_or_id.isdigit():
                return cls._find_key_row(conn, int(name_or_id))
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
        try:
            with self._transaction("create key") as conn:
                row = conn.execute(
                    "INSERT INTO api_keys (name, key_hash, prefix, scopes, budget_items, budget_requests,"
                    " rpm, ipm, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                ).fetchone()
                key = _row_to_key(self._find_key_row(conn, int(row["id"])))
        except StoreError as exc:
            if isinstance(exc.__cause__, self.INTEGRITY_ERRORS):
                raise DuplicateKeyName(f"an API key named {name!r} already exists") from exc
            raise
        logger.info("created API key %r (id %d)", name, key.id)
        return plaintext, key

    def authenticate(self, plaintext: str) -> ApiKey | None:
        digest = hash_key(plaintext)
        with self._transaction("authenticate", write=False) as conn:
            row = conn.execute(
                f"SELECT {KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ?", (digest,)
            ).fetchone()
        # The indexed lookup already matched; the constant-time compare is defence in depth.
        if row is None or not hmac.compare_digest(row["key_hash"], digest) or row["revoked"]:
            return None
        return _row_to_key(row)

    def get_key(self, name_or_id: str | int) -> ApiKey:
        with self._transaction("get key", write=False) as conn:
            return _row_to_key(self._find_key_row(conn, name_or_id))

    def list_keys(self) -> list[ApiKey]:
        with self._transaction("list keys", write=False) as conn:
            rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id").fetchall()
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

    # -- charging --------------------------------------------------------------------------

    def reserve(self, key_id: int, items: int, request_id: str, endpoint: str) -> Reservation:
        _check_non_negative(items=items)
        if not request_id:
            raise ValueError("request_id must be non-empty")
        try:
            with self._transaction("reserve") as conn:
                if conn.execute(_RESERVE_SQL, (items, key_id, items)).rowcount == 0:
                    raise self._refusal(conn, key_id, items)
                conn.execute(
                    "INSERT INTO ledger (request_id, key_id, endpoint, items, created_at, owner)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (request_id, key_id, endpoint, items, self._clock(), self.owner_id),
                )
                # Read inside the charging transaction: the budget left after exactly this charge.
                key = _row_to_key(self._find_key_row(conn, key_id))
        except StoreError as exc:
            if isinstance(exc.__cause__, self.INTEGRITY_ERRORS):
                # The transaction was rolled back, which also undid the charge.
                raise StoreError(f"request id {request_id!r} was already reserved") from exc
            raise
        return Reservation(
            request_id=request_id,
            key_id=key_id,
            items=items,
            endpoint=endpoint,
            remaining_items=key.remaining_items,
            remaining_requests=key.remaining_requests,
        )

    def _refusal(self, conn: Connection, key_id: int, items: int) -> StoreError:
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
            # Conditional, so that a concurrent recovery and this refund return the items once.
            row = conn.execute(
                "UPDATE ledger SET refunded = 1, status = ?, settled_at = ?"
                " WHERE request_id = ? AND refunded = 0 RETURNING key_id, items",
                (status, self._clock(), request_id),
            ).fetchone()
            if row is None:
                self._ledger_row(conn, request_id)  # unknown request ids raise
                return False
            self._return_items(conn, [row])
        logger.info("refunded %d items of request %s (status %d)", row["items"], request_id, status)
        return True

    @staticmethod
    def _return_items(conn: Connection, rows: Iterable[Row]) -> None:
        """Give refunded ledger rows' items and requests back to their keys (one UPDATE per key)."""
        per_key: dict[int, tuple[int, int]] = {}
        for row in rows:
            items, requests = per_key.get(int(row["key_id"]), (0, 0))
            per_key[int(row["key_id"])] = (items + int(row["items"]), requests + 1)
        for key_id, (items, requests) in sorted(per_key.items()):  # sorted: one lock order
            conn.execute(
                "UPDATE api_keys SET spent_items = spent_items - ?, spent_requests = spent_requests - ?"
                " WHERE id = ?",
                (items, requests, key_id),
            )

    @staticmethod
    def _ledger_row(conn: Connection, request_id: str) -> Row:
        row = conn.execute(
            "SELECT key_id, items, refunded FROM ledger WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is None:
            raise ReservationNotFound(f"no reservation for request id {request_id!r}")
        return row

    def usage(self, key_id: int, recent: int = 20) -> tuple[ApiKey, list[LedgerRow]]:
        # One transaction so that the key's totals and its ledger rows are one snapshot.
        with self._transaction("usage", write=False) as conn:
            key = _row_to_key(self._find_key_row(conn, key_id))
            rows = conn.execute(
                "SELECT request_id, endpoint, items, status, refunded, created_at FROM ledger"
                f" WHERE key_id = ? ORDER BY {self.LEDGER_ORDER} LIMIT ?",
                (key_id, max(recent, 0)),
            ).fetchall()
        return key, [_row_to_ledger(row) for row in rows]

    def ledger_total(self, key_id: int) -> int:
        with self._transaction("ledger total", write=False) as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(items), 0) AS total FROM ledger WHERE key_id = ? AND refunded = 0",
                (key_id,),
            ).fetchone()
        return int(row["total"])

    # -- owners and crash recovery ---------------------------------------------------------

    def claim_owner(self, ttl_s: float, *, exclusive: bool | None = None) -> Recovery:
        """Register this process as an owner of the database, after recovering dead owners' work.

        One transaction: dead owners (lease expired, or their process gone on this host) are
        cleared and their unanswered reservations refunded; then, if `exclusive` (default: the
        store serves one process at a time) and another live owner remains, DatabaseInUse is
        raised and nothing changes; otherwise our owner row is inserted with a lease of ttl_s.
        """
        exclusive = not self.SHARED_SERVING if exclusive is None else exclusive
        owner_id = new_owner_id()
        with self._transaction("claim owner") as conn:
            recovery = self._recover(conn)
            if exclusive:
                live = conn.execute("SELECT owner_id, host, pid FROM owners").fetchall()
                if live:
                    holder = live[0]
                    raise DatabaseInUse(
                        f"another cbbt server (pid {holder['pid']} on {holder['host'].split('/')[0]}) "
                        f"is serving {self.path}; one server per database"
                    )
            now = self._lease_now(conn)
            conn.execute(
                "INSERT INTO owners (owner_id, host, pid, started_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (owner_id, self._host, os.getpid(), now, now + ttl_s),
            )
        self.owner_id = owner_id
        logger.info("serving as owner %s (lease %.1f s)", owner_id, ttl_s)
        return recovery

    def renew_owner(self, ttl_s: float) -> bool:
        """Extend our lease. False when it had been lost (expired and recovered): re-registered."""
        if self.owner_id is None:
            return False
        with self._transaction("renew lease") as conn:
            now = self._lease_now(conn)
            renewed = conn.execute(
                "UPDATE owners SET expires_at = ? WHERE owner_id = ?", (now + ttl_s, self.owner_id)
            ).rowcount
            if renewed:
                return True
            conn.execute(
                "INSERT INTO owners (owner_id, host, pid, started_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (self.owner_id, self._host, os.getpid(), now, now + ttl_s),
            )
        logger.error(
            "lease of owner %s had expired and was recovered by another server: requests in flight "
            "then were refunded; renew the lease more often than its TTL",
            self.owner_id,
        )
        return False

    def recover_expired(self) -> Recovery:
        """Refund the unanswered reservations of dead owners (never of a live one), in one transaction."""
        with self._transaction("recover") as conn:
            return self._recover(conn)

    def release_owner(self) -> Recovery:
        """Leave the database (clean shutdown): our row goes, and whatever we left unanswered is refunded."""
        if self.owner_id is None:
            return Recovery()
        with self._transaction("release owner") as conn:
            conn.execute("DELETE FROM owners WHERE owner_id = ?", (self.owner_id,))
            self.owner_id = None
            return self._recover(conn)

    def recover_unsettled(self) -> Recovery:
        """Start-up recovery without registering (tools, tests): the same dead-owner sweep."""
        return self.recover_expired()

    def owners(self) -> list[OwnerRecord]:
        with self._transaction("list owners", write=False) as conn:
            rows = conn.execute(
                "SELECT owner_id, host, pid, expires_at FROM owners ORDER BY started_at"
            ).fetchall()
        return [_owner(row) for row in rows]

    def _recover(self, conn: Connection) -> Recovery:
        now = self._lease_now(conn)
        rows = conn.execute("SELECT owner_id, host, pid, expires_at FROM owners").fetchall()
        dead = [o for o in map(_owner, rows) if is_dead(o, now, self._host, self.owner_id)]
        for owner in dead:
            # Re-checked in the DELETE: a lease renewed since the SELECT is left alone.
            still_expired = owner.expires_at <= now
            conn.execute(
                "DELETE FROM owners WHERE owner_id = ? AND (expires_at <= ? OR ? = 0)",
                (owner.owner_id, now, int(still_expired)),
            )
        refunded = conn.execute(
            f"UPDATE ledger SET refunded = 1, status = 0, settled_at = ? WHERE {_UNSETTLED} AND {_ORPHANED}"
            " RETURNING key_id, items",
            (self._clock(),),
        ).fetchall()
        self._return_items(conn, refunded)
        conn.execute(f"DELETE FROM idempotency WHERE status IS NULL AND {_ORPHANED}")
        recovery = Recovery(
            owners=len(dead), requests=len(refunded), items=sum(int(r["items"]) for r in refunded)
        )
        if recovery.requests or recovery.owners:
            logger.warning(
                "crash recovery: %d dead owner(s); refunded %d unanswered requests (%d items)",
                recovery.owners,
                recovery.requests,
                recovery.items,
            )
        return recovery

    # -- idempotency -----------------------------------------------------------------------

    def begin_idempotent(
        self, key_id: int, idem_key: str, body_hash: str, ttl_s: float
    ) -> IdempotencyRecord | None:
        now = self._clock()
        with self._transaction("begin idempotent request") as conn:
            # Lazy purge: expired records are dead, and deleting them here keeps the table small.
            conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            row = conn.execute(
                "SELECT key_id, idem_key, body_hash, status, body, headers, expires_at FROM idempotency"
                " WHERE key_id = ? AND idem_key = ?",
                (key_id, idem_key),
            ).fetchone()
            if row is not None:
                return _row_to_idempotency(row)
            inserted = conn.execute(
                "INSERT INTO idempotency (key_id, idem_key, body_hash, created_at, expires_at, owner)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, idem_key) DO NOTHING",
                (key_id, idem_key, body_hash, now, now + ttl_s, self.owner_id),
            ).rowcount
            if not inserted:  # another replica inserted it between our SELECT and INSERT
                row = conn.execute(
                    "SELECT key_id, idem_key, body_hash, status, body, headers, expires_at FROM idempotency"
                    " WHERE key_id = ? AND idem_key = ?",
                    (key_id, idem_key),
                ).fetchone()
                return _row_to_idempotency(row)
        return None

    def finish_idempotent(
        self, key_id: int, idem_key: str, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        with self._transaction("finish idempotent request") as conn:
            self._store_answer(conn, key_id, idem_key, status, body, headers)

    @staticmethod
    def _store_answer(
        conn: Connection, key_id: int, idem_key: str, status: int, body: bytes, headers: dict[str, str]
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


def _owner(row: Row) -> OwnerRecord:
    return OwnerRecord(
        owner_id=row["owner_id"], host=row["host"], pid=int(row["pid"]), expires_at=float(row["expires_at"])
    )
