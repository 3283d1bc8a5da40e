"""How biased is scoring perturbed prompts on a subset of the classes? (the default `cbbt`, issue 13)

With many classes the default `cbbt` scores each step's perturbed prompts on `--class-subset`
classes (client/fewshot/stack.py `pick_classes`: half drawn at random, half their hardest
negatives), to pay k instead of C text items per prompt. The restricted loss drops the other
classes from every softmax's normaliser, so its gradient is not the full loss's gradient. This
script measures how far it is, on real features (in-process: the server's own backend, the
cached features of `benchmarks/fewshot_features.py`), at the default `cbbt`'s starting point:

- the base logits are the calibrated out-of-fold logits of the CV-chosen feature method, the
  prompt is "a photo of a" (what client/collab.py starts from);
- for M random unit directions u, central differences of the full loss and of the restricted
  loss (averaged over R subset draws, i.e. the estimator's expectation) give the gradient's
  projections; their cosine is the alignment of the two gradients in that M-dimensional
  subspace (1 = unbiased direction), their norm ratio the scale bias;
- subsets: `pick_classes` (random + hard negatives) against purely random classes of the same size.

    python -m benchmarks.class_subset_bias --features runs/fewshot/fashion-mnist.pt --sizes 2 4 6
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from client.adapters import clip_logits
from client.collab import CollabConfig
from client.data import few_shot_split, load_dataset
from client.fewshot.methods import default_methods
from client.fewshot.select import calibrate, choose, cross_validate
from client.fewshot.shots import Shots
from client.fewshot.stack import best_weight, pick_classes
from client.fewshot.templates import ensemble
from server.backends.base import PromptItem
from server.backends.registry import create_backend

logger = logging.getLogger("cbbt.class_subset_bias")

LINEAR = ("zero-shot", "gda", "clap", "linear-probe")


def stacked_loss(base: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor, weight: float) -> float:
    return float(F.cross_entropy(base + weight * prompt, labels))


def restricted_loss(
    base: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor, subset: torch.Tensor, weight: float
) -> float:
    keep = torch.isin(labels, subset)
    remap = torch.full((base.shape[1],), -1, dtype=torch.long)
    remap[subset] = torch.arange(subset.numel())
    return stacked_loss(base[keep][:, subset], prompt[keep][:, subset], remap[labels[keep]], weight)


def random_subset(labels: torch.Tensor, classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(classes, generator=generator)[:size].sort().values


def measure(
    blob: dict[str, Any], seed: int, sizes: list[int], directions: int, draws: int
) -> list[dict[str, Any]]:
    dataset = load_dataset(blob["data"])
    split = few_shot_split(dataset, 16, seed, max_test_per_class=100)
    index = {s: i for i, s in enumerate(blob["sources"])}
    rows = torch.tensor([index[e.source] for e in split.train + split.val])
    names = list(blob["class_names"])
    classes = len(names)
    shots = Shots.of(blob["features"][rows, :1], blob["labels"][rows], classes)
    scale = float(blob["logit_scale"])
    priors = {"ensemble": ensemble(blob["text"]["openai80"]), "template": blob["text"]["single"][0]}
    methods = {m: default_methods()[m] for m in LINEAR}
    cv = cross_validate(shots, priors, scale, list(methods.values()))
    oof = cv.oof[choose(cv, ensembles=False).members[0]]
    base = calibrate(oof, shots.labels) * oof
    images, labels = shots.features[:, 0], shots.labels

    backend = create_backend("devise-effnet-minilm")
    _, theta0 = backend.token_embeddings("a photo of a")
    theta0 = theta0.float()
    generator = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(directions, theta0.numel(), generator=generator), dim=1)
    mu = max(1.0 / theta0.numel(), 1e-3)

    def prompt_logits(theta: torch.Tensor) -> torch.Tensor:
        items = [PromptItem(theta.reshape(theta0.shape), n) for n in names]
        with torch.no_grad():
            return clip_logits(images, backend.encode_prompts(items), scale)

    # The weight the default's first step trains at (client/collab.py: max(w*, floor)).
    weight = max(
        best_weight(base, prompt_logits(theta0.flatten()), labels).weight, CollabConfig().weight_floor
    )
    plus = [prompt_logits(theta0.flatten() + mu * u) for u in dirs]
    minus = [prompt_logits(theta0.flatten() - mu * u) for u in dirs]
    full = torch.tensor(
        [
            (stacked_loss(base, p, labels, weight) - stacked_loss(base, m, labels, weight)) / (2 * mu)
            for p, m in zip(plus, minus, strict=True)
        ]
    )
    out = []
    for size in sizes:
        for rule in ("random + hard negatives", "random"):
            draw_gen = torch.Generator().manual_seed(seed + size)
            sub = torch.zeros(directions)
            for _ in range(draws):
                if rule == "random":
                    subset = random_subset(labels, classes, size, draw_gen)
                else:
                    subset = pick_classes(base, labels, size, draw_gen)
                sub += torch.tensor(
                    [
                        (
                            restricted_loss(base, p, labels, subset, weight)
                            - restricted_loss(base, m, labels, subset, weight)
                        )
                        / (2 * mu)
                        for p, m in zip(plus, minus, strict=True)
                    ]
                )
            sub /= draws
            cosine = float(F.cosine_similarity(full, sub, dim=0))
            ratio = float(sub.norm() / full.norm())
            out.append(
                {"data": blob["data"], "seed": seed, "classes": classes, "subset": size, "rule": rule,
                 "cosine": cosine, "norm_ratio": ratio, "directions": directions, "draws": draws}
            )  # fmt: skip
            logger.warning(
                "%s k=%d %s: cosine %.3f, norm ratio %.2f", blob["data"], size, rule, cosine, ratio
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.features:
        blob = torch.load(path, weights_only=True)
        for seed in args.seeds:
            rows += measure(blob, seed, args.sizes, args.directions, args.draws)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
