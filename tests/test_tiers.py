"""Per-key API tiers against a real server process: each key simulates one kind of API."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from server.store import SqliteStore
from server.tiers import Tier, granted_scopes, scopes_for_tier, tier_of
from tests.helpers import REPO_ROOT, ServerProcess, assert_error, image_data_uri, noise_image

Json = dict[str, Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("tiers") / "tiers.db") as srv:
        yield srv


def _create(server: ServerProcess, name: str, *flags: str) -> str:
    cmd = [sys.executable, "-m", "server.cli", "keys", "create", "--db", str(server.db), "--name", name]
    done = subprocess.run(
        [*cmd, "--budget-items", "1000", *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _calls(client: httpx.Client) -> dict[str, httpx.Response]:
    """One small valid call to every charged route."""
    width = client.get("/v1/models").json()["data"][0]["token_width"]
    image = image_data_uri(noise_image(seed=3))
    return {
        "embeddings": client.post("/v1/embeddings", json={"input": ["a cat"]}),
        "classify": client.post("/v1/classify", json={"images": [image], "texts": ["a cat", "a dog"]}),
        "classify-context": client.post(
            "/v1/classify", json={"images": [image], "class_names": ["cat"], "context": [[0.0] * width]}
        ),
        "token-embeddings": client.post("/v1/token-embeddings", json={"text": "a photo"}),
        "prompt-embeddings": client.post(
            "/v1/prompt-embeddings", json={"prompts": [[[0.0] * width]], "class_names": ["cat"]}
        ),
    }


ALLOWED: dict[Tier, set[str]] = {
    Tier.embeddings: {"embeddings"},
    Tier.predictions: {"classify", "classify-context", "token-embeddings"},
    Tier.full: {"embeddings", "classify", "classify-context", "token-embeddings", "prompt-embeddings"},
}


@pytest.mark.parametrize("tier", list(Tier))
def test_each_tier_allows_its_routes_and_refuses_the_others(server: ServerProcess, tier: Tier) -> None:
    key = _create(server, f"k-{tier.value}", "--tier", tier.value)
    with server.client(key) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200  # every tier may read the model card
        for name, response in _calls(client).items():
            if name in ALLOWED[tier]:
                assert response.status_code == 200, (name, response.text)
            else:
                error = assert_error(response, 403, "tier_not_allowed")
                assert error["type"] == "permission_error"
                assert tier.value in error["message"], error
        usage = client.get("/v1/usage").json()
    assert usage["tier"] == tier.value
    # Refused calls are free: the ledger holds only what the allowed calls encoded.
    with SqliteStore(server.db) as store:
        record = store.get_key(f"k-{tier.value}")
        assert store.ledger_total(record.id) == record.spent_items == usage["spent_items"]


def test_refusal_names_the_tier_needed(server: ServerProcess) -> None:
    key = _create(server, "k-emb-msg", "--tier", "embeddings")
    with server.client(key) as client:
        width = client.get("/v1/models").json()["data"][0]["token_width"]
        response = client.post(
            "/v1/prompt-embeddings", json={"prompts": [[[0.0] * width]], "class_names": ["cat"]}
        )
    error = assert_error(response, 403, "tier_not_allowed")
    assert "full tier" in error["message"] and "embeddings tier" in error["message"], error


def test_keys_made_before_tiers_keep_every_route(server: ServerProcess) -> None:
    legacy = _create(server, "k-legacy")  # neither --tier nor --scopes: the old default scopes
    with SqliteStore(server.db) as store:
        assert store.get_key("k-legacy").scopes == frozenset({"embed", "classify"})
    with server.client(legacy) as client:
        assert all(r.status_code == 200 for r in _calls(client).values())
        assert client.get("/v1/usage").json()["tier"] == "full"


def test_custom_scopes_still_answer_permission_denied(server: ServerProcess) -> None:
    custom = _create(server, "k-custom", "--scopes", "embed", "prompt")
    with server.client(custom) as client:
        calls = _calls(client)
        assert tier_of({"embed", "prompt"}) is None
        assert calls["embeddings"].status_code == calls["prompt-embeddings"].status_code == 200
        assert_error(calls["classify"], 403, "permission_denied")
        assert client.get("/v1/usage").json()["tier"] is None


def test_tier_and_scopes_are_exclusive_on_the_cli(server: ServerProcess) -> None:
    cmd = [sys.executable, "-m", "server.cli", "keys", "create", "--db", str(server.db), "--name", "k-both"]
    done = subprocess.run(
        [*cmd, "--budget-items", "1", "--tier", "full", "--scopes", "embed"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not allowed with" in done.stderr


def test_scope_algebra() -> None:
    assert granted_scopes({"embed", "classify"}) == scopes_for_tier(Tier.full)
    assert tier_of(scopes_for_tier(Tier.embeddings)) is Tier.embeddings
    assert tier_of({"classify", "tokens"}) is Tier.predictions
    assert tier_of({"classify"}) is None


def test_admin_route_creates_keys_by_tier(tmp_path: Path) -> None:
    settings = ServerSettings(
        db=tmp_path / "admin.db", admin_token="t0ken", model="cbbt-tiny", pretrained="none"
    )
    auth = {"Authorization": "Bearer t0ken"}
    with TestClient(create_app(settings)) as client:
        made = client.post(
            "/admin/keys", headers=auth, json={"name": "p", "budget_items": 5, "tier": "predictions"}
        )
        assert made.status_code == 201, made.text
        record = made.json()["record"]
        assert record["tier"] == "predictions" and record["scopes"] == ["classify", "tokens"]
        both = client.post(
            "/admin/keys",
            headers=auth,
            json={"name": "q", "budget_items": 5, "tier": "full", "scopes": ["embed"]},
        )
        assert_error(both, 400, "invalid_request")  # type: ignore[arg-type]
        bad = client.post("/admin/keys", headers=auth, json={"name": "r", "budget_items": 5, "tier": "gold"})
        assert_error(bad, 400, "invalid_request")  # type: ignore[arg-type]
        assert bad.json()["error"]["param"] == "tier"


def test_outside_the_tier_is_refused_before_any_decoding(server: ServerProcess) -> None:
    key = _create(server, "k-emb-early", "--tier", "embeddings")
    with server.client(key) as client:
        response = client.post("/v1/classify", json={"images": ["not an image"], "texts": ["a cat"]})
    assert_error(response, 403, "tier_not_allowed")  # not 400 invalid_base64: nothing was decoded
