"""Feature methods: zero-prompt-query baselines on the service's features (method.md §5).

These methods never tune a prompt. They pay, through the same `CbbtClient` and the same
`QueryCounter` as the tuner, for what they use from the API:
- the image features of the few-shot training views, the validation and the test images
  (through the shared `FeatureStore`, so cached features are free, exactly as for `Tuner`);
- one prompt evaluation: the C class text features of a fixed text template,
  `"a photo of a {class}."` (plain text, `/v1/embeddings`; no soft prompt needed).
Everything else is local work on the returned features. Hyperparameters and checkpoints are
chosen on the validation split only; the test split is scored once, at the end.

- `linear-probe`: `LinearProbe` (logistic regression on the training views' features), its
  weight decay picked on validation from a small grid. Ignores the text features.
- `lfa`: an LFA-style linear map W (D × D) from image features onto the text features of their
  classes, logits = scale · cos(f·W, text). Initialised by orthogonal Procrustes
  (W₀ = U·Vᵀ from the SVD of Xᵀ·Y, X = training features, Y = their class text features),
  shrunk toward the identity (W = I + s·(W₀ − I), s picked on validation: LFA's "β-Procrustes"),
  then refined briefly by Adam on the training cross-entropy with a penalty ‖W − W_init‖²
  (in place of LFA's re-ranking loss; simpler, and it keeps W near its closed-form start);
  the refinement step is picked on validation.
- `tip-adapter`: the training-free cache model (keys = training features averaged over views),
  α and β searched on validation with `search_alpha_beta` (α ∈ [0.1, 10], β ∈ [0.1, 12]).
- `tip-adapter-f`: the same cache with trainable keys, fine-tuned locally with AdamW on all
  training views (Tip-Adapter-F's recipe: lr 1e-3, cosine decay, 20 epochs), the epoch picked on
  validation, then α, β searched on validation again.

A feature method is a fit function, `fit(cfg, data) -> Fit`: it sees the cached features
(`FeatureData`: training views and labels, validation, the template's class text features,
the logit scale), selects its own hyperparameters on validation with `better`, and returns a
classifier (image features -> logits). Adding one = a fit function here, an entry in `FITS`,
and a `MethodSpec` in client/methods.py. `run_feature_method` does the rest (features and text
through the API, counted; the test split scored once; the same `RunReport` as the tuner).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import torch
import torch.nn.functional as F

from client.adapters import (
    AlphaBetaSearch,
    LinearProbe,
    ResidualAdapter,
    TipAdapter,
    clip_logits,
    search_alpha_beta,
)
from client.api import ModelApi
from client.errors import RequestError
from client.fewshot.methods import default_methods
from client.fewshot.select import select_and_fit
from client.fewshot.shots import Shots
from client.fewshot.templates import class_texts, ensemble, template_set
from client.model import score
from client.plan import check_features_and_texts
from client.report import RunReport, finish_report
from client.run_context import RunContext, SplitFeatures
from client.selection import better, curve_point
from client.wordings import DEFAULT_WORDINGS, wording_slots

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TEMPLATE", "FITS", "FeatureConfig", "FeatureData", "Fit", "FitFn", "run_feature_method"]

DEFAULT_TEMPLATE = "a photo of a {}."
# Generic wordings (from CLIP's prompt-ensembling templates): nothing data-set specific.
SEARCH_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a black and white photo of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of the {}.",
)
# Methods that embed every template of `search_templates` (K x C texts, paid and counted).
NEEDS_TEMPLATES = frozenset({"prompt-search", "prompt-search-tip-f"})


@dataclass(frozen=True)
class FeatureConfig:
    """One feature-baseline run. Grids are data; defaults follow the methods' papers."""

    method: str
    shots: int = 16
    seed: int = 1
    budget: int | None = None  # items; refuse to start if features + text cannot be paid
    views: int = 2  # cached views per training image, as for the tuner
    template: str = DEFAULT_TEMPLATE
    # Prompt ensemble: a general template set (client/fewshot/templates.py) whose C × T class
    # texts are bought and averaged into the zero-shot classifier; "single" = `template` only.
    template_set: str = "single"
    # fewshot-cv: folds of the cross-validation over all labelled shots (None: ≤ 5, as the
    # rarest class allows) and whether ensembles of the top methods may be chosen.
    cv_folds: int | None = None
    cv_ensembles: bool = True
    # Linear probe: weight decay grid (L2 on the weights of the multinomial regression).
    probe_weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    # LFA: shrinkage toward the identity, then a short refinement.
    lfa_shrinks: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    lfa_steps: int = 150
    lfa_lr: float = 5e-4
    lfa_anchor: float = 1e-2  # weight of ‖W − W_init‖² (summed over entries)
    lfa_eval_every: int = 10
    # Tip-Adapter(-F): α, β grids searched on validation. Tip-Adapter's released search goes up
    # to α = 5, β = 12 on some data sets; this model's logit scale (30, not CLIP's 100) and weak
    # zero-shot classifier want more cache weight, so α goes to 10 (the default grid's α = 3
    # edge was hit on Fashion-MNIST validation).
    tip_alphas: tuple[float, float, int] = (0.1, 10.0, 100)  # linspace(start, stop, steps)
    tip_betas: tuple[float, float, int] = (0.1, 12.0, 60)
    tip_epochs: int = 20
    tip_lr: float = 1e-3
    tip_batch_size: int = 256
    # Discrete prompt search (embeddings tier): the pool of generic templates, the greedy
    # ensemble-selection rounds (with replacement, so a template picked twice weighs double).
    search_templates: tuple[str, ...] = SEARCH_TEMPLATES
    search_rounds: int = 24
    # ... and of class-name wordings (client/wordings.py): up to this many per class, the name
    # as given included (1: the names as given only). Each distinct text is paid once.
    search_wordings: int = DEFAULT_WORDINGS
    # Residual adapter on image features (CLIP-Adapter), trained locally on the template's texts.
    adapter_ratio: float = 0.2
    adapter_steps: int = 300
    adapter_lr: float = 1e-3
    adapter_eval_every: int = 10
    extra: dict[str, object] = field(default_factory=dict)  # free-form notes kept in the report


