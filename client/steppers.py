"""Prompt steppers: one prompt update per step, from ONE batched oracle call.

The tuning loop needs, from every black-box optimiser, the same three things: the new
prompt, the loss it reports, and the class text features at the current prompt (for
validation-based selection and for the adapter's exact gradient step). `EstimatedGradient`
is CBBT's estimator + Adam; `Baseline` wraps any `ZerothOrderOptimizer` (CMA-ES, SPSA-GC,
ZIP) and appends the current prompt to its population in the same request, so every method
pays for its base-point evaluation the same way and is selected on validation the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch

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
)
from client.oracle import LossOracle, TextLossOracle
from client.surrogate import SurrogateConfig, SurrogateTrustRegion


@dataclass(frozen=True)
class StepOutcome:
    theta: torch.Tensor  # the prompt after the update
    loss: float  # the training loss reported by the optimiser
    base_text: torch.Tensor  # [C, D] text features at the prompt *before* the update


class PromptStepper(Protocol):
    @property
    def points_per_step(self) -> int: ...

    def step(self, index: int, theta: torch.Tensor, oracle: LossOracle) -> StepOutcome: ...

    def state_dict(self) -> dict[str, object]: ...

    def load_state_dict(self, state: dict[str, object]) -> None: ...


def _text_row(oracle: LossOracle, row: int) -> torch.Tensor:
    if oracle.text_features is None:
        raise RuntimeError("the oracle gave no text features: a prompt stepper needs them")
    return oracle.text_features[row]


class EstimatedGradient:
    """CBBT: a random-direction gradient estimate, written into θ.grad, then an AdamW step.

    The learning rate follows `lr_at(step)` (warm-up then cosine, set by the loop's plan).
    """

    def __init__(
        self,
        theta: torch.Tensor,
        config: EstimatorConfig,
        generator: torch.Generator,
        *,
        lr: float,
        weight_decay: float,
        lr_at: Callable[[int], float],
    ) -> None:
        self.param = theta.detach().clone().requires_grad_(True)
        self.estimator = GradientEstimator(theta.numel(), config, generator)
        self.optimizer = torch.optim.AdamW([self.param], lr=lr, weight_decay=weight_decay)
        self.lr_at = lr_at

    @property
    def points_per_step(self) -> int:
        return self.estimator.points_per_step

    def step(self, index: int, theta: torch.Tensor, oracle: LossOracle) -> StepOutcome:
        self.param.data.copy_(theta)
        estimate = self.estimator.step(self.param.detach(), oracle)  # row 0: the base point
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(index)
        self.param.grad = estimate.grad.to(self.param.dtype)
        self.optimizer.step()
        return StepOutcome(self.param.detach().clone(), estimate.loss, _text_row(oracle, 0))

    def state_dict(self) -> dict[str, object]:
        return {"estimator": self.estimator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.estimator.load_state_dict(state["estimator"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]


class _WithBase:
    """The peer's population plus the current prompt as the last point, in the same call."""

    def __init__(self, oracle: LossOracle, base: torch.Tensor) -> None:
        self.oracle = oracle
        self.base = base.detach().reshape(1, -1)
        self.text_features: torch.Tensor | None = None
        self.base_text: torch.Tensor | None = None

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        losses = self.oracle(torch.cat([points, self.base.to(points.dtype)]))
        self.base_text = _text_row(self.oracle, -1)
        assert self.oracle.text_features is not None
        self.text_features = self.oracle.text_features[:-1]
        return losses[:-1]


class Baseline:
    """A peer's zeroth-order optimiser; the current θ rides along as the last point of the call."""

    def __init__(self, optimizer: ZerothOrderOptimizer) -> None:
        self.optimizer = optimizer

    @property
    def points_per_step(self) -> int:
        return self.optimizer.points_per_step + 1

    def step(self, index: int, theta: torch.Tensor, oracle: LossOracle) -> StepOutcome:
        with_base = _WithBase(oracle, theta)
        result = self.optimizer.step(theta.detach(), with_base)
        assert with_base.base_text is not None
        return StepOutcome(result.theta.detach().clone(), result.loss, with_base.base_text)

    def state_dict(self) -> dict[str, object]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]


class Surrogate:
    """cbbt's feature-model stepper (client/surrogate.py): the same 1 + 2q prompts a step as the
    antithetic estimator, but it fits the class text features' Jacobian from them and steps
    in a trust region on the exact loss of the modelled features. Needs an oracle whose loss is
    a function of the text features (`TextLossOracle`): the embeddings and prompt tiers."""

    def __init__(self, theta: torch.Tensor, config: SurrogateConfig, generator: torch.Generator) -> None:
        self.region = SurrogateTrustRegion(theta, config, generator)

    @property
    def points_per_step(self) -> int:
        return self.region.points_per_step

    def step(self, index: int, theta: torch.Tensor, oracle: LossOracle) -> StepOutcome:
        if not hasattr(oracle, "loss_of_texts"):
            raise TypeError("the surrogate stepper needs an oracle with loss_of_texts (text features)")
        result = self.region.step(theta, cast(TextLossOracle, oracle))
        proposal = result.proposal.reshape(theta.shape).to(device=theta.device, dtype=theta.dtype)
        return StepOutcome(proposal, result.loss, result.texts.to(torch.float32))

    def state_dict(self) -> dict[str, object]:
        return {"region": self.region.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.region.load_state_dict(state["region"])  # type: ignore[arg-type]


OPTIMIZERS = ("estimator", "surrogate", "cmaes", "spsa-gc", "zip")


def make_stepper(
    name: str,
    theta: torch.Tensor,
    generator: torch.Generator,
    *,
    estimator: EstimatorConfig,
    lr: float,
    weight_decay: float,
    lr_at: Callable[[int], float],
    surrogate: SurrogateConfig | None = None,
) -> PromptStepper:
    """`surrogate` defaults to the estimator's q directions and μ with the surrogate's own
    trust-region settings."""
    dim = theta.numel()
    if name == "estimator":
        return EstimatedGradient(theta, estimator, generator, lr=lr, weight_decay=weight_decay, lr_at=lr_at)
    if name == "surrogate":
        config = surrogate or SurrogateConfig(directions=estimator.directions, mu=estimator.mu)
        return Surrogate(theta, config, generator)
    if name == "cmaes":
        return Baseline(CmaesOptimizer(dim, CmaesConfig(), generator))
    if name == "spsa-gc":
        return Baseline(SpsaGcOptimizer(dim, SpsaGcConfig(), generator))
    if name == "zip":
        return Baseline(ZipOptimizer(dim, ZipConfig(), generator))
    raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(OPTIMIZERS)}")


def points_per_step(name: str, dim: int, estimator: EstimatorConfig) -> int:
    """Cost of one step in loss evaluations, without building the optimiser's state."""
    if name == "estimator":
        return 1 + (2 if estimator.antithetic else 1) * estimator.directions
    if name == "surrogate":
        return 1 + 2 * estimator.directions
    stepper = make_stepper(
        name,
        torch.zeros(dim),
        torch.Generator().manual_seed(0),
        estimator=estimator,
        lr=1.0,
        weight_decay=0.0,
        lr_at=lambda _: 1.0,
    )
    return stepper.points_per_step


def cosine_with_warmup(steps: int, warmup: int, lr: float, warmup_lr: float) -> Callable[[int], float]:
    def lr_at(step: int) -> float:
        if step < warmup:
            return warmup_lr
        span = max(1, steps - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))

    return lr_at
