"""The tuning loop: CBBT over HTTP, readable top to bottom.

1. fetch image features once (cached on disk), 2. initialise the soft prompt from words,
3. zero-shot accuracy, 4. prompt steps: estimate the prompt's gradient from the losses of
perturbed prompts (ONE request per step carries all of them), Adam on the estimate, and,
after the prompt-only phase, an exact adapter step on the same batch, 5. adapter-only epochs
on cached features (free), 6. test the checkpoint chosen on validation, write the artifact.

Everything that decides the result is in `TuneState` and checkpointed, so `--resume`
continues to the same result; deterministic idempotency keys make redone steps replays.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from client.adapters import ResidualAdapter, TipAdapter, clip_logits, search_alpha_beta
from client.api import CbbtClient, QuotaExhausted
from client.artifact import Artifact, save_artifact
from client.data import Example, FewShotSplit
from client.estimators import EstimatorConfig
from client.features import FeatureStore
from client.plan import Plan, make_plan
from client.report import write_report
from client.steppers import Oracle, PromptStepper, cosine_with_warmup, make_stepper, points_per_step

logger = logging.getLogger(__name__)

Method = Literal["cbbt", "cbbt-prompt", "adapter", "zero-shot"]
METHODS: tuple[str, ...] = ("cbbt", "cbbt-prompt", "adapter", "zero-shot")
CHECKPOINT_FILE = "checkpoint.pt"
FEATURE_LOG_FILE = "feature_spend.json"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TuneConfig:
    """Defaults are CBBT's released hyperparameters (method.md §2-3)."""

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
    optimizer: str = "estimator"  # or a peer's: cmaes, spsa-gc, zip (see client.steppers)
    prompt_lr: float = 2e-3
    prompt_weight_decay: float = 5e-4
    warmup_lr: float = 1e-5
    epochs: int = 150
    batch_size: int = 32  # images per prompt step; 0 = every cached training view (no extra queries)
    # The adapter on image features.
    adapter: Literal["residual", "tip", "none"] = "residual"
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


# Named settings of the prompt estimator: configs as data. `faithful` is CBBT's released
# estimator (TuneConfig's defaults); `fast` is cbbt's own (docs/benchmarks.md measures both).
ESTIMATOR_PRESETS: dict[str, dict[str, object]] = {
    "faithful": {},
    "fast": {
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
    },
}


def tune_config(estimator: str = "faithful", **overrides: object) -> TuneConfig:
    """A TuneConfig from a named estimator preset, with explicit settings on top."""
    if estimator not in ESTIMATOR_PRESETS:
        raise ValueError(f"unknown estimator preset {estimator!r}; one of {', '.join(ESTIMATOR_PRESETS)}")
    return TuneConfig(**{**ESTIMATOR_PRESETS[estimator], **overrides, "estimator": estimator})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The client-side model: text features of the prompt, an adapter on image features, logits.
# ---------------------------------------------------------------------------------------------


def make_adapter(
    cfg: TuneConfig, dim: int, train_feats: torch.Tensor, train_labels: torch.Tensor, classes: int
) -> nn.Module | None:
    if not cfg.uses_adapter:
        return None
    if cfg.adapter == "tip":
        keys = F.normalize(train_feats.mean(dim=1), dim=-1)  # average the cached views per image
        return TipAdapter(keys, train_labels, classes, trainable_keys=True)
    return ResidualAdapter(dim, ratio=cfg.adapter_ratio)


def logits_of(
    adapter: nn.Module | None, images: torch.Tensor, texts: torch.Tensor, scale: float
) -> torch.Tensor:
    """[N, D] image features x [C, D] class text features -> [N, C] logits."""
    if adapter is None:
        return clip_logits(images, texts, scale)
    if isinstance(adapter, TipAdapter):
        return adapter(images, clip_logits(images, texts, scale))
    return clip_logits(adapter(images), texts, scale)


@torch.no_grad()
def accuracy_and_loss(
    adapter: nn.Module | None, images: torch.Tensor, labels: torch.Tensor, texts: torch.Tensor, scale: float
) -> tuple[float, float]:
    logits = logits_of(adapter, images, texts, scale)
    return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


# ---------------------------------------------------------------------------------------------
# State: everything a resumed run needs to continue to the same result.
# ---------------------------------------------------------------------------------------------


@dataclass
class Best:
    val_accuracy: float = -1.0
    val_loss: float = math.inf
    step: int = -1
    theta: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    adapter: dict[str, torch.Tensor] | None = None

    def improves(self, accuracy: float, loss: float) -> bool:
        return (accuracy, -loss) > (self.val_accuracy, -self.val_loss)


