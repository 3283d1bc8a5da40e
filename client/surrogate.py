"""A local linear model of the class text features, minimised in a trust region.

The scalar estimators (client/estimators.py) use one number per prompt the API embeds: its
loss. The API returns more than that: each prompt's C class text features. Near the current
prompt θ those features are a smooth map T(θ) ∈ R^{C×D}, and the loss is a known, cheap
function of them, computed here on cached image features. So one antithetic pair along a
direction u gives the derivative of all C·D features along u, one column J·u of the Jacobian,
and each step gives one more column for free: the secant ΔT / Δθ between two prompts already
evaluated. From the last `memory` columns the stepper fits the model

    T(x + Q a) ≈ T(x) + B a        (Q: an orthonormal basis of the probed directions)

and minimises the exact loss of the modelled features over a inside a trust region. The
region's radius follows how well the model predicted the last step (the textbook rule:
Nocedal & Wright, ch. 4). POUNDERS uses the same idea for least-squares residuals.

Each step costs 1 + 2q prompts in one oracle call, the same as q antithetic directions of the
scalar estimator. The gain comes from using the features the API already returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from client.estimators import _WORK_DTYPE, default_mu, evaluate
from client.oracle import TextLossOracle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurrogateConfig:
    """Settings of `SurrogateTrustRegion`.

    directions: q new random directions probed per step (two prompts each).
    mu: finite-difference radius; None → max(1/d, 1e-3), as the scalar estimator.
    memory: Jacobian columns kept (newest first); older ones were measured at other prompts.
    decay: weight of a column per step of age, where columns disagree (secants overlap probes).
    radius: the first trust radius, as a fraction of |θ₀| (the scale of the model's token
        embeddings, whatever the model); max_radius caps it likewise.
    inner_iterations: projected Adam iterations that minimise the model's loss in the region.
    """

    directions: int = 4
    mu: float | None = None
    memory: int = 24
    decay: float = 0.9
    radius: float = 0.1
    max_radius: float = 1.0
    inner_iterations: int = 60

    def __post_init__(self) -> None:
        if self.directions < 1:
            raise ValueError("directions must be ≥ 1")
        if self.mu is not None and not self.mu > 0:
            raise ValueError("mu must be positive")
        if self.memory < self.directions:
            raise ValueError("memory must hold at least one step's directions")
        if not 0 < self.decay <= 1:
            raise ValueError("decay must be in (0, 1]")
        if not 0 < self.radius <= self.max_radius:
            raise ValueError("need 0 < radius <= max_radius")
        if self.inner_iterations < 1:
            raise ValueError("inner_iterations must be ≥ 1")

    @classmethod
    def for_probes(
        cls, directions: int, mu: float | None, *, memory: int, radius: float, max_radius: float
    ) -> SurrogateConfig:
        """The settings a tuner's flags ask for, the memory raised to hold one step's probes
        however many directions a step draws (faithful's q = 256 exceeds the default 24)."""
        return cls(directions, mu, max(memory, directions), radius=radius, max_radius=max_radius)


@dataclass(frozen=True)
class SurrogateStep:
    """One step: the next prompt to evaluate, the loss and features at the prompt evaluated."""

    proposal: torch.Tensor  # flat [d], float64
    loss: float
    texts: torch.Tensor  # [C, D] at the prompt passed in


class SurrogateTrustRegion:
    """Trust-region steps on a linear model of the text features (see the module docstring).

    The stepper keeps an incumbent x, the best prompt so far under the current step's loss.
    Each call evaluates the prompt it proposed last time (its "centre") with 2q probes around
    it, keeps it as the incumbent if its loss is lower, and proposes x + Q a*. Where the loss
    changes between steps (a new mini-batch, a refitted weight), the incumbent's loss is
    recomputed from its stored features, which costs no query.
    """

    def __init__(self, theta0: torch.Tensor, config: SurrogateConfig, generator: torch.Generator) -> None:
        self.dim = theta0.numel()
        if config.directions > self.dim:
            raise ValueError(
                f"{config.directions} directions a step cannot be orthogonal in {self.dim} dimensions"
            )
        self.config = config
        self.generator = generator
        self.mu = config.mu if config.mu is not None else default_mu(self.dim)
        scale = float(theta0.detach().double().norm()) or 1.0
        self.radius = config.radius * scale
        self.max_radius = config.max_radius * scale
        self.min_radius = 2.0 * self.mu
        self._s = torch.zeros(0, self.dim, dtype=_WORK_DTYPE)  # displacements in θ
        self._y = torch.zeros(0, 0, dtype=_WORK_DTYPE)  # the text features' displacements
        self._age = torch.zeros(0, dtype=_WORK_DTYPE)
        self._incumbent: torch.Tensor | None = None
        self._incumbent_texts: torch.Tensor | None = None
        self._predicted = 0.0  # the model's predicted decrease for the pending proposal
        self._step_norm = 0.0
        self.accepted = 0
        self.rejected = 0

    @property
    def points_per_step(self) -> int:
        return 1 + 2 * self.config.directions

    # -- one step ---------------------------------------------------------------------------
    def step(self, theta: torch.Tensor, oracle: TextLossOracle) -> SurrogateStep:
        centre = theta.detach().reshape(-1).to(dtype=_WORK_DTYPE, device="cpu")
        directions = self._new_directions()
        points = torch.cat([centre[None], centre + self.mu * directions, centre - self.mu * directions])
        losses = evaluate(oracle, points.to(dtype=theta.dtype))
        if oracle.text_features is None:
            raise RuntimeError("the surrogate stepper needs the oracle's text features")
        texts = oracle.text_features.detach().to(_WORK_DTYPE)
        centre_texts, loss = texts[0], float(losses[0])
        self._age = self._age + 1.0
        self._judge(centre, centre_texts, loss, oracle)
        q = self.config.directions
        self._remember(2.0 * self.mu * directions, texts[1 : q + 1] - texts[q + 1 :])
        assert self._incumbent is not None and self._incumbent_texts is not None
        basis, model = self._fit()
        move, self._predicted = self._solve(oracle, self._incumbent_texts, model)
        self._step_norm = float(move.norm())
        logger.debug(
            "surrogate: loss %.5f radius %.4g step %.4g predicted decrease %.3g (k=%d)",
            loss, self.radius, self._step_norm, self._predicted, basis.shape[1],
        )  # fmt: skip
        return SurrogateStep(self._incumbent + basis @ move, loss, texts[0])

    def _judge(self, centre: torch.Tensor, texts: torch.Tensor, loss: float, oracle: TextLossOracle) -> None:
        """Accept or reject the last proposal, update the radius, remember the secant."""
        if self._incumbent is None or self._incumbent_texts is None:
            self._incumbent, self._incumbent_texts = centre.clone(), texts.clone()
            return
        with torch.no_grad():
            incumbent_loss = float(oracle.loss_of_texts(self._incumbent_texts.float()))
        actual = incumbent_loss - loss
        if self._predicted > 0:
            ratio = actual / self._predicted
            if ratio < 0.25:
                self.radius = max(0.5 * self._step_norm, self.min_radius)
            elif ratio > 0.75 and self._step_norm > 0.9 * self.radius:
                self.radius = min(2.0 * self.radius, self.max_radius)
        secant = centre - self._incumbent
        if float(secant.norm()) > 0:
            self._remember(secant[None], (texts - self._incumbent_texts)[None])
        if actual > 0:
            self._incumbent, self._incumbent_texts = centre.clone(), texts.clone()
            self.accepted += 1
        else:
            self.rejected += 1

    # -- the model --------------------------------------------------------------------------
    def _new_directions(self) -> torch.Tensor:
        """q orthonormal directions, orthogonal to the newest probed ones where room allows."""
        q = self.config.directions
        gaussian = torch.randn(q, self.dim, generator=self.generator, dtype=_WORK_DTYPE)
        room = self.dim - q
        if self._s.shape[0] and room > 0:
            recent = self._orthonormal_rows(self._s[-room:])
            gaussian = gaussian - (gaussian @ recent.T) @ recent
        return self._orthonormal_rows(gaussian)

    @staticmethod
    def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
        _, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
        keep = sigma > sigma.max() * 1e-9
        return vh[keep]

    def _remember(self, displacements: torch.Tensor, feature_change: torch.Tensor) -> None:
        flat = feature_change.reshape(feature_change.shape[0], -1)
        if self._y.shape[1] != flat.shape[1]:
            # The first pairs, or the class set changed: older columns no longer apply.
            self._s, self._y, self._age = self._s[:0], flat[:0], self._age[:0]
        keep = self.config.memory
        self._s = torch.cat([self._s, displacements])[-keep:]
        self._y = torch.cat([self._y, flat])[-keep:]
        self._age = torch.cat([self._age, torch.zeros(displacements.shape[0], dtype=_WORK_DTYPE)])[-keep:]

    def _fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q [d, k], B [C·D, k]): weighted least squares of the feature changes on the
        displacements' coordinates in Q, newer columns weighing more where they disagree."""
        _, sigma, vh = torch.linalg.svd(self._s, full_matrices=False)
        basis = vh[sigma > sigma.max() * 1e-8].T  # [d, k]
        coords = self._s @ basis  # [m, k]
        weights = self.config.decay**self._age
        weighted = coords * weights[:, None]
        gram = coords.T @ weighted
        ridge = 1e-10 * float(torch.trace(gram)) * torch.eye(gram.shape[0], dtype=_WORK_DTYPE)
        model = torch.linalg.solve(gram + ridge, weighted.T @ self._y).T  # [C·D, k]
        return basis, model

    def _solve(
        self, oracle: TextLossOracle, texts: torch.Tensor, model: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """argmin over |a| <= radius of the loss at T(x) + B a (projected Adam); the decrease."""
        shape = texts.shape
        base = texts.float()
        jac = model.float()
        move = torch.zeros(jac.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([move], lr=self.radius / 10.0)
        with torch.no_grad():
            start = float(oracle.loss_of_texts(base))
        best, best_loss = move.detach().clone(), start
        for _ in range(self.config.inner_iterations):
            value = oracle.loss_of_texts(base + (jac @ move).reshape(shape))
            if float(value.detach()) < best_loss:
                best, best_loss = move.detach().clone(), float(value.detach())
            # autograd.grad, not backward: the loss may pass through an adapter whose
            # parameters must not collect gradients from the model's inner solve.
            (move.grad,) = torch.autograd.grad(value, [move])
            optimizer.step()
            with torch.no_grad():
                norm = float(move.norm())
                if norm > self.radius:
                    move.mul_(self.radius / norm)
        with torch.no_grad():
            final = float(oracle.loss_of_texts(base + (jac @ move).reshape(shape)))
        if final < best_loss:
            best, best_loss = move.detach().clone(), final
        return best.to(_WORK_DTYPE), start - best_loss

    # -- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "generator_state": self.generator.get_state().clone(),
            "s": self._s,
            "y": self._y,
            "age": self._age,
            "scalars": torch.tensor(
                [self.radius, self._predicted, self._step_norm, self.accepted, self.rejected],
                dtype=_WORK_DTYPE,
            ),
        }
        if self._incumbent is not None and self._incumbent_texts is not None:
            state["incumbent"] = self._incumbent
            state["incumbent_texts"] = self._incumbent_texts
        return {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"].to(torch.uint8))
        self._s, self._y, self._age = (state[n].to(_WORK_DTYPE).clone() for n in ("s", "y", "age"))
        radius, predicted, step_norm, accepted, rejected = state["scalars"].tolist()
        self.radius, self._predicted, self._step_norm = radius, predicted, step_norm
        self.accepted, self.rejected = int(accepted), int(rejected)
        if "incumbent" in state:
            self._incumbent = state["incumbent"].to(_WORK_DTYPE).clone()
            self._incumbent_texts = state["incumbent_texts"].to(_WORK_DTYPE).clone()
