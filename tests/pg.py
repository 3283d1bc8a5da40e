"""A throwaway PostgreSQL cluster for tests: initdb in a temporary folder, a free loopback port.

Debian's `postgresql` package provides the binaries (.ci/run installs it). initdb refuses to
run as root, so as root the cluster belongs to the `postgres` user (runuser). Durability is off
(`--no-sync`, fsync=off): the cluster lives for one test session. `stop()` removes everything.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.helpers import free_port

BINARIES = ("initdb", "pg_ctl", "postgres")


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bindir() -> Path:
    """The folder of initdb/pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    candidates = [Path(p).parent for p in filter(None, [shutil.which("pg_ctl"), shutil.which("initdb")])]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        resolved = folder.resolve()
        if all((resolved / name).exists() for name in BINARIES):
            return resolved
        real = Path(os.path.realpath(folder / "pg_ctl")).parent
        if all((real / name).exists() for name in BINARIES):
            return real
    raise PostgresMissing(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's "
        "`postgresql` package (apt-get install -y postgresql; .ci/run does this)"
    )


class PostgresCluster:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.bindir = find_bindir()
        self.host = host
        self.port = free_port(host)
        self.root = Path(tempfile.mkdtemp(prefix="cbbt-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        done = subprocess.run(
            prefix + list(args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}{self.log_tail()}")

    def start(self) -> PostgresCluster:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.root} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "start",
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def new_database(self, prefix: str = "cbbt") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(condition: object, timeout_s: float = 60.0, step_s: float = 0.05) -> bool:
    """Poll `condition()` until true or the timeout; returns its last value."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
