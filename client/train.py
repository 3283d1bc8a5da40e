"""The tuning loop: CBBT over HTTP, readable top to bottom.

    setup    check the budget pays for the features, plan the schedule (printed before the
             spending starts), fetch image features once (cached on disk), the initial prompt
             and its zero-shot accuracy;
    steps    for each prompt step: estimate the prompt's gradient from the losses of perturbed
             prompts (ONE request per step carries all of them), update it, and, once the
             adapter has joined, take an exact adapter step on the same batch; then the
             adapter-only epochs on cached features (free);
    select   after every step and epoch, on validation (never the test split);
    finish   test the selected checkpoint once, write the artifact and the report.

Everything that decides the result is checkpointed, so `--resume` continues to the same
result; deterministic idempotency keys make redone steps replays, not new charges.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.adapters import TipAdapter, clip_logits, search_alpha_beta
from client.api import ModelApi
from client.artifact import Artifact, save_artifact
from client.errors import QuotaExhausted, RequestError
from client.model import accuracy_and_loss, logits_of, make_adapter, state_of
from client.oracle import PromptLoss, prompt_text_features
from client.plan import Plan, check_fixed_costs, make_plan
from client.progress import show_point
from client.report import RunReport, finish_report
from client.run_context import RunContext, SplitFeatures
from client.run_folder import RunFolder
from client.selection import BATCH_SEED_OFFSET, Best, Selection, sample_batch
from client.steppers import PromptStepper, cosine_with_warmup, make_stepper, points_per_step
from client.tune_config import TuneConfig

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """What the steps change: the prompt, its optimiser, the adapter and its optimiser."""

    theta: torch.Tensor
    stepper: PromptStepper
    adapter: nn.Module | None
    adapter_opt: torch.optim.Optimizer | None


@dataclass
class RunPosition:
    """Where the run is: steps done, adapter epochs done, why it stopped early (if it did)."""

    step: int = 0
    adapter_epoch: int = 0
    stopped_reason: str | None = None


@dataclass
class TuneResult:
    report: RunReport
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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's tensors and values; never unpickles code (weights_only=True)."""
    return dict(torch.load(path, weights_only=True))


class FeatureSpend:
    """What this run paid for image features, persisted batch by batch.

    Nothing is checkpointed before the first prompt step, and a resumed run finds the features
    it already paid for in the cache (it never asks again), so without this log a run killed
    while fetching features would under-report its spending.
    """

    def __init__(self, folder: RunFolder, api: ModelApi, *, resume: bool) -> None:
        self.folder = folder
        path = folder.feature_spend
        if not resume:
            path.unlink(missing_ok=True)
        self.spent: dict[str, int] = (
            json.loads(path.read_text()) if path.exists() else {"calls": 0, "items": 0}
        )
        if resume and not folder.checkpoint.exists():  # the checkpoint's counter would hold them
            api.counter.calls += self.spent["calls"]
            api.counter.items += self.spent["items"]

    def record(self, images: int) -> None:
        self.spent["calls"] += 1
        self.spent["items"] += images
        self.folder.write_json(self.folder.feature_spend, self.spent, indent=None)

    @property
    def items(self) -> int:
        return self.spent["items"]


