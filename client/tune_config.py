"""The tuner's configuration (CBBT's released hyperparameters by default) and the estimator
presets: named settings of the prompt estimator, configs as data.

Which preset and which settings a *method* uses is the registry's business (client/methods.py);
this module only says what the settings are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from client.errors import RequestError
from client.estimators import EstimatorConfig
from client.model import AdapterKind
from client.surrogate import SurrogateConfig

Method = Literal["cbbt", "cbbt-prompt", "adapter", "zero-shot"]
MODES: tuple[str, ...] = ("cbbt", "cbbt-prompt", "adapter", "zero-shot")


@dataclass(frozen=True)
class TuneConfig:
    """Defaults are CBBT's released hyperparameters (method.md §2-3)."""

    # The tuner's mode (what it trains); the registry name of the method is separate (methods.py).
    method: Method = "cbbt"
    estimator: str = "faithful"  # the preset the prompt settings came from (see ESTIMATOR_PRESETS)
    shots: int = 16
    seed: int = 1
    budget: int | None = None  # items; a hard cap
    # The soft prompt and its estimator.
    init_text: str = "a"
    directions: int = 256
    antithetic: bool = False
    mu: float | None = None
    clip_norm: float | None = 5.0
    subspace_dim: int | None = None
    orthogonal: bool = False
    history: int = 0
    clip_sqrt_d: bool = False
    optimizer: str = "estimator"  # or surrogate, or a peer's: cmaes, spsa-gc, zip (client.steppers)
    # The surrogate's trust region, as fractions of |θ₀|, and its Jacobian memory (columns).
    trust_radius: float = 0.1
    max_trust_radius: float = 1.0
    model_memory: int = 24
    prompt_lr: float = 2e-3
    prompt_weight_decay: float = 5e-4
    warmup_lr: float = 1e-5
    epochs: int = 150
    batch_size: int = 32  # images per prompt step; 0 = every cached training view (no extra queries)
    # The adapter on image features.
    adapter: AdapterKind = "residual"
    adapter_ratio: float = 0.2
    adapter_lr: float = 1e-3
    adapter_weight_decay: float = 1e-4
    adapter_start_epoch: int = 10
    adapter_epochs: int = 100
    adapter_batch_size: int = 32
    # Data and bookkeeping.
    views: int = 2  # cached views per training image (view 0 is the image itself)
    checkpoint_every: int = 5

    @property
    def tunes_prompt(self) -> bool:
        return self.method in ("cbbt", "cbbt-prompt")

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("cbbt", "adapter") and self.adapter != "none"

    @property
    def adapter_kind(self) -> AdapterKind:
        return self.adapter if self.uses_adapter else "none"

    @property
    def adapter_joins_epoch(self) -> int:
        """Prompt-only epochs before the adapter trains beside the prompt (CBBT's schedule)."""
        return self.adapter_start_epoch if self.method == "cbbt" else 0

    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(
            directions=self.directions,
            mu=self.mu,
            antithetic=self.antithetic,
            clip_norm=self.clip_norm,
            subspace_dim=self.subspace_dim,
            orthogonal=self.orthogonal,
            history=self.history,
            clip_sqrt_d=self.clip_sqrt_d,
        )

    def surrogate_config(self) -> SurrogateConfig:
        return SurrogateConfig.for_probes(
            self.directions, self.mu, memory=self.model_memory, radius=self.trust_radius,
            max_radius=self.max_trust_radius,
        )  # fmt: skip


# Named settings of the prompt estimator: configs as data. `faithful` is CBBT's released
# estimator (TuneConfig's defaults); `fast` is cbbt's own (docs/benchmarks/peers.md measures both).
_FAST: dict[str, object] = {
    # Evaluate every perturbed prompt on ALL cached training views: image features are
    # local, so a bigger batch costs no queries and removes mini-batch noise.
    "batch_size": 0,
    # Few antithetic, orthogonal directions per step, many more steps for the same items.
    "directions": 4,
    "antithetic": True,
    "orthogonal": True,
    # Fewer, noisier steps than the faithful schedule's 750 need a larger step.
    "prompt_lr": 5e-2,
    # A Tip-Adapter-F cache added to the prompt's logits keeps the tuned prompt's gain,
    # where a residual adapter on image features tends to absorb it.
    "adapter": "tip",
}
ESTIMATOR_PRESETS: dict[str, dict[str, object]] = {
    "faithful": {},
    "fast": _FAST,
    # `fast`'s probes, but the stepper fits the text features' Jacobian from them and steps in
    # a trust region (client/surrogate.py; measured against CMA-ES in docs/benchmarks/default.md).
    # Where the API returns no features (the prediction tier) it runs as `fast`.
    "surrogate": {**_FAST, "optimizer": "surrogate"},
}


def tune_config(estimator: str = "faithful", **overrides: object) -> TuneConfig:
    """A TuneConfig from a named estimator preset, with explicit settings on top."""
    if estimator not in ESTIMATOR_PRESETS:
        raise RequestError(f"unknown estimator preset {estimator!r}; one of {', '.join(ESTIMATOR_PRESETS)}")
    return TuneConfig(**{**ESTIMATOR_PRESETS[estimator], **overrides, "estimator": estimator})  # type: ignore[arg-type]