@dataclass
class FeatureData(SplitFeatures):
    """The split's features plus the template's class text features [C, D] and the logit scale."""

    text: torch.Tensor
    scale: float  # the model's logit scale (fitted on the shots when the API publishes none)
    searched_texts: torch.Tensor | None = None  # [K, C, D]: every searched prompt's class texts
    # What each of the K searched prompts is (a template, with a wording slot of the class
    # names when there are several); None: `cfg.search_templates`, one each.
    searched_labels: tuple[str, ...] | None = None
    # [T, C, D] per-template class features when a template set was bought (`text` is then
    # their ensemble), else None.
    template_text: torch.Tensor | None = None

    @property
    def classes(self) -> int:
        return int(self.text.shape[0])


# A fitted classifier: image features [N, D] -> logits [N, C].
Classifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Fit:
    classifier: Classifier
    val_accuracy: float
    val_loss: float
    selected: dict[str, object]


# A feature method: (its config, the cached features) -> a classifier selected on validation.
FitFn = Callable[["FeatureConfig", FeatureData], Fit]


# ---------------------------------------------------------------------------------------------
# The four methods. Each sees features only and selects on validation only.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_linear_probe(cfg: FeatureConfig, data: FeatureData) -> Fit:
    x, y = data.flat_train
    classes = data.classes
    best: Fit | None = None
    for weight_decay in cfg.probe_weight_decays:
        probe = LinearProbe(x.shape[1], classes, weight_decay=weight_decay).fit(x, y)
        acc, loss = score(probe.predict_logits(data.val), data.val_labels)
        logger.debug("linear probe wd=%g: val %.4f", weight_decay, acc)
        if best is None or better((acc, loss), (best.val_accuracy, best.val_loss)):
            best = Fit(probe.predict_logits, acc, loss, {"weight_decay": weight_decay})
    assert best is not None
    return best


