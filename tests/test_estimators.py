"""Zeroth-order estimators and baseline optimisers on functions with known gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client.estimators import (
    CmaesConfig,
    CmaesOptimizer,
    EstimatorConfig,
    GradientEstimator,
    SpsaGcConfig,
    SpsaGcOptimizer,
    ZerothOrderOptimizer,
    ZipConfig,
    ZipOptimizer,
    default_mu,
)

F64 = torch.float64


@dataclass
class Quadratic:
    """f(θ) = ½ θᵀHθ + bᵀθ, batched, recording every oracle call."""

    hessian: torch.Tensor
    linear: torch.Tensor
    calls: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def random(cls, dim: int, seed: int = 0) -> Quadratic:
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
        return cls(
            hessian=m @ m.T + 0.5 * torch.eye(dim, dtype=F64), linear=torch.randn(dim, generator=g, dtype=F64)
        )

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self.calls.append(points.clone())
        return 0.5 * ((points @ self.hessian) * points).sum(dim=1) + points @ self.linear

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.hessian @ theta + self.linear


def cubic(points: torch.Tensor) -> torch.Tensor:
    return (points**3).sum(dim=1) / 3.0 + 0.5 * (points**2).sum(dim=1)


def cubic_grad(theta: torch.Tensor) -> torch.Tensor:
    return theta**2 + theta


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def make(dim: int, seed: int = 0, **overrides: object) -> GradientEstimator:
    config = EstimatorConfig(**{"clip_norm": None, **overrides})  # type: ignore[arg-type]
    return GradientEstimator(dim, config, torch.Generator().manual_seed(seed))


def directions_from_call(points: torch.Tensor, theta: torch.Tensor, mu: float, q: int) -> torch.Tensor:
    return (points[1 : q + 1] - theta) / mu


def ideal_estimate(dirs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """CBBT's estimate with exact directional derivatives."""
    return (grad.numel() / dirs.shape[0]) * (dirs @ grad) @ dirs


# --------------------------------------------------------------------------------------------
# GradientEstimator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "q", "draws"), [(64, 16, 120), (512, 256, 12)])
def test_mean_cosine_matches_theory(dim: int, q: int, draws: int) -> None:
    # For q uniform directions and exact derivatives E[cos] ≈ sqrt(q / (q + d)); method.md's
    # figures (0.58 at d=512, q=256; 0.33 at d=2048) are this formula.
    f = Quadratic.random(dim)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    cosines = []
    for seed in range(draws):
        estimate = make(dim, seed=seed, directions=q, mu=1e-6).step(theta, f)
        cosines.append(cosine(estimate.grad, f.grad(theta)))
    expected = math.sqrt(q / (q + dim))
    assert sum(cosines) / len(cosines) == pytest.approx(expected, abs=0.03)


def test_estimate_is_unbiased_with_d_over_q_scaling() -> None:
    dim, q, draws = 16, 4, 2000
    f = Quadratic.random(dim)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    estimator = make(dim, directions=q, mu=1e-6)
    mean = torch.stack([estimator.step(theta, f).grad for _ in range(draws)]).mean(dim=0)
    true = f.grad(theta)
    assert float((mean - true).norm() / true.norm()) < 0.1
    assert float(mean.norm() / true.norm()) == pytest.approx(1.0, abs=0.1)


def test_antithetic_is_exact_on_quadratics() -> None:
    dim, q, mu = 32, 8, 0.5  # a large μ: only the symmetric difference stays exact
    f = Quadratic.random(dim)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    estimate = make(dim, directions=q, mu=mu, antithetic=True).step(theta, f)
    dirs = directions_from_call(f.calls[0], theta, mu, q)
    torch.testing.assert_close(estimate.grad, ideal_estimate(dirs, f.grad(theta)), rtol=1e-9, atol=1e-9)


def test_antithetic_has_lower_bias_on_a_cubic() -> None:
    dim, q, mu = 32, 8, 0.05
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=F64)
    errors = {}
    for antithetic in (False, True):
        calls: list[torch.Tensor] = []

        def oracle(points: torch.Tensor, calls: list[torch.Tensor] = calls) -> torch.Tensor:
            calls.append(points)
            return cubic(points)

        estimate = make(dim, seed=7, directions=q, mu=mu, antithetic=antithetic).step(theta, oracle)
        dirs = directions_from_call(calls[0], theta, mu, q)
        errors[antithetic] = float((estimate.grad - ideal_estimate(dirs, cubic_grad(theta))).norm())
    assert errors[True] < 0.1 * errors[False]


