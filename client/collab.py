"""The default `cbbt` method: collaborative and budget-aware (issue 13), readable top to bottom.

Spend first where an item buys the most, and stop when more items stop helping:

    features  the image features, one view per labelled and test image (the plan is printed,
              and the budget checked, before anything is spent), and the class texts of a
              general template set (80 templates x C classes): the zero-shot priors;
    select    k-fold cross-validation over every labelled image chooses the feature method
              (zero-shot, GDA, CLAP probe, linear probe) and its grid point, refitted on all
              of them (client/fewshot/select.py): free after the features;
    prompt    a soft prompt tuned by cbbt's surrogate ON TOP of that choice: its zero-shot
              logits are stacked on the chosen method's out-of-fold logits
              (client/fewshot/stack.py), so the prompt learns what the feature method gets
              wrong. It trains on (k-1)/k of the labelled images and stops when the held-out
              rest has not improved for `patience` steps; it is kept only if it beat the
              feature method alone there;
    finish    the test split scored once; a linear-head artifact `cbbt eval`/`predict` load;
              the report says how many of the planned items the run did not need.

An API without soft prompts (the embeddings tier) gets the first two stages. `--estimator
faithful` runs CBBT's released recipe instead (`cbbt-paper`, client/train.py), unchanged.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from client.adapters import LinearHead, clip_logits, power_features
from client.api import ModelApi
from client.artifact import Artifact, save_artifact
from client.errors import CredentialsError, QuotaExhausted, RequestError
from client.estimators import EstimatorConfig
from client.feature_methods import buy_template_texts, fit_logit_scale
from client.fewshot.methods import Classifier, SpacedClassifier, default_methods
from client.fewshot.select import Selection, calibrate, select_and_fit
from client.fewshot.shots import Shots
from client.fewshot.stack import (
    as_linear_head,
    best_weight,
    evaluate_weight,
    holdout_split,
    pick_classes,
)
from client.fewshot.templates import SINGLE_TEMPLATE, ensemble, template_set
from client.model import score
from client.oracle import prompt_text_features
from client.plan import check_features_and_texts
from client.report import RunReport, finish_report
from client.run_context import RunContext, SplitFeatures
from client.selection import CurvePoint, curve_point
from client.steppers import cosine_with_warmup, make_stepper, points_per_step
from client.surrogate import SurrogateConfig

logger = logging.getLogger(__name__)

__all__ = ["CollabConfig", "run_collaborative"]

# The feature methods whose classifiers are linear heads, so the result is one exact linear
# artifact (a Tip cache or a mixture is not); CV over them is within ~0.3 points of the
# wider fewshot-cv on the data sets measured (docs/benchmarks/default.md).
LINEAR_METHODS: tuple[str, ...] = ("zero-shot", "gda", "clap", "linear-probe")
ACCEPT_Z = 1.0  # the prompt must lower the held-out loss by at least one standard error


@dataclass(frozen=True)
class CollabConfig:
    """One collaborative run. The prompt's probes are cbbt's `fast` preset's, stepped by the surrogate
    (docs/benchmarks/default.md)."""

    shots: int = 16
    seed: int = 1
    budget: int | None = None  # items, everything included; the run stops before passing it
    views: int = 1  # extra augmented views bought nothing measurable for these methods
    template_set: str = "openai80"
    cv_folds: int | None = None  # None: <= 5, as the rarest class allows
    methods: tuple[str, ...] = LINEAR_METHODS
    # Ensembles of the top 2-3 methods (their calibrated logits averaged: still a linear head).
    cv_ensembles: bool = True
    # The prompt stage.
    init_text: str = "a photo of a"  # the template the priors start from
    prompt_steps: int = 100  # at most; patience usually stops it long before
    patience: int = 12  # steps without a better held-out loss before stopping
    accept_z: float = ACCEPT_Z  # held-out gain, in standard errors, the prompt needs to be kept
    # The prompt trains at weight max(w*, floor), w* fitted to the current prompt: at w = 0 the
    # loss would not depend on the prompt at all, and its estimated gradient would be zero.
    weight_floor: float = 0.25
    # Many classes: perturbed prompts are scored on at most this many classes a step (half
    # drawn at random, half the hardest negatives of those), plus one all-class call for the
    # current prompt; see client/fewshot/stack.py `pick_classes` and docs/benchmarks/default.md.
    class_subset: int = 48
    # "surrogate": a model of the text features fitted from each step's probes (client/
    # surrogate.py); "estimator": the scalar `fast` estimator + AdamW. With a class subset the
    # features of a step cover other classes than the last step's, so the estimator is used.
    optimizer: str = "surrogate"
    trust_radius: float = 0.1  # the surrogate's first trust radius, a fraction of |θ₀|
    max_trust_radius: float = 1.0
    model_memory: int = 24  # the surrogate's Jacobian columns
    directions: int = 4
    antithetic: bool = True
    orthogonal: bool = True
    mu: float | None = None
    clip_norm: float | None = 5.0
    prompt_lr: float = 5e-2
    prompt_weight_decay: float = 5e-4

    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(
            directions=self.directions,
            mu=self.mu,
            antithetic=self.antithetic,
            clip_norm=self.clip_norm,
            orthogonal=self.orthogonal,
        )

    def surrogate_config(self) -> SurrogateConfig:
        return SurrogateConfig.for_probes(
            self.directions, self.mu, memory=self.model_memory, radius=self.trust_radius,
            max_radius=self.max_trust_radius,
        )  # fmt: skip


def collab_config(values: dict[str, object]) -> CollabConfig:
    """A CollabConfig from settings and flags; a flag that does not apply is an error."""
    names = {f.name for f in fields(CollabConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RequestError(
            f"{', '.join(unknown)}: not a setting of the default cbbt method "
            f"(its settings: {', '.join(sorted(names))}); use --method cbbt-paper for CBBT's own loop"
        )
    if "methods" in values:
        given = values["methods"]
        methods = tuple(str(m) for m in given) if isinstance(given, list | tuple) else (str(given),)
        outside = sorted(set(methods) - set(LINEAR_METHODS))
        if not methods or outside:
            raise RequestError(
                f"the default cbbt chooses among linear heads only ({', '.join(LINEAR_METHODS)}); "
                f"got {', '.join(outside) or 'none'} (fewshot-cv runs the others)"
            )
        values = {**values, "methods": methods}
    return CollabConfig(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CollabPlan:
    feature_items: int
    text_items: int
    init_items: int
    items_per_step: int
    steps: int
    budget: int | None
    template_set: str  # the set the run buys: the asked one, or a smaller one the budget can pay
    template_set_asked: str

    @property
    def total_items(self) -> int:
        return self.feature_items + self.text_items + self.init_items + self.steps * self.items_per_step

    def describe(self) -> str:
        lines = [
            f"features: {self.feature_items} items; class texts (template set {self.template_set}): "
            f"{self.text_items} items"
            + (
                f" ({self.template_set_asked} would not fit the budget beside the features)"
                if self.template_set != self.template_set_asked
                else ""
            ),
            f"prompt on top: {self.init_items} item (its token vectors), then at most {self.steps} steps x "
            f"{self.items_per_step} items (early stopping usually needs far fewer)"
            if self.steps
            else "prompt on top: none (no soft prompts on this API, or no budget left for a step)",
            f"planned at most: {self.total_items} items"
            + (f" of a {self.budget} budget" if self.budget else ""),
        ]
        return "\n".join(lines)


# Smaller general template sets, in the order a run falls back to when the budget cannot pay
# for the asked set's C texts per template beside the image features (many classes, a tight
# budget): a run with fewer templates beats a refusal, and at 16 shots the set hardly matters
# (docs/benchmarks/default.md, "What the template set buys").
TEMPLATE_FALLBACKS: tuple[str, ...] = ("openai80", "simple7", "single")


def affordable_template_set(asked: str, *, feature_items: int, classes: int, budget: int | None) -> str:
    """`asked`, or the first smaller set after it in TEMPLATE_FALLBACKS that the budget can pay
    for beside the image features (the last one when none fits: the plan then refuses)."""
    chain = TEMPLATE_FALLBACKS[TEMPLATE_FALLBACKS.index(asked) :] if asked in TEMPLATE_FALLBACKS else (asked,)
    for name in chain:
        if budget is None or feature_items + classes * len(template_set(name)) <= budget:
            return name
    return chain[-1]


def make_collab_plan(
    cfg: CollabConfig, *, feature_items: int, classes: int, soft_prompts: bool
) -> CollabPlan:
    templates = affordable_template_set(
        cfg.template_set, feature_items=feature_items, classes=classes, budget=cfg.budget
    )
    text_items = classes * len(template_set(templates))
    fixed = check_features_and_texts(feature_items=feature_items, text_items=text_items, budget=cfg.budget)
    scored = min(classes, cfg.class_subset)
    per_step = points_per_step(prompt_optimizer(cfg, classes), 1, cfg.estimator_config()) * scored
    if scored < classes:
        per_step += classes  # the current prompt on every class, for the held-out images
    init_items = 1 if soft_prompts else 0  # the initial prompt's token vectors
    steps = cfg.prompt_steps if soft_prompts else 0
    if cfg.budget is not None and steps:
        steps = min(steps, max(0, (cfg.budget - fixed - init_items) // per_step))
    if steps == 0:
        init_items = 0
    return CollabPlan(
        feature_items, text_items, init_items, per_step, steps, cfg.budget, templates, cfg.template_set
    )


@dataclass
class PromptResult:
    """What the prompt stage found: the best prompt on the held-out images, and whether it
    beat the feature method alone there."""

    theta: torch.Tensor | None
    texts: torch.Tensor | None
    weight: float
    temperature: float
    held_loss: float
    held_accuracy: float
    base_held_loss: float
    base_held_accuracy: float
    steps: int
    best_step: int
    stopped_reason: str
    held_images: int
    # The held-out gain in standard errors: mean over the held-out images of (loss without the
    # prompt − loss with it), over its standard error. The best step is the minimum of many
    # noisy held-out losses, so a bare "lower" keeps prompts that only fit the held-out noise.
    gain_z: float = 0.0
    accept_z: float = ACCEPT_Z

    @property
    def accepted(self) -> bool:
        return (
            self.texts is not None
            and self.weight > 0
            and self.held_loss < self.base_held_loss
            and self.gain_z >= self.accept_z
        )


class StackedLoss:
    """The prompt stage's oracle: P soft prompts -> P cross-entropies of `base + w·z_θ` on the
    prompt's training images at the step's weight w; ONE request (P prompts x C classes)."""

    def __init__(
        self, api: ModelApi, classes: Sequence[str], shape: torch.Size, images: torch.Tensor,
        base: torch.Tensor, labels: torch.Tensor, scale: float, key: str, weight: float,
    ) -> None:  # fmt: skip
        self.api, self.classes, self.shape, self.key = api, list(classes), shape, key
        self.images, self.base, self.labels, self.scale = images, base, labels, scale
        self.weight = weight
        self.text_features: torch.Tensor | None = None

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        texts = prompt_text_features(self.api, points.reshape(-1, *self.shape), self.classes, self.key)
        self.text_features = texts
        with torch.no_grad():
            return torch.stack([self.loss_of_texts(t) for t in texts]).double()

    def loss_of_texts(self, texts: torch.Tensor) -> torch.Tensor:
        logits = self.base + self.weight * clip_logits(self.images, texts, self.scale)
        return F.cross_entropy(logits, self.labels)


def prompt_optimizer(cfg: CollabConfig, classes: int) -> str:
    """The prompt stage's stepper: the configured one, or the estimator when classes are subset."""
    if cfg.optimizer not in ("estimator", "surrogate"):
        raise RequestError(f"optimizer {cfg.optimizer!r}: the default cbbt tunes with estimator or surrogate")
    return "estimator" if classes > cfg.class_subset else cfg.optimizer


