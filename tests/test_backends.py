"""In-process backend tests: the causal cut gives open_clip's own text features."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from server.backends.base import PromptItem
from server.backends.openclip import OpenClipBackend
from server.backends.registry import create_backend

TEXTS = [
    "a photo of a cat.",
    "x",
    "a considerably longer sentence about a small red bicycle leaning on a wall in the rain.",
    "a photo of a golden retriever.",
]


@pytest.fixture(scope="module")
def tiny() -> OpenClipBackend:
    torch.manual_seed(0)
    backend = create_backend("cbbt-tiny", "none")
    assert isinstance(backend, OpenClipBackend)
    return backend


def _reference(backend: OpenClipBackend, texts: list[str]) -> torch.Tensor:
    """open_clip's own path: full-context token ids, its own pooling and normalisation."""
    with torch.inference_mode():
        return backend.model.encode_text(backend.tokenizer(texts), normalize=True).float()


def test_tiny_text_tower_is_causal_and_cut(tiny: OpenClipBackend) -> None:
    assert tiny.causal and tiny.card.causal_text


def test_encode_texts_equals_open_clip(tiny: OpenClipBackend) -> None:
    torch.testing.assert_close(tiny.encode_texts(TEXTS), _reference(tiny, TEXTS), atol=1e-5, rtol=0)


def test_batch_composition_does_not_change_features(tiny: OpenClipBackend) -> None:
    """Each text alone (cut at its own length) equals it inside a batch cut at the longest."""
    together = tiny.encode_texts(TEXTS)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(tiny.encode_texts([text])[0], together[i], atol=1e-5, rtol=0)


def test_encode_prompts_equals_open_clip(tiny: OpenClipBackend) -> None:
    _, context = tiny.token_embeddings("a photo of a")
    names = ["cat", "golden retriever", "cup of coffee", "x"]
    features = tiny.encode_prompts([PromptItem(context, name) for name in names])
    reference = _reference(tiny, [f"a photo of a {name}." for name in names])
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


def test_prompts_of_different_lengths_in_one_batch(tiny: OpenClipBackend) -> None:
    _, short = tiny.token_embeddings("a")
    _, long = tiny.token_embeddings("a blurry low resolution photo of a")
    items = [PromptItem(short, "cat"), PromptItem(long, "dog")]
    features = tiny.encode_prompts(items)
    reference = _reference(tiny, ["a cat.", "a blurry low resolution photo of a dog."])
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


def test_image_features_are_normalised(tiny: OpenClipBackend) -> None:
    pixels = torch.stack([tiny.preprocess(Image.new("RGB", (40, 30), (i * 60, 20, 200))) for i in range(3)])
    features = tiny.encode_images(pixels)
    assert features.shape == (3, tiny.card.feature_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    with torch.inference_mode():
        reference = tiny.model.encode_image(pixels, normalize=True).float()
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