def procrustes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The orthogonal W minimising ‖x·W − y‖_F: U·Vᵀ from the SVD of xᵀ·y (float64)."""
    u, _, vh = torch.linalg.svd(x.double().T @ y.double())
    return (u @ vh).float()


def fit_lfa(cfg: FeatureConfig, data: FeatureData) -> Fit:
    scale, seed = data.scale, cfg.seed
    x, y = data.flat_train
    x = F.normalize(x, dim=-1)
    text = F.normalize(data.text, dim=-1)
    dim = x.shape[1]
    w0 = procrustes(x, text[y])
    eye = torch.eye(dim)

    def logits(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return clip_logits(F.normalize(feats, dim=-1) @ w, text, scale)

    # 1. β-Procrustes: the shrinkage toward the identity, on validation.
    best_s, best_score = 0.0, score(logits(eye, data.val), data.val_labels)  # s = 0: zero-shot
    with torch.no_grad():
        for s in cfg.lfa_shrinks:
            candidate = score(logits(eye + s * (w0 - eye), data.val), data.val_labels)
            if better(candidate, best_score):
                best_s, best_score = s, candidate
    w_init = eye + best_s * (w0 - eye)

    # 2. A short refinement by exact local gradients, the step picked on validation.
    torch.manual_seed(seed)
    w = w_init.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lfa_lr)
    best_w, best_step = w_init.clone(), 0
    for step in range(1, cfg.lfa_steps + 1):
        with torch.enable_grad():
            opt.zero_grad()
            loss = F.cross_entropy(logits(w, x), y) + cfg.lfa_anchor * (w - w_init).pow(2).sum()
            loss.backward()
            opt.step()
        if step % cfg.lfa_eval_every == 0 or step == cfg.lfa_steps:
            with torch.no_grad():
                candidate = score(logits(w, data.val), data.val_labels)
            if better(candidate, best_score):
                best_score, best_w, best_step = candidate, w.detach().clone(), step
    final = best_w
    return Fit(
        lambda feats: logits(final, feats),
        best_score[0],
        best_score[1],
        {"shrink": best_s, "refine_step": best_step, "refine_steps": cfg.lfa_steps},
    )


def _tip_cache(data: FeatureData, classes: int, *, trainable: bool) -> TipAdapter:
    keys = F.normalize(data.train.mean(dim=1), dim=-1)  # average the cached views per image
    return TipAdapter(keys, data.train_labels, classes, trainable_keys=trainable)


def _tip_classifier(adapter: TipAdapter, text: torch.Tensor, scale: float) -> Classifier:
    def classify(feats: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapter(feats, clip_logits(feats, text, scale))

    return classify


def _search(
    cfg: FeatureConfig, adapter: TipAdapter, data: FeatureData, val_zero: torch.Tensor
) -> AlphaBetaSearch:
    return search_alpha_beta(
        adapter,
        data.val,
        data.val_labels,
        val_zero,
        alphas=torch.linspace(*cfg.tip_alphas),
        betas=torch.linspace(*cfg.tip_betas),
    )


@torch.no_grad()
def fit_tip_adapter(cfg: FeatureConfig, data: FeatureData) -> Fit:
    scale = data.scale
    adapter = _tip_cache(data, data.classes, trainable=False)
    found = _search(cfg, adapter, data, clip_logits(data.val, data.text, scale))
    adapter.alpha, adapter.beta = found.alpha, found.beta
    classify = _tip_classifier(adapter, data.text, scale)
    acc, loss = score(classify(data.val), data.val_labels)
    return Fit(classify, acc, loss, {"alpha": found.alpha, "beta": found.beta})


def fit_tip_adapter_f(cfg: FeatureConfig, data: FeatureData) -> Fit:
    scale, seed = data.scale, cfg.seed
    adapter = _tip_cache(data, data.classes, trainable=True)
    val_zero = clip_logits(data.val, data.text, scale)
    start = _search(cfg, adapter, data, val_zero)
    adapter.alpha, adapter.beta = start.alpha, start.beta
    x, y = data.flat_train
    zero_train = clip_logits(x, data.text, scale)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.tip_lr, eps=1e-4)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.tip_batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.tip_epochs * steps_per_epoch)
    best_keys = adapter.keys.detach().clone()
    best_epoch = 0
    with torch.no_grad():
        best_score = score(adapter(data.val, val_zero), data.val_labels)
    for epoch in range(1, cfg.tip_epochs + 1):
        order = torch.randperm(x.shape[0], generator=generator)
        for start_at in range(0, x.shape[0], cfg.tip_batch_size):
            idx = order[start_at : start_at + cfg.tip_batch_size]
            with torch.enable_grad():
                opt.zero_grad()
                loss = F.cross_entropy(adapter(x[idx], zero_train[idx]), y[idx])
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            candidate = score(adapter(data.val, val_zero), data.val_labels)
        if better(candidate, best_score):
            best_score, best_keys, best_epoch = candidate, adapter.keys.detach().clone(), epoch
    with torch.no_grad():
        adapter.keys.copy_(best_keys)
    found = _search(cfg, adapter, data, val_zero)
    adapter.alpha, adapter.beta = found.alpha, found.beta
    classify = _tip_classifier(adapter, data.text, scale)
    val_acc, val_loss = score(classify(data.val), data.val_labels)
    return Fit(
        classify,
        val_acc,
        val_loss,
        {"alpha": found.alpha, "beta": found.beta, "epoch": best_epoch, "epochs": cfg.tip_epochs},
    )


# ---------------------------------------------------------------------------------------------
# Methods for an embeddings-only API: text templates instead of soft prompts.
# ---------------------------------------------------------------------------------------------


def _zero_shot(text: torch.Tensor, scale: float) -> Classifier:
    return lambda feats: clip_logits(feats, text, scale)


@torch.no_grad()
def fit_zero_shot_text(cfg: FeatureConfig, data: FeatureData) -> Fit:
    """Zero-shot from the text template (the logit scale fitted on the shots when unknown)."""
    classify = _zero_shot(data.text, data.scale)
    acc, loss = score(classify(data.val), data.val_labels)
    return Fit(classify, acc, loss, {"template": cfg.template})


@torch.no_grad()
def search_templates(cfg: FeatureConfig, data: FeatureData) -> tuple[torch.Tensor, dict[str, object]]:
    """Discrete prompt search: greedy ensemble selection with replacement on the training
    shots' loss (each round adds the template whose inclusion lowers it most; the counts are
    the weights), the number of rounds kept chosen on validation. Returns the [C, D] text."""
    if data.searched_texts is None:
        raise RequestError(f"{cfg.method} needs the searched templates' texts")
    pool = F.normalize(data.searched_texts, dim=-1)  # [K, C, D]
    x, y = data.flat_train
    counts = torch.zeros(pool.shape[0])

    def mix(weights: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.einsum("k,kcd->cd", weights, pool), dim=-1)

    best_text, best_score, best_counts = (
        data.text,
        score(clip_logits(data.val, data.text, data.scale), data.val_labels),
        counts.clone(),
    )
    for _ in range(cfg.search_rounds):
        losses = []
        for k in range(pool.shape[0]):
            trial = counts.clone()
            trial[k] += 1
            losses.append(float(F.cross_entropy(clip_logits(x, mix(trial), data.scale), y)))
        counts[int(torch.tensor(losses).argmin())] += 1
        text = mix(counts)
        candidate = score(clip_logits(data.val, text, data.scale), data.val_labels)
        if better(candidate, best_score):
            best_text, best_score, best_counts = text, candidate, counts.clone()
    labels = data.searched_labels or cfg.search_templates
    weights = {labels[k]: int(c) for k, c in enumerate(best_counts.tolist()) if c > 0}
    return best_text, {"template_weights": weights or {cfg.template: 1}}


def fit_prompt_search(cfg: FeatureConfig, data: FeatureData) -> Fit:
    text, selected = search_templates(cfg, data)
    classify = _zero_shot(text, data.scale)
    with torch.no_grad():
        acc, loss = score(classify(data.val), data.val_labels)
    return Fit(classify, acc, loss, selected)


def fit_prompt_search_tip_f(cfg: FeatureConfig, data: FeatureData) -> Fit:
    """The searched template ensemble as Tip-Adapter-F's zero-shot classifier."""
    text, selected = search_templates(cfg, data)
    fit = fit_tip_adapter_f(cfg, replace(data, text=text))
    return Fit(fit.classifier, fit.val_accuracy, fit.val_loss, {**selected, **fit.selected})