def subset_loss(
    api: ModelApi, classes: Sequence[str], shape: torch.Size, images: torch.Tensor, base: torch.Tensor,
    labels: torch.Tensor, scale: float, key: str, weight: float, subset: torch.Tensor | None,
) -> StackedLoss:  # fmt: skip
    """The oracle on every class, or on `subset`: its classes' images, logits and names only."""
    if subset is None:
        return StackedLoss(api, classes, shape, images, base, labels, scale, key, weight)
    keep = torch.isin(labels, subset)
    remap = torch.full((len(classes),), -1, dtype=torch.long)
    remap[subset] = torch.arange(subset.numel())
    names = [classes[i] for i in subset.tolist()]
    return StackedLoss(
        api, names, shape, images[keep], base[keep][:, subset], remap[labels[keep]], scale, key, weight
    )


def run_collaborative(ctx: RunContext, cfg: CollabConfig) -> RunReport:
    started = time.time()
    api, split = ctx.api, ctx.split
    ctx.folder.create()
    card = api.model_card()
    classes = list(split.class_names)
    soft_prompts = card.max_context_vectors > 0  # an embeddings-tier card has none
    plan = make_collab_plan(
        cfg, feature_items=ctx.feature_items(cfg.views), classes=len(classes), soft_prompts=soft_prompts
    )
    if not soft_prompts:
        logger.warning("this API offers no soft prompts (embeddings tier): the prompt stage is skipped")
    logger.info("plan:\n%s", plan.describe())
    if ctx.on_plan is not None:
        ctx.on_plan(plan.describe())
    paid_features = ctx.feature_items(cfg.views, missing=True)
    curve: list[CurvePoint] = []

    # Features: images, then the template set's class texts (the priors).
    data = ctx.fetch_features(cfg.views)
    if plan.template_set != cfg.template_set:
        logger.warning(
            "template set %s (%d texts) instead of %s: the budget cannot pay for both it and the features",
            plan.template_set, plan.text_items, cfg.template_set,
        )  # fmt: skip
    templates = template_set(plan.template_set)
    per_template = buy_template_texts(api, templates, classes)
    priors = {"ensemble": ensemble(per_template)}
    if SINGLE_TEMPLATE in templates:
        priors["template"] = per_template[templates.index(SINGLE_TEMPLATE)]
    scale = (
        card.logit_scale
        if card.logit_scale > 0
        else fit_logit_scale(data.train, data.train_labels, priors["ensemble"])
    )
    zero_val, _ = score(clip_logits(data.val, priors["ensemble"], scale), data.val_labels)
    zero_test, _ = score(clip_logits(data.test, priors["ensemble"], scale), data.test_labels)
    curve.append(curve_point(0, zero_val, math.nan, api.counter))

    # Select: the feature method by cross-validation over every labelled image.
    shots = Shots.pooled(data.train, data.train_labels, data.val, data.val_labels, len(classes))
    known = default_methods()
    chosen = {m: known[m] for m in cfg.methods}
    selection = select_and_fit(shots, priors, scale, chosen, folds=cfg.cv_folds, ensembles=cfg.cv_ensembles)
    logger.info("feature method: %s, CV accuracy %.4f", selection.choice.describe(), selection.cv_accuracy)
    curve.append(curve_point(1, selection.cv_accuracy, math.nan, api.counter))

    # Prompt: on top of the choice, while the held-out images say it helps.
    prompt = None
    if plan.steps > 0:
        prompt = tune_prompt_on_top(ctx, cfg, plan, shots, selection, scale, curve)
    head = final_head(selection, prompt, shots, scale)

    # Finish: test once, the artifact, the report.
    with torch.no_grad():
        test_accuracy, _ = score(head(data.test), data.test_labels)
    save_collab_artifact(ctx, cfg, head, prompt, priors["ensemble"], card.model_dump())
    return finish_collab_report(
        ctx,
        cfg,
        plan,
        selection,
        prompt,
        curve,
        data,
        (zero_val, zero_test, test_accuracy),
        paid_features,
        started,
    )


