"""The client's embeddings tier: the OpenAI-style client on a real server, and the text methods."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.api import CbbtClient
from client.data import few_shot_split, load_dataset
from client.feature_methods import (
    FITS,
    SEARCH_TEMPLATES,
    FeatureConfig,
    FeatureData,
    SearchPool,
    fit_logit_scale,
    search_templates,
)
from client.features import FeatureCache, FeatureStore
from client.methods import method
from client.openai_api import OpenAIEmbeddingsClient, TierNotAllowed, detect_api
from client.run_folder import RunFolder
from client.runner import DataSpec, RunSpec, run_method
from client.wordings import name_wordings, wording_slots
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


# -- class-name wordings in the discrete prompt search ---------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("T-shirt/top", ["T-shirt/top", "T-shirt or top", "T-shirt", "T shirt/top"]),
        ("ankle_boot", ["ankle_boot", "ankle boot"]),
        ("Sea-Lion", ["Sea-Lion", "Sea Lion", "sea-lion", "sea lion"]),
        ("Trouser", ["Trouser", "trouser"]),
        ("zero", ["zero"]),  # nothing to vary: no extra text is bought for it
        ("a / b", ["a / b", "a or b", "a"]),
    ],
)
def test_name_wordings_are_generic_rules(name: str, expected: list[str]) -> None:
    assert name_wordings(name) == expected
    assert name_wordings(name, 1) == [name]


def test_wording_slots_fall_back_to_the_name_as_given() -> None:
    slots = wording_slots(["T-shirt/top", "zero", "ankle_boot"])
    assert slots[0] == ["T-shirt/top", "zero", "ankle_boot"]
    assert slots[1] == ["T-shirt or top", "zero", "ankle boot"]
    assert slots[3] == ["T shirt/top", "zero", "ankle_boot"]
    assert len(slots) == 4


class _WordingEmbedder:
    """Text features where only the spaced wordings ('ankle boot') sit on their class's
    prototype: the search must find that wording slot on the shots alone."""

    def __init__(self, prototypes: dict[str, torch.Tensor]) -> None:
        self.prototypes, self.asked = prototypes, []  # type: list[str]
        self.generator = torch.Generator().manual_seed(7)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.asked += texts
        rows = []
        for text in texts:
            hit = next((p for name, p in self.prototypes.items() if name in text), None)
            noise = torch.randn(hit.shape[0] if hit is not None else 16, generator=self.generator)
            rows.append(F.normalize(hit + 0.1 * noise if hit is not None else noise, dim=-1))
        return torch.stack(rows).numpy()


def test_prompt_search_finds_the_wording_that_fits_and_pays_each_text_once() -> None:
    torch.manual_seed(3)
    names = ["ankle_boot", "sea_lion", "tabby_cat"]
    protos = F.normalize(torch.randn(3, 16), dim=-1)
    embedder = _WordingEmbedder({n.replace("_", " "): protos[i] for i, n in enumerate(names)})
    cfg = FeatureConfig(method="prompt-search")
    pool = SearchPool.of(cfg, names)
    searched = pool.embed(embedder)  # type: ignore[arg-type]
    assert len(embedder.asked) == len(set(embedder.asked)) == pool.items == 2 * 3 * len(cfg.search_templates)
    assert searched.shape == (2 * len(cfg.search_templates), 3, 16)

    def feats(labels: torch.Tensor) -> torch.Tensor:
        return F.normalize(protos[labels] + 0.3 * torch.randn(len(labels), 16), dim=-1)

    y, val_y = torch.arange(3).repeat(8), torch.arange(3).repeat(4)
    text = F.normalize(torch.randn(3, 16), dim=-1)  # the names as given: off the prototypes
    data = FeatureData(torch.stack([feats(y)], 1), y, feats(val_y), val_y, feats(val_y), val_y, text, 20.0,
                       searched, pool.labels)  # fmt: skip
    _, selected = search_templates(cfg, data)
    weights = selected["template_weights"]
    assert isinstance(weights, dict) and weights
    assert all("wording 1: ankle boot, sea lion, tabby cat" in label for label in weights), weights


def test_prompt_search_buys_the_wordings_in_counted_text_queries(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A class-per-folder data set through the embeddings tier: the client pays exactly the
    distinct texts of templates x wordings (plus the run's template and the dimension probe),
    and its count is the server's ledger."""
    folders = {"Sea-Lion": 7, "tabby_cat": 7, "Cat": 7}
    for name, count in folders.items():
        for i in range(count):
            path = tmp_path / "data" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(noise_image(seed=hash(name) % 1000 + i)))
    split = few_shot_split(load_dataset(f"imagefolder:{tmp_path / 'data'}"), 1, 1, max_test_per_class=1)
    assert sorted(split.class_names) == ["Cat", "Sea-Lion", "tabby cat"]
    # Sea-Lion -> {Sea-Lion, Sea Lion, sea-lion, sea lion}; tabby cat -> {tabby cat}; Cat -> {Cat, cat}.
    distinct_names = 4 + 1 + 2
    with SqliteStore(server.db) as store:
        before = store.ledger_total(store.get_key("emb").id)
    with OpenAIEmbeddingsClient(server.url, server.api_key) as api:
        store_ = FeatureStore(api, FeatureCache(tmp_path / "f.sqlite"))
        spec = method("prompt-search")
        run = RunSpec(spec, split, RunFolder(tmp_path / "run"), DataSpec("folder"), 1)
        report = run_method(run, api, store_)
    with SqliteStore(server.db) as store:
        spent = store.ledger_total(store.get_key("emb").id) - before
    assert report.queries["items"] == spent
    texts = report.queries["items"] - report.feature_items_charged
    assert texts == 1 + 3 + len(SEARCH_TEMPLATES) * distinct_names  # probe + template + the search
    assert report.tier == "embeddings"
    weights = report.selected["template_weights"]
    assert isinstance(weights, dict) and sum(weights.values()) >= 1
