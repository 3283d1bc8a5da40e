"""The loss oracle: the one way any optimiser here sees the loss.

`LossOracle` is what the estimators and peer optimisers call: P flattened points `[P, d]` in,
their P losses `[P]` out, in ONE batched call (one logical HTTP request for the prompt tuners,
so every method asks for all the points of a step at once and the query counter stays honest).

`PromptLoss` is the tuner's oracle: the points are soft prompts, the request is
`/v1/prompt-embeddings` for all P prompts x C class names, and the losses are computed here on
one batch of cached image features. It keeps the last call's class text features
(`text_features`, [P, C, D]) so a stepper can hand the base prompt's features to validation
and to the adapter without another query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from client.api import ModelApi
from client.model import logits_of


class LossOracle(Protocol):
    """[P, d] points -> [P] losses, one batched call. `text_features`: the last call's [P, C, D]
    class text features, for oracles whose loss has them (None otherwise)."""

    text_features: torch.Tensor | None

    def __call__(self, points: torch.Tensor) -> torch.Tensor: ...


class TextLossOracle(LossOracle, Protocol):
    """A LossOracle whose loss is a known function of the class text features, so a stepper
    can evaluate (and differentiate) it at modelled features without a query."""

    def loss_of_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """[C, D] class text features -> the scalar loss, differentiable in `texts`."""
        ...


def prompt_text_features(
    api: ModelApi, prompts: torch.Tensor, class_names: Sequence[str], key: str
) -> torch.Tensor:
    """[P, M, W] prompts -> [P, C, D] class text features (one logical call, counted as P evaluations)."""
    out = api.prompt_embeddings(prompts.detach().float().numpy(), class_names, idempotency_key=key)
    api.counter.loss_evaluations += prompts.shape[0]
    return torch.from_numpy(out)


class PromptLoss:
    """Cross-entropy of soft prompts on one batch of cached image features (+ the adapter)."""

    def __init__(
        self,
        api: ModelApi,
        class_names: Sequence[str],
        prompt_shape: torch.Size,
        images: torch.Tensor,
        labels: torch.Tensor,
        adapter: nn.Module | None,
        scale: float,
        key: str,
    ) -> None:
        self.api = api
        self.class_names = list(class_names)
        self.prompt_shape = prompt_shape
        self.images = images
        self.labels = labels
        self.adapter = adapter
        self.scale = scale
        self.key = key
        self.text_features: torch.Tensor | None = None

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        prompts = points.reshape(-1, *self.prompt_shape)
        texts = prompt_text_features(self.api, prompts, self.class_names, self.key)
        self.text_features = texts
        with torch.no_grad():
            return torch.stack([self.loss_of_texts(t) for t in texts])

    def loss_of_texts(self, texts: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(self.adapter, self.images, texts, self.scale), self.labels)
