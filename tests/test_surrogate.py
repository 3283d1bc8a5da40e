"""The surrogate stepper (client/surrogate.py) on synthetic text-feature oracles: exact on a
linear feature map, better than the scalar estimator at equal prompts on a smooth non-linear
one, never farther from its incumbent than the trust radius, resumable bit for bit."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from client.estimators import EstimatorConfig
from client.steppers import cosine_with_warmup, make_stepper, points_per_step
from client.surrogate import SurrogateConfig, SurrogateTrustRegion


class FeatureOracle:
    """Prompts [P, d] -> class features [P, C, D] through a fixed map, the loss computed from
    the features on fixed images, as the client's PromptLoss does."""

    def __init__(self, dim: int, *, linear: bool, seed: int = 0, classes: int = 6, width: int = 24) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights = torch.randn(classes, width, dim, generator=g) / dim**0.5
        self.offset = torch.randn(classes, width, generator=g)
        self.images = torch.randn(90, width, generator=g)
        self.labels = torch.randint(0, classes, (90,), generator=g)
        self.linear = linear
        self.text_features: torch.Tensor | None = None
        self.calls = 0
        self.points = 0

    def features(self, points: torch.Tensor) -> torch.Tensor:
        raw = torch.einsum("cwd,pd->pcw", self.weights, points.float()) + self.offset
        return raw if self.linear else torch.tanh(raw)

    def loss_of_texts(self, texts: torch.Tensor) -> torch.Tensor:
        logits = 10.0 * F.normalize(self.images, dim=-1) @ F.normalize(texts, dim=-1).T
        return F.cross_entropy(logits, self.labels)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.points += points.shape[0]
        self.text_features = self.features(points)
        with torch.no_grad():
            return torch.stack([self.loss_of_texts(t) for t in self.text_features])

    def loss_at(self, theta: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.loss_of_texts(self.features(theta.reshape(1, -1))[0]))


def stepper(name: str, theta: torch.Tensor, seed: int = 1):  # type: ignore[no-untyped-def]
    return make_stepper(
        name, theta, torch.Generator().manual_seed(seed),
        estimator=EstimatorConfig(directions=4, antithetic=True, orthogonal=True),
        lr=5e-2, weight_decay=5e-4, lr_at=cosine_with_warmup(60, 0, 5e-2, 5e-2),
    )  # fmt: skip


def run_steps(name: str, oracle: FeatureOracle, theta: torch.Tensor, steps: int) -> torch.Tensor:
    s = stepper(name, theta)
    for i in range(steps):
        theta = s.step(i, theta, oracle).theta.reshape(theta.shape).float()
    return theta


def test_one_call_of_one_plus_two_q_prompts_per_step() -> None:
    oracle, theta = FeatureOracle(32, linear=False), torch.zeros(1, 32) + 0.1
    s = stepper("surrogate", theta)
    outcome = s.step(0, theta, oracle)
    assert (oracle.calls, oracle.points) == (1, 9) == (1, s.points_per_step)
    assert points_per_step("surrogate", 32, EstimatorConfig(directions=4, antithetic=True)) == 9
    assert outcome.theta.shape == theta.shape
    assert outcome.loss == pytest.approx(oracle.loss_at(theta), rel=1e-5)  # the loss at θ passed in


