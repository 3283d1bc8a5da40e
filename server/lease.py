"""Keeps this server's owner lease alive and sweeps dead owners' reservations, on a thread.

A thread rather than an event-loop task: the lease must reflect whether the process lives,
not whether its event loop is momentarily busy, and the store's calls are blocking anyway.
"""

from __future__ import annotations

import logging
import threading

from server.store.base import Store, StoreError

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Every `interval_s`: renew our lease to `ttl_s`, then recover owners whose lease ran out."""

    def __init__(self, store: Store, ttl_s: float, interval_s: float) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"renew the lease more often than it lasts ({interval_s} >= {ttl_s} s)")
        self._store = store
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cbbt-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 10)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self._store.renew_owner(self._ttl_s)
                self._store.recover_expired()
            except StoreError:
                # The database is unavailable for now; the next round retries. A lease that runs
                # out meanwhile only lets others recover what no one can settle anyway.
                logger.warning("lease renewal failed; retrying in %.1f s", self._interval_s, exc_info=True)
