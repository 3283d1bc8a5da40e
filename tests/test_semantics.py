"""The default real-weights model ranks the right class first for unambiguous real photos.

scikit-image ships the photos (a cat, a cup of coffee), so nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.helpers import image_data_uri

LABELS = [
    "cat",
    "cup of coffee",
    "rocket",
    "astronaut",
    "dog",
    "car",
    "tree",
    "airplane",
    "bicycle",
    "pizza",
]
PHOTOS = {"chelsea": "cat", "coffee": "cup of coffee"}


def _photo(name: str) -> str:
    pixels = getattr(data, name)()
    return image_data_uri(Image.fromarray(pixels).convert("RGB"), "JPEG")


@pytest.fixture(scope="module")
def photos() -> dict[str, str]:
    return {name: _photo(name) for name in PHOTOS}


def _classify(client: httpx.Client, images: list[str], **prompts: Any) -> dict[str, Any]:
    response = client.post("/v1/classify", json={"images": images, **prompts})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_photos_are_classified_correctly_with_texts(
    devise_client: httpx.Client, photos: dict[str, str]
) -> None:
    names = list(PHOTOS)
    body = _classify(
        devise_client, [photos[n] for n in names], texts=[f"a photo of a {label}." for label in LABELS]
    )
    for row, name in enumerate(names):
        ranked = [LABELS[i] for i in np.argsort(body["logits"][row])[::-1]]
        assert ranked[0] == PHOTOS[name], f"{name}: ranked {ranked[:4]}"
        assert body["predictions"][row] == LABELS.index(PHOTOS[name])


def test_photos_are_classified_correctly_with_a_soft_prompt(
    devise_client: httpx.Client, photos: dict[str, str]
) -> None:
    """The same through the soft-prompt path: context = token embeddings of "a photo of a"."""
    response = devise_client.post(
        "/v1/token-embeddings", json={"text": "a photo of a", "encoding_format": "base64"}
    )
    assert response.status_code == 200, response.text
    names = list(PHOTOS)
    body = _classify(
        devise_client, [photos[n] for n in names], context=response.json()["embedding"], class_names=LABELS
    )
    assert [LABELS[i] for i in body["predictions"]] == [PHOTOS[n] for n in names]


def test_image_features_separate_the_photos(devise_client: httpx.Client, photos: dict[str, str]) -> None:
    response = devise_client.post(
        "/v1/embeddings", json={"input": [photos["chelsea"], photos["coffee"]], "modality": "image"}
    )
    assert response.status_code == 200, response.text
    image_features = np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    response = devise_client.post(
        "/v1/embeddings", json={"input": ["a photo of a cat.", "a photo of a cup of coffee."]}
    )
    text_features = np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    similarity = image_features @ text_features.T
    assert similarity[0, 0] > similarity[0, 1]
    assert similarity[1, 1] > similarity[1, 0]
