"""The prediction-only tier: `/v1/classify` (images + one soft prompt in, logits out) and nothing
that returns a feature. What most black-box tuning papers assume (BBT, BPT-VLM, BlackVIP, ZIP).

The loss-only optimisers (CMA-ES, SPSA-GC, ZIP-style, cbbt's estimator on the loss) tune the
soft prompt through it for real: every loss evaluation is one classify call on the step's image
batch, counted as the server bills it (the images plus the C class prompts encoded). Validation
and test accuracy come from classify calls too, so they are paid like everything else. The start
is the word embedding of the init text from `/v1/token-embeddings`, which this tier includes.

`run_on_predictions` is what `cbbt tune/bench --api predictions` run (client/runner.py):
the budget is planned up front (`ClassifyPlan`), the prompt selected on validation, the test
split scored once, the report written like every other run's (its tier: `predictions`).
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from client.api import CbbtClient
from client.data import Example, FewShotSplit
from client.errors import BudgetTooSmall
from client.features import view_bytes
from client.report import RunReport, finish_report
from client.run_context import RunContext
from client.selection import BATCH_SEED_OFFSET, Best, Selection, labels_of
from client.steppers import PromptStepper, make_stepper, points_per_step
from client.tune_config import TuneConfig, tune_config
from shared.arrays import encode_array
from shared.schemas import API_PREFIX, ClassifyResponse

logger = logging.getLogger(__name__)

__all__ = ["ClassifyClient", "ClassifyLoss", "ClassifyPlan", "PredictionRun", "run_on_predictions",
           "tune_on_predictions"]  # fmt: skip

EVAL_EVERY = 5  # prompt steps between validation scorings (each is paid: val images + prompts)
# Images per loss evaluation when the method says "every cached view" (batch_size 0): that is
# free only on cached features; here every image is re-sent and paid for on every call.
DEFAULT_BATCH = 16


class ClassifyClient(CbbtClient):
    """`CbbtClient` plus `/v1/classify` with a soft prompt: logits, never features."""

    def classify(
        self, images: Sequence[bytes], class_names: Sequence[str], context: np.ndarray
    ) -> torch.Tensor:
        """[N] images x C classes under one [M, W] soft prompt -> [N, C] logits (one call)."""
        body: dict[str, object] = {
            "images": [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in images],
            "class_names": list(class_names),
            "context": encode_array(np.ascontiguousarray(context, dtype=np.float32)),
        }
        answer = self._call(
            "POST",
            f"{API_PREFIX}/classify",
            ClassifyResponse,
            json=body,
            items=len(images) + len(class_names),
        )
        return torch.tensor(answer.logits, dtype=torch.float32)


class ClassifyLoss:
    """The LossOracle of this tier: P prompts -> P cross-entropies, one classify call each."""

    def __init__(
        self,
        api: ClassifyClient,
        images: list[bytes],
        labels: torch.Tensor,
        classes: list[str],
        shape: torch.Size,
    ) -> None:
        self.api, self.images, self.labels, self.classes, self.shape = api, images, labels, classes, shape
        # Steppers hand on the base prompt's text features; this tier has none (empty rows).
        self.text_features: torch.Tensor | None = None

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        losses = []
        for point in points:
            logits = self.api.classify(self.images, self.classes, point.reshape(self.shape).numpy())
            losses.append(F.cross_entropy(logits, self.labels))
        self.api.counter.loss_evaluations += points.shape[0]
        self.text_features = torch.zeros(points.shape[0], len(self.classes), 0)
        return torch.stack(losses)


@dataclass(frozen=True)
class ClassifyPlan:
    """What a run on this tier costs, in items as the server bills /v1/classify (images + C
    prompts per call): the start, the zero-shot and final scorings, the steps, the validations."""

    classes: int
    batch_images: int
    points_per_step: int
    val_images: int
    test_images: int
    images_per_call: int  # scoring calls carry at most this many images (the request limit)
    steps: int
    budget: int | None
    eval_every: int = EVAL_EVERY

    def scoring_items(self, images: int) -> int:
        return images + self.classes * math.ceil(images / self.images_per_call) if images else 0

    @property
    def items_per_step(self) -> int:
        return self.points_per_step * (self.batch_images + self.classes)

    @property
    def fixed_items(self) -> int:
        """The init text's token vectors, zero-shot val and test, and the final test."""
        return 1 + self.scoring_items(self.val_images) + 2 * self.scoring_items(self.test_images)

    def validations(self, steps: int) -> int:
        return sum(1 for s in range(steps) if is_eval_step(s, steps, self.eval_every))

    def total_items(self, steps: int | None = None) -> int:
        steps = self.steps if steps is None else steps
        return (
            self.fixed_items
            + steps * self.items_per_step
            + self.validations(steps) * self.scoring_items(self.val_images)
        )

    def describe(self) -> str:
        return "\n".join([
            f"prediction tier (/v1/classify; every image re-sent per call): start and scoring "
            f"{self.fixed_items} items",
            f"prompt steps: {self.steps} x {self.items_per_step} items ({self.points_per_step} "
            f"classify calls of {self.batch_images} images + {self.classes} prompts), "
            f"{self.validations(self.steps)} validations of {self.scoring_items(self.val_images)} items",
            f"planned total: {self.total_items()} items"
            + (f" of a {self.budget} budget" if self.budget is not None else ""),
        ])  # fmt: skip


