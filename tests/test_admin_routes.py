"""The /admin routes mounted on a throwaway app over a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.errors import install_error_handlers
from server.routes.admin import build_admin_router
from server.store import SqliteStore, Store, StoreUnavailable

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _client(store: Store) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_admin_router(lambda: store, TOKEN))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "admin.db")
    yield s
    s.close()


@pytest.fixture
def client(store: SqliteStore) -> TestClient:
    return _client(store)


def _assert_error(response_json: dict[str, dict[str, str]], code: str) -> None:
    assert response_json["error"]["code"] == code


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {b"Authorization": "Bearer ünï".encode()},
    ],
)
def test_admin_token_required(client: TestClient, headers: dict[str, str] | dict[bytes, bytes]) -> None:
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/keys/a")):
        response = client.request(method, path, headers=headers, json={"name": "a", "budget_items": 1})
        assert response.status_code == 401
        _assert_error(response.json(), "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"


def test_empty_admin_token_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError):
        build_admin_router(lambda: store, "")


def test_create_list_show_top_up_revoke(client: TestClient, store: SqliteStore) -> None:
    created = client.post(
        "/admin/keys",
        headers=AUTH,
        json={"name": "alice", "budget_items": 10, "rpm": 60, "scopes": ["embed"]},
    )
    assert created.status_code == 201
    body = created.json()
    plaintext = body["key"]
    record = body["record"]
    assert plaintext.startswith("cbbt-") and record["prefix"] == plaintext[:8]
    assert (record["name"], record["budget_items"], record["rpm"], record["scopes"]) == (
        "alice",
        10,
        60,
        ["embed"],
    )
    assert store.authenticate(plaintext) is not None

    listed = client.get("/admin/keys", headers=AUTH)
    assert listed.status_code == 200 and [k["name"] for k in listed.json()["data"]] == ["alice"]

    shown = client.get("/admin/keys/alice", headers=AUTH)
    assert shown.status_code == 200 and shown.json()["remaining_items"] == 10

    topped = client.post("/admin/keys/alice/top-up", headers=AUTH, json={"items": 5})
    assert topped.status_code == 200 and topped.json()["budget_items"] == 15

    revoked = client.post("/admin/keys/alice/revoke", headers=AUTH)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert store.authenticate(plaintext) is None

    # The plaintext is shown once, and no hash ever leaves the server.
    for response in (listed, shown, topped, revoked):
        assert plaintext not in response.text and "hash" not in response.text
    assert "hash" not in created.text


def test_default_scopes_and_unlimited_budget(client: TestClient) -> None:
    created = client.post("/admin/keys", headers=AUTH, json={"name": "bob", "budget_items": None})
    assert created.status_code == 201
    record = created.json()["record"]
    assert record["scopes"] == ["classify", "embed"]
    assert record["budget_items"] is None and record["remaining_items"] is None


def test_errors(client: TestClient) -> None:
    assert (
        client.post("/admin/keys", headers=AUTH, json={"name": "alice", "budget_items": 1}).status_code == 201
    )

    duplicate = client.post("/admin/keys", headers=AUTH, json={"name": "alice", "budget_items": 1})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["param"] == "name"

    for bad in ({"name": "x"}, {"name": "9x", "budget_items": 1}, {"name": "x", "budget_items": -1}):
        response = client.post("/admin/keys", headers=AUTH, json=bad)
        assert response.status_code == 400
        _assert_error(response.json(), "invalid_request")

    for method, path in (
        ("GET", "/admin/keys/nobody"),
        ("POST", "/admin/keys/nobody/revoke"),
        ("POST", "/admin/keys/nobody/top-up"),
    ):
        response = client.request(method, path, headers=AUTH, json={"items": 1})
        assert response.status_code == 404
        _assert_error(response.json(), "not_found")

    negative = client.post("/admin/keys/alice/top-up", headers=AUTH, json={"items": -1})
    assert negative.status_code == 400


def test_unavailable_store_is_503(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gone.db")
    store.close()
    response = _client(store).get("/admin/keys", headers=AUTH)
    assert response.status_code == 503
    _assert_error(response.json(), "store_unavailable")
    with pytest.raises(StoreUnavailable):
        store.list_keys()
