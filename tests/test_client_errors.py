"""Failing the way users expect: every error path through the real `cbbt` CLI (a subprocess)
against a real server process on loopback. Each ends with its exit code, ONE line on stderr
naming the fix, and no traceback; `--debug` shows the traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from client.errors import CredentialsError, QuotaExhausted, RequestError, RetryLater
from client.server_process import free_port
from tests.helpers import REPO_ROOT, ServerProcess

# A subprocess that retried a refused connection with the default settings would take minutes
# (CBBT_RETRY_TOTAL_S defaults to 600 s); this bound only catches that, it measures nothing.
CLI_TIMEOUT_S = 180
TINY_TUNE = ["--data", "digits", "--test-per-class", "5", "--shots", "4", "--views", "1", "--no-progress"]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cbbt(*argv: str, env: dict[str, str] | None = None, cache: Path | None = None) -> Outcome:
    """`python -m client.cli ARGV` with only `env` of the CBBT_/OPENAI_ variables set, and its
    feature cache in `cache` (a cold cache: every image feature is bought again)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CBBT_", "OPENAI_"))}
    environment = {**environment, "HF_HUB_OFFLINE": "1", **(env or {})}
    if cache is not None:
        environment["CBBT_CACHE_DIR"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", *argv],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(outcome: Outcome, code: int, *fragments: str) -> str:
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert len(outcome.stderr_lines) == 1, outcome.stderr
    line = outcome.stderr_lines[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


def new_key(server: ServerProcess, **kwargs: int) -> tuple[str, str]:
    name = f"errors-{uuid.uuid4().hex[:8]}"
    return name, server.create_key(name, default=False, **kwargs)


def test_exit_codes_are_distinct_per_kind_of_fix() -> None:
    codes = [
        RequestError.exit_code,
        CredentialsError.exit_code,
        QuotaExhausted.exit_code,
        RetryLater.exit_code,
    ]
    assert len(set(codes)) == 4 and 0 not in codes and 1 not in codes


def test_a_wrong_key_says_to_fix_the_key(tiny_server: ServerProcess) -> None:
    outcome = cbbt("usage", "--server", tiny_server.url, "--api-key", "sk-not-a-key")
    assert_one_line_error(outcome, CredentialsError.exit_code, "rejected the API key", "CBBT_API_KEY")


def test_a_missing_key_says_to_fix_the_key(tiny_server: ServerProcess) -> None:
    outcome = cbbt("usage", "--server", tiny_server.url)
    assert_one_line_error(outcome, CredentialsError.exit_code, "missing API key", "CBBT_API_KEY")


def test_a_revoked_key_says_to_fix_the_key(tiny_server: ServerProcess) -> None:
    name, key = new_key(tiny_server)
    assert cbbt("usage", "--server", tiny_server.url, "--api-key", key).code == 0  # it worked before
    tiny_server.revoke_key(name)
    outcome = cbbt("usage", "--server", tiny_server.url, "--api-key", key)
    assert_one_line_error(outcome, CredentialsError.exit_code, "invalid or revoked API key")


def test_a_base_url_ending_in_v1_works(tiny_server: ServerProcess) -> None:
    name, key = new_key(tiny_server)
    for server in (f"{tiny_server.url}/v1", f"{tiny_server.url}/v1/", f"{tiny_server.url}/"):
        outcome = cbbt("usage", "--server", server, "--api-key", key)
        assert outcome.code == 0 and outcome.stderr_lines == [], outcome
        assert f'"key_name": "{name}"' in outcome.stdout


def test_openai_variables_are_honoured_when_the_cbbt_ones_are_unset(tiny_server: ServerProcess) -> None:
    name, key = new_key(tiny_server)
    openai = {"OPENAI_BASE_URL": f"{tiny_server.url}/v1", "OPENAI_API_KEY": key}
    outcome = cbbt("usage", env=openai)
    assert outcome.code == 0 and f'"key_name": "{name}"' in outcome.stdout, outcome
    # The CBBT_ ones win when both are set.
    outcome = cbbt("usage", env={**openai, "CBBT_API_KEY": "sk-wrong"})
    assert_one_line_error(outcome, CredentialsError.exit_code)


def test_a_server_that_is_down_fails_at_once_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    outcome = cbbt("usage", "--server", url, "--api-key", "sk-x")
    assert_one_line_error(outcome, RetryLater.exit_code, f"no cbbt server at {url}")
    tune = cbbt(
        "tune",
        "--server",
        url,
        "--api-key",
        "sk-x",
        "--out",
        str(tmp_path / "run"),
        *TINY_TUNE,
        cache=tmp_path,
    )
    assert_one_line_error(tune, RetryLater.exit_code, f"no cbbt server at {url}")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    outcome = cbbt("usage", "--server", url, "--debug")
    assert outcome.code == RetryLater.exit_code and "Traceback" in outcome.stderr


def test_rate_limited_past_the_retry_bound_says_to_try_later(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    _, key = new_key(tiny_server, rpm=2)  # the token call and one feature call, then 429s
    outcome = cbbt(
        "tune", "--server", tiny_server.url, "--api-key", key, "--out", str(tmp_path / "run"), *TINY_TUNE,
        env={"CBBT_RETRY_TOTAL_S": "2"},  # shorter than the server's Retry-After
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert_one_line_error(outcome, RetryLater.exit_code, "rate_limit_exceeded", "try again later")


def test_an_exhausted_quota_says_to_top_up(tiny_server: ServerProcess, tmp_path: Path) -> None:
    # 50 items: the token call passes, the first 64-image feature batch cannot be paid for.
    _, key = new_key(tiny_server, budget_items=50)
    run = ["tune", "--server", tiny_server.url, "--api-key", key, "--out", str(tmp_path / "run"), *TINY_TUNE]
    outcome = cbbt(*run, cache=tmp_path / "cache")  # a cold cache: the features must be bought
    assert_one_line_error(outcome, QuotaExhausted.exit_code, "budget is exhausted", "top the key up")


def test_bad_input_is_one_line_too(tmp_path: Path) -> None:
    outcome = cbbt("tune", "--data", "nope", "--out", str(tmp_path / "run"))
    assert_one_line_error(outcome, RequestError.exit_code)
    outcome = cbbt("tune", "--data", "digits", "--out", str(tmp_path / "run"), "--method", "no-such-method")
    assert_one_line_error(outcome, RequestError.exit_code, "unknown method 'no-such-method'")


def _server_pids(db: Path) -> list[int]:
    """Processes serving `db` (their command lines name it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "server.cli" in command and str(db) in command:
                found.append(int(entry.name))
    return found


def test_sigterm_on_a_local_bench_stops_the_server_it_started(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    db = out / "server" / "server.db"
    argv = [
        "bench", "--local", "--local-model", "cbbt-tiny", "--local-pretrained", "none", "--data", "digits",
        "--methods", "cbbt", "--shots", "4", "--seeds", "1", "--views", "1", "--test-per-class", "5",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bench = subprocess.Popen(
        [sys.executable, "-m", "client.cli", *argv], cwd=REPO_ROOT, env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not _server_pids(db) and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _server_pids(db), "the bench never started its server"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=CLI_TIMEOUT_S) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
    deadline = time.monotonic() + 30
    while _server_pids(db) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_pids(db) == []
