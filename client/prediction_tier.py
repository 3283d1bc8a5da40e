"""The prediction-only tier: `/v1/classify` (images + one soft prompt in, logits out) and nothing
that returns a feature. What most black-box tuning papers assume (BBT, BPT-VLM, BlackVIP, ZIP).

The loss-only optimisers (CMA-ES, SPSA-GC, ZIP-style, cbbt's estimator on the loss) tune the
soft prompt through it for real: every loss evaluation is one classify call on the step's image
batch, counted as the server bills it (the images plus the C class prompts encoded). Validation
and test accuracy come from classify calls too. The start is the word embedding of "a" from
`/v1/token-embeddings`, which this tier includes.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from client.api import CbbtClient
from client.data import Example, FewShotSplit
from client.features import view_bytes
from client.selection import labels_of
from client.steppers import make_stepper
from client.tune_config import tune_config
from shared.arrays import encode_array
from shared.schemas import API_PREFIX, ClassifyResponse

logger = logging.getLogger(__name__)

__all__ = ["ClassifyClient", "ClassifyLoss", "PredictionRun", "tune_on_predictions"]


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


@dataclass
class PredictionRun:
    optimizer: str
    steps: int
    val_accuracy: float
    test_accuracy: float
    zero_shot_test_accuracy: float
    losses: list[float] = field(default_factory=list)


def _accuracy(
    api: ClassifyClient, examples: Sequence[Example], classes: list[str], theta: torch.Tensor
) -> float:
    images = [view_bytes(e, 0) for e in examples]
    limit = max(1, api.max_items_per_request - len(classes))
    logits = torch.cat(
        [api.classify(images[i : i + limit], classes, theta.numpy()) for i in range(0, len(images), limit)]
    )
    return float((logits.argmax(dim=1) == labels_of(list(examples))).float().mean())


def tune_on_predictions(
    api: ClassifyClient,
    split: FewShotSplit,
    *,
    optimizer: str = "estimator",
    steps: int = 20,
    batch_size: int = 16,
    eval_every: int = 5,
    seed: int = 1,
) -> PredictionRun:
    """Tune one soft prompt by loss-only optimisation through /v1/classify; select on validation."""
    classes = list(split.class_names)
    theta = torch.from_numpy(api.token_embeddings("a")).float()  # [1, W]: the prompt "a {class}."
    cfg = tune_config("fast")
    generator = torch.Generator().manual_seed(seed)
    stepper = make_stepper(
        optimizer,
        theta.flatten().clone(),
        generator,
        estimator=cfg.estimator_config(),
        lr=cfg.prompt_lr,
        weight_decay=cfg.prompt_weight_decay,
        lr_at=lambda _: cfg.prompt_lr,
    )
    zero_shot_test = _accuracy(api, split.test, classes, theta)
    best_theta, best_val = theta.clone(), _accuracy(api, split.val, classes, theta)
    flat = theta.flatten().clone()
    losses: list[float] = []
    for step in range(steps):
        order = torch.randperm(len(split.train), generator=generator)[:batch_size].tolist()
        batch = [split.train[i] for i in order]
        oracle = ClassifyLoss(api, [view_bytes(e, 0) for e in batch], labels_of(batch), classes, theta.shape)
        outcome = stepper.step(step, flat, oracle)
        flat = outcome.theta.detach().flatten().clone()
        losses.append(outcome.loss)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _accuracy(api, split.val, classes, flat.reshape(theta.shape))
            if val > best_val:
                best_theta, best_val = flat.reshape(theta.shape).clone(), val
    test = _accuracy(api, split.test, classes, best_theta)
    logger.info(
        "%s on the prediction tier: val %.3f, test %.3f (zero-shot %.3f)",
        optimizer,
        best_val,
        test,
        zero_shot_test,
    )
    return PredictionRun(optimizer, steps, best_val, test, zero_shot_test, losses)
