"""Every method cbbt can run, as data: one registry, one lookup, the same meaning everywhere.

`cbbt tune --method X` and `cbbt bench --methods X` both resolve X here (`method(X)`) and
build its config with `tune_config_for` / `feature_config_for`, so they run the same thing.

A `MethodSpec` says how a method runs (`kind`):
- `tune`: the tuning loop (client/train.py) with `TuneConfig` settings. `settings["method"]`
  is the tuner's mode (cbbt, cbbt-prompt, adapter, zero-shot), `settings["estimator"]` the
  estimator preset (client/tune_config.py) the other settings go on top of;
- `feature`: a zero-prompt-query feature method (client/feature_methods.py, `FITS`), with
  `FeatureConfig` settings;
- `whitebox`: the in-process CoOp reference (benchmarks/whitebox.py; only with a local model);
- `collab`: the default `cbbt`, collaborative and budget-aware (client/collab.py, `CollabConfig`
  settings): features, the feature method chosen by cross-validation, a prompt on top of it
  with early stopping. `--estimator faithful` on it runs `cbbt-paper`, CBBT's released recipe.

Settings are layered: estimator preset < the method's settings < flags the user typed < the
run's own (shots, seed, views, budget). `register_method` (or `cbbt bench --define
NAME=BASE:key=value,...`) adds a variant of an existing method.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from client.collab import CollabConfig, collab_config
from client.errors import RequestError
from client.feature_methods import FITS, FeatureConfig
from client.tune_config import TuneConfig, tune_config

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_METHODS",
    "METHODS",
    "MethodSpec",
    "collab_config_for",
    "feature_config_for",
    "method",
    "parse_define",
    "register_method",
    "runs_paper_recipe",
    "tune_config_for",
]

Kind = Literal["tune", "feature", "whitebox", "collab"]

_NEEDS_FEATURES = "image features + C template texts (plain text in, features out)"
_NEEDS_TEMPLATES = "image features + K x C template texts (plain text in, features out)"
_NEEDS_PROMPTS = "image features + text features of soft prompts (embeddings in, features out)"
_NEEDS_ONE_PROMPT = "image features + one soft prompt's class features"
_NEEDS_WEIGHTS = "model weights and gradients (in-process; NOT black-box)"


@dataclass(frozen=True)
class MethodSpec:
    """One method: how it runs, with which settings, and what it needs from the API."""

    name: str
    kind: Kind
    settings: Mapping[str, Any] = field(default_factory=dict)
    needs: str = ""
    description: str = ""
    black_box: bool = True

    @property
    def prompt_only(self) -> bool:
        """Tunes the prompt alone (no adapter, no feature model)."""
        return self.settings.get("method") == "cbbt-prompt"


def _specs(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _specs(
    MethodSpec("zero-shot", "tune", {"method": "zero-shot"}, _NEEDS_ONE_PROMPT,
               "the prompt 'a {class}.' (CBBT's init), no tuning"),
    MethodSpec("linear-probe", "feature", {"method": "linear-probe"}, _NEEDS_FEATURES,
               "logistic regression on image features (text unused), weight decay on val"),
    MethodSpec("lfa", "feature", {"method": "lfa"}, _NEEDS_FEATURES,
               "LFA-style map: Procrustes init, shrunk to identity, short refinement"),
    MethodSpec("tip-adapter", "feature", {"method": "tip-adapter"}, _NEEDS_FEATURES,
               "training-free cache model, alpha/beta on val"),
    MethodSpec("tip-adapter-f", "feature", {"method": "tip-adapter-f"}, _NEEDS_FEATURES,
               "cache keys fine-tuned locally, epoch and alpha/beta on val"),
    # The embeddings tier's own (text templates, never a soft prompt): any OpenAI-style API.
    MethodSpec("zero-shot-text", "feature", {"method": "zero-shot-text"}, _NEEDS_FEATURES,
               "zero-shot from the text template 'a photo of a {class}.'"),
    MethodSpec("residual-adapter", "feature", {"method": "residual-adapter"}, _NEEDS_FEATURES,
               "CLIP-Adapter residual MLP on image features against the template's texts"),
    MethodSpec("prompt-search", "feature", {"method": "prompt-search"}, _NEEDS_TEMPLATES,
               "discrete prompt search: a weighted ensemble of generic templates chosen on the shots"),
    MethodSpec("prompt-search-tip-f", "feature", {"method": "prompt-search-tip-f"}, _NEEDS_TEMPLATES,
               "Tip-Adapter-F on the searched template ensemble"),
    # client/fewshot: cross-validated over all labelled shots, on the 80-template ensemble;
    # one view per image (extra views bought nothing measurable: docs/benchmarks/default.md).
    MethodSpec("fewshot-cv", "feature", {"method": "fewshot-cv", "views": 1, "template_set": "openai80"},
               _NEEDS_FEATURES, "k-fold CV over all shots chooses among zero-shot, GDA, CLAP probe, "
               "linear probe, Tip cache (or an ensemble of the top ones), on an 80-template ensemble"),
    MethodSpec("gda", "feature", {"method": "gda", "views": 1, "template_set": "openai80"}, _NEEDS_FEATURES,
               "GDA (shared shrunk covariance) fused with zero-shot; shrinkage, weight and power "
               "transform by CV"),
    MethodSpec("clap", "feature", {"method": "clap", "views": 1, "template_set": "openai80"}, _NEEDS_FEATURES,
               "CLAP-style probe anchored to the text features; penalty by CV"),
    MethodSpec("adapter", "tune", {"method": "adapter"}, _NEEDS_ONE_PROMPT,
               "CLIP-Adapter residual MLP alone on the 'a {class}.' text features"),
    # The default: the most accuracy per item (docs/benchmarks/default.md, "The default cbbt").
    # One view, as in `cbbt tune` (CollabConfig.views): a bench's --views is for the tuners.
    MethodSpec("cbbt", "collab", {"views": 1},
               _NEEDS_PROMPTS + "; on the embeddings tier, its feature stages only",
               "features -> the feature method chosen by k-fold CV (GDA, CLAP, probe, zero-shot on 80 "
               "templates, or a mean of the top ones' calibrated logits) -> cbbt's surrogate tunes a "
               "prompt on top, early stopping on held-out shots"),
    # CBBT's released recipe, unchanged (also `cbbt --estimator faithful`).
    MethodSpec("cbbt-paper", "tune", {"method": "cbbt", "estimator": "faithful"}, _NEEDS_PROMPTS,
               "faithful CBBT: estimated-gradient prompt + residual adapter"),
    MethodSpec("cbbt-prompt", "tune", {"method": "cbbt-prompt", "estimator": "surrogate"}, _NEEDS_PROMPTS,
               "cbbt's surrogate: the text features' Jacobian fitted from 4 antithetic probes a step, "
               "trust-region steps on the full-batch loss; prompt only"),
    MethodSpec("cbbt-faithful-prompt", "tune", {"method": "cbbt-prompt", "estimator": "faithful"},
               _NEEDS_PROMPTS, "faithful CBBT estimator (q=256, one-sided), prompt only"),
    MethodSpec("cmaes-prompt", "tune", {"method": "cbbt-prompt", "optimizer": "cmaes"}, _NEEDS_PROMPTS,
               "BBT/BPT-VLM style CMA-ES in a random subspace, prompt only"),
    MethodSpec("spsa-gc-prompt", "tune", {"method": "cbbt-prompt", "optimizer": "spsa-gc"}, _NEEDS_PROMPTS,
               "BlackVIP-style SPSA-GC on the context vectors, prompt only"),
    MethodSpec("zip-prompt", "tune", {"method": "cbbt-prompt", "optimizer": "zip"}, _NEEDS_PROMPTS,
               "ZIP-style low-rank context, SPSA, sqrt(d) clipping, prompt only"),
    MethodSpec("cbbt-fast-prompt", "tune", {"method": "cbbt-prompt", "estimator": "fast"}, _NEEDS_PROMPTS,
               "cbbt's scalar estimator (full-batch loss, 4 antithetic orthogonal directions, "
               "AdamW 5e-2), prompt only"),
    MethodSpec("cbbt-fast", "tune", {"method": "cbbt", "estimator": "fast"}, _NEEDS_PROMPTS,
               "cbbt's estimator + Tip-Adapter-F cache on the tuned prompt's logits"),
    MethodSpec("cbbt-fast-residual", "tune", {"method": "cbbt", "estimator": "fast", "adapter": "residual"},
               _NEEDS_PROMPTS, "cbbt's estimator + CBBT's residual adapter"),
    MethodSpec("cmaes-prompt-fullbatch", "tune",
               {"method": "cbbt-prompt", "optimizer": "cmaes", "batch_size": 0}, _NEEDS_PROMPTS,
               "CMA-ES as above, loss on all cached training views (as cbbt-fast's)"),
    MethodSpec("coop-whitebox", "whitebox", {"method": "cbbt"}, _NEEDS_WEIGHTS,
               "CoOp: exact gradients through the text encoder + the same adapter", black_box=False),
    MethodSpec("coop-prompt-whitebox", "whitebox", {"method": "cbbt-prompt"}, _NEEDS_WEIGHTS,
               "CoOp alone: exact gradients through the text encoder, prompt only", black_box=False),
)  # fmt: skip
DEFAULT_METHOD = "cbbt"
DEFAULT_METHODS: tuple[str, ...] = ("zero-shot", "linear-probe", "tip-adapter", "cbbt-prompt", "cbbt")
# Settings each run fixes itself (from its grid cell), whatever the method or the flags say.
RUN_SETTINGS = frozenset({"shots", "seed", "views", "budget"})


def method(name: str) -> MethodSpec:
    """The one lookup: a registered method by name (RequestError naming the known ones)."""
    spec = METHODS.get(name)
    if spec is None:
        raise RequestError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return spec


def register_method(
    name: str,
    *,
    based_on: str = DEFAULT_METHOD,
    needs: str | None = None,
    description: str | None = None,
    **settings: Any,
) -> MethodSpec:
    """Add (or replace) a method: `based_on`'s spec with more settings.

    e.g. `register_method("cbbt-fast", based_on="cbbt", antithetic=True, directions=16)`.
    """
    base = method(based_on)
    check_settings(base.kind, settings)
    spec = replace(
        base,
        name=name,
        settings={**base.settings, **settings},
        needs=base.needs if needs is None else needs,
        description=description or f"{based_on} with {', '.join(f'{k}={v}' for k, v in settings.items())}",
    )
    METHODS[name] = spec
    return spec


def check_settings(kind: Kind, settings: Mapping[str, Any]) -> None:
    target = {"feature": FeatureConfig, "collab": CollabConfig}.get(kind, TuneConfig)
    names = {f.name for f in fields(target)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise RequestError(f"unknown {target.__name__} fields: {', '.join(unknown)}")


def tune_config_for(spec: MethodSpec, flags: Mapping[str, Any], run: Mapping[str, Any]) -> TuneConfig:
    """The TuneConfig of a `tune` (or `whitebox`) method: preset < spec < flags < run."""
    check_settings("tune", flags)
    values = {**spec.settings, **flags, **run}
    estimator = str(values.pop("estimator", "faithful"))
    return tune_config(estimator, **values)


def feature_config_for(spec: MethodSpec, run: Mapping[str, Any]) -> FeatureConfig:
    """The FeatureConfig of a `feature` method (tuning flags do not apply to it)."""
    if spec.settings.get("method") not in FITS:
        raise RequestError(f"{spec.name}: no feature method {spec.settings.get('method')!r} in FITS")
    return FeatureConfig(**{**spec.settings, **run})


def collab_config_for(spec: MethodSpec, flags: Mapping[str, Any], run: Mapping[str, Any]) -> CollabConfig:
    """The CollabConfig of the default method: spec < flags < run (estimator `fast` is its own)."""
    estimator = flags.get("estimator", "fast")
    if estimator != "fast":
        raise RequestError(
            f"{spec.name} tunes its prompt with the `fast` estimator (or `faithful`: CBBT's own recipe)"
        )
    values = {**spec.settings, **{k: v for k, v in flags.items() if k != "estimator"}, **run}
    return collab_config(values)


def runs_paper_recipe(spec: MethodSpec, flags: Mapping[str, Any]) -> bool:
    """`cbbt --estimator faithful`: CBBT's released recipe, as the issue keeps it."""
    return spec.kind == "collab" and flags.get("estimator") == "faithful"


def whitebox_settings(spec: MethodSpec, flags: Mapping[str, Any]) -> dict[str, Any]:
    """TuneConfig settings for the white-box reference (it has no budget and no optimiser)."""
    values = {**spec.settings, **{k: v for k, v in flags.items() if k != "budget"}}
    return {k: v for k, v in values.items() if k not in ("views", "optimizer")}


def parse_define(text: str) -> tuple[str, str, dict[str, Any]]:
    """'NAME=BASE:key=value,key=value' -> (name, base, settings); values parsed as JSON if they can be."""
    name, sep, rest = text.partition("=")
    base, _, assignments = rest.partition(":")
    if not sep or not name or not base:
        raise RequestError(f"--define wants NAME=BASE:key=value,...; got {text!r}")
    settings: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in assignments.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise RequestError(f"--define {name}: {item!r} is not key=value")
        lowered = raw.strip().lower()
        value: Any = None if lowered in ("none", "null") else raw.strip()
        if value is not None:
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(lowered if lowered in ("true", "false") else raw.strip())
        settings[key.strip().replace("-", "_")] = value
    return name.strip(), base.strip(), settings
