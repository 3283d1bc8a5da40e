"""One serving process per database: an exclusive advisory lock on `<db>.lock`.

Crash recovery (refunding reservations that were never answered) is only correct when no
other live server could own them, so `cbbt-server serve` takes this lock first and refuses
to start when another server holds it. The key-administration CLI does not need it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit


class DatabaseInUse(RuntimeError):
    """Another server process is serving this database."""


def database_file(db: Path | str) -> Path:
    """The file behind a database path or an SQLite `file:` URI (`file:/x/cbbt.db?mode=ro`)."""
    text = str(db)
    if text.startswith("file:"):
        return Path(unquote(urlsplit(text).path))
    return Path(text)


class ServerLock:
    def __init__(self, db_path: Path | str) -> None:
        # Next to the database file itself: a `file:` URI taken literally would create a folder
        # named "file:" in the working directory.
        self.path = Path(f"{database_file(db_path)}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DatabaseInUse(
                f"another cbbt server is serving {self.path.with_suffix('')}; one server per database"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
