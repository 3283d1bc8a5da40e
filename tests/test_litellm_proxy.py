"""Tuning through a real third-party OpenAI-compatible proxy, end to end, on real data.

LiteLLM's proxy (from PyPI) stands in front of a cbbt-server whose key is restricted to the
embeddings tier; the proxy offers only OpenAI's routes, so the client sees exactly what a
commercial multimodal embeddings API offers: `/v1/models` (ids) and `/v1/embeddings`. The
`cbbt tune` CLI, told nothing but `--api openai`, tunes Tip-Adapter-F with the real default model
on 16-shot digits, and must beat zero-shot (text templates) while its item count equals the
server's ledger. Also: a method that needs soft prompts is refused in one line naming its tier.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.store import SqliteStore
from tests.helpers import REPO_ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

MASTER_KEY = "sk-" + secrets.token_hex(24)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("upstream") / "up.db", model=None, pretrained=None) as srv:
        srv.create_key("via-proxy", scopes=["embed"])  # {embed}: the embeddings tier
        yield srv


@pytest.fixture(scope="module")
def model_id(upstream: ServerProcess) -> str:
    with upstream.client() as client:
        return str(client.get("/v1/models").json()["data"][0]["id"])


@pytest.fixture(scope="module")
def proxy(upstream: ServerProcess, model_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("litellm")
    config = folder / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model_id}\n"
        "    litellm_params:\n"
        f"      model: openai/{model_id}\n"
        f"      api_base: {upstream.url}/v1\n"
        "      api_key: os.environ/CBBT_UPSTREAM_KEY\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "CBBT_UPSTREAM_KEY": upstream.api_key or "",
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches its price list at import
        "HF_HUB_OFFLINE": "1",
    }
    log = (folder / "proxy.log").open("wb")
    litellm = Path(sys.executable).parent / "litellm"
    process = subprocess.Popen(
        [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_proxy(url, process, folder / "proxy.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def _wait_for_proxy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the LiteLLM proxy did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _cbbt(proxy: str, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CBBT_SERVER": f"{proxy}/v1", "CBBT_API_KEY": MASTER_KEY}
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_the_proxy_is_only_an_embeddings_api(proxy: str, model_id: str) -> None:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    listed = httpx.get(f"{proxy}/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == [model_id] and "feature_dim" not in listed[0]  # no cbbt card
    classify = httpx.post(f"{proxy}/v1/classify", headers=headers, json={"images": ["x"], "texts": ["a"]})
    assert classify.status_code >= 400


def test_tune_through_litellm_beats_zero_shot_and_matches_the_ledger(
    proxy: str, upstream: ServerProcess, model_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with SqliteStore(upstream.db) as store:
        key = store.get_key("via-proxy")
        spent_before = store.ledger_total(key.id)
    done = _cbbt(
        proxy,
        "tune", "--api", "openai", "--model", model_id, "--method", "tip-adapter-f",
        "--data", "digits", "--shots", "16", "--seed", "1", "--test-per-class", "30",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["test_accuracy"] > report["zero_shot_test_accuracy"], report
    with SqliteStore(upstream.db) as store:
        key = store.get_key("via-proxy")
        spent = store.ledger_total(key.id) - spent_before
    assert report["queries"]["items"] == spent > 0, (report["queries"], spent)


def test_soft_prompt_methods_are_refused_naming_the_tier(proxy: str, model_id: str, tmp_path: Path) -> None:
    done = _cbbt(
        proxy,
        "tune", "--api", "openai", "--model", model_id, "--method", "cbbt-paper", "--data", "digits",
        "--out", str(tmp_path / "refused"), "--no-progress",
    )  # fmt: skip
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert "full tier" in message and "embeddings tier" in message, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
