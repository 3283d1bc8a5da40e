"""OpenAI conformance of /v1/embeddings and /v1/models, and the OpenAPI document, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import ServerProcess, assert_error, image_data_uri, noise_image

Json = dict[str, Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("conformance") / "c.db") as srv:
        srv.create_key("conformance")
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _rows(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def test_dimensions_truncates_and_renormalises(client: httpx.Client) -> None:
    full = _rows(client.post("/v1/embeddings", json={"input": ["a cat", "a dog"]}))
    short = _rows(client.post("/v1/embeddings", json={"input": ["a cat", "a dog"], "dimensions": 8}))
    assert short.shape == (2, 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    same = _rows(client.post("/v1/embeddings", json={"input": ["a cat"], "dimensions": full.shape[1]}))
    np.testing.assert_allclose(same, full[:1], atol=1e-6)


@pytest.mark.parametrize("dimensions", [0, -3, 10**6])
def test_dimensions_out_of_range_is_400(client: httpx.Client, dimensions: int) -> None:
    response = client.post("/v1/embeddings", json={"input": ["a cat"], "dimensions": dimensions})
    assert assert_error(response, 400, "invalid_request")["param"] == "dimensions"


def test_unknown_field_is_400_naming_it(client: httpx.Client) -> None:
    image = image_data_uri(noise_image(seed=1))
    response = client.post("/v1/embeddings", json={"input": [image], "modalty": "image"})
    error = assert_error(response, 400, "invalid_request")
    assert error["type"] == "invalid_request_error" and error["param"] == "modalty"
    assert "modalty" in error["message"]


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]])
def test_token_id_arrays_are_400_with_a_way_out(client: httpx.Client, tokens: Any) -> None:
    error = assert_error(client.post("/v1/embeddings", json={"input": tokens}), 400, "invalid_request")
    assert error["param"] == "input"
    assert "strings" in error["message"] and "check_embedding_ctx_length=False" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": ["a"], "encoding_format": "int8"}, "encoding_format"),
        ("/v1/classify", {"images": "x", "texts": ["a"]}, "images"),
        ("/v1/token-embeddings", {"text": 3}, "text"),
        ("/v1/prompt-embeddings", {"prompts": [], "class_names": ["a"]}, "prompts"),
    ],
)
def test_validation_errors_are_400_with_param(
    client: httpx.Client, path: str, body: Json, param: str
) -> None:
    error = assert_error(client.post(path, json=body), 400, "invalid_request")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_image_data_uris_are_images_without_modality(client: httpx.Client) -> None:
    images = [image_data_uri(noise_image(seed=s)) for s in (1, 2)]
    implicit = client.post("/v1/embeddings", json={"input": images})
    explicit = client.post("/v1/embeddings", json={"input": images, "modality": "image"})
    np.testing.assert_allclose(_rows(implicit), _rows(explicit), atol=1e-6)
    assert implicit.json()["usage"]["images"] == 2
    mixed = client.post("/v1/embeddings", json={"input": [images[0], "a cat"]})
    assert assert_error(mixed, 400, "invalid_request")["param"] == "input"


def test_models_carry_created_and_owned_by(client: httpx.Client) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert cards and all(isinstance(c["created"], int) and c["created"] > 1_600_000_000 for c in cards)
    assert all(c["owned_by"] == "cbbt" and c["object"] == "model" for c in cards)


def test_openapi_declares_errors_security_and_metrics_type(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert any(s == {"type": "http", "scheme": "bearer", **_extra(s)} for s in schemes.values()), schemes
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    assert embeddings["security"]
    for status in ("400", "401", "403", "404", "409", "413", "415", "429", "500", "503"):
        content = embeddings["responses"][status]["content"]["application/json"]["schema"]
        assert content["$ref"].endswith("/ErrorEnvelope"), (status, content)
    assert "422" not in embeddings["responses"]  # FastAPI's default shape is never answered
    assert "security" not in doc["paths"]["/health"]["get"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def _extra(scheme: Json) -> Json:
    return {k: v for k, v in scheme.items() if k not in ("type", "scheme")}


def test_docs_page_uses_local_assets(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/static-offline-docs/{asset}" in page.text
        served = client.get(f"/static-offline-docs/{asset}")
        assert served.status_code == 200 and len(served.content) > 10_000
