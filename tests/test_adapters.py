"""Client-side feature adapters on synthetic features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from client.adapters import (
    LinearProbe,
    ResidualAdapter,
    TipAdapter,
    adapter_state,
    clip_logits,
    search_alpha_beta,
)

DIM, CLASSES, SHOTS = 32, 5, 8


def synthetic(seed: int = 0, shots: int = SHOTS, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features clustered around one random centre per class: separable."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1234)), dim=-1)
    labels = torch.arange(CLASSES).repeat_interleave(shots)
    features = centres[labels] + noise / DIM**0.5 * torch.randn(len(labels), DIM, generator=g)
    return F.normalize(features, dim=-1), labels


def text_features(seed: int = 7) -> torch.Tensor:
    """Class 'text' features unrelated to the image clusters, so zero-shot is poor."""
    return F.normalize(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_logits_is_scaled_cosine() -> None:
    image = torch.randn(4, DIM)
    text = torch.randn(CLASSES, DIM)
    logits = clip_logits(image, text, 100.0)
    assert logits.shape == (4, CLASSES)
    expected = 100.0 * F.cosine_similarity(image[:, None], text[None], dim=-1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def test_residual_adapter_is_unit_norm_and_starts_near_identity() -> None:
    torch.manual_seed(0)
    features, _ = synthetic()
    adapter = ResidualAdapter(DIM)
    with torch.no_grad():
        out = adapter(features)
    assert out.shape == features.shape
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(features)))
    assert float(F.cosine_similarity(out, features).min()) > 0.95
    torch.testing.assert_close(ResidualAdapter(DIM, ratio=0.0)(features), features)
    assert adapter.mlp[0].out_features == DIM // 4


def test_training_residual_adapter_reduces_the_loss() -> None:
    torch.manual_seed(0)
    features, labels = synthetic()
    text = text_features()
    adapter = ResidualAdapter(DIM, ratio=0.5)
    optimiser = torch.optim.Adam(adapter.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return F.cross_entropy(clip_logits(adapter(features), text, 30.0), labels)

    initial = float(loss().detach())
    for _ in range(200):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    assert float(loss().detach()) < 0.5 * initial


def test_tip_adapter_shapes_and_cache_classifies_its_own_keys() -> None:
    features, labels = synthetic()
    adapter = TipAdapter(features, labels, CLASSES, alpha=1.0, beta=50.0)
    assert adapter.keys.shape == (len(labels), DIM) and adapter.values.shape == (len(labels), CLASSES)
    zero_shot = torch.zeros(len(labels), CLASSES)
    logits = adapter(features, zero_shot)
    assert logits.shape == (len(labels), CLASSES)
    assert torch.equal(logits.argmax(dim=1), labels)
    # Exactly: clip_logits + α · exp(−β(1 − f·Kᵀ)) · V.
    expected = (
        2.0 + 1.0 * torch.exp(-50.0 * (1 - features @ F.normalize(features, dim=-1).T)) @ adapter.values
    )
    torch.testing.assert_close(adapter(features, torch.full_like(zero_shot, 2.0)), expected)


def test_tip_adapter_alpha_beta_are_settable_and_keys_trainable() -> None:
    features, labels = synthetic()
    frozen = TipAdapter(features, labels, CLASSES)
    assert not list(frozen.parameters())
    tuned = TipAdapter(features, labels, CLASSES, trainable_keys=True)
    tuned.alpha, tuned.beta = 2.5, 3.0
    assert (tuned.alpha, tuned.beta) == (2.5, 3.0)
    text = text_features()
    queries, query_labels = synthetic(seed=5)
    optimiser = torch.optim.AdamW(tuned.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        return F.cross_entropy(tuned(queries, clip_logits(queries, text, 10.0)), query_labels)

    initial = float(loss().detach())
    for _ in range(50):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    assert tuned.keys.grad is not None
    assert float(loss().detach()) < initial


def test_search_alpha_beta_beats_zero_shot_on_validation() -> None:
    train, train_labels = synthetic()
    val, val_labels = synthetic(seed=3, shots=4)
    adapter = TipAdapter(train, train_labels, CLASSES)
    zero_shot = clip_logits(val, text_features(), 100.0)
    zero_shot_accuracy = float((zero_shot.argmax(1) == val_labels).float().mean())
    found = search_alpha_beta(adapter, val, val_labels, zero_shot, betas=torch.tensor([1.0, 5.0]))
    assert found.beta in (1.0, 5.0) and 0.1 <= found.alpha <= 3.0
    assert found.accuracy >= zero_shot_accuracy
    assert adapter.alpha == 1.0  # search leaves the adapter untouched


def test_linear_probe_separates_the_classes() -> None:
    train, train_labels = synthetic()
    test, test_labels = synthetic(seed=9)
    probe = LinearProbe(DIM, CLASSES).fit(train, train_labels)
    logits = probe.predict_logits(test)
    assert logits.shape == (len(test_labels), CLASSES)
    assert float((logits.argmax(1) == test_labels).float().mean()) > 0.95
    torch.testing.assert_close(probe(test), logits)


def test_state_round_trip_through_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    features, labels = synthetic()
    text = text_features()

    residual = ResidualAdapter(DIM)
    save_file(adapter_state(residual), str(tmp_path / "residual.safetensors"))
    restored = ResidualAdapter(DIM)
    restored.load_state_dict(load_file(str(tmp_path / "residual.safetensors")))
    torch.testing.assert_close(restored(features), residual(features), rtol=0, atol=0)

    tip = TipAdapter(features, labels, CLASSES, alpha=2.0, beta=4.0, trainable_keys=True)
    with torch.no_grad():
        tip.keys.add_(0.01)  # as if fine-tuned: keys no longer unit-norm
    state = adapter_state(tip)
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "tip.safetensors"))
    tip_restored = TipAdapter.from_state_dict(
        load_file(str(tmp_path / "tip.safetensors")), trainable_keys=True
    )
    assert (tip_restored.alpha, tip_restored.beta) == (2.0, 4.0)
    zero_shot = clip_logits(features, text, 100.0)
    torch.testing.assert_close(tip_restored(features, zero_shot), tip(features, zero_shot), rtol=0, atol=0)

    probe = LinearProbe(DIM, CLASSES).fit(features, labels)
    save_file(adapter_state(probe), str(tmp_path / "probe.safetensors"))
    probe_restored = LinearProbe(DIM, CLASSES)
    probe_restored.load_state_dict(load_file(str(tmp_path / "probe.safetensors")))
    torch.testing.assert_close(probe_restored(features), probe(features), rtol=0, atol=0)


def test_tip_adapter_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        TipAdapter(torch.randn(4, DIM), torch.zeros(3, dtype=torch.long), CLASSES)
