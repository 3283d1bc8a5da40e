"""The store interface: API keys, budgets, the usage ledger, idempotency records and owners.

SQLite (server.store.sqlite, one server per file) and PostgreSQL (server.store.postgres, any
number of replicas) implement it; nothing above this layer names either (server.store.factory
opens the right one from `--db`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from server.store.owners import Recovery

DEFAULT_SCOPES: frozenset[str] = frozenset({"embed", "classify"})
KEY_PREFIX = "cbbt-"
# Display prefix length: enough to tell keys apart in listings, far too little to guess the rest.
DISPLAY_PREFIX_LEN = 8
# Largest budget, limit or top-up a key may have: far beyond any real use, and far below SQLite's
# 64-bit integers, so that no sum the store computes can overflow (SQLite would turn it into a float).
MAX_COUNT = 10**15
# Names start with a letter so a name can never be mistaken for a numeric id, and contain no
# '/' so they are safe as a URL path segment.
KEY_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,63}$"
_KEY_NAME_RE = re.compile(KEY_NAME_PATTERN)


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now (locked, read-only, disk full, I/O error, closed).

    Nothing was charged: the server answers 503 and the client may retry.
    """


class StoreReadOnly(StoreUnavailable):
    """The database only allows reads (a read-only file or URI, a standby): nothing can be charged."""


class QuotaExceeded(StoreError):
    """The key's budget cannot cover the request; it is refused whole and nothing is charged."""

    def __init__(self, message: str, *, remaining_items: int | None, remaining_requests: int | None) -> None:
        super().__init__(message)
        self.remaining_items = remaining_items
        self.remaining_requests = remaining_requests


class KeyNotFound(StoreError):
    """No such key (or, for reserve, the key was revoked after authentication)."""


class DuplicateKeyName(StoreError):
    """A key with this name already exists; names are unique."""


class ReservationNotFound(StoreError):
    """settle/refund named a request id that was never reserved."""


def validate_key_name(name: str) -> str:
    if not _KEY_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid key name {name!r}: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter"
        )
    return name


def _remaining(budget: int | None, spent: int) -> int | None:
    return None if budget is None else max(budget - spent, 0)


@dataclass(frozen=True)
class ApiKey:
    """A key's public record. The hash never leaves the store; the plaintext is never stored."""

    id: int
    name: str
    prefix: str
    scopes: frozenset[str]
    budget_items: int | None
    budget_requests: int | None
    spent_items: int
    spent_requests: int
    rpm: int | None
    ipm: int | None
    revoked: bool
    created_at: float

    @property
    def remaining_items(self) -> int | None:
        """None means unlimited."""
        return _remaining(self.budget_items, self.spent_items)

    @property
    def remaining_requests(self) -> int | None:
        """None means unlimited."""
        return _remaining(self.budget_requests, self.spent_requests)

    def public_dict(self) -> dict[str, Any]:
        """JSON-ready view for the CLI and admin API (scopes sorted for stable output)."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": sorted(self.scopes),
            "budget_items": self.budget_items,
            "spent_items": self.spent_items,
            "remaining_items": self.remaining_items,
            "budget_requests": self.budget_requests,
            "spent_requests": self.spent_requests,
            "remaining_requests": self.remaining_requests,
            "rpm": self.rpm,
            "ipm": self.ipm,
            "revoked": self.revoked,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Reservation:
    """A charge that was made. remaining_*: the key's budget left right after it (None = unlimited)."""

    request_id: str
    key_id: int
    items: int
    endpoint: str
    remaining_items: int | None = None
    remaining_requests: int | None = None


@dataclass(frozen=True)
class LedgerRow:
    """One charged request. status None = reserved, not yet settled (the request is in flight)."""

    request_id: str
    endpoint: str
    items: int
    status: int | None
    refunded: bool
    created_at: float

    def public_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "items": self.items,
            "status": self.status,
            "refunded": self.refunded,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class IdempotencyRecord:
    """A stored answer for (key, Idempotency-Key). status None = the first request is still running."""

    key_id: int
    idem_key: str
    body_hash: str
    status: int | None
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    expires_at: float = 0.0

    @property
    def in_progress(self) -> bool:
        return self.status is None


