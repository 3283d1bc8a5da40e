"""Zeroth-order gradient estimators and baseline black-box optimisers.

Everything here talks to the loss through one batched oracle, `LossOracle`
(client/oracle.py): it takes P flattened
parameter vectors `[P, d]` and returns their P losses `[P]`. The client turns one oracle call
into one HTTP request, so every method asks for *all* the points of a step (the base point
included) in a single call, and reports how many points it evaluated so the query counter
stays honest.

- `GradientEstimator` is CBBT's estimator (method.md §2) plus the query-saving levers of §6:
  antithetic differences, orthogonal directions, a fixed random subspace, √d clipping and a
  history subspace. The caller writes `Estimate.grad` into θ.grad and steps its own optimiser.
- `CmaesOptimizer`, `SpsaGcOptimizer` and `ZipOptimizer` are the peer baselines (method.md §5),
  each a self-contained optimiser behind the `ZerothOrderOptimizer` protocol.

All randomness comes from an injected `torch.Generator`; every class exposes
`state_dict()`/`load_state_dict()` with tensors only (safetensors-friendly, no pickle), so a
resumed run draws the same directions it would have drawn.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import cma
import numpy as np
import numpy.typing as npt
import torch

from client.oracle import LossOracle

logger = logging.getLogger(__name__)


# Estimation runs in float64: finite differences of float32 losses over μ ≈ 1e-3 already lose
# about four digits, and accumulating q terms in float32 would lose more.
_WORK_DTYPE = torch.float64

# ZIP's published intrinsic dimensionality (417 trainable parameters for 8 soft tokens).
ZIP_INTRINSIC_DIM = 417
# CMA-ES keeps a full k×k covariance; beyond ~100 dimensions it learns too slowly for the
# budgets this project runs, so the default subspace stays small.
CMAES_DEFAULT_SUBSPACE = 64


# --------------------------------------------------------------------------------------------
# Results and the shared protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """One gradient estimate.

    `grad` has θ's shape and dtype and is already clipped; `grad_norm` is its norm *before*
    clipping (useful to tune the threshold). `loss` is ℓ(θ) from the same oracle call, and
    `evaluations` counts every point that call evaluated.
    """

    grad: torch.Tensor
    loss: float
    evaluations: int
    grad_norm: float
    clipped: bool


@dataclass(frozen=True)
class StepResult:
    """One optimiser step: the new parameters, the step's reported loss, the points evaluated."""

    theta: torch.Tensor
    loss: float
    evaluations: int


class ZerothOrderOptimizer(Protocol):
    """A black-box optimiser that makes exactly one oracle call per step."""

    @property
    def points_per_step(self) -> int: ...

    def step(self, theta: torch.Tensor, loss_fn: LossOracle) -> StepResult: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def default_mu(dim: int) -> float:
    """CBBT's smoothing radius: μ = max(1/d, 1e-3)."""
    return max(1.0 / dim, 1e-3)