def is_eval_step(step: int, steps: int, every: int) -> bool:
    return (step + 1) % every == 0 or step + 1 == steps


def plan_classify_run(
    cfg: TuneConfig, split: FewShotSplit, prompt_dim: int, images_per_call: int, *, faithful_steps: int
) -> ClassifyPlan:
    """The most steps (up to `faithful_steps`) the budget pays for; BudgetTooSmall when it
    cannot pay for the start and the scorings."""
    batch = min(DEFAULT_BATCH if cfg.batch_size <= 0 else cfg.batch_size, len(split.train))
    plan = ClassifyPlan(
        classes=len(split.class_names),
        batch_images=batch,
        points_per_step=points_per_step(cfg.optimizer, prompt_dim, cfg.estimator_config()),
        val_images=len(split.val),
        test_images=len(split.test),
        images_per_call=images_per_call,
        steps=faithful_steps,
        budget=cfg.budget,
    )
    if cfg.budget is None:
        return plan
    if plan.total_items(0) > cfg.budget:
        raise BudgetTooSmall(
            f"a budget of {cfg.budget} items cannot pay for the prediction tier's start and scoring "
            f"({plan.total_items(0)} items: every scoring re-sends the images); raise --budget or "
            "lower --test-per-class"
        )
    steps = min(faithful_steps, (cfg.budget - plan.total_items(0)) // plan.items_per_step)
    while steps > 0 and plan.total_items(steps) > cfg.budget:  # the validations' share
        steps -= 1
    return ClassifyPlan(**{**asdict(plan), "steps": steps})


def _accuracy_and_loss(
    api: ClassifyClient, examples: Sequence[Example], classes: list[str], theta: torch.Tensor, per_call: int
) -> tuple[float, float]:
    if not examples:
        return math.nan, math.nan
    images = [view_bytes(e, 0) for e in examples]
    chunks = range(0, len(images), per_call)
    logits = torch.cat([api.classify(images[i : i + per_call], classes, theta.numpy()) for i in chunks])
    labels = labels_of(list(examples))
    return float((logits.argmax(dim=1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def _images_per_call(api: ClassifyClient, classes: int) -> int:
    return max(1, api.max_items_per_request - classes)


def _stepper(cfg: TuneConfig, theta: torch.Tensor, generator: torch.Generator) -> PromptStepper:
    # A constant rate: the tier's budgets buy tens of steps, too few for a warm-up and a decay.
    return make_stepper(
        cfg.optimizer,
        theta.flatten().clone(),
        generator,
        estimator=cfg.estimator_config(),
        lr=cfg.prompt_lr,
        weight_decay=cfg.prompt_weight_decay,
        lr_at=lambda _: cfg.prompt_lr,
    )


@dataclass
class _Tuned:
    best: Best
    zero_val: float
    zero_test: float
    test: float
    steps: int
    losses: list[float]
    selection: Selection


def _same(best: Best) -> Best:
    return best


def _tune(
    api: ClassifyClient, split: FewShotSplit, cfg: TuneConfig, plan: ClassifyPlan, theta: torch.Tensor
) -> _Tuned:
    """Zero-shot scoring, `plan.steps` loss-only steps from `theta` [M, W] selected on
    validation, one test scoring."""
    classes = list(split.class_names)
    per_call = plan.images_per_call
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = torch.Generator().manual_seed(cfg.seed + BATCH_SEED_OFFSET)
    stepper = _stepper(cfg, theta, generator)
    zero_test, _ = _accuracy_and_loss(api, split.test, classes, theta, per_call)
    zero_val, zero_val_loss = _accuracy_and_loss(api, split.val, classes, theta, per_call)
    selection = Selection(api.counter)
    selection.start(Best(zero_val, zero_val_loss, 0, theta.clone()))
    flat, losses = theta.flatten().clone(), []
    for step in range(plan.steps):
        order = torch.randperm(len(split.train), generator=batches)[: plan.batch_images].tolist()
        batch = [split.train[i] for i in order]
        oracle = ClassifyLoss(api, [view_bytes(e, 0) for e in batch], labels_of(batch), classes, theta.shape)
        outcome = stepper.step(step, flat, oracle)
        flat = outcome.theta.detach().flatten().clone()
        losses.append(outcome.loss)
        if is_eval_step(step, plan.steps, plan.eval_every):
            current = flat.reshape(theta.shape).clone()
            val, val_loss = _accuracy_and_loss(api, split.val, classes, current, per_call)
            snapshot = Best(val, val_loss, step + 1, current)
            selection.offer(step + 1, val, val_loss, outcome.loss, functools.partial(_same, snapshot))
    best = selection.best
    assert best.theta is not None
    test, _ = _accuracy_and_loss(api, split.test, classes, best.theta, per_call)
    return _Tuned(best, zero_val, zero_test, test, plan.steps, losses, selection)


def run_on_predictions(ctx: RunContext, cfg: TuneConfig, *, faithful_steps: int) -> RunReport:
    """A loss-only prompt method (or zero-shot: no steps) through /v1/classify alone."""
    api = ctx.api
    if not isinstance(api, ClassifyClient):
        raise TypeError("the prediction tier runs on a ClassifyClient")
    if cfg.optimizer == "surrogate":
        # The surrogate models the class text features, and this tier returns none.
        logger.info(
            "the prediction tier returns no text features: the prompt is tuned with the scalar estimator"
        )
        cfg = replace(cfg, optimizer="estimator")
    started = time.time()
    ctx.folder.create()
    card = api.model_card()
    steps = faithful_steps if cfg.tunes_prompt else 0
    per_call = _images_per_call(api, len(ctx.split.class_names))
    plan_classify_run(cfg, ctx.split, card.token_width, per_call, faithful_steps=0)  # refuse before spending
    theta = torch.from_numpy(api.token_embeddings(cfg.init_text)).float()  # [M, W]
    plan = plan_classify_run(cfg, ctx.split, theta.numel(), per_call, faithful_steps=steps)
    logger.info("plan:\n%s", plan.describe())
    if ctx.on_plan is not None:
        ctx.on_plan(plan.describe())
    tuned = _tune(api, ctx.split, cfg, plan, theta)
    assert tuned.best.theta is not None
    np.save(ctx.folder.path / "context.npy", tuned.best.theta.numpy())  # the tuned soft prompt
    return finish_report(
        ctx.folder,
        tuned.selection.curve,
        method=ctx.name,
        split=ctx.split,
        card=card,
        counter=api.counter,
        scores=(tuned.zero_val, tuned.zero_test, tuned.best.val_accuracy, tuned.best.val_loss, tuned.test),
        feature_items_charged=0,
        started=started,
        selected_step=tuned.best.step,
        prompt_steps=tuned.steps,
        budget=cfg.budget,
        plan={**asdict(plan), "total_items": plan.total_items()},
        config=asdict(cfg),
        note="prediction tier: logits from /v1/classify only; the tuned prompt is context.npy",
    )


@dataclass
class PredictionRun:
    optimizer: str
    steps: int
    val_accuracy: float
    test_accuracy: float
    zero_shot_test_accuracy: float
    losses: list[float] = field(default_factory=list)


def tune_on_predictions(
    api: ClassifyClient,
    split: FewShotSplit,
    *,
    optimizer: str = "estimator",
    steps: int = 20,
    batch_size: int = 16,
    eval_every: int = EVAL_EVERY,
    seed: int = 1,
) -> PredictionRun:
    """Tune one soft prompt by loss-only optimisation through /v1/classify, a fixed number of
    steps (no budget, no report): the library call under `run_on_predictions`."""
    cfg = tune_config("fast", method="cbbt-prompt", optimizer=optimizer, batch_size=batch_size, seed=seed)
    theta = torch.from_numpy(api.token_embeddings(cfg.init_text)).float()
    per_call = _images_per_call(api, len(split.class_names))
    plan = plan_classify_run(cfg, split, theta.numel(), per_call, faithful_steps=steps)
    plan = ClassifyPlan(**{**asdict(plan), "eval_every": eval_every})
    tuned = _tune(api, split, cfg, plan, theta)
    logger.info(
        "%s on the prediction tier: val %.3f, test %.3f (zero-shot %.3f)",
        optimizer, tuned.best.val_accuracy, tuned.test, tuned.zero_test,
    )  # fmt: skip
    return PredictionRun(optimizer, steps, tuned.best.val_accuracy, tuned.test, tuned.zero_test, tuned.losses)
