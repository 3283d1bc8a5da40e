"""Who serves a database: owner identities, leases and the liveness of a recorded process.

Every serving process registers an owner row (id, host, pid, lease expiry) in the database it
serves and renews the lease while it runs. Crash recovery refunds only the reservations of
owners that are dead: whose lease expired, or, on this very host, whose process is gone. The
guarantee lives in the database itself, so no second path to the file (a symlink, a hard link,
a deleted lock file) and no second machine can bypass it.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path


class DatabaseInUse(RuntimeError):
    """Another live server owns this database, and the store serves one process at a time."""


@dataclass(frozen=True)
class Recovery:
    """What a recovery sweep did: dead owners cleared, their unanswered requests and items refunded."""

    owners: int = 0
    requests: int = 0
    items: int = 0


@dataclass(frozen=True)
class OwnerRecord:
    owner_id: str
    host: str
    pid: int
    expires_at: float


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def host_identity() -> str:
    """Names the PID space this process lives in: the boot and PID namespace, else the hostname.

    Two processes with the same identity can see each other's PIDs, so one can tell for certain
    that the other has exited; across identities only the lease can tell.
    """
    boot = _read("/proc/sys/kernel/random/boot_id")
    namespace = _pid_namespace()
    if boot and namespace:
        return f"{socket.gethostname()}/{boot}/{namespace}"
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists in our PID space (EPERM still means it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) holds its PID but serves nothing.
    stat = _read(f"/proc/{pid}/stat")
    return not (stat and stat.rpartition(")")[2].split()[:1] == ["Z"])


def new_owner_id() -> str:
    return uuid.uuid4().hex


def is_dead(owner: OwnerRecord, now: float, here: str, me: str | None) -> bool:
    """An owner is dead once its lease has expired, or at once when its process is gone."""
    if owner.owner_id == me:
        return False
    if owner.expires_at <= now:
        return True
    return owner.host == here and not process_alive(owner.pid)