def tune_prompt_on_top(
    ctx: RunContext,
    cfg: CollabConfig,
    plan: CollabPlan,
    shots: Shots,
    selection: Selection,
    scale: float,
    curve: list[CurvePoint],
) -> PromptResult | None:
    """Prompt steps on the chosen method's out-of-fold logits; early stopping on held-out images."""
    api, classes = ctx.api, list(ctx.split.class_names)
    run_id = uuid.uuid4().hex  # idempotency keys: a retried step is replayed, never charged twice
    oof = selection.oof_logits()
    temperature = calibrate(oof, shots.labels)
    base = temperature * oof
    images, labels = shots.features[:, 0], shots.labels
    split = holdout_split(labels, selection.cv.folds, cfg.seed)
    tr, held = split.train, split.held
    base_held = evaluate_weight(base[held], torch.zeros_like(base[held]), labels[held], 0.0)

    try:
        tokens = api.token_embeddings(cfg.init_text, idempotency_key=f"{run_id}/tokens")
    except CredentialsError as exc:
        if exc.code != "tier_not_allowed":
            raise
        logger.warning(
            "this key's tier offers no soft prompts (%s): the prompt stage is skipped", exc.message
        )
        return None
    theta0 = torch.from_numpy(tokens).float()
    generator = torch.Generator().manual_seed(cfg.seed)
    lr_at = cosine_with_warmup(plan.steps, 0, cfg.prompt_lr, cfg.prompt_lr)
    stepper = make_stepper(
        prompt_optimizer(cfg, len(classes)), theta0, generator, estimator=cfg.estimator_config(),
        lr=cfg.prompt_lr, weight_decay=cfg.prompt_weight_decay, lr_at=lr_at,
        surrogate=cfg.surrogate_config(),
    )  # fmt: skip
    best = PromptResult(
        None, None, 0.0, temperature, base_held.loss, base_held.accuracy, base_held.loss,
        base_held.accuracy, 0, -1, "max steps", int(held.numel()),
    )  # fmt: skip
    theta, since_best, step = theta0.clone(), 0, 0
    texts: torch.Tensor | None = None  # the current prompt's [C, D] class features
    weight = 0.0
    class_generator = torch.Generator().manual_seed(cfg.seed + 1)
    with ctx.progress.bar(f"{ctx.name} prompt steps", plan.steps, "step") as bar:
        while step < plan.steps:
            if cfg.budget is not None and api.counter.items + plan.items_per_step > cfg.budget:
                best.stopped_reason = "budget"
                break
            key = f"{run_id}/step{step}"
            subset = None
            if len(classes) > cfg.class_subset:
                stacked = (
                    base[tr] + weight * clip_logits(images[tr], texts, scale)
                    if texts is not None
                    else base[tr]
                )
                subset = pick_classes(stacked, labels[tr], cfg.class_subset, class_generator)
            train_weight = max(weight, cfg.weight_floor)
            oracle = subset_loss(
                api, classes, theta.shape, images[tr], base[tr], labels[tr], scale, key, train_weight, subset
            )
            try:
                outcome = stepper.step(step, theta, oracle)
                # outcome.base_text is the prompt BEFORE this update, on the scored classes.
                texts = outcome.base_text
                if subset is not None:
                    texts = prompt_text_features(api, theta.unsqueeze(0), classes, f"{key}/all")[0]
            except QuotaExhausted:
                logger.warning("the server reports the key's budget exhausted: stopping the prompt stage")
                best.stopped_reason = "server quota"
                break
            weight = best_weight(base[tr], clip_logits(images[tr], texts, scale), labels[tr]).weight
            held_score = evaluate_weight(
                base[held], clip_logits(images[held], texts, scale), labels[held], weight
            )
            curve.append(curve_point(2 + step, held_score.accuracy, outcome.loss, api.counter))
            if held_score.loss < best.held_loss:
                best.theta, best.texts, best.weight = theta.clone(), texts.clone(), weight
                best.held_loss, best.held_accuracy, best.best_step = (
                    held_score.loss,
                    held_score.accuracy,
                    step,
                )
                since_best = 0
            else:
                since_best += 1
            theta = outcome.theta.reshape(theta.shape).float()
            step += 1
            bar.update(1)
            bar.set_postfix(held_loss=f"{held_score.loss:.3f}", best=f"{best.held_loss:.3f}")
            if since_best >= cfg.patience:
                best.stopped_reason = "patience"
                break
    best.steps = step
    best.accept_z = cfg.accept_z
    if best.texts is not None:
        best.gain_z = held_out_gain_z(
            base[held], clip_logits(images[held], best.texts, scale), labels[held], best.weight
        )
    logger.info(
        "prompt stage: %d steps (%s); held-out loss %.4f with the prompt (w %.2f, %.1f SE), %.4f without",
        step, best.stopped_reason, best.held_loss, best.weight, best.gain_z, best.base_held_loss,
    )  # fmt: skip
    return best


