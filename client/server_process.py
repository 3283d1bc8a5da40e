"""A model server as a child process on loopback: the demo, the bench, the scripts and the tests
all start, wait for, stop and make keys on servers through this one class.

The client still only talks HTTP to it; the only coupling is the command line
`python -m server.cli serve ...` / `keys ...` (run from the repository, so `server` is
importable whether or not the package is installed).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_START_TIMEOUT_S", "LARGE_BUDGET", "ServerProcess", "ServerStartError", "free_port"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real-weights model loads in ~20 s on a quiet 2-core machine, several times that under load.
DEFAULT_START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.2
LARGE_BUDGET = 10**12  # items: practically unlimited (local runs, tests)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready in time; the message has its log tail."""


class ServerProcess:
    """A `cbbt-server serve` subprocess on loopback.

    model=None serves the server's default model (the real-weights devise encoder); otherwise
    `model` is passed with `--model` and `pretrained` with `--pretrained`. `extra_args` are more
    `serve` flags; `env` adds environment variables (HF_HUB_OFFLINE=1 is always set). The port
    is chosen at the first start and kept by restarts, so URLs handed out stay valid. The
    process runs in its own session, so a terminal's Ctrl-C reaches only the parent, which
    stops it (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        db: Path | str,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        auth: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | str | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        # A postgresql:// URL stays text (a Path would fold its '//'); a file path becomes a Path.
        self.db: Path | str = db if str(db).startswith(("postgresql://", "postgres://")) else Path(db)
        self.model = model
        self.pretrained = pretrained
        self.auth = auth
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.host = host
        self.port = port
        if log_path is None and not isinstance(self.db, Path):
            raise ValueError("a server on a database URL needs a log_path")
        self.log_path = Path(log_path) if log_path is not None else Path(self.db).with_suffix(".server.log")
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.api_key: str | None = None  # set by create_key(..., default=True)

    # -- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until it is started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        assert self.port is not None
        cmd = [*_server_cli(), "serve", "--host", self.host, "--port", str(self.port), "--db", str(self.db)]
        if self.model is not None:
            cmd += ["--model", self.model]
            if self.pretrained is not None:
                cmd += ["--pretrained", self.pretrained]
        if not self.auth:
            cmd.append("--no-auth")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, wait: bool = True) -> ServerProcess:
        if self.running:
            raise RuntimeError("the server is already running")
        if self.port is None:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting the model server on %s (log: %s)", self.url, self.log_path)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # Ctrl-C or SIGTERM while starting: `__exit__` will not run
                self.stop()
                raise
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll /ready until 200; raise ServerStartError (with the log) if it dies or times out."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.start_timeout_s)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise ServerStartError(
                        f"server exited with {code} before it was ready\n{self.log_tail()}"
                    )
                try:
                    if client.get("/ready").status_code == 200:
                        logger.info("model server ready")
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(f"server not ready within the start timeout\n{self.log_tail()}")
                time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit; returns the exit code."""
        if self.process is None:
            return None
        proc, self.process = self.process, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash, with no graceful shutdown (for fault tests)."""
        if self.process is None:
            return None
        proc, self.process = self.process, None
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        return proc.returncode

    def restart(self, *, wait: bool = True) -> ServerProcess:
        """Stop and start again on the same port, database and log."""
        self.stop()
        return self.start(wait=wait)

    def __enter__(self) -> ServerProcess:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- keys ------------------------------------------------------------------------------
    def keys(self, *args: str) -> str:
        """Run `cbbt-server keys ARGS --db DB` on this server's database; returns its stdout."""
        cmd = [*_server_cli(), "keys", args[0], "--db", str(self.db), *args[1:]]
        done = subprocess.run(
            cmd, cwd=REPO_ROOT, env=self.environment(), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"keys {args[0]} failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip()

    def create_key(
        self,
        name: str,
        *,
        budget_items: int = LARGE_BUDGET,
        budget_requests: int | None = None,
        rpm: int | None = None,
        ipm: int | None = None,
        scopes: Sequence[str] | None = None,
        default: bool = True,
    ) -> str:
        """Create a key in this server's database with the real CLI; returns the plaintext."""
        args = ["create", "--name", name, "--budget-items", str(budget_items)]
        for flag, value in (("--budget-requests", budget_requests), ("--rpm", rpm), ("--ipm", ipm)):
            if value is not None:
                args += [flag, str(value)]
        if scopes is not None:
            args += ["--scopes", *scopes]
        key = self.keys(*args)
        if default:
            self.api_key = key
        return key

    def revoke_key(self, name: str) -> None:
        self.keys("revoke", name)

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key if key is not None else self.api_key
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    def client(self, key: str | None = None, *, timeout_s: float = 120.0, **kwargs: Any) -> httpx.Client:
        """A raw httpx client on this server, authenticated with `key` (default: the default key)."""
        return httpx.Client(base_url=self.url, headers=self.headers(key), timeout=timeout_s, **kwargs)

    # -- the log ---------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _server_cli() -> list[str]:
    return [sys.executable, "-m", "server.cli"]
