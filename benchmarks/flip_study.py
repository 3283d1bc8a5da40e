"""What horizontal flips buy the default's feature stage: as extra training views, and at test
time (the mean of an image's and its mirror's features), on cached real features.

The mirrors of every labelled and test image of a `fewshot_features` cache are encoded once
(in-process, with the default model) into `--flips`, then the default's CV + refit runs per
seed on four variants: `plain` (as `cbbt` runs), `tta` (labelled and test images as the mean
of both), `flip-views` (the mirror as a second training view) and `flip-views+tta`.

    python -m benchmarks.flip_study --features runs/fewshot/fashion-mnist.pt \\
        --flips runs/fewshot/fashion-mnist-flip.pt
"""

from __future__ import annotations

import argparse
import io
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.selection_ablation import priors_of
from client.data import Example, few_shot_split, load_dataset
from client.features import view_bytes
from client.fewshot.methods import default_methods
from client.fewshot.select import accuracy, select_and_fit
from client.fewshot.shots import Shots

SEEDS = (1, 2, 3)


def mirror_features(blob: dict[str, Any], batch: int = 32) -> dict[str, torch.Tensor]:
    """Features of the mirrored view 0 of every labelled image (cache order) and test image."""
    from server.backends.registry import create_backend

    dataset = load_dataset(blob["data"])
    labelled: dict[str, Example] = {}
    test: list[Example] = []
    for seed in blob["seeds"]:
        split = few_shot_split(dataset, 16, seed, max_test_per_class=100)
        labelled.update({e.source: e for e in split.train + split.val})
        test = split.test
    if sorted(labelled) != blob["sources"] or [e.label for e in test] != blob["test_labels"].tolist():
        raise SystemExit("the cache was written from other splits (other --seeds or --test-per-class)")
    backend = create_backend("devise-effnet-minilm")

    def encode(examples: list[Example]) -> torch.Tensor:
        def mirrored(e: Example) -> torch.Tensor:
            image = Image.open(io.BytesIO(view_bytes(e, 0))).convert("RGB")
            return backend.preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))

        chunks = [examples[i : i + batch] for i in range(0, len(examples), batch)]
        return torch.cat([backend.encode_images(torch.stack([mirrored(e) for e in c])) for c in chunks])

    return {"labelled": encode([labelled[s] for s in blob["sources"]]), "test": encode(test)}


def study(blob: dict[str, Any], flips: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    dataset = load_dataset(blob["data"])
    every = priors_of(blob)
    priors = {"single": every["single"], "openai80": every["openai80"]}
    scale, classes = float(blob["logit_scale"]), len(blob["class_names"])
    index = {s: i for i, s in enumerate(blob["sources"])}
    test, test_flip = F.normalize(blob["test"].float(), dim=-1), F.normalize(flips["test"].float(), dim=-1)
    results: dict[str, list[float]] = {}
    for seed in SEEDS:
        split = few_shot_split(dataset, 16, seed, max_test_per_class=100)
        rows = torch.tensor([index[e.source] for e in split.train + split.val])
        plain = F.normalize(blob["features"][rows, 0].float(), dim=-1)
        mirror = F.normalize(flips["labelled"][rows].float(), dim=-1)
        both = F.normalize(plain + mirror, dim=-1)
        variants = {
            "plain": (plain.unsqueeze(1), test),
            "tta": (both.unsqueeze(1), F.normalize(test + test_flip, dim=-1)),
            "flip-views": (torch.stack([plain, mirror], dim=1), test),
            "flip-views+tta": (torch.stack([plain, mirror], dim=1), F.normalize(test + test_flip, dim=-1)),
        }
        for name, (train, scored) in variants.items():
            shots = Shots.of(train, blob["labels"][rows], classes)
            selection = select_and_fit(shots, priors, scale, default_methods())
            results.setdefault(name, []).append(
                100 * accuracy(selection.classifier, scored, blob["test_labels"])
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--flips", type=Path, required=True, help="mirror features (written if missing)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    blob = torch.load(args.features, weights_only=True)
    if not args.flips.exists():
        torch.save(mirror_features(blob), args.flips)
    results = study(blob, torch.load(args.flips, weights_only=True))
    base = results["plain"]
    print(f"{blob['data']}: test accuracy %, seeds {', '.join(map(str, SEEDS))}")
    for name, accs in results.items():
        paired = [a - b for a, b in zip(accs, base, strict=True)]
        print(
            f"{name:16s} {statistics.fmean(accs):5.1f} ± {statistics.stdev(accs):.1f}   per seed "
            f"{' / '.join(f'{a:.1f}' for a in accs)}   paired vs plain {statistics.fmean(paired):+.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
