"""Prompt ensembles: many text templates per class, one classifier (method.md §7, "richer text").

The templates are general ones, not tuned to any data set: CLIP's 80 ImageNet templates and
the 7-template subset open_clip calls "simple", read from open_clip's own metadata module
(a plain list of lambdas; it is loaded on its own so the client does not import the model
stack). Each costs C text items, counted like any other query.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

SINGLE_TEMPLATE = "a photo of a {}."


@lru_cache(maxsize=1)
def _metadata() -> ModuleType:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("cbbt_open_clip_zero_shot_metadata", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def template_set(name: str) -> list[str]:
    """`single` (one template), `simple7` or `openai80`, as format strings with one `{}`."""
    if name == "single":
        return [SINGLE_TEMPLATE]
    attribute = {"openai80": "OPENAI_IMAGENET_TEMPLATES", "simple7": "SIMPLE_IMAGENET_TEMPLATES"}.get(name)
    if attribute is None:
        raise ValueError(f"unknown template set {name!r}; one of single, simple7, openai80")
    return [template("{}") for template in getattr(_metadata(), attribute)]


def class_texts(templates: list[str], class_names: list[str]) -> list[str]:
    """Template-major: row t·C + c is template t for class c."""
    return [t.format(name) for t in templates for name in class_names]


def ensemble(text_features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`[T, C, D]` per-template class features -> `[C, D]`: the (weighted) mean of the
    normalised features, normalised again (CLIP's prompt ensembling)."""
    feats = F.normalize(text_features.float(), dim=-1)
    if weights is None:
        mean = feats.mean(dim=0)
    else:
        mean = (weights.view(-1, 1, 1) * feats).sum(dim=0) / weights.sum()
    return F.normalize(mean, dim=-1)