class Tuner:
    """One tuning run of `cfg` in `ctx` (ctx.name is the method's registry name)."""

    def __init__(self, ctx: RunContext, cfg: TuneConfig) -> None:
        self.ctx = ctx
        self.api = ctx.api
        self.features = ctx.features
        self.split = ctx.split
        self.cfg = cfg
        self.folder = ctx.folder
        self.card = self.api.model_card()
        self.scale = self.card.logit_scale
        self.classes = list(ctx.split.class_names)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed + BATCH_SEED_OFFSET)
        self.selection = Selection(self.api.counter)
        self.at = RunPosition()
        self.run_id = ""

    # -- the run, top to bottom -----------------------------------------------------------------
    def run(self, *, resume: bool = False) -> TuneResult:
        started = time.time()
        cfg = self.cfg
        self.folder.create()
        # Setup: refuse a budget that cannot pay for the features before paying for anything.
        feature_items = self.feature_items()
        check_fixed_costs(feature_items=feature_items, num_classes=len(self.classes), budget=cfg.budget)
        self.run_id = self._run_id(resume)
        spend = FeatureSpend(self.folder, self.api, resume=resume)
        tokens = self.api.token_embeddings(cfg.init_text, idempotency_key=f"{self.run_id}/tokens")
        theta0 = torch.from_numpy(tokens).float()
        plan = self._fixed_plan(self.plan(theta0.numel(), feature_items), resume)
        logger.info("plan:\n%s", plan.describe())
        if self.ctx.on_plan is not None:  # before the features, the bulk of a small run's spending
            self.ctx.on_plan(plan.describe())
        data = self.fetch_features(spend)
        text0 = prompt_text_features(self.api, theta0.unsqueeze(0), self.classes, f"{self.run_id}/init")[0]
        zero_val, _ = accuracy_and_loss(None, data.val, data.val_labels, text0, self.scale)
        zero_test, _ = accuracy_and_loss(None, data.test, data.test_labels, text0, self.scale)
        logger.info("zero-shot: val %.3f, test %.3f", zero_val, zero_test)
        parts = self._parts(theta0, data, plan)
        self.selection.start(Best(zero_val, math.inf, 0, theta0.clone(), text0, state_of(parts.adapter)))
        if resume:
            self._load_checkpoint(parts)

        # Steps, each followed by selection on validation.
        adapter_epochs = cfg.adapter_epochs if parts.adapter_opt is not None else 0
        with (
            stop_on_signals() as stop_requested,
            self.ctx.progress.bar(f"{self.ctx.name} steps", plan.steps + adapter_epochs, "step") as bar,
        ):
            bar.update(self.at.step + self.at.adapter_epoch)
            self.selection.on_point = lambda point: show_point(bar, point)
            try:
                self._prompt_steps(plan, data, parts, stop_requested)
                self._adapter_epochs(plan, data, parts, stop_requested)
            except StopRequested:
                self._save_checkpoint(parts)
                raise
            finally:
                self.selection.on_point = None

        # Finish: the selected checkpoint, tested once.
        return self._finish(data, parts.adapter, plan, zero_val, zero_test, spend, started)

    # -- setup --------------------------------------------------------------------------------
    def feature_items(self) -> int:
        """Items the image features cost at full price. Cached features are not charged, but
        the plan counts them anyway: a run's schedule must not depend on what some earlier run
        left in the cache (benchmarks sharing a cache, resumed runs)."""
        return self.ctx.feature_items(self.cfg.views)

    def plan(self, prompt_dim: int, feature_items: int) -> Plan:
        s, cfg = self.split, self.cfg
        points = points_per_step(cfg.optimizer, prompt_dim, cfg.estimator_config()) if cfg.tunes_prompt else 1
        return make_plan(
            feature_items=feature_items,
            num_classes=len(self.classes),
            points_per_step=points,
            train_images=len(s.train),
            batch_size=cfg.batch_size if cfg.batch_size > 0 else len(s.train),
            epochs=cfg.epochs,
            adapter_start_epoch=cfg.adapter_joins_epoch,
            budget=cfg.budget,
            tunes_prompt=cfg.tunes_prompt,
        )

    def fetch_features(self, spend: FeatureSpend) -> SplitFeatures:
        return self.ctx.fetch_features(self.cfg.views, on_batch=spend.record)

    def _parts(self, theta0: torch.Tensor, data: SplitFeatures, plan: Plan) -> Parts:
        cfg = self.cfg
        adapter = make_adapter(
            cfg.adapter_kind, self.card.feature_dim, data.train, data.train_labels, len(self.classes),
            ratio=cfg.adapter_ratio,
        )  # fmt: skip
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
            surrogate=cfg.surrogate_config() if cfg.optimizer == "surrogate" else None,
        )
        return Parts(theta0.clone(), stepper, adapter, adapter_opt)

    # -- steps ----------------------------------------------------------------------------------
    def _prompt_steps(
        self, plan: Plan, data: SplitFeatures, parts: Parts, stop_requested: Callable[[], bool]
    ) -> None:
        """Prompt-only steps first, then prompt + adapter, until the plan or the budget ends."""
        cfg, at = self.cfg, self.at
        while at.step < plan.steps and at.stopped_reason is None:
            if cfg.budget is not None and self.api.counter.items + plan.items_per_step > cfg.budget:
                at.stopped_reason = "budget"
                break
            images, labels = sample_batch(data.train, data.train_labels, cfg.batch_size, self.batch_generator)
            oracle = PromptLoss(
                self.api, self.classes, parts.theta.shape, images, labels, parts.adapter, self.scale,
                key=f"{self.run_id}/step{at.step}",
            )  # fmt: skip
            try:
                outcome = parts.stepper.step(at.step, parts.theta, oracle)
            except QuotaExhausted:
                logger.warning("the server reports the key's budget exhausted: stopping prompt tuning")
                at.stopped_reason = "server quota"
                break
            self._select(at.step, parts.theta, outcome.base_text, parts.adapter, data, outcome.loss)
            if (
                parts.adapter_opt is not None
                and parts.adapter is not None
                and at.step >= plan.adapter_start_step
            ):
                self._adapter_step(parts.adapter, parts.adapter_opt, images, labels, outcome.base_text)
            parts.theta = outcome.theta.reshape(parts.theta.shape).float()
            at.step += 1
            if stop_requested():
                raise StopRequested
            if at.step % cfg.checkpoint_every == 0:
                self._save_checkpoint(parts)

    def _adapter_epochs(
        self, plan: Plan, data: SplitFeatures, parts: Parts, stop_requested: Callable[[], bool]
    ) -> None:
        """The adapter alone, on cached features, with the selected prompt (free)."""
        adapter, opt, best = parts.adapter, parts.adapter_opt, self.selection.best
        if adapter is None or opt is None:
            return
        assert best.text_features is not None and best.theta is not None
        texts = best.text_features
        if isinstance(adapter, TipAdapter) and self.at.adapter_epoch == 0:
            # Tip-Adapter's recipe: the cache's weight and sharpness are chosen on validation.
            found = search_alpha_beta(
                adapter, data.val, data.val_labels, clip_logits(data.val, texts, self.scale)
            )
            adapter.alpha, adapter.beta = found.alpha, found.beta
        size = self.cfg.adapter_batch_size
        steps_per_epoch = max(1, math.ceil(data.train.shape[0] * data.train.shape[1] / size))
        while self.at.adapter_epoch < self.cfg.adapter_epochs:
            for _ in range(steps_per_epoch):
                images, labels = sample_batch(data.train, data.train_labels, size, self.batch_generator)
                self._adapter_step(adapter, opt, images, labels, texts)
            self.at.adapter_epoch += 1
            self._select(plan.steps + self.at.adapter_epoch, best.theta, texts, adapter, data, math.nan)
            if stop_requested():
                raise StopRequested

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

    # -- selection ------------------------------------------------------------------------------
    def _select(
        self,
        step: int,
        theta: torch.Tensor,
        texts: torch.Tensor,
        adapter: nn.Module | None,
        data: SplitFeatures,
        train_loss: float,
    ) -> None:
        acc, loss = accuracy_and_loss(adapter, data.val, data.val_labels, texts, self.scale)
        self.selection.offer(
            step, acc, loss, train_loss,
            lambda: Best(acc, loss, step, theta.detach().clone(), texts.clone(), state_of(adapter)),
        )  # fmt: skip

    # -- finish ---------------------------------------------------------------------------------
    def _finish(
        self,
        data: SplitFeatures,
        adapter: nn.Module | None,
        plan: Plan,
        zero_val: float,
        zero_test: float,
        spend: FeatureSpend,
        started: float,
    ) -> TuneResult:
        best = self.selection.best
        assert best.theta is not None and best.text_features is not None
        if adapter is not None and best.adapter is not None:
            adapter.load_state_dict(best.adapter)
        test_acc, _ = accuracy_and_loss(adapter, data.test, data.test_labels, best.text_features, self.scale)
        artifact = Artifact(
            context=best.theta,
            class_names=self.classes,
            class_text_features=best.text_features,
            adapter_kind=self.cfg.adapter if adapter is not None else "none",
            adapter_state=state_of(adapter),
            model_card=self.card.model_dump(),
            config=asdict(self.cfg),
        )
        save_artifact(artifact, self.folder.artifact)
        report = finish_report(
            self.folder,
            self.selection.curve,
            method=self.ctx.name,
            split=self.split,
            card=self.card,
            counter=self.api.counter,
            scores=(zero_val, zero_test, best.val_accuracy, best.val_loss, test_acc),
            feature_items_charged=spend.items,
            started=started,
            selected_step=best.step,
            prompt_steps=self.at.step,
            adapter_epochs=self.at.adapter_epoch,
            stopped_reason=self.at.stopped_reason,
            budget=self.cfg.budget,
            plan=plan.as_dict(),
            config=asdict(self.cfg),
        )
        logger.info(
            "test accuracy %.4f (zero-shot %.4f), items %d", test_acc, zero_test, self.api.counter.items
        )
        return TuneResult(report=report, artifact_dir=self.folder.artifact)

    # -- run identity, plan and checkpoints -----------------------------------------------------
    def _run_id(self, resume: bool) -> str:
        """A nonce per output folder: stable across resumes, so redone calls replay, not recharge."""
        path = self.folder.run_file
        if resume and path.exists():
            return str(json.loads(path.read_text())["run_id"])
        run_id = uuid.uuid4().hex
        self.folder.write_json(path, {"run_id": run_id, "config": asdict(self.cfg)})
        return run_id

    def _fixed_plan(self, plan: Plan, resume: bool) -> Plan:
        """The plan made when the run started: a resumed run finds its features cached, and
        re-planning would hand it a different schedule (and a different result)."""
        path = self.folder.run_file
        run = json.loads(path.read_text())
        if resume and "plan" in run:
            return Plan(**run["plan"])
        run["plan"] = asdict(plan)
        self.folder.write_json(path, run)
        return plan

    def _save_checkpoint(self, parts: Parts) -> None:
        payload = {
            "step": self.at.step,
            "adapter_epoch": self.at.adapter_epoch,
            "theta": parts.theta.detach().clone(),
            "stepper": parts.stepper.state_dict(),
            "adapter": state_of(parts.adapter),
            "adapter_opt": parts.adapter_opt.state_dict() if parts.adapter_opt is not None else None,
            "batch_rng": self.batch_generator.get_state(),
            "counter": self.api.counter.as_dict(),
            "curve": json.dumps(self.selection.curve),
            "best": asdict(self.selection.best),
            "stopped_reason": self.at.stopped_reason,
            "config": json.dumps(asdict(self.cfg)),
        }
        path = self.folder.checkpoint
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # atomic: a kill never leaves half a checkpoint
        logger.debug("checkpoint at step %d", self.at.step)

    def _load_checkpoint(self, parts: Parts) -> None:
        path = self.folder.checkpoint
        if not path.exists():
            logger.warning("no checkpoint in %s: starting from the beginning", self.folder.path)
            return
        ck = read_checkpoint(path)
        if json.loads(ck["config"]) != json.loads(json.dumps(asdict(self.cfg))):
            raise RequestError(
                f"the checkpoint in {self.folder.path} was made with a different configuration; "
                "refusing to resume (drop --resume or use another --out)"
            )
        self.at = RunPosition(int(ck["step"]), int(ck["adapter_epoch"]), ck["stopped_reason"])
        parts.theta = ck["theta"].clone()
        parts.stepper.load_state_dict(ck["stepper"])
        if parts.adapter is not None and ck["adapter"] is not None:
            parts.adapter.load_state_dict(ck["adapter"])
        if parts.adapter_opt is not None and ck["adapter_opt"] is not None:
            parts.adapter_opt.load_state_dict(ck["adapter_opt"])
        self.batch_generator.set_state(ck["batch_rng"])
        self.api.counter.load(ck["counter"])
        self.selection.curve = json.loads(ck["curve"])
        self.selection.best = Best(**ck["best"])
        logger.info("resumed at step %d (items spent so far: %d)", self.at.step, self.api.counter.items)