def test_orthogonal_full_rank_directions_recover_the_gradient() -> None:
    dim = 24
    f = Quadratic.random(dim)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    estimate = make(dim, directions=dim, orthogonal=True, antithetic=True).step(theta, f)
    torch.testing.assert_close(estimate.grad, f.grad(theta), rtol=1e-8, atol=1e-8)
    dirs = directions_from_call(f.calls[0], theta, default_mu(dim), dim)
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(dim, dtype=F64), rtol=0, atol=1e-9)


def test_orthogonal_with_more_directions_than_dimensions() -> None:
    dim, q = 8, 20
    f = Quadratic.random(dim)
    theta = torch.zeros(dim, dtype=F64)
    estimate = make(dim, directions=q, orthogonal=True).step(theta, f)
    assert estimate.evaluations == 1 + q
    dirs = directions_from_call(f.calls[0], theta, default_mu(dim), q)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(q, dtype=F64))


@pytest.mark.parametrize("antithetic", [False, True])
def test_one_oracle_call_per_step_with_the_documented_population(antithetic: bool) -> None:
    dim, q = 20, 6
    f = Quadratic.random(dim)
    estimator = make(dim, directions=q, antithetic=antithetic)
    theta = torch.randn(dim, dtype=F64)
    estimate = estimator.step(theta, f)
    expected = 1 + (2 * q if antithetic else q)
    assert len(f.calls) == 1
    assert f.calls[0].shape == (expected, dim)
    assert estimate.evaluations == estimator.points_per_step == expected
    torch.testing.assert_close(f.calls[0][0], theta)
    assert estimate.loss == pytest.approx(float(f(theta[None])[0]))


def test_oracle_points_keep_theta_dtype_and_grad_keeps_theta_shape() -> None:
    seen: list[torch.Tensor] = []

    def oracle(points: torch.Tensor) -> torch.Tensor:
        seen.append(points)
        return points.pow(2).sum(dim=1)

    theta = torch.randn(2, 5)  # float32, [M, W] like a context
    estimate = make(10, directions=4).step(theta, oracle)
    assert seen[0].dtype == torch.float32 and seen[0].shape == (5, 10)
    assert estimate.grad.shape == (2, 5) and estimate.grad.dtype == torch.float32


def test_bad_oracle_answers_are_rejected() -> None:
    estimator = make(4, directions=2)
    with pytest.raises(ValueError, match="shape"):
        estimator.step(torch.zeros(4), lambda p: torch.zeros(p.shape[0] + 1))
    with pytest.raises(ValueError, match="non-finite"):
        estimator.step(torch.zeros(4), lambda p: torch.full((p.shape[0],), math.nan))
    with pytest.raises(ValueError, match="elements"):
        estimator.step(torch.zeros(5), lambda p: p.sum(dim=1))


def test_clipping_caps_the_norm() -> None:
    dim = 16
    f = Quadratic.random(dim)
    theta = 10 * torch.ones(dim, dtype=F64)
    estimate = make(dim, directions=8, clip_norm=0.5).step(theta, f)
    assert estimate.clipped and estimate.grad_norm > 0.5
    assert float(estimate.grad.norm()) == pytest.approx(0.5)
    sqrt_d = make(dim, directions=8, clip_norm=0.5, clip_sqrt_d=True).step(theta, f)
    assert float(sqrt_d.grad.norm()) == pytest.approx(math.sqrt(dim))
    subspace = make(dim, directions=8, subspace_dim=4, clip_sqrt_d=True).step(theta, f)
    assert float(subspace.grad.norm()) <= math.sqrt(4) + 1e-9