@runtime_checkable
class Store(Protocol):
    """Everything the server needs from durable storage. All methods are blocking and thread-safe.

    Every method raises StoreUnavailable when the backing store cannot be used.
    """

    def create_key(
        self,
        name: str,
        scopes: frozenset[str] | set[str] | list[str] | tuple[str, ...],
        budget_items: int | None,
        budget_requests: int | None = None,
        rpm: int | None = None,
        ipm: int | None = None,
    ) -> tuple[str, ApiKey]:
        """Returns (plaintext key, record); the plaintext exists only in this return value."""
        ...

    def authenticate(self, plaintext: str) -> ApiKey | None:
        """The live key with this plaintext, or None (unknown or revoked)."""
        ...

    def get_key(self, name_or_id: str | int) -> ApiKey:
        """Raises KeyNotFound. Revoked keys are returned (with revoked=True)."""
        ...

    def list_keys(self) -> list[ApiKey]: ...

    def revoke(self, name_or_id: str | int) -> ApiKey: ...

    def top_up(self, name_or_id: str | int, items: int = 0, requests: int = 0) -> ApiKey:
        """Raises the budgets (an unlimited budget stays unlimited)."""
        ...

    def reserve(self, key_id: int, items: int, request_id: str, endpoint: str) -> Reservation:
        """Atomically charge items and one request, or raise QuotaExceeded having charged nothing."""
        ...

    def settle(
        self, request_id: str, status: int, idempotent: tuple[str, bytes, dict[str, str]] | None = None
    ) -> None:
        """Record the final HTTP status; the charge stands.

        `idempotent` = (Idempotency-Key, body, headers) stores the answer for replay in the SAME
        transaction: a crash can then never leave a charge whose answer a retry cannot replay
        (recovery drops in-progress records, and the retry would be charged a second time).
        """
        ...

    def refund(self, request_id: str, status: int) -> bool:
        """Return the charge (server-side failure). True if refunded now, False if it already was."""
        ...

    def usage(self, key_id: int, recent: int = 20) -> tuple[ApiKey, list[LedgerRow]]:
        """The key and its most recent ledger rows, newest first."""
        ...

    def ledger_total(self, key_id: int) -> int:
        """Sum of items of non-refunded ledger rows; always equals the key's spent_items."""
        ...

    def begin_idempotent(
        self, key_id: int, idem_key: str, body_hash: str, ttl_s: float
    ) -> IdempotencyRecord | None:
        """None: no live record existed, an in-progress one was created, the caller proceeds.

        Otherwise the live record: the caller replays it (finished, same hash), rejects the
        request (different hash), or reports it as still in progress.
        """
        ...

    def finish_idempotent(
        self, key_id: int, idem_key: str, status: int, body: bytes, headers: dict[str, str]
    ) -> None: ...

    def abandon_idempotent(self, key_id: int, idem_key: str) -> None:
        """Drop an in-progress record (server-side failure) so that a retry can run."""
        ...

    # -- owners (crash recovery that never touches a live server's requests) --------------

    def claim_owner(self, ttl_s: float, *, exclusive: bool | None = None) -> Recovery:
        """Recover dead owners' reservations and register this process with a lease, in one
        transaction. Raises DatabaseInUse when `exclusive` and another live owner exists."""
        ...

    def renew_owner(self, ttl_s: float) -> bool:
        """Extend this process's lease (False: it had been lost and was re-registered)."""
        ...

    def recover_expired(self) -> Recovery:
        """Refund the unanswered reservations of dead owners only, in one transaction."""
        ...

    def release_owner(self) -> Recovery:
        """Clean shutdown: drop this process's owner row and refund what it left unanswered."""
        ...

    def close(self) -> None: ...
