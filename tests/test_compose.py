"""The operator surface: docker-compose.yml against the Compose specification, and the image.

No Docker engine runs here, so the files are checked statically: the compose file validates
against the Compose specification's JSON schema (tests/data/compose_spec.json, as shipped in
the `docker-compose` 1.29.2 wheel on PyPI, Apache-2.0), and the properties an operator relies
on are checked one by one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import REPO_ROOT

SCHEMA = REPO_ROOT / "tests" / "data" / "compose_spec.json"
ONE_SHOT = ("keys", "keys-pg", "tune")
SERVING = ("server", "replica", "ray")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return loaded


def _dockerfile() -> str:
    return (REPO_ROOT / "Dockerfile").read_text()


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_would(compose: dict[str, Any]) -> None:
    """The validation has teeth: a misspelt key and a wrong type are both reported."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["server"]["helthcheck"] = {}
    broken["services"]["keys"]["init"] = "yes"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_one_shot_containers_have_no_healthcheck_and_servers_have_one(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ONE_SHOT:
        assert services[name]["healthcheck"] == {"disable": True}, name
    for name in SERVING:
        assert "/ready" in " ".join(services[name]["healthcheck"]["test"]), name
    assert "HEALTHCHECK" not in re.sub(r"#.*", "", _dockerfile())  # it would apply to keys/tune too


def test_every_cbbt_container_has_an_init_process(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("image") == "cbbt:latest":
            assert service.get("init") is True, name


def test_replicated_and_ray_profiles_share_one_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"replicated", "ray"} <= set(services["postgres"]["profiles"])
    for name in ("replica", "ray", "keys-pg"):
        assert services[name]["environment"]["CBBT_DB"].startswith("postgresql://"), name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert "deploy" in services["replica"] and "replicas" in services["replica"]["deploy"]
    for service in services.values():  # published on loopback only
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_the_image_is_pinned_non_root_and_selects_its_torch_index() -> None:
    dockerfile = _dockerfile()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base is not None
    # An exact release (x.y.z) or a digest, never a moving tag like python:3.11-slim.
    assert re.search(r":\d+\.\d+\.\d+|@sha256:", base.group(1)), base.group(1)
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.MULTILINE)
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in dockerfile
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert "HOME=/home/cbbt" in dockerfile and "chown -R cbbt:cbbt /data /runs /home/cbbt" in dockerfile


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= ignored


def test_the_compose_postgres_url_is_one_the_server_accepts(compose: dict[str, Any]) -> None:
    from server.store.factory import is_postgres_url

    assert is_postgres_url(compose["services"]["replica"]["environment"]["CBBT_DB"])
    assert Path(compose["services"]["keys"]["command"][4]).name == "cbbt.db"