def test_same_seed_gives_identical_estimates() -> None:
    dim = 32
    f = Quadratic.random(dim)
    theta = torch.randn(dim, dtype=F64)
    a = make(dim, seed=11, directions=8, subspace_dim=10).step(theta, f).grad
    b = make(dim, seed=11, directions=8, subspace_dim=10).step(theta, f).grad
    c = make(dim, seed=12, directions=8, subspace_dim=10).step(theta, f).grad
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"subspace_dim": 12, "orthogonal": True}, {"history": 3, "antithetic": True}],
)
def test_state_dict_round_trip_reproduces_the_next_estimate(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    dim = 32
    f = Quadratic.random(dim)
    theta = torch.randn(dim, dtype=F64)
    original = make(dim, seed=1, directions=8, **overrides)
    for _ in range(4):
        original.step(theta, f)
    save_file(original.state_dict(), str(tmp_path / "estimator.safetensors"))
    expected = original.step(theta, f).grad

    resumed = make(dim, seed=99, directions=8, **overrides)
    resumed.load_state_dict(load_file(str(tmp_path / "estimator.safetensors")))
    assert torch.equal(resumed.step(theta, f).grad, expected)


def test_subspace_directions_and_gradient_lie_in_the_subspace() -> None:
    dim, k, q = 40, 6, 10
    f = Quadratic.random(dim)
    theta = torch.randn(dim, dtype=F64)
    estimator = make(dim, directions=q, subspace_dim=k)
    estimate = estimator.step(theta, f)
    basis = estimator.basis
    assert basis is not None and basis.shape == (dim, k)
    torch.testing.assert_close(basis.T @ basis, torch.eye(k, dtype=F64))
    projector = torch.eye(dim, dtype=F64) - basis @ basis.T
    offsets = f.calls[0][1:] - theta
    assert float((offsets @ projector).abs().max()) < 1e-12
    assert float((projector @ estimate.grad).abs().max()) < 1e-9


def test_subspace_estimate_is_unbiased_for_the_projected_gradient() -> None:
    dim, k, q, draws = 24, 6, 3, 2000
    f = Quadratic.random(dim)
    theta = torch.randn(dim, dtype=F64)
    estimator = make(dim, directions=q, subspace_dim=k, mu=1e-6)
    mean = torch.stack([estimator.step(theta, f).grad for _ in range(draws)]).mean(dim=0)
    assert estimator.basis is not None
    projected = estimator.basis @ (estimator.basis.T @ f.grad(theta))
    assert float((mean - projected).norm() / projected.norm()) < 0.1


def test_history_directions_sharpen_a_steady_gradient_and_stay_unbiased() -> None:
    dim, q = 64, 16
    f = Quadratic.random(dim)
    theta = torch.randn(dim, dtype=F64)
    true = f.grad(theta)
    # The history holds noisy estimates, but their span contains their average, so at a
    # steady gradient the exactly-measured projection grows and the estimate sharpens.
    mean_cosine = {}
    for history in (0, 4):
        estimator = make(dim, directions=q, history=history, mu=1e-6)
        cosines = [cosine(estimator.step(theta, f).grad, true) for _ in range(30)]
        mean_cosine[history] = sum(cosines[10:]) / 20
    assert mean_cosine[0] == pytest.approx(math.sqrt(q / (q + dim)), abs=0.08)
    assert mean_cosine[4] > mean_cosine[0] + 0.15
    assert all(call.shape == (1 + q, dim) for call in f.calls)

    small = Quadratic.random(16)
    point = torch.randn(16, dtype=F64)
    draws = [make(16, seed=s, directions=4, history=1, mu=1e-6) for s in range(600)]
    estimates = []
    for estimator in draws:
        estimator.step(point, small)  # fill the history with one (noisy) estimate
        estimates.append(estimator.step(point, small).grad)
    mean = torch.stack(estimates).mean(dim=0)
    assert float((mean - small.grad(point)).norm() / small.grad(point).norm()) < 0.1


def test_invalid_configurations_are_rejected() -> None:
    with pytest.raises(ValueError):
        EstimatorConfig(directions=0)
    with pytest.raises(ValueError):
        EstimatorConfig(directions=4, history=4)
    with pytest.raises(ValueError):
        GradientEstimator(8, EstimatorConfig(subspace_dim=9), torch.Generator())


# --------------------------------------------------------------------------------------------
# Baseline optimisers
# --------------------------------------------------------------------------------------------


def isotropic(dim: int, seed: int = 0) -> tuple[Quadratic, torch.Tensor]:
    """½‖θ − θ*‖² (as H = I, b = −θ*, up to a constant) and its start θ = 0."""
    target = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return Quadratic(hessian=torch.eye(dim, dtype=F64), linear=-target), torch.zeros(dim, dtype=F64)


def run(optimizer: ZerothOrderOptimizer, f: Quadratic, theta: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        result = optimizer.step(theta, f)
        assert result.evaluations == optimizer.points_per_step
        theta = result.theta
    assert len(f.calls) == steps
    assert all(call.shape[0] == optimizer.points_per_step for call in f.calls)
    return theta


def value(f: Quadratic, theta: torch.Tensor) -> float:
    return float(Quadratic(f.hessian, f.linear)(theta[None])[0])


def test_cmaes_decreases_a_quadratic() -> None:
    dim = 16
    f, theta = isotropic(dim)
    optimizer = CmaesOptimizer(dim, CmaesConfig(sigma0=0.3), torch.Generator().manual_seed(0))
    assert optimizer.subspace_dim == dim and optimizer.points_per_step == 4 + int(3 * math.log(dim))
    start = value(f, theta)
    final = run(optimizer, f, theta, 120)
    minimum = -0.5 * float(f.linear @ f.linear)
    assert value(f, final) - minimum < 0.01 * (start - minimum)
    assert optimizer.best_loss <= value(f, final) + 1e-3
    assert optimizer.best_theta is not None


def test_cmaes_subspace_population_and_resume(tmp_path: Path) -> None:
    dim = 48
    f, anchor = isotropic(dim, seed=1)
    theta = anchor
    config = CmaesConfig(subspace_dim=8, popsize=10, sigma0=0.2)
    optimizer = CmaesOptimizer(dim, config, torch.Generator().manual_seed(3))
    for _ in range(5):
        theta = optimizer.step(theta, f).theta
    save_file(optimizer.state_dict(), str(tmp_path / "cma.safetensors"))
    expected = optimizer.step(theta, f)

    resumed = CmaesOptimizer(dim, config, torch.Generator().manual_seed(42))
    resumed.load_state_dict(load_file(str(tmp_path / "cma.safetensors")))
    replayed = resumed.step(theta, f)
    assert torch.equal(f.calls[-1], f.calls[-2])
    assert torch.equal(replayed.theta, expected.theta)
    assert f.calls[-1].shape == (10, dim)
    offsets = f.calls[-1] - anchor
    projector = torch.eye(dim, dtype=F64) - resumed.basis @ resumed.basis.T
    assert float((offsets @ projector).abs().max()) < 1e-9


def test_cmaes_rejects_a_foreign_theta() -> None:
    f, theta = isotropic(8)
    optimizer = CmaesOptimizer(8, CmaesConfig(), torch.Generator().manual_seed(0))
    optimizer.step(theta, f)
    with pytest.raises(ValueError, match="owns"):
        optimizer.step(theta + 1.0, f)


@pytest.mark.parametrize("perturbation", ["rademacher", "gaussian"])
def test_spsa_gc_decreases_a_quadratic(perturbation: str) -> None:
    dim = 16
    f, theta = isotropic(dim)
    config = SpsaGcConfig(a=0.05, c=0.01, perturbation=perturbation)  # type: ignore[arg-type]
    optimizer = SpsaGcOptimizer(dim, config, torch.Generator().manual_seed(0))
    assert optimizer.points_per_step == 10
    start = value(f, theta)
    final = run(optimizer, f, theta, 150)
    minimum = -0.5 * float(f.linear @ f.linear)
    assert value(f, final) - minimum < 0.05 * (start - minimum)


def test_spsa_gc_gains_evaluate_base_and_resume() -> None:
    config = SpsaGcConfig(a=0.1, c=0.2, offset=2.0, evaluate_base=True, subspace_dim=4)
    optimizer = SpsaGcOptimizer(8, config, torch.Generator().manual_seed(0))
    assert optimizer.gains(0) == pytest.approx((0.1 / 3.0**0.602, 0.2))
    assert optimizer.gains(9) == pytest.approx((0.1 / 12.0**0.602, 0.2 / 10.0**0.101))
    f, theta = isotropic(8)
    result = optimizer.step(theta, f)
    assert result.evaluations == optimizer.points_per_step == 11
    assert result.loss == pytest.approx(value(f, theta))
    state = optimizer.state_dict()
    expected = optimizer.step(result.theta, f).theta
    resumed = SpsaGcOptimizer(8, config, torch.Generator().manual_seed(5))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.step(result.theta, f).theta, expected)


def test_zip_decreases_a_quadratic() -> None:
    dim = 32
    f, theta = isotropic(dim)
    optimizer = ZipOptimizer(dim, ZipConfig(lr=0.1), torch.Generator().manual_seed(0))
    assert optimizer.points_per_step == 11
    start = value(f, theta)
    final = run(optimizer, f, theta, 200)
    minimum = -0.5 * float(f.linear @ f.linear)
    assert value(f, final) - minimum < 0.2 * (start - minimum)
    assert set(optimizer.state_dict()) >= {"generator_state", "basis", "history"}
