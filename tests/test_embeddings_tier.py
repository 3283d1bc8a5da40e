"""The client's embeddings tier: the OpenAI-style client on a real server, and the text methods."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.api import CbbtClient
from client.feature_methods import FITS, FeatureConfig, FeatureData, fit_logit_scale, search_templates
from client.openai_api import OpenAIEmbeddingsClient, TierNotAllowed, detect_api
from server.store import SqliteStore
from tests.helpers import ServerProcess, image_bytes, noise_image


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("emb-tier") / "e.db") as srv:
        srv.create_key("emb", scopes=["embed"])
        yield srv


def test_openai_client_matches_the_cbbt_client_and_the_ledger(server: ServerProcess) -> None:
    images = [image_bytes(noise_image(seed=s)) for s in range(3)]
    with OpenAIEmbeddingsClient(server.url, server.api_key) as openai_tier:
        card = openai_tier.model_card()
        assert card.logit_scale == 0.0 and card.feature_dim > 0  # dimension from the first answer
        got_images = openai_tier.embed_images(images)
        got_texts = openai_tier.embed_texts(["a cat", "a dog"])
        counted = openai_tier.counter.items
        with pytest.raises(TierNotAllowed, match="full tier"):
            openai_tier.prompt_embeddings(np.zeros((1, 1, 8), np.float32), ["cat"])
    with CbbtClient(server.url, server.api_key) as cbbt:
        np.testing.assert_allclose(got_images, cbbt.embed_images(images), atol=1e-5)
        np.testing.assert_allclose(got_texts, cbbt.embed_texts(["a cat", "a dog"]), atol=1e-5)
        counted += cbbt.counter.items
    with SqliteStore(server.db) as store:
        key = store.get_key("emb")
        assert store.ledger_total(key.id) == counted == 1 + 3 + 2 + 3 + 2  # +1: the dimension probe


def test_detect_api_knows_a_cbbt_server(server: ServerProcess) -> None:
    assert detect_api(server.url, server.api_key) == "cbbt"
    assert detect_api("http://127.0.0.1:9", None) == "cbbt"  # unreachable: the cbbt client reports it


def _synthetic(seed: int = 0) -> FeatureData:
    torch.manual_seed(seed)
    classes, dim = 5, 32
    protos = F.normalize(torch.randn(classes, dim), dim=-1)

    def feats(labels: torch.Tensor) -> torch.Tensor:
        return F.normalize(protos[labels] + 0.8 * torch.randn(len(labels), dim), dim=-1)

    y = torch.arange(40) % classes
    val_y, test_y = torch.arange(20) % classes, torch.arange(50) % classes
    text = F.normalize(protos + 1.2 * torch.randn(classes, dim), dim=-1)  # a poor template
    pool = F.normalize(protos[None] + 0.9 * torch.randn(12, classes, dim), dim=-1)
    train = torch.stack([feats(y), feats(y)], dim=1)
    scale = fit_logit_scale(train, y, text)
    return FeatureData(train, y, feats(val_y), val_y, feats(test_y), test_y, text, scale, pool)


def test_fit_logit_scale_recovers_a_known_temperature() -> None:
    torch.manual_seed(1)
    text = F.normalize(torch.randn(4, 16), dim=-1)
    feats = F.normalize(torch.randn(4000, 16), dim=-1)
    labels = torch.distributions.Categorical(logits=20.0 * feats @ text.T).sample()
    scale = fit_logit_scale(feats[:, None], labels, text)
    assert 15.0 < scale < 27.0


def test_prompt_search_lowers_the_training_loss_and_reports_weights() -> None:
    data = _synthetic()
    cfg = FeatureConfig(method="prompt-search")
    text, selected = search_templates(cfg, data)
    x, y = data.flat_train
    before = F.cross_entropy(data.scale * x @ data.text.T, y)
    after = F.cross_entropy(data.scale * x @ text.T, y)
    weights = selected["template_weights"]
    assert isinstance(weights, dict) and weights
    assert float(after) <= float(before)
    assert set(weights) <= set(cfg.search_templates)


@pytest.mark.parametrize(
    "method", ["zero-shot-text", "residual-adapter", "prompt-search", "prompt-search-tip-f"]
)
def test_text_methods_fit_and_are_deterministic(method: str) -> None:
    data = _synthetic()
    first = FITS[method](FeatureConfig(method=method), data)
    second = FITS[method](FeatureConfig(method=method), data)
    torch.testing.assert_close(first.classifier(data.test), second.classifier(data.test))
    assert first.classifier(data.test).shape == (50, 5)
