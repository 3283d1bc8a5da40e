"""Security review, as tests: secrets at rest and in logs, the admin surface, network defaults,
deserialisation, and what the API reveals.

- API keys are stored as SHA-256 hashes (the plaintext is nowhere in the database files) and
  compared with hmac.compare_digest; so is the admin token.
- Admin routes exist only with CBBT_ADMIN_TOKEN, and an API key is not an admin token (nor the
  other way round).
- A real server at debug log level never writes an API key or the admin token to its log.
- The server binds 127.0.0.1 by default; CORS is off unless origins are configured.
- Nothing deserialises pickle: every torch.load is weights_only=True (a malicious checkpoint is
  refused before its code runs), artifacts are safetensors + JSON.
- The API has no route that returns weights or gradients, and a key sees only its own usage.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import io
import pickle
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import SecretStr
from starlette.testclient import TestClient

import client.train as train_module
from client.artifact import Artifact, load_artifact, save_artifact
from client.run_folder import RunFolder
from client.train import read_checkpoint
from server.app import create_app
from server.settings import ServerSettings
from server.store import SqliteStore
from tests.helpers import REPO_ROOT, TINY_MODEL, ServerProcess

ADMIN_TOKEN = "security-admin-token-1f0c7d52b9"
SOURCE_DIRS = ("client", "server", "shared", "benchmarks", "scripts")


def _settings(db: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(model=TINY_MODEL, pretrained="none", db=db, **overrides)


def _app_client(db: Path, store: SqliteStore, **overrides: Any) -> TestClient:
    """The app without its lifespan (no model): enough for auth, admin and usage."""
    return TestClient(create_app(_settings(db, **overrides), store=store), raise_server_exceptions=False)


# -- keys at rest and their comparison ------------------------------------------------------------
def test_keys_are_hashed_at_rest(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    with SqliteStore(db) as store:
        plaintext, key = store.create_key("alice", ["embed"], 100)
        assert store.authenticate(plaintext) == key
        store.reserve(key.id, 3, "r1", "embeddings")
        store.settle("r1", 200)
        # Look while the connection is open, so the write-ahead log still holds the recent pages.
        files = [p for p in tmp_path.iterdir() if p.name.startswith("cbbt.db")]
        raw = b"".join(p.read_bytes() for p in files)
    assert any(p.name.endswith("-wal") for p in files), [p.name for p in files]
    secret_part = plaintext.encode()[len(key.prefix) :]
    assert plaintext.encode() not in raw and secret_part not in raw
    assert hashlib.sha256(plaintext.encode()).hexdigest().encode() in raw  # what is stored instead
    with SqliteStore(db) as store:
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("cbbt.db"))
    assert secret_part not in raw


def test_keys_and_admin_token_are_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.routes.admin as admin_module
    import server.store.sqlite as sqlite_module

    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(sqlite_module.hmac, "compare_digest", spy)
    db = tmp_path / "cbbt.db"
    with SqliteStore(db) as store:
        plaintext, _ = store.create_key("bob", ["embed"], 100)
        assert store.authenticate(plaintext) is not None
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        assert compared == [(digest, digest)]
        compared.clear()
        with _app_client(db, store, admin_token=SecretStr(ADMIN_TOKEN)) as client:
            for token in ("wrong-token", ADMIN_TOKEN, "é-non-ascii"):
                client.get("/admin/keys", headers={"Authorization": f"Bearer {token}".encode()})
    # The spy replaced the one hmac module both files use: every admin check went through it.
    assert admin_module.hmac is sqlite_module.hmac
    tokens = [a for a, b in compared if b == ADMIN_TOKEN.encode()]
    assert len(tokens) == 3, compared


def test_admin_routes_absent_without_a_token_and_refuse_api_keys(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    with SqliteStore(db) as store:
        api_key, _ = store.create_key("carol", ["embed", "classify"], 100)
        for missing in (None, SecretStr("")):
            with _app_client(db, store, admin_token=missing) as client:
                assert (
                    client.get("/admin/keys", headers={"Authorization": f"Bearer {api_key}"}).status_code
                    == 404
                )
                assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/admin")]
        with _app_client(db, store, admin_token=SecretStr(ADMIN_TOKEN)) as client:
            for headers in ({}, {"Authorization": f"Bearer {api_key}"}, {"Authorization": ADMIN_TOKEN}):
                response = client.get("/admin/keys", headers=headers)
                assert response.status_code == 401, (headers, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
            assert (
                client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code
                == 200
            )
            # ... and the admin token is no API key.
            usage = client.get("/v1/usage", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert usage.status_code == 401


def test_secrets_never_reach_the_server_log(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "cbbt.db",
        env={"CBBT_ADMIN_TOKEN": ADMIN_TOKEN},
        extra_args=["--log-level", "debug"],
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        created = client.post("/admin/keys", json={"name": "dave", "budget_items": 50}, headers=admin)
        assert created.status_code == 201, created.text
        api_key = created.json()["key"]
        auth = {"Authorization": f"Bearer {api_key}"}
        assert client.post("/v1/embeddings", json={"input": ["a cat"]}, headers=auth).status_code == 200
        assert client.post("/v1/embeddings", json={"input": ["a"] * 60}, headers=auth).status_code == 429
        assert client.post("/v1/embeddings", json={"input": 3}, headers=auth).status_code == 422
        assert client.get("/v1/usage", headers={"Authorization": f"Bearer {api_key}x"}).status_code == 401
        assert client.get("/admin/keys", headers={"Authorization": f"Bearer {api_key}"}).status_code == 401
        assert client.post("/admin/keys/dave/revoke", headers=admin).status_code == 200
        assert client.get("/v1/usage", headers=auth).status_code == 401
    log = server.log_text()
    assert "POST /v1/embeddings" in log and "/admin/keys" in log  # the log is there
    secret_part = api_key[8:]
    assert api_key not in log and secret_part not in log
    assert ADMIN_TOKEN not in log
    # ... and at rest: the database holds neither.
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("cbbt.db"))
    assert secret_part.encode() not in raw and ADMIN_TOKEN.encode() not in raw


# -- network defaults ----------------------------------------------------------------------------
def test_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBBT_HOST", raising=False)
    assert ServerSettings().host == "127.0.0.1"
    from server.cli import _SERVE_FLAGS

    assert ("--host", "host") in [(flag, name) for flag, name, _, _ in _SERVE_FLAGS]


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with SqliteStore(db) as store:
        with _app_client(db, store) as client:
            for response in (
                client.get("/health", headers={"Origin": "https://evil.example"}),
                client.options("/v1/embeddings", headers=preflight),
            ):
                assert not [h for h in response.headers if h.lower().startswith("access-control-")], (
                    response.headers
                )
        # Configured, it answers for the configured origin only.
        with _app_client(db, store, cors_origins=["https://ok.example"]) as client:
            ok = client.get("/health", headers={"Origin": "https://ok.example"})
            assert ok.headers.get("access-control-allow-origin") == "https://ok.example"
            evil = client.get("/health", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in evil.headers


# -- deserialisation ---------------------------------------------------------------------------------
def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


def test_no_pickle_deserialisation_anywhere_in_the_code() -> None:
    """Every torch.load passes weights_only=True; nothing calls pickle/joblib/dill/np.load(pickle)."""
    torch_loads = 0
    for folder in SOURCE_DIRS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, call in _calls(tree):
                where = f"{path.relative_to(REPO_ROOT)}:{call.lineno}"
                keywords = {k.arg: k.value for k in call.keywords}
                if name.endswith("torch.load"):
                    torch_loads += 1
                    flag = keywords.get("weights_only")
                    assert isinstance(flag, ast.Constant) and flag.value is True, (
                        f"{where}: {ast.unparse(call)}"
                    )
                assert not re.fullmatch(
                    r"(c?pickle|dill|cloudpickle|joblib|_pickle)\.\w*(load|Unpickler)\w*", name
                ), where
                if name.endswith("np.load") or name.endswith("numpy.load"):
                    flag = keywords.get("allow_pickle")
                    assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), where
    assert torch_loads >= 1  # client/train.py's checkpoint


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_malicious_checkpoint_is_refused_before_its_code_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = RunFolder(tmp_path).checkpoint
    torch.save({"step": 3, "theta": torch.zeros(2), "evil": _Payload(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(checkpoint)  # what Tuner._load_checkpoint loads with
    assert not marker.exists()
    # The payload is live: loading it the unsafe way runs it (which is why the client never does).
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()
    assert "weights_only=True" in Path(train_module.__file__).read_text()


def test_artifacts_load_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = Artifact(
        context=torch.randn(2, 8),
        class_names=["cat", "dog"],
        class_text_features=torch.randn(2, 16),
        adapter_kind="none",
        adapter_state=None,
        model_card={"logit_scale": 100.0},
    )
    save_artifact(artifact, tmp_path / "artifact")

    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_artifact(tmp_path / "artifact")
    assert torch.equal(loaded.context, artifact.context) and loaded.class_names == ["cat", "dog"]
    # A pickle dressed up as the tensors file is refused by the safetensors parser, not run.
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    pickle.Pickler(buffer).dump(_Payload(marker))
    (tmp_path / "artifact" / "tensors.safetensors").write_bytes(buffer.getvalue())
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ|invalid"):
        load_artifact(tmp_path / "artifact")
    assert not marker.exists()


# -- what the API reveals --------------------------------------------------------------------------
PUBLIC_ROUTES = {
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/embeddings",
    "/v1/prompt-embeddings",
    "/v1/token-embeddings",
    "/v1/classify",
    "/v1/usage",
}
REVEALING = re.compile(r"(?i)weight|grad|state_dict|checkpoint|parameters|optimizer|logit_bias|hidden")


def _property_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            names.add(key)
            names |= _property_names(value)
        for value in node.values():
            names |= _property_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _property_names(value)
    return names


def test_no_route_returns_weights_or_gradients(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    schema = create_app(_settings(db)).openapi()
    assert set(schema["paths"]) == PUBLIC_ROUTES, "a new route: review what it reveals, then list it here"
    names = _property_names(schema)
    assert not [n for n in names if REVEALING.search(n)], sorted(names)
    card = schema["components"]["schemas"]["ModelCard"]["properties"]
    assert set(card) == {
        "id", "object", "owned_by", "backend", "feature_dim", "token_width", "max_context_vectors",
        "context_length", "logit_scale", "image_size", "causal_text", "has_semantics", "description",
        "limits",
    }  # fmt: skip


def test_a_key_sees_only_its_own_usage(tmp_path: Path) -> None:
    db = tmp_path / "cbbt.db"
    with SqliteStore(db) as store:
        alice, alice_key = store.create_key("alice", ["embed"], 100)
        _, bob_key = store.create_key("bob", ["embed"], 100)
        theirs = [f"bob-{uuid.uuid4().hex}" for _ in range(3)]
        mine = [f"alice-{uuid.uuid4().hex}"]
        for key, ids in ((bob_key, theirs), (alice_key, mine)):
            for request_id in ids:
                store.reserve(key.id, 2, request_id, "embeddings")
                store.settle(request_id, 200)
        with _app_client(db, store) as client:
            auth = {"Authorization": f"Bearer {alice}"}
            for query in ({"recent": 1000}, {"recent": 1000, "key": "bob", "key_id": bob_key.id}):
                usage = client.get("/v1/usage", params=query, headers=auth).json()
                assert usage["key_name"] == "alice" and usage["spent_items"] == 2
                assert [row["request_id"] for row in usage["recent"]] == mine
            text = client.get("/metrics").text
            assert "bob" not in text and "alice" not in text  # metrics carry no per-key labels