def fit_residual_adapter(cfg: FeatureConfig, data: FeatureData) -> Fit:
    """CLIP-Adapter's residual MLP on the image features, against the template's class texts,
    by exact local gradients (full batch of every cached view); the step chosen on validation."""
    torch.manual_seed(cfg.seed)
    x, y = data.flat_train
    adapter = ResidualAdapter(x.shape[1], ratio=cfg.adapter_ratio)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.adapter_lr)

    def logits(feats: torch.Tensor) -> torch.Tensor:
        return clip_logits(adapter(feats), data.text, data.scale)

    with torch.no_grad():
        best_score = score(logits(data.val), data.val_labels)
    best_state, best_step = copy.deepcopy(adapter.state_dict()), 0
    for step in range(1, cfg.adapter_steps + 1):
        opt.zero_grad()
        F.cross_entropy(logits(x), y).backward()
        opt.step()
        if step % cfg.adapter_eval_every == 0:
            with torch.no_grad():
                candidate = score(logits(data.val), data.val_labels)
            if better(candidate, best_score):
                best_score, best_state, best_step = candidate, copy.deepcopy(adapter.state_dict()), step
    adapter.load_state_dict(best_state)
    adapter.eval()

    def classify(feats: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits(feats)

    return Fit(classify, best_score[0], best_score[1], {"step": best_step, "ratio": cfg.adapter_ratio})


def fit_fewshot_cv(cfg: FeatureConfig, data: FeatureData, only: str | None = None) -> Fit:
    """Every client.fewshot method (zero-shot, GDA, CLAP probe, linear probe, Tip cache) on
    every prior (the single template, the ensemble), cross-validated over ALL labelled shots:
    the training shots and the validation images pooled (the validation images get their one
    view repeated, so each image weighs the same). The winner, or an ensemble of the top
    methods, is refitted on all of them. `val_accuracy` is the winner's CV accuracy. `only`:
    one client.fewshot method alone (its grid still chosen by the same CV, no ensembles)."""
    shots = Shots.pooled(data.train, data.train_labels, data.val, data.val_labels, data.classes)
    methods = default_methods()
    if only is not None:
        methods = {only: methods[only]}
    priors: dict[str, torch.Tensor] = {"template": data.text}
    if data.template_text is not None:
        single = _single_template_row(cfg)
        priors = {"ensemble": data.text}
        if single is not None:
            priors["template"] = data.template_text[single]
    ensembles = cfg.cv_ensembles and only is None
    selection = select_and_fit(shots, priors, data.scale, methods, folds=cfg.cv_folds, ensembles=ensembles)
    chosen = selection.choice
    return Fit(
        selection.classifier,
        chosen.score.accuracy,
        chosen.score.loss,
        {
            "choice": chosen.name,
            "candidates": chosen.describe(),
            "cv_folds": selection.cv.folds,
            "cv_accuracy": chosen.score.accuracy,
            "cv_accuracy_by_method": selection.method_scores(),
            "labelled_images": int(shots.labels.numel()),
        },
    )


def _single_template_row(cfg: FeatureConfig) -> int | None:
    templates = template_set(cfg.template_set)
    return templates.index(cfg.template) if cfg.template in templates else None


FITS: dict[str, FitFn] = {
    "fewshot-cv": fit_fewshot_cv,
    "gda": partial(fit_fewshot_cv, only="gda"),
    "clap": partial(fit_fewshot_cv, only="clap"),
    "linear-probe": fit_linear_probe,
    "lfa": fit_lfa,
    "tip-adapter": fit_tip_adapter,
    "tip-adapter-f": fit_tip_adapter_f,
    "zero-shot-text": fit_zero_shot_text,
    "residual-adapter": fit_residual_adapter,
    "prompt-search": fit_prompt_search,
    "prompt-search-tip-f": fit_prompt_search_tip_f,
}


# ---------------------------------------------------------------------------------------------
# The run: setup (features and text through the API, counted) -> fit (selects on validation)
# -> finish (test once, report).
# ---------------------------------------------------------------------------------------------


def fit_logit_scale(train: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    """The temperature of the zero-shot logits that maximises the training shots' likelihood
    (train [N, V, D], every view a sample): a 1-D search on a log grid, no query."""
    views = train.shape[1]
    cos = F.normalize(train.reshape(-1, train.shape[-1]), dim=-1) @ F.normalize(text, dim=-1).T
    targets = labels.repeat_interleave(views)
    grid = torch.logspace(0.0, 2.5, 61)  # 1 .. ~316 (CLIP's learned scale is 100)
    losses = torch.stack([F.cross_entropy(scale * cos, targets) for scale in grid])
    scale = float(grid[int(losses.argmin())])
    logger.info("logit scale fitted on the training shots: %.2f", scale)
    return scale


@dataclass(frozen=True)
class SearchPool:
    """The discrete prompt search's pool: every template x every wording slot of the class
    names (client/wordings.py), as [K][C] texts; each distinct text is embedded (paid) once."""

    labels: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]  # [K][C]

    @classmethod
    def of(cls, cfg: FeatureConfig, classes: list[str]) -> SearchPool:
        slots = wording_slots(classes, cfg.search_wordings)
        labels, texts = [], []
        for template in cfg.search_templates:
            for j, names in enumerate(slots):
                wording = f" [wording {j}: {', '.join(names)}]" if len(slots) > 1 else ""
                labels.append(template + wording)
                texts.append(tuple(template.format(name) for name in names))
        return cls(tuple(labels), tuple(texts))

    @property
    def distinct(self) -> list[str]:
        return list(dict.fromkeys(t for row in self.texts for t in row))

    @property
    def items(self) -> int:
        return len(self.distinct)

    def embed(self, api: ModelApi) -> torch.Tensor:
        """[K, C, D] text features, one text query per distinct text."""
        distinct = self.distinct
        features = torch.from_numpy(api.embed_texts(distinct))
        index = {text: i for i, text in enumerate(distinct)}
        rows = torch.tensor([[index[t] for t in row] for row in self.texts])
        return features[rows]


def buy_template_texts(api: ModelApi, templates: list[str], classes: list[str]) -> torch.Tensor:
    """`[T, C, D]` class text features of every template, in plain-text queries (T x C items),
    counted as one prompt evaluation per template."""
    per_template = torch.from_numpy(api.embed_texts(class_texts(templates, classes)))
    api.counter.loss_evaluations += len(templates)
    return per_template.view(len(templates), len(classes), -1)


def run_feature_method(ctx: RunContext, cfg: FeatureConfig) -> RunReport:
    started = time.time()
    api, split = ctx.api, ctx.split
    fit_fn = FITS.get(cfg.method)
    if fit_fn is None:
        raise RequestError(f"unknown feature method {cfg.method!r}; one of {', '.join(FITS)}")
    ctx.folder.create()
    card = api.model_card()
    classes = list(split.class_names)
    # As the tuner does, the budget counts image features at full price, cached or not, so
    # the check does not depend on what other runs left in the cache.
    full_price = ctx.feature_items(cfg.views)
    templates = [cfg.template] if cfg.template_set == "single" else template_set(cfg.template_set)
    search = SearchPool.of(cfg, classes) if cfg.method in NEEDS_TEMPLATES else None
    text_items = len(classes) * len(templates) + (search.items if search is not None else 0)
    check_features_and_texts(feature_items=full_price, text_items=text_items, budget=cfg.budget)
    missing = ctx.feature_items(cfg.views, missing=True)  # what this run pays for
    counter = api.counter
    if ctx.on_plan is not None:
        ctx.on_plan(f"features: {full_price} items ({missing} not cached); class texts: {text_items} items")
    images = ctx.fetch_features(cfg.views)
    per_template = buy_template_texts(api, templates, classes)
    text = per_template[0] if len(templates) == 1 else ensemble(per_template)
    searched_texts = None
    if search is not None:  # discrete prompt search: every distinct text, in text queries
        searched_texts = search.embed(api)
        counter.loss_evaluations += len(search.labels)
    # An embeddings-tier API publishes no logit scale (0 on its card): fit it on the shots.
    scale = card.logit_scale
    if scale <= 0:
        scale = fit_logit_scale(images.train, images.train_labels, text)
    data = FeatureData(
        **{f.name: getattr(images, f.name) for f in fields(images)},
        text=text,
        scale=scale,
        searched_texts=searched_texts,
        searched_labels=search.labels if search is not None else None,
        template_text=None if len(templates) == 1 else per_template,
    )

    zero_val, _ = score(clip_logits(data.val, text, scale), data.val_labels)
    zero_test, _ = score(clip_logits(data.test, text, scale), data.test_labels)
    logger.info("%s: zero-shot (template) val %.3f, test %.3f", cfg.method, zero_val, zero_test)

    fit = fit_fn(cfg, data)
    with torch.no_grad():
        test_accuracy, _ = score(fit.classifier(data.test), data.test_labels)
    logger.info(
        "%s: val %.4f, test %.4f (zero-shot %.4f), items %d, selected %s",
        cfg.method, fit.val_accuracy, test_accuracy, zero_test, counter.items, fit.selected,
    )  # fmt: skip
    curve = [
        curve_point(0, zero_val, math.nan, counter),
        curve_point(1, fit.val_accuracy, math.nan, counter),
    ]
    return finish_report(
        ctx.folder,
        curve,
        method=ctx.name,
        split=split,
        card=card,
        counter=counter,
        scores=(zero_val, zero_test, fit.val_accuracy, fit.val_loss, test_accuracy),
        feature_items_charged=missing,
        started=started,
        selected=fit.selected,
        budget=cfg.budget,
        config=asdict(cfg),
    )
