"""Open the store a `--db` value names: a file path (SQLite) or a postgresql:// URL."""

from __future__ import annotations

import os

from server.store.base import Store, StoreError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str | os.PathLike[str]) -> bool:
    return os.fspath(db).startswith(POSTGRES_SCHEMES)


def open_store(db: str | os.PathLike[str]) -> Store:
    """SqliteStore for a path or `file:` URI; PostgresStore for a URL (needs the `postgres` extra)."""
    if is_postgres_url(db):
        try:
            from server.store.postgres import PostgresStore
        except ImportError as exc:  # psycopg is an optional dependency
            raise StoreError(
                f"a PostgreSQL database needs psycopg: pip install 'cbbt[postgres]' ({exc})"
            ) from exc
        return PostgresStore(os.fspath(db))
    from server.store.sqlite import SqliteStore

    return SqliteStore(db)


def describe(db: str | os.PathLike[str]) -> str:
    """The database for messages: a URL loses its password."""
    text = os.fspath(db)
    if not is_postgres_url(text):
        return text
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
