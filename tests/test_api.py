"""The HTTP API against real server processes on loopback (tiny random-init model unless noted)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.arrays import decode_array, encode_array
from shared.errors import error_type_for
from shared.schemas import ModelCard
from tests.helpers import (
    ServerProcess,
    assert_error,
    bomb_png,
    data_uri,
    image_bytes,
    image_data_uri,
    noise_image,
)

Json = dict[str, Any]


# -- helpers -----------------------------------------------------------------------------
def _ok(response: httpx.Response) -> Json:
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _embed(client: httpx.Client, inputs: list[str], **extra: Any) -> np.ndarray:
    body = _ok(client.post("/v1/embeddings", json={"input": inputs, **extra}))
    assert [row["index"] for row in body["data"]] == list(range(len(inputs)))
    rows = [row["embedding"] for row in body["data"]]
    if extra.get("encoding_format") == "base64":
        return np.stack([decode_array(row) for row in rows])
    return np.asarray(rows, dtype=np.float32)


def _prompt_cube(
    client: httpx.Client, prompts: list[Any], class_names: list[str], **extra: Any
) -> np.ndarray:
    body = _ok(
        client.post("/v1/prompt-embeddings", json={"prompts": prompts, "class_names": class_names, **extra})
    )
    shape = body["shape"]
    assert shape[:2] == [len(prompts), len(class_names)]
    if isinstance(body["embeddings"], str):
        return decode_array(body["embeddings"], shape)
    return np.asarray(body["embeddings"], dtype=np.float32)


def _token_embeddings(client: httpx.Client, text: str) -> np.ndarray:
    body = _ok(client.post("/v1/token-embeddings", json={"text": text}))
    matrix = np.asarray(body["embedding"], dtype=np.float32)
    assert list(matrix.shape) == body["shape"] == [len(body["tokens"]), matrix.shape[1]]
    return matrix


def _contexts(card: Json, count: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        0.02 * rng.standard_normal((length, card["token_width"])).astype(np.float32) for _ in range(count)
    ]


def _assert_unit_rows(matrix: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=-1), 1.0, atol=1e-5)


CLASS_NAMES = ["cat", "dog", "golden retriever", "cup of coffee", "space shuttle"]


@pytest.fixture(scope="module")
def images() -> list[str]:
    """Two PNG and one JPEG data URI of different sizes and modes."""
    return [
        image_data_uri(noise_image(48, 40, seed=1), "PNG"),
        image_data_uri(noise_image(64, 64, seed=2, mode="L"), "PNG"),
        image_data_uri(noise_image(30, 50, seed=3), "JPEG"),
    ]


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A tiny server with small request limits, auth off."""
    server = ServerProcess(
        Path(tmp_path_factory.mktemp("limited")) / "cbbt.db",
        auth=False,
        extra_args=["--max-items-per-request", "8", "--max-body-bytes", "200000"],
    )
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def limited_client(limited_server: ServerProcess) -> Iterator[httpx.Client]:
    with limited_server.client() as client:
        yield client


# -- service endpoints -------------------------------------------------------------------
def test_health_and_ready_need_no_key(tiny_server: ServerProcess) -> None:
    with httpx.Client(base_url=tiny_server.url) as anonymous:
        assert _ok(anonymous.get("/health")) == {"status": "ok"}
        ready = _ok(anonymous.get("/ready"))
        assert ready["status"] == "ready"
        assert ready["model"] == "open_clip/cbbt-tiny"


