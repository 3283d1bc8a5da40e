"""Start a model server as a child process (for `cbbt demo`): the client still only talks HTTP."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    def __init__(
        self, *, db: Path, port: int | None = None, log_path: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.db = db
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def _server_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "server.cli", *args]

    def create_key(self, name: str, *, budget_items: int) -> str:
        result = subprocess.run(
            self._server_command(
                "keys", "create", "--db", str(self.db), "--name", name, "--budget-items", str(budget_items)
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def __enter__(self) -> LocalServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = self._server_command(
            "serve", "--port", str(self.port), "--db", str(self.db), *self.extra_args
        )
        logger.info("starting the model server on %s (log: %s)", self.url, self.log_path)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the model server exited with {self._process.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    logger.info("model server ready")
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the model server was not ready within {START_TIMEOUT_S:.0f} s; see {self.log_path}"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._log.close()