def held_out_gain_z(base: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor, weight: float) -> float:
    """Mean per-image loss reduction of `base + weight · prompt` over `base`, in standard errors
    (paired over the same images); +inf for a reduction with no spread."""
    without = F.cross_entropy(base, labels, reduction="none")
    with_prompt = F.cross_entropy(base + weight * prompt, labels, reduction="none")
    gain = without - with_prompt
    mean = float(gain.mean())
    if gain.numel() < 2:
        return 0.0
    error = float(gain.std()) / math.sqrt(gain.numel())
    if error == 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / error


def final_head(selection: Selection, prompt: PromptResult | None, shots: Shots, scale: float) -> LinearHead:
    """The chosen method(s) refitted on every labelled image, plus the prompt's logits (at the
    weight the held-out images validated) if they helped on the held-out images.

    Each feature space's part (the served features, and each power transform a method was
    fitted on) is read off in its own space and checked there; the prompt is a part on the
    served features."""
    classifier = SpacedClassifier.of(selection.classifier)
    if prompt is not None and prompt.accepted:
        assert prompt.texts is not None
        # The weight the held-out images validated (fitted on the prompt's training images):
        # refitting it on all of them would reuse the images the prompt was tuned on.
        texts = prompt.texts

        def prompt_logits(features: torch.Tensor) -> torch.Tensor:
            return clip_logits(features, texts, scale)

        classifier = SpacedClassifier.total([classifier, prompt_logits], [prompt.temperature, prompt.weight])
    probe = shots.features[:, 0]
    parts: dict[float, LinearHead | None] = {}
    for power in {1.0, *classifier.powers}:
        part = classifier.part(power) if power in classifier.powers else _zeros(shots.num_classes)
        parts[power] = as_linear_head(part, shots.dim, power_features(probe, power))
    if any(head is None for head in parts.values()):  # only a non-linear method gets here
        raise RequestError(
            f"{selection.choice.describe()} is not a linear head; choose among {LINEAR_METHODS}"
        )
    heads = {power: head for power, head in parts.items() if head is not None}
    served = heads.pop(1.0)
    bias = served.bias + sum((h.bias for h in heads.values()), torch.zeros_like(served.bias))
    return LinearHead(served.weight, bias, {power: h.weight for power, h in heads.items()})