def test_metrics_are_prometheus_text(tiny_server: ServerProcess, tiny_client: httpx.Client) -> None:
    _embed(tiny_client, ["a photo of a cat."])
    response = httpx.get(f"{tiny_server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for name in ("cbbt_requests", "cbbt_batch_size", "cbbt_queue_depth", "cbbt_request_latency_seconds"):
        assert name in families, sorted(families)
    requests = [s for s in families["cbbt_requests"].samples if s.labels.get("route") == "/v1/embeddings"]
    assert any(s.labels["status"] == "200" and s.value >= 1 for s in requests), requests
    assert _batches(tiny_server, "text")[0] >= 1


def _batches(server: ServerProcess, modality: str) -> tuple[float, float]:
    """(model batches run, items in them) for one modality, from /metrics."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    values = {
        s.name: s.value for s in families["cbbt_batch_size"].samples if s.labels.get("modality") == modality
    }
    return values.get("cbbt_batch_size_count", 0.0), values.get("cbbt_batch_size_sum", 0.0)


def test_image_batches_have_their_own_cap(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "cbbt.db", extra_args=["--image-batch-max-items", "3"])
    server.create_key("me")
    with server.start(), server.client() as client:
        images = [image_data_uri(noise_image(seed=i)) for i in range(8)]
        assert client.post("/v1/embeddings", json={"input": images}).status_code == 200
        _embed(client, [f"text {i}" for i in range(8)])
        assert _batches(server, "image") == (3, 8)  # 3 + 3 + 2
        assert _batches(server, "text") == (1, 8)  # --batch-max-items (64) still caps texts


def test_docs_and_openapi(tiny_server: ServerProcess) -> None:
    docs = httpx.get(f"{tiny_server.url}/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    spec = _ok(httpx.get(f"{tiny_server.url}/openapi.json"))
    for path in (
        "/v1/models",
        "/v1/embeddings",
        "/v1/prompt-embeddings",
        "/v1/token-embeddings",
        "/v1/classify",
        "/health",
        "/ready",
    ):
        assert path in spec["paths"], sorted(spec["paths"])


# -- model card --------------------------------------------------------------------------
def test_model_card_fields(tiny_client: httpx.Client, tiny_card: Json) -> None:
    listing = _ok(tiny_client.get("/v1/models"))
    assert listing["object"] == "list" and len(listing["data"]) == 1
    card = tiny_card
    assert set(card) == set(ModelCard.model_fields)  # nothing beyond the public card
    assert card["id"] == "open_clip/cbbt-tiny"
    assert card["object"] == "model"
    assert card["backend"] == "open_clip"
    assert card["feature_dim"] == 64
    assert card["token_width"] == 64
    assert card["context_length"] == 77
    assert card["max_context_vectors"] == 64
    assert card["image_size"] == 32
    assert card["causal_text"] is True
    assert card["has_semantics"] is False
    assert card["logit_scale"] > 0
    assert _ok(tiny_client.get(f"/v1/models/{card['id']}")) == card


def test_default_model_card(devise_card: Json) -> None:
    assert set(devise_card) == set(ModelCard.model_fields)
    assert devise_card["id"] == "devise-effnet-minilm"
    assert devise_card["backend"] == "devise"
    assert devise_card["feature_dim"] == 1280
    assert devise_card["token_width"] == 384
    assert devise_card["causal_text"] is False
    assert devise_card["has_semantics"] is True
    assert devise_card["image_size"] == 224


# -- /v1/embeddings ----------------------------------------------------------------------
def test_text_embeddings_float(tiny_client: httpx.Client, tiny_card: Json) -> None:
    texts = ["a photo of a cat.", "a dog", "an extremely long description of a very small red bicycle"]
    body = _ok(tiny_client.post("/v1/embeddings", json={"input": texts, "model": tiny_card["id"]}))
    assert body["object"] == "list"
    assert body["model"] == tiny_card["id"]
    assert body["usage"]["items"] == 3 and body["usage"]["texts"] == 3 and body["usage"]["images"] == 0
    assert all(row["object"] == "embedding" for row in body["data"])
    matrix = np.asarray([row["embedding"] for row in body["data"]], dtype=np.float32)
    assert matrix.shape == (3, tiny_card["feature_dim"])
    _assert_unit_rows(matrix)
    assert not np.allclose(matrix[0], matrix[1])


def test_text_embeddings_single_string(tiny_client: httpx.Client) -> None:
    body = _ok(tiny_client.post("/v1/embeddings", json={"input": "a photo of a cat."}))
    assert len(body["data"]) == 1
    single = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(single, _embed(tiny_client, ["a photo of a cat."])[0], atol=1e-6)


def test_text_embeddings_base64_matches_float(tiny_client: httpx.Client, tiny_card: Json) -> None:
    texts = ["a photo of a cat.", "a photo of a dog."]
    as_float = _embed(tiny_client, texts)
    as_base64 = _embed(tiny_client, texts, encoding_format="base64")
    assert as_base64.dtype == np.float32 and as_base64.shape == (2, tiny_card["feature_dim"])
    _assert_unit_rows(as_base64)
    np.testing.assert_allclose(as_base64, as_float, atol=1e-6)


def test_image_embeddings_from_data_uris(
    tiny_client: httpx.Client, tiny_card: Json, images: list[str]
) -> None:
    body = _ok(tiny_client.post("/v1/embeddings", json={"input": images, "modality": "image"}))
    assert body["usage"]["items"] == 3 and body["usage"]["images"] == 3 and body["usage"]["texts"] == 0
    matrix = np.asarray([row["embedding"] for row in body["data"]], dtype=np.float32)
    assert matrix.shape == (3, tiny_card["feature_dim"])
    _assert_unit_rows(matrix)
    # Bare base64 (no data URI) is accepted too and gives the same features.
    bare = images[0].split(",", 1)[1]
    again = _embed(tiny_client, [bare], modality="image", encoding_format="base64")
    np.testing.assert_allclose(again[0], matrix[0], atol=1e-6)


def test_determinism(tiny_client: httpx.Client, tiny_card: Json, images: list[str]) -> None:
    texts = ["a photo of a cat.", "a diagram", "x"]
    np.testing.assert_array_equal(_embed(tiny_client, texts), _embed(tiny_client, texts))
    np.testing.assert_array_equal(
        _embed(tiny_client, images, modality="image"), _embed(tiny_client, images, modality="image")
    )
    prompts = [encode_array(c) for c in _contexts(tiny_card, 2, 4)]
    np.testing.assert_array_equal(
        _prompt_cube(tiny_client, prompts, CLASS_NAMES), _prompt_cube(tiny_client, prompts, CLASS_NAMES)
    )


def test_openai_client(tiny_server: ServerProcess, tiny_client: httpx.Client, tiny_card: Json) -> None:
    texts = ["a photo of a cat.", "a photo of a dog.", "hello world"]
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=tiny_server.api_key, max_retries=0)
    result = client.embeddings.create(model=tiny_card["id"], input=texts)
    assert result.model == tiny_card["id"]
    vectors = np.asarray([item.embedding for item in result.data], dtype=np.float32)
    assert vectors.shape == (3, tiny_card["feature_dim"])
    np.testing.assert_allclose(vectors, _embed(tiny_client, texts), atol=1e-6)
    explicit = client.embeddings.create(model=tiny_card["id"], input=texts[0], encoding_format="float")
    np.testing.assert_allclose(explicit.data[0].embedding, vectors[0], atol=1e-6)
    # Errors map onto the client's exceptions through the envelope.
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input=texts)
    bad_key = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="cbbt-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.embeddings.create(model=tiny_card["id"], input=texts)


# -- token and prompt embeddings ---------------------------------------------------------
def test_token_embeddings(tiny_client: httpx.Client, tiny_card: Json) -> None:
    body = _ok(tiny_client.post("/v1/token-embeddings", json={"text": "a photo of a"}))
    assert len(body["tokens"]) == 4
    assert body["shape"] == [4, tiny_card["token_width"]]
    as_base64 = _ok(
        tiny_client.post("/v1/token-embeddings", json={"text": "a photo of a", "encoding_format": "base64"})
    )
    np.testing.assert_array_equal(
        decode_array(as_base64["embedding"], as_base64["shape"]),
        np.asarray(body["embedding"], dtype=np.float32),
    )


def test_prompt_embeddings_shape_and_formats(tiny_client: httpx.Client, tiny_card: Json) -> None:
    contexts = _contexts(tiny_card, 3, 4)
    as_floats = [c.tolist() for c in contexts]
    as_base64 = [encode_array(c) for c in contexts]
    body = _ok(
        tiny_client.post("/v1/prompt-embeddings", json={"prompts": as_base64, "class_names": CLASS_NAMES})
    )
    d = tiny_card["feature_dim"]
    assert body["shape"] == [3, len(CLASS_NAMES), d]
    assert body["usage"]["items"] == 3 * len(CLASS_NAMES)
    assert isinstance(body["embeddings"], str)  # base64 is the default answer format here
    cube = decode_array(body["embeddings"], body["shape"])
    _assert_unit_rows(cube)
    from_floats = _prompt_cube(tiny_client, as_floats, CLASS_NAMES)
    np.testing.assert_allclose(from_floats, cube, atol=1e-6)
    float_answer = _prompt_cube(tiny_client, as_base64, CLASS_NAMES, encoding_format="float")
    np.testing.assert_allclose(float_answer, cube, atol=1e-6)
    # Different prompts give different features.
    assert not np.allclose(cube[0], cube[1])


def test_prompt_embeddings_mixed_lengths_match_single_calls(
    tiny_client: httpx.Client, tiny_card: Json
) -> None:
    """Prompts of different lengths in one call each equal their own single-prompt call."""
    contexts = [*_contexts(tiny_card, 1, 2, seed=5), *_contexts(tiny_card, 1, 7, seed=6)]
    together = _prompt_cube(tiny_client, [encode_array(c) for c in contexts], CLASS_NAMES)
    for i, context in enumerate(contexts):
        alone = _prompt_cube(tiny_client, [encode_array(context)], CLASS_NAMES)
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "devise"])
def test_prompt_with_phrase_context_equals_text_embedding(which: str, request: pytest.FixtureRequest) -> None:
    """Context = token embeddings of "a photo of a" + class "cat" == embedding "a photo of a cat."."""
    client: httpx.Client = request.getfixturevalue(f"{which}_client")
    context = _token_embeddings(client, "a photo of a")
    names = ["cat", "dog", "golden retriever"]
    for prompt in (encode_array(context), context.tolist()):
        cube = _prompt_cube(client, [prompt], names)
        texts = _embed(client, [f"a photo of a {name}." for name in names])
        np.testing.assert_allclose(cube[0], texts, atol=1e-5)


# -- /v1/classify ------------------------------------------------------------------------
def test_classify_with_texts(tiny_client: httpx.Client, tiny_card: Json, images: list[str]) -> None:
    texts = [f"a photo of a {name}." for name in CLASS_NAMES]
    body = _ok(tiny_client.post("/v1/classify", json={"images": images, "texts": texts}))
    assert body["model"] == tiny_card["id"]
    assert body["usage"]["items"] == len(images) + len(texts)
    logits = np.asarray(body["logits"])
    probabilities = np.asarray(body["probabilities"])
    assert logits.shape == probabilities.shape == (len(images), len(texts))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert body["predictions"] == logits.argmax(axis=1).tolist()
    image_features = _embed(tiny_client, images, modality="image")
    text_features = _embed(tiny_client, texts)
    expected = tiny_card["logit_scale"] * image_features @ text_features.T
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_classify_with_context(tiny_client: httpx.Client, tiny_card: Json, images: list[str]) -> None:
    context = _contexts(tiny_card, 1, 4, seed=9)[0]
    body = _ok(
        tiny_client.post(
            "/v1/classify",
            json={"images": images, "context": encode_array(context), "class_names": CLASS_NAMES},
        )
    )
    logits = np.asarray(body["logits"])
    assert logits.shape == (len(images), len(CLASS_NAMES))
    image_features = _embed(tiny_client, images, modality="image")
    prompt_features = _prompt_cube(tiny_client, [encode_array(context)], CLASS_NAMES)[0]
    np.testing.assert_allclose(
        logits, tiny_card["logit_scale"] * image_features @ prompt_features.T, atol=1e-4
    )
    # JSON floats give the same answer.
    as_floats = _ok(
        tiny_client.post(
            "/v1/classify", json={"images": images, "context": context.tolist(), "class_names": CLASS_NAMES}
        )
    )
    np.testing.assert_allclose(np.asarray(as_floats["logits"]), logits, atol=1e-4)


# -- bad input: images -------------------------------------------------------------------
def _embed_images(client: httpx.Client, payloads: list[str]) -> httpx.Response:
    return client.post("/v1/embeddings", json={"input": payloads, "modality": "image"})


@pytest.mark.parametrize(
    "payload",
    ["data:image/png;base64,@@@not-base64@@@", "not base64 at all!", "data:image/png;base64,QUJ"],
    ids=["data-uri", "bare", "bad-padding"],
)
def test_malformed_base64_image(tiny_client: httpx.Client, payload: str) -> None:
    error = assert_error(_embed_images(tiny_client, [payload]), 400, "invalid_base64")
    assert error["param"] == "input[0]"


def test_data_uri_without_base64_marker(tiny_client: httpx.Client) -> None:
    assert_error(_embed_images(tiny_client, ["data:image/png,rawdata"]), 400, "invalid_base64")


@pytest.mark.parametrize("mime", ["image/png", None])
def test_non_image_bytes(tiny_client: httpx.Client, mime: str | None) -> None:
    raw = b"this is plain text, not an image at all" * 4
    payload = data_uri(raw, mime) if mime else base64.b64encode(raw).decode()
    assert_error(_embed_images(tiny_client, [payload]), 400, "invalid_image")


def test_declared_format_must_match(tiny_client: httpx.Client) -> None:
    jpeg = image_bytes(noise_image(), "JPEG")
    assert_error(_embed_images(tiny_client, [data_uri(jpeg, "image/png")]), 400, "invalid_image")


@pytest.mark.parametrize("mime", ["image/svg+xml", "application/pdf", "text/plain"])
def test_unsupported_image_type(tiny_client: httpx.Client, mime: str) -> None:
    payload = data_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", mime)
    assert_error(_embed_images(tiny_client, [payload]), 415, "unsupported_image_format")


def test_truncated_png(tiny_client: httpx.Client) -> None:
    raw = image_bytes(noise_image(64, 64), "PNG")
    assert_error(_embed_images(tiny_client, [data_uri(raw[: len(raw) // 2])]), 400, "invalid_image")


def test_truncated_jpeg(tiny_client: httpx.Client) -> None:
    raw = image_bytes(noise_image(64, 64), "JPEG")
    assert_error(
        _embed_images(tiny_client, [data_uri(raw[: len(raw) // 2], "image/jpeg")]), 400, "invalid_image"
    )


@pytest.mark.parametrize("size", [(20000, 20000), (5000, 5000)], ids=["bomb", "over-pixel-limit"])
def test_huge_dimension_png(tiny_client: httpx.Client, size: tuple[int, int]) -> None:
    raw = bomb_png(*size)
    assert len(raw) < 200_000  # small file, huge header
    assert_error(_embed_images(tiny_client, [data_uri(raw)]), 413, "image_too_large")


def test_one_bad_image_fails_the_whole_request(tiny_client: httpx.Client, images: list[str]) -> None:
    error = assert_error(
        _embed_images(tiny_client, [*images, "data:image/png;base64,AAAA"]), 400, "invalid_image"
    )
    assert error["param"] == "input[3]"


def test_bad_image_in_classify(tiny_client: httpx.Client) -> None:
    response = tiny_client.post(
        "/v1/classify", json={"images": ["data:image/svg+xml;base64,AAAA"], "texts": ["a"]}
    )
    error = assert_error(response, 415, "unsupported_image_format")
    assert error["param"] == "images[0]"


# -- bad input: vectors ------------------------------------------------------------------
def _post_prompts(client: httpx.Client, prompts: Any, class_names: list[str] | None = None) -> httpx.Response:
    return client.post(
        "/v1/prompt-embeddings", json={"prompts": prompts, "class_names": class_names or ["cat"]}
    )


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_floats(tiny_client: httpx.Client, tiny_card: Json, literal: str) -> None:
    row = ", ".join(["0.1"] * (tiny_card["token_width"] - 1) + [literal])
    content = f'{{"prompts": [[[{row}]]], "class_names": ["cat"]}}'
    response = tiny_client.post(
        "/v1/prompt-embeddings", content=content, headers={"content-type": "application/json"}
    )
    error = assert_error(response, 422, "non_finite_values")
    assert error["param"] == "prompts[0]"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_base64(tiny_client: httpx.Client, tiny_card: Json, value: float) -> None:
    context = _contexts(tiny_card, 1, 3)[0]
    context[1, 5] = value
    assert_error(_post_prompts(tiny_client, [encode_array(context)]), 422, "non_finite_values")


def test_non_finite_context_in_classify(
    tiny_client: httpx.Client, tiny_card: Json, images: list[str]
) -> None:
    context = _contexts(tiny_card, 1, 3)[0]
    context[0, 0] = math.nan
    response = tiny_client.post(
        "/v1/classify", json={"images": images, "context": encode_array(context), "class_names": ["cat"]}
    )
    error = assert_error(response, 422, "non_finite_values")
    assert error["param"] == "context"


def test_wrong_width(tiny_client: httpx.Client, tiny_card: Json) -> None:
    width = tiny_card["token_width"]
    wrong = np.zeros((3, width - 1), dtype=np.float32)
    assert_error(_post_prompts(tiny_client, [wrong.tolist()]), 422, "wrong_shape")
    # base64: a value count that is not a multiple of the width
    assert_error(_post_prompts(tiny_client, [encode_array(np.zeros(width + 1))]), 422, "wrong_shape")
    # base64: a byte count that is not a whole number of float32 values
    assert_error(_post_prompts(tiny_client, [base64.b64encode(b"\0" * 7).decode()]), 422, "wrong_shape")


def test_ragged_and_empty_contexts(tiny_client: httpx.Client, tiny_card: Json) -> None:
    width = tiny_card["token_width"]
    ragged = [[0.1] * width, [0.1] * (width - 3)]
    assert_error(_post_prompts(tiny_client, [ragged]), 422, "wrong_shape")
    assert_error(_post_prompts(tiny_client, [[]]), 422, "wrong_shape")
    assert_error(_post_prompts(tiny_client, [""]), 422, "wrong_shape")


def test_malformed_base64_context(tiny_client: httpx.Client) -> None:
    assert_error(_post_prompts(tiny_client, ["!!!! not base64 !!!!"]), 400, "invalid_base64")


def test_too_many_context_vectors(tiny_client: httpx.Client, tiny_card: Json) -> None:
    context = _contexts(tiny_card, 1, 70)[0]
    assert_error(_post_prompts(tiny_client, [encode_array(context)]), 422, "too_many_context_vectors")
    # The longest allowed context fits a short class name, but not a long one.
    longest = _contexts(tiny_card, 1, tiny_card["max_context_vectors"])[0]
    assert _post_prompts(tiny_client, [encode_array(longest)]).status_code == 200
    long_name = " ".join(["word"] * 20)
    error = assert_error(
        _post_prompts(tiny_client, [encode_array(longest)], ["cat", long_name]),
        422,
        "too_many_context_vectors",
    )
    assert error["param"] == "class_names[1]"


# -- bad input: sizes --------------------------------------------------------------------
def test_no_auth_server_needs_no_key(limited_client: httpx.Client) -> None:
    assert "authorization" not in limited_client.headers
    assert len(_embed(limited_client, ["a", "b"])) == 2


def test_too_many_items(limited_client: httpx.Client, images: list[str]) -> None:
    response = limited_client.post("/v1/embeddings", json={"input": ["a"] * 9})
    assert_error(response, 413, "too_many_items")
    assert _ok(limited_client.post("/v1/embeddings", json={"input": ["a"] * 8}))["usage"]["items"] == 8
    width = _ok(limited_client.get("/v1/models"))["data"][0]["token_width"]
    prompts = [encode_array(np.zeros((2, width)))] * 3
    assert_error(_post_prompts(limited_client, prompts, ["a", "b", "c"]), 413, "too_many_items")  # 3 x 3
    response = limited_client.post("/v1/classify", json={"images": images * 2, "texts": ["a", "b", "c"]})
    assert_error(response, 413, "too_many_items")  # 6 images + 3 classes


def test_body_too_large(limited_server: ServerProcess, limited_client: httpx.Client) -> None:
    big = {"input": ["x" * 1000] * 300}  # ~300 KB > 200 KB
    assert_error(limited_client.post("/v1/embeddings", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies to the stream
        raw = json.dumps(big).encode()
        for start in range(0, len(raw), 16384):
            yield raw[start : start + 16384]

    response = limited_client.post(
        "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "request_too_large")
    assert limited_server.running  # and it still serves
    assert len(_embed(limited_client, ["still alive"])) == 1


# -- bad input: routing, auth, types -----------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": ["a"], "model": "gpt-9"}),
        ("/v1/prompt-embeddings", {"prompts": [[[0.0] * 64]], "class_names": ["a"], "model": "gpt-9"}),
        ("/v1/token-embeddings", {"text": "a", "model": "gpt-9"}),
        ("/v1/classify", {"images": ["AAAA"], "texts": ["a"], "model": "gpt-9"}),
    ],
)
def test_unknown_model(tiny_client: httpx.Client, path: str, body: Json) -> None:
    error = assert_error(tiny_client.post(path, json=body), 404, "model_not_found")
    assert error["param"] == "model"


def test_unknown_model_card(tiny_client: httpx.Client) -> None:
    assert_error(tiny_client.get("/v1/models/gpt-9"), 404, "model_not_found")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer cbbt-not-a-real-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "invalid", "wrong-scheme", "empty"],
)
def test_missing_or_invalid_key(tiny_server: ServerProcess, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=tiny_server.url, headers=headers) as client:
        error = assert_error(client.post("/v1/embeddings", json={"input": ["a"]}), 401, "invalid_api_key")
        assert error["type"] == error_type_for(401)
        assert_error(client.get("/v1/models"), 401, "invalid_api_key")


def test_unknown_route_and_method(tiny_client: httpx.Client) -> None:
    assert_error(tiny_client.get("/v1/nope"), 404, "not_found")
    assert_error(tiny_client.post("/nope", json={}), 404, "not_found")
    assert_error(tiny_client.get("/v1/embeddings"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": 123}),
        ("/v1/embeddings", {"input": [1, 2]}),
        ("/v1/embeddings", {"input": ["a"], "encoding_format": "hex"}),
        ("/v1/embeddings", {"input": ["a"], "modality": "audio"}),
        ("/v1/embeddings", {}),
        ("/v1/prompt-embeddings", {"prompts": "abc", "class_names": ["a"]}),
        ("/v1/prompt-embeddings", {"prompts": [], "class_names": ["a"]}),
        ("/v1/prompt-embeddings", {"prompts": [[["x"]]], "class_names": ["a"]}),
        ("/v1/prompt-embeddings", {"prompts": ["AAAA"], "class_names": []}),
        ("/v1/token-embeddings", {"text": ["a"]}),
        ("/v1/classify", {"images": [], "texts": ["a"]}),
        ("/v1/classify", {"images": "AAAA", "texts": ["a"]}),
    ],
)
def test_wrong_types(tiny_client: httpx.Client, path: str, body: Json) -> None:
    assert_error(tiny_client.post(path, json=body), 400, "invalid_request")


def test_body_not_json(tiny_client: httpx.Client) -> None:
    response = tiny_client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": ["a", "  "]}, "input[1]"),
        ("/v1/embeddings", {"input": ["a\x00b"]}, "input[0]"),
        ("/v1/classify", {"images": ["AAAA"], "texts": ["a"], "context": "AAAA", "class_names": ["a"]}, None),
        ("/v1/classify", {"images": ["AAAA"]}, None),
        ("/v1/classify", {"images": ["AAAA"], "context": "AAAA"}, "class_names"),
    ],
)
def test_invalid_requests(tiny_client: httpx.Client, path: str, body: Json, param: str | None) -> None:
    error = assert_error(tiny_client.post(path, json=body), 400, "invalid_request")
    assert error["param"] == param


def test_errors_are_not_charged(tiny_server: ServerProcess, tiny_client: httpx.Client) -> None:
    before = _ok(tiny_client.get("/v1/usage"))["spent_items"]
    _embed_images(tiny_client, ["data:image/png;base64,@@@"])
    _post_prompts(tiny_client, [encode_array(np.full((2, 64), math.inf))])
    tiny_client.post("/v1/embeddings", json={"input": ["a"], "model": "gpt-9"})
    assert _ok(tiny_client.get("/v1/usage"))["spent_items"] == before
    _embed(tiny_client, ["a", "b"])
    assert _ok(tiny_client.get("/v1/usage"))["spent_items"] == before + 2
