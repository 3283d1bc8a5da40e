"""Shared fixtures: real server processes on loopback (session-scoped: each model loads once).

- `tiny_server`: the tiny random-init open_clip config (`cbbt-tiny`, loads in ~2 s), auth on,
  with a key of a practically unlimited budget; for everything where semantics do not matter.
- `devise_server`: the default real-weights model (no --model flag), auth on, with such a key.
- `tiny_client` / `devise_client`: authenticated httpx clients on them; `*_card`: the model card.

When a test fails, the tail of the log of every server it used is attached to its report.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Generator, Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import ServerProcess


def _start(server: ServerProcess) -> ServerProcess:
    server.create_key("tests")
    return server.start()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("tiny") / "cbbt.db")
    try:
        yield _start(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def devise_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("devise") / "cbbt.db", model=None, pretrained=None)
    try:
        yield _start(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_client(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with tiny_server.client() as client:
        yield client


@pytest.fixture(scope="session")
def devise_client(devise_server: ServerProcess) -> Iterator[httpx.Client]:
    with devise_server.client() as client:
        yield client


@pytest.fixture(scope="session")
def tiny_card(tiny_client: httpx.Client) -> dict[str, Any]:
    response = tiny_client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def devise_card(devise_client: httpx.Client) -> dict[str, Any]:
    response = devise_client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]  # type: ignore[no-any-return]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed:
        seen: set[int] = set()
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, ServerProcess) and id(value) not in seen:
                seen.add(id(value))
                report.sections.append((f"server log ({value.url})", value.log_tail(60)))
    return report


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster on a free loopback port for the whole session.

    Fails (never skips) when the binaries are missing: CI installs Debian's postgresql.
    """
    from tests.pg import PostgresCluster, PostgresMissing

    try:
        cluster = PostgresCluster()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
