"""Durable storage of API keys, budgets, the usage ledger, idempotency records and owners."""

from server.store.base import (
    DEFAULT_SCOPES,
    KEY_NAME_PATTERN,
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
    StoreReadOnly,
    StoreUnavailable,
    validate_key_name,
)
from server.store.owners import DatabaseInUse, Recovery
from server.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_SCOPES",
    "KEY_NAME_PATTERN",
    "MAX_COUNT",
    "ApiKey",
    "DatabaseInUse",
    "DuplicateKeyName",
    "IdempotencyRecord",
    "KeyNotFound",
    "LedgerRow",
    "QuotaExceeded",
    "Recovery",
    "Reservation",
    "ReservationNotFound",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreReadOnly",
    "StoreUnavailable",
    "validate_key_name",
]