def _zeros(classes: int) -> Classifier:
    return lambda feats: torch.zeros(feats.shape[0], classes)


def save_collab_artifact(
    ctx: RunContext,
    cfg: CollabConfig,
    head: LinearHead,
    prompt: PromptResult | None,
    prior: torch.Tensor,
    card: dict[str, object],
) -> None:
    # The prompt's context and class features when the head includes it, else the prior's.
    context, texts = torch.zeros(0, 0), prior
    if prompt is not None and prompt.accepted and prompt.theta is not None and prompt.texts is not None:
        context, texts = prompt.theta, prompt.texts
    artifact = Artifact(
        context=context,
        class_names=list(ctx.split.class_names),
        class_text_features=texts,
        adapter_kind="linear",
        adapter_state=head.state(),
        model_card=card,
        config=asdict(cfg),
    )
    save_artifact(artifact, ctx.folder.artifact)


def finish_collab_report(
    ctx: RunContext,
    cfg: CollabConfig,
    plan: CollabPlan,
    selection: Selection,
    prompt: PromptResult | None,
    curve: list[CurvePoint],
    data: SplitFeatures,
    accuracies: tuple[float, float, float],
    paid_features: int,
    started: float,
) -> RunReport:
    zero_val, zero_test, test_accuracy = accuracies
    counter = ctx.api.counter
    # The run's own estimate: the CV accuracy of the feature method, or, with the prompt, the
    # held-out accuracy of the stack (both on images the classifier never saw).
    estimate = selection.cv_accuracy
    selected: dict[str, object] = {
        "feature_method": selection.choice.describe(),
        "cv_folds": selection.cv.folds,
        "cv_accuracy": selection.cv_accuracy,
        "cv_accuracy_by_method": selection.method_scores(),
        "labelled_images": int(data.train.shape[0] + data.val.shape[0]),
    }
    if prompt is not None:
        selected.update(
            prompt_kept=prompt.accepted,
            prompt_weight=prompt.weight if prompt.accepted else 0.0,
            temperature=prompt.temperature,
            held_out_images=prompt.held_images,
            held_out_loss_feature_method=prompt.base_held_loss,
            held_out_loss_with_prompt=prompt.held_loss,
            held_out_accuracy_feature_method=prompt.base_held_accuracy,
            held_out_accuracy_with_prompt=prompt.held_accuracy,
            held_out_gain_z=prompt.gain_z,
            prompt_best_step=prompt.best_step,
        )
    not_needed = plan.total_items - counter.items
    logger.info(
        "test accuracy %.4f (zero-shot %.4f), items %d; %d planned items not needed",
        test_accuracy, zero_test, counter.items, not_needed,
    )  # fmt: skip
    return finish_report(
        ctx.folder,
        curve,
        method=ctx.name,
        split=ctx.split,
        card=ctx.api.model_card(),
        counter=counter,
        scores=(zero_val, zero_test, estimate, None, test_accuracy),
        feature_items_charged=paid_features,
        started=started,
        selected=selected,
        prompt_steps=prompt.steps if prompt is not None else 0,
        stopped_reason=prompt.stopped_reason if prompt is not None else None,
        budget=cfg.budget,
        items_not_needed=max(0, not_needed),
        plan={**asdict(plan), "total_items": plan.total_items},
        config=asdict(cfg),
    )
