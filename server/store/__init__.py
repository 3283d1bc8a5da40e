"""Durable storage of API keys, budgets, the usage ledger and idempotency records."""

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
    StoreUnavailable,
    validate_key_name,
)
from server.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_SCOPES",
    "KEY_NAME_PATTERN",
    "MAX_COUNT",
    "ApiKey",
    "DuplicateKeyName",
    "IdempotencyRecord",
    "KeyNotFound",
    "LedgerRow",
    "QuotaExceeded",
    "Reservation",
    "ReservationNotFound",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "validate_key_name",
]