def test_on_a_linear_feature_map_the_model_predicts_the_step_exactly() -> None:
    dim = 16
    oracle, theta = FeatureOracle(dim, linear=True), torch.full((dim,), 0.2)
    region = SurrogateTrustRegion(
        theta, SurrogateConfig(directions=4, memory=16), torch.Generator().manual_seed(3)
    )
    for _ in range(4):  # 4 × 4 probes span all 16 dimensions: the model is the map itself
        before = oracle.loss_at(theta)
        result = region.step(theta, oracle)
        theta = result.proposal.float()
    predicted = region._predicted
    after = oracle.loss_at(theta)
    assert predicted > 0
    assert before - after != 0
    best = oracle.loss_at(region._incumbent.float())  # type: ignore[union-attr]
    assert best - after == pytest.approx(predicted, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_it_lowers_a_smooth_loss_more_than_the_scalar_estimator_at_equal_prompts(seed: int) -> None:
    dim = 64
    theta0 = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    finals = {}
    for name in ("estimator", "surrogate"):
        oracle = FeatureOracle(dim, linear=False, seed=seed)
        finals[name] = oracle.loss_at(run_steps(name, oracle, theta0.clone(), 30))
        assert oracle.points == 30 * 9
    start = FeatureOracle(dim, linear=False, seed=seed).loss_at(theta0)
    assert finals["surrogate"] < finals["estimator"] < start


def test_proposals_stay_inside_the_trust_region_around_the_incumbent() -> None:
    dim = 40
    oracle, theta = FeatureOracle(dim, linear=False), torch.full((dim,), 0.3)
    region = SurrogateTrustRegion(theta, SurrogateConfig(), torch.Generator().manual_seed(0))
    incumbent_losses = []
    for _ in range(25):
        result = region.step(theta, oracle)
        assert region._incumbent is not None
        assert float((result.proposal - region._incumbent).norm()) <= region.radius * (1 + 1e-6)
        incumbent_losses.append(oracle.loss_at(region._incumbent.float()))
        theta = result.proposal.float()
    # The incumbent is the best prompt evaluated so far: its loss never goes up.
    assert all(b <= a + 1e-6 for a, b in pairwise(incumbent_losses))
    assert region.accepted > 0


def test_state_dict_round_trip_reproduces_the_next_proposal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dim = 24
    oracle, theta = FeatureOracle(dim, linear=False), torch.full((dim,), 0.1)
    first = SurrogateTrustRegion(theta, SurrogateConfig(), torch.Generator().manual_seed(5))
    for _ in range(6):
        theta = first.step(theta, oracle).proposal.float()
    save_file(first.state_dict(), tmp_path / "s.safetensors")
    second = SurrogateTrustRegion(
        torch.full((dim,), 0.1), SurrogateConfig(), torch.Generator().manual_seed(99)
    )
    second.load_state_dict(load_file(tmp_path / "s.safetensors"))
    a = first.step(theta, oracle).proposal
    b = second.step(theta, oracle).proposal
    assert torch.equal(a, b)
    assert first.radius == second.radius


def test_an_oracle_without_text_losses_is_refused() -> None:
    theta = torch.zeros(8)

    def losses_only(points: torch.Tensor) -> torch.Tensor:
        return points.pow(2).sum(-1)

    with pytest.raises(TypeError, match="loss_of_texts"):
        stepper("surrogate", theta).step(0, theta, losses_only)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [{"directions": 0}, {"mu": 0.0}, {"memory": 2}, {"decay": 0.0}, {"radius": 2.0}, {"inner_iterations": 0}],
)
def test_invalid_configurations_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SurrogateConfig(**bad)  # type: ignore[arg-type]


def test_the_inner_solve_leaves_an_adapter_in_the_loss_without_gradients() -> None:
    dim = 16
    adapter = torch.nn.Linear(24, 24)

    class ThroughAdapter(FeatureOracle):
        def loss_of_texts(self, texts: torch.Tensor) -> torch.Tensor:
            logits = 10.0 * F.normalize(adapter(self.images), dim=-1) @ F.normalize(texts, dim=-1).T
            return F.cross_entropy(logits, self.labels)

    oracle, theta = ThroughAdapter(dim, linear=False), torch.full((dim,), 0.2)
    s = stepper("surrogate", theta)
    for i in range(3):
        theta = s.step(i, theta, oracle).theta
    assert adapter.weight.grad is None and adapter.bias.grad is None


@pytest.mark.parametrize("preset", ["faithful", "fast", "surrogate"])
def test_every_preset_builds_every_stepper(preset: str) -> None:
    """A preset's surrogate settings are valid whatever its q (faithful's 256 exceeds the
    default memory of 48): building any stepper from them never fails."""
    from client.steppers import OPTIMIZERS
    from client.tune_config import tune_config

    cfg = tune_config(preset)
    assert cfg.surrogate_config().memory >= cfg.directions
    for name in OPTIMIZERS:
        built = make_stepper(
            name, torch.zeros(1, 384), torch.Generator().manual_seed(0), estimator=cfg.estimator_config(),
            lr=cfg.prompt_lr, weight_decay=0.0, lr_at=lambda _: cfg.prompt_lr,
            surrogate=cfg.surrogate_config(),
        )  # fmt: skip
        assert built.points_per_step >= 2


def test_more_directions_than_dimensions_is_refused() -> None:
    with pytest.raises(ValueError, match="directions"):
        SurrogateTrustRegion(torch.zeros(3), SurrogateConfig(directions=4), torch.Generator())
