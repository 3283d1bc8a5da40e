"""The shared store: PostgreSQL through psycopg 3 and its connection pool, for many replicas.

The statements are SqlStore's (server.store.sql), so the guarantees are SQLite's: one
conditional UPDATE per charge (PostgreSQL re-checks its WHERE clause on the locked row, so
concurrent charges on one key never overspend), a retry charged once, the ledger. What differs:
any number of live servers may serve one database (owner leases on the database's own clock
keep their crash recoveries apart), and rate-limit buckets live here too, so that a key's
limits hold whichever replica a request lands on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from server.ratelimit import BucketState
from server.store.base import Store, StoreError, StoreReadOnly, StoreUnavailable
from server.store.factory import describe
from server.store.sql import Connection, Cursor, Migration, SqlStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant: the key of the advisory lock that serialises migrations between replicas.
_MIGRATION_LOCK = 0x63627474

_MIGRATIONS: tuple[Migration, ...] = (
    (
        1,
        """
CREATE TABLE api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    budget_items BIGINT,
    budget_requests BIGINT,
    spent_items BIGINT NOT NULL DEFAULT 0,
    spent_requests BIGINT NOT NULL DEFAULT 0,
    rpm BIGINT,
    ipm BIGINT,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE owners (
    owner_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE ledger (
    seq BIGSERIAL UNIQUE,
    request_id TEXT PRIMARY KEY,
    key_id BIGINT NOT NULL REFERENCES api_keys(id),
    endpoint TEXT NOT NULL,
    items BIGINT NOT NULL,
    status INTEGER,
    refunded INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    settled_at DOUBLE PRECISION,
    owner TEXT
);
CREATE INDEX ledger_by_key ON ledger (key_id, created_at);
CREATE INDEX ledger_unsettled ON ledger (owner) WHERE status IS NULL AND refunded = 0;
CREATE TABLE idempotency (
    key_id BIGINT NOT NULL,
    idem_key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    status INTEGER,
    body BYTEA,
    headers TEXT NOT NULL DEFAULT '{}',
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    owner TEXT,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE TABLE rate_buckets (
    key_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key_id, kind)
)
""",
    ),
)


@lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """SqlStore writes `?`; psycopg wants `%s` (no statement contains a literal '?' or '%')."""
    return sql.replace("?", "%s")


class _Adapter:
    """A psycopg connection seen through the small Connection protocol SqlStore uses."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(_placeholders(sql), tuple(parameters))


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except psycopg.IntegrityError as exc:
        raise StoreError(f"{action}: integrity error: {exc}") from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise StoreReadOnly(f"store unavailable during {action}: {exc}") from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise StoreError(f"{action}: {exc}") from exc
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        logger.warning("store unavailable during %s: %s (%s)", action, exc, type(exc).__name__)
        raise StoreUnavailable(f"store unavailable during {action}: {exc} ({type(exc).__name__})") from exc


class PostgresStore(SqlStore, Store):
    """Store on a PostgreSQL database (`postgresql://user@host:port/dbname`), shared by replicas."""

    MIGRATIONS: ClassVar[tuple[Migration, ...]] = _MIGRATIONS
    SHARED_SERVING: ClassVar[bool] = True
    INTEGRITY_ERRORS: ClassVar[tuple[type[Exception], ...]] = (psycopg.IntegrityError,)
    LEDGER_ORDER: ClassVar[str] = "created_at DESC, seq DESC"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        timeout_s: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        # Leases are measured on the database's clock (replicas' clocks may differ); a clock
        # injected by a test measures everything instead.
        self._db_clock = clock is None
        if clock is None:
            super().__init__()
        else:
            super().__init__(clock=clock)
        self._url = url
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(timeout_s))},
            name="cbbt",
            open=False,
        )
        with _translated("connect"):
            self._pool.open(wait=True, timeout=timeout_s)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return describe(self._url)

    @contextmanager
    def _transaction(self, action: str, *, write: bool = True) -> Iterator[Connection]:
        """A pooled connection in one transaction: committed at the end, rolled back on error."""
        with _translated(action), self._pool.connection() as conn, conn.transaction():
            yield _Adapter(conn)

    def _has_version_table(self, conn: Connection) -> bool:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()
        return bool(row["present"])

    def _lock_schema(self, conn: Connection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,)).fetchone()

    def _lease_now(self, conn: Connection) -> float:
        if not self._db_clock:
            return self._clock()
        row = conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now").fetchone()
        return float(row["now"])

    def close(self) -> None:
        self._pool.close()

    # -- shared rate limits ------------------------------------------------------------------

    def update_buckets(
        self,
        key_id: int,
        capacities: dict[str, int | None],
        decide: Callable[[dict[str, BucketState], float], T],
    ) -> T:
        """Run `decide` on the key's buckets, locked, and store what it left (one transaction).

        capacities: kind -> the key's limit (None: unlimited, the bucket is dropped; kinds not
        named are left as stored). `decide` gets the buckets (full ones for kinds never seen) and
        the database's time, mutates them and returns its decision; concurrent requests of one
        key, on any replica, queue on the rows' lock.
        """
        with self._transaction("rate limit") as conn:
            now = self._lease_now(conn)
            for kind, capacity in capacities.items():
                if capacity is None:
                    conn.execute("DELETE FROM rate_buckets WHERE key_id = ? AND kind = ?", (key_id, kind))
                else:
                    conn.execute(
                        "INSERT INTO rate_buckets (key_id, kind, capacity, tokens, updated_at)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, kind) DO NOTHING",
                        (key_id, kind, capacity, float(capacity), now),
                    )
            rows = conn.execute(
                "SELECT kind, capacity, tokens, updated_at FROM rate_buckets WHERE key_id = ?"
                " ORDER BY kind FOR UPDATE",
                (key_id,),
            ).fetchall()
            buckets = {
                row["kind"]: BucketState(
                    limit=int(row["capacity"]), tokens=float(row["tokens"]), updated=float(row["updated_at"])
                )
                for row in rows
            }
            result = decide(buckets, now)
            for kind, bucket in buckets.items():
                conn.execute(
                    "UPDATE rate_buckets SET capacity = ?, tokens = ?, updated_at = ?"
                    " WHERE key_id = ? AND kind = ?",
                    (bucket.limit, bucket.tokens, bucket.updated, key_id, kind),
                )
        return result
