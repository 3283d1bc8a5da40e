"""Third-party OpenAI clients against a real server with an embeddings-tier key, text and images.

Each client runs unchanged but for the one documented setting it needs here:
- openai: none;
- LangChain `OpenAIEmbeddings`: `check_embedding_ctx_length=False`, so it sends strings (by
  default it tokenizes with tiktoken, which downloads its BPE file at run time, and sends
  OpenAI token ids, which mean nothing to another model's tokenizer: the server answers 400);
- LlamaIndex `OpenAIEmbedding`: `model_name=<served id>` (its `model` must be an OpenAI name);
- LiteLLM: the `openai/` model prefix and `LITELLM_LOCAL_MODEL_COST_MAP=True` (otherwise it
  fetches its price list from the internet when imported).
Images are sent as `data:image/...` URIs, which the server embeds as images without any extra
field. Every answer is checked against the server's own answer for the same input.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.helpers import ServerProcess, image_data_uri, noise_image

TEXTS = ["a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("clients") / "clients.db") as srv:
        yield srv


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return server.create_key("clients", scopes=["embed"])  # the embeddings tier


@pytest.fixture(scope="module")
def model_id(server: ServerProcess, key: str) -> str:
    with server.client(key) as client:
        return str(client.get("/v1/models").json()["data"][0]["id"])


@pytest.fixture(scope="module")
def images() -> list[str]:
    return [image_data_uri(noise_image(seed=seed)) for seed in (11, 12)]


def _reference(server: ServerProcess, key: str, inputs: list[str]) -> np.ndarray:
    with server.client(key) as client:
        response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200, response.text
    return np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def _check(server: ServerProcess, key: str, inputs: list[str], got: list[list[float]]) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), _reference(server, key, inputs), atol=1e-5)


def test_official_openai_client(server: ServerProcess, key: str, model_id: str, images: list[str]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == [model_id]
    for inputs in (TEXTS, images):
        result = client.embeddings.create(model=model_id, input=inputs)
        _check(server, key, inputs, [row.embedding for row in result.data])
    short = client.embeddings.create(model=model_id, input=TEXTS, dimensions=16)
    assert all(len(row.embedding) == 16 for row in short.data)
    with pytest.raises(openai.PermissionDeniedError) as info:  # the embeddings tier: no classify
        client.post("/classify", body={"images": images, "texts": TEXTS}, cast_to=httpx.Response)
    assert info.value.code == "tier_not_allowed"
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length"):
        client.embeddings.create(model=model_id, input=[[1, 2, 3]])


def test_langchain_openai_embeddings(
    server: ServerProcess, key: str, model_id: str, images: list[str]
) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=model_id, base_url=f"{server.url}/v1", api_key=key, check_embedding_ctx_length=False
    )
    _check(server, key, TEXTS, embeddings.embed_documents(TEXTS))
    _check(server, key, TEXTS[:1], [embeddings.embed_query(TEXTS[0])])
    _check(server, key, images, embeddings.embed_documents(images))


def test_llama_index_openai_embedding(
    server: ServerProcess, key: str, model_id: str, images: list[str]
) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    embedding = OpenAIEmbedding(model_name=model_id, api_base=f"{server.url}/v1", api_key=key, max_retries=0)
    _check(server, key, TEXTS, embedding.get_text_embedding_batch(TEXTS))
    _check(server, key, TEXTS[:1], [embedding.get_query_embedding(TEXTS[0])])
    _check(server, key, images, embedding.get_text_embedding_batch(images))


def test_litellm_sdk(
    server: ServerProcess, key: str, model_id: str, images: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    for inputs in (TEXTS, images):
        result = litellm.embedding(
            model=f"openai/{model_id}", api_base=f"{server.url}/v1", api_key=key, input=inputs
        )
        _check(server, key, inputs, [row["embedding"] for row in result.data])