@dataclass
class TuneState:
    run_id: str
    step: int = 0
    adapter_epoch: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    stopped_reason: str | None = None


@dataclass
class Data:
    """Cached features as tensors: train [N, V, D], val [Nv, D], test [Nt, D]."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class Parts:
    """What the steps change: the prompt, its optimiser, the adapter and its optimiser."""

    theta: torch.Tensor
    stepper: PromptStepper
    adapter: nn.Module | None
    adapter_opt: torch.optim.Optimizer | None


@dataclass
class TuneResult:
    report: dict[str, object]
    artifact_dir: Path


class StopRequested(Exception):
    """SIGINT/SIGTERM: checkpoint and stop at the next step boundary."""


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    requested = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True
        logger.warning("signal %d: stopping after this step (a checkpoint will be written)", signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield lambda: requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


class Tuner:
    def __init__(
        self,
        client: CbbtClient,
        features: FeatureStore,
        split: FewShotSplit,
        cfg: TuneConfig,
        out_dir: Path,
        *,
        progress: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.client = client
        self.features = features
        self.split = split
        self.cfg = cfg
        self.out_dir = out_dir
        self.progress = progress
        self.card = client.model_card()
        self.scale = self.card.logit_scale
        self.classes = list(split.class_names)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed + 1_000_003)

    # -- phases -------------------------------------------------------------------------------
    def feature_items(self) -> int:
        """Items the image features cost at full price. Cached features are not charged, but
        the plan counts them anyway: a run's schedule must not depend on what some earlier run
        left in the cache (benchmarks sharing a cache, resumed runs)."""
        s, cfg = self.split, self.cfg
        return self.features.item_count(s.train, cfg.views) + self.features.item_count(s.val + s.test, 1)

    def plan(self, prompt_dim: int | None, feature_items: int) -> Plan:
        """The schedule. Without `prompt_dim` (unknown before the first query) it only checks
        that the budget pays for the features and the initial prompt (BudgetTooSmall if not)."""
        s, cfg = self.split, self.cfg
        tunes_prompt = cfg.tunes_prompt and prompt_dim is not None
        points = 1
        if cfg.tunes_prompt and prompt_dim is not None:
            points = points_per_step(cfg.optimizer, prompt_dim, cfg.estimator_config())
        return make_plan(
            feature_items=feature_items,
            num_classes=len(self.classes),
            points_per_step=points,
            train_images=len(s.train),
            batch_size=cfg.batch_size if cfg.batch_size > 0 else len(s.train),
            epochs=cfg.epochs,
            adapter_start_epoch=cfg.adapter_start_epoch if cfg.method == "cbbt" else 0,
            budget=cfg.budget,
            tunes_prompt=tunes_prompt,
        )

    def fetch_features(self) -> Data:
        s = self.split

        def labels(examples: list[Example]) -> torch.Tensor:
            return torch.tensor([e.label for e in examples], dtype=torch.long)

        with self._logging_feature_spend():
            train = torch.from_numpy(self.features.features(s.train, self.cfg.views))
            val = torch.from_numpy(self.features.features(s.val, 1))[:, 0]
            test = torch.from_numpy(self.features.features(s.test, 1))[:, 0]
        return Data(train, labels(s.train), val, labels(s.val), test, labels(s.test))

    @contextmanager
    def _logging_feature_spend(self) -> Iterator[None]:
        """Persist what this run paid for image features, batch by batch.

        Nothing is checkpointed before the first prompt step, and a resumed run finds the
        features it already paid for in the cache (it never asks again), so without this log
        a run killed while fetching features would under-report its spending.
        """
        path = self.out_dir / FEATURE_LOG_FILE
        spent = json.loads(path.read_text()) if path.exists() else {"calls": 0, "items": 0}
        chained = self.features.progress

        def record(images: int) -> None:
            spent["calls"] += 1
            spent["items"] += images
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(spent))
            tmp.replace(path)
            if chained is not None:
                chained(images)

        self.features.progress = record
        try:
            yield
        finally:
            self.features.progress = chained

    def _feature_items_charged(self) -> int:
        """Image features this run paid for (the rest came from the cache)."""
        path = self.out_dir / FEATURE_LOG_FILE
        return int(json.loads(path.read_text())["items"]) if path.exists() else 0

    def _restore_feature_spend(self) -> None:
        """On a resume with no checkpoint yet, count the features earlier attempts paid for."""
        path = self.out_dir / FEATURE_LOG_FILE
        if path.exists() and not (self.out_dir / CHECKPOINT_FILE).exists():
            spent = json.loads(path.read_text())
            self.client.counter.calls += int(spent["calls"])
            self.client.counter.items += int(spent["items"])

    def text_features(self, thetas: torch.Tensor, key: str) -> torch.Tensor:
        """[P, M, W] prompts -> [P, C, D] class text features, in as few requests as allowed."""
        out = self.client.prompt_embeddings(
            thetas.detach().float().numpy(), self.classes, idempotency_key=f"{self.state.run_id}/{key}"
        )
        self.client.counter.loss_evaluations += thetas.shape[0]
        return torch.from_numpy(out)

    def oracle(
        self,
        shape: torch.Size,
        images: torch.Tensor,
        labels: torch.Tensor,
        adapter: nn.Module | None,
        key: str,
    ) -> Oracle:
        """One step's loss oracle: every point in one logical call, losses on this batch."""

        def evaluate(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            texts = self.text_features(points.reshape(-1, *shape), key)
            with torch.no_grad():
                losses = [F.cross_entropy(logits_of(adapter, images, t, self.scale), labels) for t in texts]
            return torch.stack(losses), texts

        return evaluate

    # -- main ---------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> TuneResult:
        started = time.time()
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        feature_items = self.feature_items()
        self.plan(None, feature_items)  # a budget that cannot pay for the features: stop before paying
        self.state = TuneState(run_id=self._run_id(resume))
        if resume:
            self._restore_feature_spend()
        else:
            (self.out_dir / FEATURE_LOG_FILE).unlink(missing_ok=True)
        tokens = self.client.token_embeddings(cfg.init_text, idempotency_key=f"{self.state.run_id}/tokens")
        theta0 = torch.from_numpy(tokens).float()
        plan = self._fixed_plan(self.plan(theta0.numel(), feature_items), resume)
        logger.info("plan:\n%s", plan.describe())
        data = self.fetch_features()

        text0 = self.text_features(theta0.unsqueeze(0), "init")[0]
        zero_val, _ = accuracy_and_loss(None, data.val, data.val_labels, text0, self.scale)
        zero_test, _ = accuracy_and_loss(None, data.test, data.test_labels, text0, self.scale)
        logger.info("zero-shot: val %.3f, test %.3f", zero_val, zero_test)

        theta = theta0.clone()
        adapter = make_adapter(cfg, self.card.feature_dim, data.train, data.train_labels, len(self.classes))
        adapter_opt = (
            torch.optim.AdamW(adapter.parameters(), lr=cfg.adapter_lr, weight_decay=cfg.adapter_weight_decay)
            if adapter is not None and any(p.requires_grad for p in adapter.parameters())
            else None
        )
        stepper = make_stepper(
            cfg.optimizer,
            theta0,
            self.generator,
            estimator=cfg.estimator_config(),
            lr=cfg.prompt_lr,
            weight_decay=cfg.prompt_weight_decay,
            lr_at=cosine_with_warmup(plan.steps, plan.warmup_steps, cfg.prompt_lr, cfg.warmup_lr),
        )
        self.state.best = Best(zero_val, math.inf, 0, theta0.clone(), text0, _adapter_state(adapter))
        self.state.curve.append(self._point(0, zero_val, math.nan))
        parts = Parts(theta, stepper, adapter, adapter_opt)
        if resume:
            self._load_checkpoint(parts)

        with stop_on_signals() as stop_requested:
            try:
                self._tune(plan, data, parts, stop_requested)
            except StopRequested:
                self._save_checkpoint(parts)
                raise
        return self._finish(data, parts.adapter, plan, zero_val, zero_test, started)

    def _tune(self, plan: Plan, data: Data, parts: Parts, stop_requested: Callable[[], bool]) -> None:
        cfg, adapter, adapter_opt = self.cfg, parts.adapter, parts.adapter_opt
        # Phase 1+2: prompt steps (prompt-only first, then prompt + adapter).
        while self.state.step < plan.steps and self.state.stopped_reason is None:
            step = self.state.step
            if cfg.budget is not None and self.client.counter.items + plan.items_per_step > cfg.budget:
                self.state.stopped_reason = "budget"
                break
            images, labels = self._sample_batch(data, cfg.batch_size)
            oracle = self.oracle(parts.theta.shape, images, labels, adapter, f"step{step}")
            try:
                outcome = parts.stepper.step(step, parts.theta, oracle)
            except QuotaExhausted:
                logger.warning("the server reports the key's budget exhausted: stopping prompt tuning")
                self.state.stopped_reason = "server quota"
                break
            self._select(step, parts.theta, outcome.base_text, adapter, data, outcome.loss)
            if adapter_opt is not None and adapter is not None and step >= plan.adapter_start_step:
                self._adapter_step(adapter, adapter_opt, images, labels, outcome.base_text)
            parts.theta = outcome.theta.reshape(parts.theta.shape).float()
            self.state.step = step + 1
            if stop_requested():
                raise StopRequested
            if self.state.step % cfg.checkpoint_every == 0:
                self._save_checkpoint(parts)

        # Phase 3: the adapter alone, on cached features, with the best prompt (free).
        best = self.state.best
        assert best.text_features is not None and best.theta is not None
        if adapter is not None and adapter_opt is not None:
            self._train_adapter(adapter, adapter_opt, data, best.text_features, plan, stop_requested)

    # -- steps --------------------------------------------------------------------------------
    def _sample_batch(self, data: Data, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, views = data.train.shape[0], data.train.shape[1]
        if batch_size <= 0:  # full batch: every cached view (costs no queries)
            return data.train.reshape(n * views, -1), data.train_labels.repeat_interleave(views)
        size = min(batch_size, n)
        idx = torch.randperm(n, generator=self.batch_generator)[:size]
        view = torch.randint(0, views, (size,), generator=self.batch_generator)
        return data.train[idx, view], data.train_labels[idx]

    def _adapter_step(
        self,
        adapter: nn.Module,
        opt: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        texts: torch.Tensor,
    ) -> float:
        adapter.train()
        opt.zero_grad()
        loss = F.cross_entropy(logits_of(adapter, images, texts, self.scale), labels)
        loss.backward()
        opt.step()
        adapter.eval()
        return loss.item()

    def _train_adapter(
        self,
        adapter: nn.Module,
        opt: torch.optim.Optimizer,
        data: Data,
        texts: torch.Tensor,
        plan: Plan,
        stop_requested: Callable[[], bool],
    ) -> None:
        if isinstance(adapter, TipAdapter) and self.state.adapter_epoch == 0:
            # Tip-Adapter's recipe: the cache's weight and sharpness are chosen on validation.
            found = search_alpha_beta(
                adapter, data.val, data.val_labels, clip_logits(data.val, texts, self.scale)
            )
            adapter.alpha, adapter.beta = found.alpha, found.beta
        size = self.cfg.adapter_batch_size
        steps_per_epoch = max(1, math.ceil(data.train.shape[0] * data.train.shape[1] / size))
        while self.state.adapter_epoch < self.cfg.adapter_epochs:
            for _ in range(steps_per_epoch):
                images, labels = self._sample_batch(data, size)
                self._adapter_step(adapter, opt, images, labels, texts)
            self.state.adapter_epoch += 1
            assert self.state.best.theta is not None
            self._select(
                plan.steps + self.state.adapter_epoch, self.state.best.theta, texts, adapter, data, math.nan
            )
            if stop_requested():
                raise StopRequested

    def _select(
        self,
        step: int,
        theta: torch.Tensor,
        texts: torch.Tensor,
        adapter: nn.Module | None,
        data: Data,
        train_loss: float,
    ) -> None:
        """Validation-based model selection (never the test split)."""
        acc, loss = accuracy_and_loss(adapter, data.val, data.val_labels, texts, self.scale)
        point = self._point(step, acc, train_loss)
        self.state.curve.append(point)
        if self.progress is not None:
            self.progress(point)
        if self.state.best.improves(acc, loss):
            self.state.best = Best(
                acc, loss, step, theta.detach().clone(), texts.clone(), _adapter_state(adapter)
            )

    def _point(self, step: int, val_accuracy: float, train_loss: float) -> dict[str, float]:
        c = self.client.counter
        return {
            "step": float(step),
            "val_accuracy": val_accuracy,
            "train_loss": train_loss,
            "items": float(c.items),
            "calls": float(c.calls),
            "loss_evaluations": float(c.loss_evaluations),
        }

    # -- the end --------------------------------------------------------------------------------
    def _finish(
        self,
        data: Data,
        adapter: nn.Module | None,
        plan: Plan,
        zero_val: float,
        zero_test: float,
        started: float,
    ) -> TuneResult:
        best = self.state.best
        assert best.theta is not None and best.text_features is not None
        if adapter is not None and best.adapter is not None:
            adapter.load_state_dict(best.adapter)
        test_acc, _ = accuracy_and_loss(adapter, data.test, data.test_labels, best.text_features, self.scale)
        artifact = Artifact(
            context=best.theta,
            class_names=self.classes,
            class_text_features=best.text_features,
            adapter_kind=self.cfg.adapter if adapter is not None else "none",
            adapter_state=_adapter_state(adapter),
            model_card=self.card.model_dump(),
            config=asdict(self.cfg),
        )
        artifact_dir = self.out_dir / "artifact"
        save_artifact(artifact, artifact_dir)
        report: dict[str, object] = {
            "method": self.cfg.method,
            "shots": self.split.shots,
            "seed": self.cfg.seed,
            "model": self.card.id,
            "classes": len(self.classes),
            "zero_shot_val_accuracy": zero_val,
            "zero_shot_test_accuracy": zero_test,
            "val_accuracy": best.val_accuracy,
            "test_accuracy": test_acc,
            "selected_step": best.step,
            "prompt_steps": self.state.step,
            "adapter_epochs": self.state.adapter_epoch,
            "stopped_reason": self.state.stopped_reason,
            "queries": self.client.counter.as_dict(),
            "feature_items_charged": self._feature_items_charged(),
            "budget": self.cfg.budget,
            "plan": plan.as_dict(),
            "test_images": int(data.test.shape[0]),
            "wall_seconds": time.time() - started,
            "config": asdict(self.cfg),
        }
        write_report(report, self.state.curve, self.out_dir)
        logger.info(
            "test accuracy %.4f (zero-shot %.4f), items %d", test_acc, zero_test, self.client.counter.items
        )
        return TuneResult(report=report, artifact_dir=artifact_dir)

    # -- checkpoints ----------------------------------------------------------------------------
    def _run_id(self, resume: bool) -> str:
        """A nonce per output folder: stable across resumes, so redone calls replay, not recharge."""
        path = self.out_dir / RUN_FILE
        if resume and path.exists():
            return str(json.loads(path.read_text())["run_id"])
        run_id = uuid.uuid4().hex
        path.write_text(json.dumps({"run_id": run_id, "config": asdict(self.cfg)}, indent=2))
        return run_id

    def _fixed_plan(self, plan: Plan, resume: bool) -> Plan:
        """The plan made when the run started: a resumed run finds its features cached, and
        re-planning would hand it a different schedule (and a different result)."""
        path = self.out_dir / RUN_FILE
        run = json.loads(path.read_text())
        if resume and "plan" in run:
            return Plan(**run["plan"])
        run["plan"] = asdict(plan)
        path.write_text(json.dumps(run, indent=2))
        return plan

    def _save_checkpoint(self, parts: Parts) -> None:
        s = self.state
        payload = {
            "step": s.step,
            "adapter_epoch": s.adapter_epoch,
            "theta": parts.theta.detach().clone(),
            "stepper": parts.stepper.state_dict(),
            "adapter": _adapter_state(parts.adapter),
            "adapter_opt": parts.adapter_opt.state_dict() if parts.adapter_opt is not None else None,
            "batch_rng": self.batch_generator.get_state(),
            "counter": self.client.counter.as_dict(),
            "curve": json.dumps(s.curve),
            "best": asdict(s.best),
            "stopped_reason": s.stopped_reason,
            "config": json.dumps(asdict(self.cfg)),
        }
        tmp = self.out_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.out_dir / CHECKPOINT_FILE)  # atomic: a kill never leaves half a checkpoint
        logger.debug("checkpoint at step %d", s.step)

    def _load_checkpoint(self, parts: Parts) -> None:
        path = self.out_dir / CHECKPOINT_FILE
        if not path.exists():
            logger.warning("no checkpoint in %s: starting from the beginning", self.out_dir)
            return
        ck = torch.load(path, weights_only=True)  # never unpickles code
        if json.loads(ck["config"]) != json.loads(json.dumps(asdict(self.cfg))):
            raise ValueError("the checkpoint was made with a different configuration; refusing to resume")
        s = self.state
        s.step, s.adapter_epoch, s.stopped_reason = (
            int(ck["step"]),
            int(ck["adapter_epoch"]),
            ck["stopped_reason"],
        )
        parts.theta = ck["theta"].clone()
        parts.stepper.load_state_dict(ck["stepper"])
        if parts.adapter is not None and ck["adapter"] is not None:
            parts.adapter.load_state_dict(ck["adapter"])
        if parts.adapter_opt is not None and ck["adapter_opt"] is not None:
            parts.adapter_opt.load_state_dict(ck["adapter_opt"])
        self.batch_generator.set_state(ck["batch_rng"])
        self.client.counter.load(ck["counter"])
        s.curve = json.loads(ck["curve"])
        s.best = Best(**ck["best"])
        logger.info("resumed at step %d (items spent so far: %d)", s.step, self.client.counter.items)


def _adapter_state(adapter: nn.Module | None) -> dict[str, torch.Tensor] | None:
    if adapter is None:
        return None
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}
