"""Helpers shared by the test files: a real server process on loopback, images, error checks.

`ServerProcess` runs `python -m server.cli serve ...` as a subprocess on a free loopback
port, waits for `/ready`, and can be stopped, killed (a crash) and restarted on the same
port and database. Everything it prints goes to one log file, kept across restarts, so a
failing test can show it (conftest.py attaches its tail to failure reports).
"""

from __future__ import annotations

import base64
import io
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
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = "cbbt-tiny"
# Budget for the shared keys: effectively unlimited for the API tests.
LARGE_BUDGET = 10**12


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class FakeClock:
    """A wall clock that only moves when a test moves it (store leases, idempotency expiry)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready in time; the message has its log tail."""


class ServerProcess:
    """A `cbbt-server serve` subprocess on loopback.

    model=None serves the server's default model (the real-weights devise encoder);
    otherwise `model` is passed with `--model` and `pretrained` with `--pretrained`.
    `extra_args` are more `serve` flags (e.g. ["--max-items-per-request", "8"]); `env`
    adds environment variables (HF_HUB_OFFLINE=1 is always set). The port is chosen at
    the first start and reused by every restart, so URLs handed out stay valid.
    """

    def __init__(
        self,
        db: Path | str,
        *,
        model: str | None = TINY_MODEL,
        pretrained: str | None = "none",
        auth: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | str | None = None,
        start_timeout_s: float = 120.0,
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
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", self.host, "--port", str(self.port)]
        cmd += ["--db", str(self.db)]
        if self.model is not None:
            cmd += ["--model", self.model]
            if self.pretrained is not None:
                cmd += ["--pretrained", self.pretrained]
        if not self.auth:
            cmd.append("--no-auth")
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
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
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
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
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(f"server not ready within the start timeout\n{self.log_tail()}")
                time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> int | None:
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
            proc.wait(timeout=15.0)
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

    # -- keys and clients ------------------------------------------------------------------
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
        cmd = [sys.executable, "-m", "server.cli", "keys", "create", "--db", str(self.db)]
        cmd += ["--name", name, "--budget-items", str(budget_items)]
        for flag, value in (("--budget-requests", budget_requests), ("--rpm", rpm), ("--ipm", ipm)):
            if value is not None:
                cmd += [flag, str(value)]
        if scopes is not None:
            cmd += ["--scopes", *scopes]
        done = subprocess.run(
            cmd, cwd=REPO_ROOT, env=self._environment(), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"keys create failed ({done.returncode}): {done.stderr}")
        key = done.stdout.strip()
        if default:
            self.api_key = key
        return key

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key if key is not None else self.api_key
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    def client(self, key: str | None = None, *, timeout_s: float = 120.0, **kwargs: Any) -> httpx.Client:
        """An httpx client on this server, authenticated with `key` (default: the default key)."""
        return httpx.Client(base_url=self.url, headers=self.headers(key), timeout=timeout_s, **kwargs)

    # -- the log ---------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# -- images ------------------------------------------------------------------------------
def noise_image(width: int = 48, height: int = 40, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}[fmt]
    return data_uri(image_bytes(image, fmt), mime)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of a few KB whose header claims width x height pixels (a decompression bomb)."""
    return image_bytes(Image.new("1", (width, height)), "PNG", optimize=True)


# -- responses ---------------------------------------------------------------------------
def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` in the one error envelope (with `code`, when given); returns it."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]