def random_orthonormal_basis(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A `[dim, rank]` matrix with orthonormal columns, Haar-distributed (float64)."""
    if not 0 < rank <= dim:
        raise ValueError(f"rank must be in [1, {dim}], got {rank}")
    gaussian = torch.randn(dim, rank, generator=generator, dtype=_WORK_DTYPE)
    return _orthonormal_columns(gaussian)


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(matrix)
    # QR's sign convention is not random; flipping by sign(diag R) makes Q Haar-distributed,
    # so each column is still uniform on the sphere and the d/q scaling stays unbiased.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).contiguous()


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def clip_norm(vector: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, bool]:
    """Scale `vector` down to L2 norm ≤ max_norm; returns (vector, whether it was scaled)."""
    if max_norm is None:
        return vector, False
    norm = float(vector.norm())
    if norm <= max_norm:
        return vector, False
    return vector * (max_norm / norm), True


def evaluate(loss_fn: LossOracle, points: torch.Tensor) -> torch.Tensor:
    """Ask the oracle for all `points` at once; returns float64 losses on the CPU, validated."""
    losses = loss_fn(points)
    if losses.shape != (points.shape[0],):
        raise ValueError(f"loss oracle returned shape {tuple(losses.shape)}, expected ({points.shape[0]},)")
    losses = losses.detach().to(device="cpu", dtype=_WORK_DTYPE)
    if not bool(torch.isfinite(losses).all()):
        # A NaN would silently poison the gradient and the optimiser state; stop loudly instead.
        raise ValueError("loss oracle returned non-finite losses")
    return losses


def _flat_work_copy(theta: torch.Tensor, dim: int) -> torch.Tensor:
    if theta.numel() != dim:
        raise ValueError(f"theta has {theta.numel()} elements, expected {dim}")
    return theta.detach().reshape(-1).to(device="cpu", dtype=_WORK_DTYPE)


def _as_oracle_points(points: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return points.to(device=like.device, dtype=like.dtype)


def _generator_state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh float64 CPU copy of a loaded tensor. safetensors hands out tensors at arbitrary
    offsets in its buffer, and BLAS kernels round differently on misaligned memory, which would
    break bit-exact resumption; a new allocation is aligned."""
    return tensor.detach().to(device="cpu", dtype=_WORK_DTYPE).clone(memory_format=torch.contiguous_format)


def _packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, unshared CPU copies: what safetensors accepts."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def _lift(search: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Map search-space rows `[n, k]` to parameter space `[n, d]` (identity without a basis)."""
    return search if basis is None else search @ basis.T


# --------------------------------------------------------------------------------------------
# CBBT's gradient estimator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorConfig:
    """Settings of `GradientEstimator`; the defaults are CBBT's released estimator.

    directions: q, the number of random directions per step.
    mu: finite-difference radius; None → max(1/d, 1e-3) with d the parameter dimension.
    antithetic: two-sided differences (ℓ(θ+μu) − ℓ(θ−μu)) / 2μ; 2q perturbed points per step.
    orthogonal: orthonormalise the directions (in blocks of the search dimension if q exceeds it).
    subspace_dim: k; draw directions as u = A z in a fixed random k-dimensional subspace.
    clip_norm: clip the estimate to this L2 norm (None: no clipping).
    clip_sqrt_d: clip at √n instead, n the search dimension (ZIP's rule; overrides clip_norm).
    history: h; spend h of the q directions on an orthonormal basis of the last h estimates.
    """

    directions: int = 256
    mu: float | None = None
    antithetic: bool = False
    orthogonal: bool = False
    subspace_dim: int | None = None
    clip_norm: float | None = 5.0
    clip_sqrt_d: bool = False
    history: int = 0

    def __post_init__(self) -> None:
        if self.directions < 1:
            raise ValueError("directions must be ≥ 1")
        if self.mu is not None and not self.mu > 0:
            raise ValueError("mu must be positive")
        if self.subspace_dim is not None and self.subspace_dim < 1:
            raise ValueError("subspace_dim must be ≥ 1")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if not 0 <= self.history < self.directions:
            raise ValueError("history must be in [0, directions): at least one direction stays random")


class GradientEstimator:
    """Random-direction finite-difference gradient estimator (CBBT, method.md §2).

    With n the search dimension (d, or k with a subspace), m random unit directions u_i and
    coefficients c_i (one-sided (ℓ_i − ℓ_0)/μ, or antithetic (ℓ_i⁺ − ℓ_i⁻)/2μ):

        ĝ = (n / m) Σ_i c_i u_i                        (faithful CBBT: m = q)

    E[ĝ] = ∇ℓ up to O(μ) (the projection of ∇ℓ onto the subspace, with one). With `history = h`
    the first h directions are an orthonormal basis H of the last h estimates and the other
    m = q − h are drawn in H's orthogonal complement (dimension n − h), so

        ĝ = Σ_{j≤h} c_j h_j + ((n − h) / m) Σ_{i>h} c_i u_i

    which is still unbiased, and has less variance when consecutive gradients are aligned.
    Each step evaluates 1 + q points (1 + 2q antithetic): ℓ(θ) is always evaluated, for
    reporting, even where the antithetic estimate does not need it.
    """

    def __init__(self, dim: int, config: EstimatorConfig, generator: torch.Generator) -> None:
        if dim < 1:
            raise ValueError("dim must be ≥ 1")
        if config.subspace_dim is not None and config.subspace_dim > dim:
            raise ValueError(f"subspace_dim {config.subspace_dim} exceeds the dimension {dim}")
        self.dim = dim
        self.config = config
        self.generator = generator
        self.mu = config.mu if config.mu is not None else default_mu(dim)
        self._basis: torch.Tensor | None = (
            random_orthonormal_basis(dim, config.subspace_dim, generator)
            if config.subspace_dim is not None
            else None
        )
        self.search_dim = config.subspace_dim if config.subspace_dim is not None else dim
        if config.history >= self.search_dim:
            raise ValueError("history must be smaller than the search dimension")
        self._history = torch.zeros(0, self.search_dim, dtype=_WORK_DTYPE)

    @property
    def points_per_step(self) -> int:
        """Loss evaluations per step: the base point plus one (or two) per direction."""
        q = self.config.directions
        return 1 + (2 * q if self.config.antithetic else q)

    @property
    def basis(self) -> torch.Tensor | None:
        """The fixed `[d, k]` subspace basis A (orthonormal columns), or None."""
        return self._basis

    @property
    def clip_threshold(self) -> float | None:
        if self.config.clip_sqrt_d:
            return math.sqrt(self.search_dim)
        return self.config.clip_norm

    def step(self, theta: torch.Tensor, loss_fn: LossOracle) -> Estimate:
        """Estimate ∇ℓ(θ) with one oracle call of `points_per_step` points."""
        base = _flat_work_copy(theta, self.dim)
        history_dirs, random_dirs = self._draw_directions()
        search_dirs = torch.cat([history_dirs, random_dirs])
        dirs = _lift(search_dirs, self._basis)

        points = self._perturbed_points(base, dirs)
        losses = evaluate(loss_fn, _as_oracle_points(points, theta))
        loss0 = float(losses[0])
        coeffs = self._coefficients(losses)

        grad_search = self._combine(coeffs, history_dirs, random_dirs)
        self._remember(grad_search)
        raw_norm = float(grad_search.norm())  # A has orthonormal columns: same norm in θ-space
        grad = grad_search if self._basis is None else self._basis @ grad_search
        grad, clipped = clip_norm(grad, self.clip_threshold)
        logger.debug(
            "estimate: loss=%.5f |g|=%.4g clipped=%s points=%d", loss0, raw_norm, clipped, len(points)
        )
        return Estimate(
            grad=grad.reshape(theta.shape).to(device=theta.device, dtype=theta.dtype),
            loss=loss0,
            evaluations=int(points.shape[0]),
            grad_norm=raw_norm,
            clipped=clipped,
        )

    def _draw_directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(history basis `[h', n]`, random unit directions `[q − h', n]`) in search space."""
        history = self._history_basis()
        count = self.config.directions - history.shape[0]
        gaussian = torch.randn(count, self.search_dim, generator=self.generator, dtype=_WORK_DTYPE)
        if history.shape[0]:
            gaussian = gaussian - (gaussian @ history.T) @ history
        if self.config.orthogonal:
            return history, self._orthogonal_rows(gaussian, self.search_dim - history.shape[0])
        return history, unit_rows(gaussian)

    @staticmethod
    def _orthogonal_rows(gaussian: torch.Tensor, block: int) -> torch.Tensor:
        # At most `block` vectors can be mutually orthogonal in the available space, so larger
        # q is handled as several independent orthonormal blocks.
        chunks = [_orthonormal_columns(chunk.T).T for chunk in torch.split(gaussian, block)]
        return torch.cat(chunks)

    def _history_basis(self) -> torch.Tensor:
        if self._history.shape[0] == 0:
            return self._history
        # Any orthonormal basis keeps the estimator unbiased, so a (near) rank-deficient
        # history is harmless: QR still returns orthonormal columns.
        q, _ = torch.linalg.qr(self._history.T)
        return q.T

    def _perturbed_points(self, base: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        forward = base + self.mu * dirs
        if self.config.antithetic:
            return torch.cat([base[None], forward, base - self.mu * dirs])
        return torch.cat([base[None], forward])

    def _coefficients(self, losses: torch.Tensor) -> torch.Tensor:
        q = self.config.directions
        if self.config.antithetic:
            return (losses[1 : q + 1] - losses[q + 1 :]) / (2.0 * self.mu)
        return (losses[1:] - losses[0]) / self.mu

    def _combine(
        self, coeffs: torch.Tensor, history_dirs: torch.Tensor, random_dirs: torch.Tensor
    ) -> torch.Tensor:
        h = history_dirs.shape[0]
        # Directional derivatives along an orthonormal basis give that projection exactly;
        # the random part estimates the rest, scaled by (remaining dimension / its count).
        scale = (self.search_dim - h) / random_dirs.shape[0]
        grad = scale * (coeffs[h:] @ random_dirs)
        if h:
            grad = grad + coeffs[:h] @ history_dirs
        return grad

    def _remember(self, grad_search: torch.Tensor) -> None:
        if self.config.history == 0 or not float(grad_search.norm()) > 0:
            return
        row = (grad_search / grad_search.norm())[None]
        self._history = torch.cat([self._history, row])[-self.config.history :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator state, subspace basis and history: all a resumed run needs to draw alike."""
        state = {"generator_state": _generator_state(self.generator), "history": self._history}
        if self._basis is not None:
            state["basis"] = self._basis
        return _packed(state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"].to(torch.uint8))
        history = _owned(state["history"])
        if history.ndim != 2 or history.shape[1] != self.search_dim:
            raise ValueError("history in state does not match the search dimension")
        self._history = history[-self.config.history :] if self.config.history else history[:0]
        if self._basis is not None:
            basis = _owned(state["basis"])
            if basis.shape != self._basis.shape:
                raise ValueError(f"basis shape {tuple(basis.shape)} != {tuple(self._basis.shape)}")
            self._basis = basis


# --------------------------------------------------------------------------------------------
# Baseline: CMA-ES in a random subspace (BBT / BPT-VLM / CraFT)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CmaesConfig:
    """CMA-ES over θ = θ₀ + A z with A a fixed `[d, k]` orthonormal basis.

    subspace_dim: k; None → min(d, 64).
    popsize: λ; None → pycma's default 4 + ⌊3 ln k⌋ (16 for k = 64).
    sigma0: initial step size in z. A has orthonormal columns, so it is also in θ's units:
        the first population lies at distance ≈ sigma0·√k from θ₀.
    """

    subspace_dim: int | None = None
    popsize: int | None = None
    sigma0: float = 0.1

    def __post_init__(self) -> None:
        if self.subspace_dim is not None and self.subspace_dim < 1:
            raise ValueError("subspace_dim must be ≥ 1")
        if self.popsize is not None and self.popsize < 2:
            raise ValueError("popsize must be ≥ 2")
        if not self.sigma0 > 0:
            raise ValueError("sigma0 must be positive")


class CmaesOptimizer:
    """pycma's CMA-ES in a fixed random subspace; one oracle call of λ points per step.

    The optimiser owns the search state: the θ passed to the first `step` becomes the anchor θ₀,
    and every later call must pass the θ the previous step returned (the distribution mean);
    anything else raises. `StepResult.loss` is the best loss of the step's population (the
    mean itself is never evaluated); `best_theta` / `best_loss` track the best point seen.

    Resuming without pickle: pycma draws its samples through the `randn` option from a private
    generator seeded from the injected one, so the state is (seed, anchor, basis, every step's
    fitness values) and loading replays the ask/tell sequence. Replay costs no oracle calls and
    reproduces the run bit for bit on the same machine and library versions.
    """

    def __init__(self, dim: int, config: CmaesConfig, generator: torch.Generator) -> None:
        self.dim = dim
        self.config = config
        self.subspace_dim = (
            config.subspace_dim if config.subspace_dim is not None else min(dim, CMAES_DEFAULT_SUBSPACE)
        )
        if self.subspace_dim > dim:
            raise ValueError(f"subspace_dim {self.subspace_dim} exceeds the dimension {dim}")
        self._basis = random_orthonormal_basis(dim, self.subspace_dim, generator)
        self._seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._anchor: torch.Tensor | None = None
        self._fitness: list[list[float]] = []
        self.best_loss = math.inf
        self._best_z: npt.NDArray[np.float64] | None = None
        self._es = self._new_strategy()

    def _new_strategy(self) -> cma.CMAEvolutionStrategy:
        sampler = torch.Generator().manual_seed(self._seed)

        def randn(*shape: int) -> npt.NDArray[np.float64]:
            return torch.randn(*shape, generator=sampler, dtype=_WORK_DTYPE).numpy()

        options: dict[str, object] = {
            "randn": randn,
            "seed": math.nan,  # never touch numpy's global RNG
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        if self.config.popsize is not None:
            options["popsize"] = self.config.popsize
        return cma.CMAEvolutionStrategy(np.zeros(self.subspace_dim), self.config.sigma0, options)

    @property
    def points_per_step(self) -> int:
        return int(self._es.popsize)

    @property
    def basis(self) -> torch.Tensor:
        return self._basis

    @property
    def best_theta(self) -> torch.Tensor | None:
        """Best point evaluated so far (float64, flat), or None before the first step."""
        if self._anchor is None or self._best_z is None:
            return None
        return self._to_theta(self._best_z)

    def _to_theta(self, z: npt.NDArray[np.float64]) -> torch.Tensor:
        assert self._anchor is not None
        return self._anchor + self._basis @ torch.from_numpy(np.asarray(z, dtype=np.float64))

    def _mean_theta(self) -> torch.Tensor:
        return self._to_theta(np.asarray(self._es.mean, dtype=np.float64))

    def step(self, theta: torch.Tensor, loss_fn: LossOracle) -> StepResult:
        flat = _flat_work_copy(theta, self.dim)
        self._check_or_anchor(flat)
        solutions = self._es.ask()
        z = torch.from_numpy(np.stack(solutions).astype(np.float64))
        assert self._anchor is not None
        points = self._anchor + z @ self._basis.T
        losses = evaluate(loss_fn, _as_oracle_points(points, theta))
        self._tell(solutions, losses.tolist())
        new_theta = self._mean_theta().reshape(theta.shape).to(device=theta.device, dtype=theta.dtype)
        return StepResult(theta=new_theta, loss=float(losses.min()), evaluations=len(solutions))

    def _check_or_anchor(self, flat: torch.Tensor) -> None:
        if self._anchor is None:
            self._anchor = flat.clone()
            return
        expected = self._mean_theta()
        # The caller may round-trip θ through float32, hence the tolerance.
        if not torch.allclose(flat, expected, rtol=1e-4, atol=1e-5):
            raise ValueError("CmaesOptimizer owns θ: pass the theta returned by the previous step")

    def _tell(self, solutions: list[npt.NDArray[np.float64]], losses: list[float]) -> None:
        self._es.tell(solutions, losses)
        self._fitness.append(losses)
        best = int(np.argmin(losses))
        if losses[best] < self.best_loss:
            self.best_loss = losses[best]
            self._best_z = np.array(solutions[best], dtype=np.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "seed": torch.tensor(self._seed, dtype=torch.int64),
            "basis": self._basis,
            "fitness": torch.tensor(self._fitness, dtype=_WORK_DTYPE).reshape(
                len(self._fitness), self.points_per_step
            ),
        }
        if self._anchor is not None:
            state["anchor"] = self._anchor
        return _packed(state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        basis = _owned(state["basis"])
        if basis.shape != self._basis.shape:
            raise ValueError(f"basis shape {tuple(basis.shape)} != {tuple(self._basis.shape)}")
        self._basis = basis
        self._seed = int(state["seed"])
        self._anchor = _owned(state["anchor"]) if "anchor" in state else None
        self._fitness, self.best_loss, self._best_z = [], math.inf, None
        self._es = self._new_strategy()
        for row in state["fitness"].tolist():
            self._tell(self._es.ask(), row)


# --------------------------------------------------------------------------------------------
# Baseline: SPSA with gradient correction (BlackVIP)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpsaGcConfig:
    """BlackVIP's SPSA-GC. Step k (from 0) uses gains a_k = a/(k+1+o)^α and c_k = c/(k+1)^γ.

    samples: perturbations averaged per step (two points each).
    perturbation: Rademacher ±1 (classic SPSA) or Gaussian entries.
    momentum: β of the Nesterov look-ahead.
    subspace_dim: perturb in a fixed random k-dim subspace (None: all d coordinates).
    evaluate_base: also evaluate ℓ(θ) (one more point) and report it; otherwise the reported
        loss is the mean of the ± pairs, which sit around the look-ahead point θ + β·v.
    """

    a: float = 0.01
    c: float = 0.01
    offset: float = 0.0
    alpha: float = 0.602
    gamma: float = 0.101
    momentum: float = 0.9
    samples: int = 5
    perturbation: Literal["rademacher", "gaussian"] = "rademacher"
    subspace_dim: int | None = None
    evaluate_base: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("samples must be ≥ 1")
        if not (self.a > 0 and self.c > 0):
            raise ValueError("gains a and c must be positive")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")


class SpsaGcOptimizer:
    """Two-sided SPSA averaged over `samples` perturbations with Nesterov look-ahead momentum.

    At step k: y = θ + β v; ĝ = mean_i (ℓ(y + c_k Δ_i) − ℓ(y − c_k Δ_i)) / (2 c_k) · Δ_i;
    v ← β v − a_k ĝ; θ ← θ + v. For Rademacher Δ, multiplying by Δ_i equals SPSA's division
    by Δ_i; for Gaussian Δ it is the Gaussian-smoothing form (dividing would have infinite
    variance). Cost: 2·samples points per step (+1 with `evaluate_base`).
    """

    def __init__(self, dim: int, config: SpsaGcConfig, generator: torch.Generator) -> None:
        if config.subspace_dim is not None and config.subspace_dim > dim:
            raise ValueError(f"subspace_dim {config.subspace_dim} exceeds the dimension {dim}")
        self.dim = dim
        self.config = config
        self.generator = generator
        self._basis = (
            random_orthonormal_basis(dim, config.subspace_dim, generator)
            if config.subspace_dim is not None
            else None
        )
        self.search_dim = config.subspace_dim if config.subspace_dim is not None else dim
        self._velocity = torch.zeros(dim, dtype=_WORK_DTYPE)
        self._k = 0

    @property
    def points_per_step(self) -> int:
        return 2 * self.config.samples + (1 if self.config.evaluate_base else 0)

    def gains(self, k: int) -> tuple[float, float]:
        """(a_k, c_k) for step k counted from 0."""
        cfg = self.config
        return cfg.a / (k + 1 + cfg.offset) ** cfg.alpha, cfg.c / (k + 1) ** cfg.gamma

    def _perturbations(self) -> torch.Tensor:
        shape = (self.config.samples, self.search_dim)
        if self.config.perturbation == "gaussian":
            search = torch.randn(*shape, generator=self.generator, dtype=_WORK_DTYPE)
        else:
            bits = torch.randint(0, 2, shape, generator=self.generator)
            search = bits.to(_WORK_DTYPE) * 2.0 - 1.0
        return _lift(search, self._basis)

    def step(self, theta: torch.Tensor, loss_fn: LossOracle) -> StepResult:
        base = _flat_work_copy(theta, self.dim)
        a_k, c_k = self.gains(self._k)
        lookahead = base + self.config.momentum * self._velocity
        deltas = self._perturbations()
        pairs = torch.cat([lookahead + c_k * deltas, lookahead - c_k * deltas])
        points = torch.cat([base[None], pairs]) if self.config.evaluate_base else pairs
        losses = evaluate(loss_fn, _as_oracle_points(points, theta))
        pair_losses = losses[1:] if self.config.evaluate_base else losses
        s = self.config.samples
        coeffs = (pair_losses[:s] - pair_losses[s:]) / (2.0 * c_k)
        grad = coeffs @ deltas / s
        self._velocity = self.config.momentum * self._velocity - a_k * grad
        self._k += 1
        reported = float(losses[0]) if self.config.evaluate_base else float(pair_losses.mean())
        new_theta = (base + self._velocity).reshape(theta.shape).to(device=theta.device, dtype=theta.dtype)
        return StepResult(theta=new_theta, loss=reported, evaluations=int(points.shape[0]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "generator_state": _generator_state(self.generator),
            "velocity": self._velocity,
            "step": torch.tensor(self._k, dtype=torch.int64),
        }
        if self._basis is not None:
            state["basis"] = self._basis
        return _packed(state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"].to(torch.uint8))
        self._velocity = _owned(state["velocity"])
        self._k = int(state["step"])
        if self._basis is not None:
            basis = _owned(state["basis"])
            if basis.shape != self._basis.shape:
                raise ValueError(f"basis shape {tuple(basis.shape)} != {tuple(self._basis.shape)}")
            self._basis = basis


# --------------------------------------------------------------------------------------------
# Baseline: ZIP-style SPSA in a low-dimensional parameterisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZipConfig:
    """A simplified ZIP: two-sided random-direction differences in a random k-dim subspace,
    the estimate clipped at √k, then plain SGD.

    ZIP's own parameterisation (low-rank factors plus a Fastfood projection, 417 parameters for
    8 tokens) is replaced by a dense orthonormal projection of the same intrinsic dimension.
    subspace_dim: k; None → min(d, 417).
    samples: perturbation pairs per step (ZIP: 5).
    mu: finite-difference radius; None → max(1/d, 1e-3).
    lr: SGD step size. Plain SGD (not Adam) because the √k clip is what sets ZIP's step
        length; Adam's per-coordinate normalisation would undo it.
    """

    subspace_dim: int | None = None
    samples: int = 5
    mu: float | None = None
    lr: float = 0.01

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("samples must be ≥ 1")
        if not self.lr > 0:
            raise ValueError("lr must be positive")


class ZipOptimizer:
    """ZIP-style baseline built on `GradientEstimator` (antithetic, subspace, √k clipping).

    Cost: 1 + 2·samples points per step (the base point is evaluated for the reported loss).
    """

    def __init__(self, dim: int, config: ZipConfig, generator: torch.Generator) -> None:
        k = config.subspace_dim if config.subspace_dim is not None else min(dim, ZIP_INTRINSIC_DIM)
        self.config = config
        self.estimator = GradientEstimator(
            dim,
            EstimatorConfig(
                directions=config.samples,
                mu=config.mu,
                antithetic=True,
                subspace_dim=k,
                clip_norm=None,
                clip_sqrt_d=True,
            ),
            generator,
        )

    @property
    def points_per_step(self) -> int:
        return self.estimator.points_per_step

    def step(self, theta: torch.Tensor, loss_fn: LossOracle) -> StepResult:
        estimate = self.estimator.step(theta, loss_fn)
        new_theta = theta.detach() - self.config.lr * estimate.grad
        return StepResult(theta=new_theta, loss=estimate.loss, evaluations=estimate.evaluations)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.estimator.load_state_dict(state)
