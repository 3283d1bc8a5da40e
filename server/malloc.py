"""glibc's allocator, tuned for a server whose model allocates large activations (a no-op elsewhere).

The server keeps glibc's adaptive mmap threshold. Fixing it low (1 MiB, an earlier hardening
fix) returned every freed request body to the OS at once, but also made each model activation
an mmap of its own, page-faulted afresh on every forward pass: the default model's images ran
~2.5x slower (docs/reliability.md). With the adaptive threshold, freed blocks stay in the heap
for reuse; two arenas bound how many heaps keep them, and the start-up's temporaries (loading
and fitting the model) are handed back once it is ready.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from malloc.h


def _glibc() -> Any | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> None:
    """At most `arenas` heaps: what large request bodies leave behind is bounded by a couple of
    heaps' peaks, not one per worker thread that ever parsed one."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(_M_ARENA_MAX, arenas):
        logger.warning("mallopt(M_ARENA_MAX) failed; freed request buffers may stay resident per thread")


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (after loading the model: ~70 MiB here)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
