"""Cache the default model's real features for the feature-method study (in-process; a benchmark).

The few-shot numerics (`client/fewshot/`) take features as tensors. To choose their defaults on
real features without paying HTTP overhead for every experiment, this script runs the server's
model *in this process* (`server.backends`, as `benchmarks/whitebox.py` does) and writes, per
data set, one `.pt` file with:
- every labelled image (train + validation shots) of the 16-shot splits of the given seeds, as
  `views` features each: view 0 is the image, views ≥ 1 the client's own seeded augmentations
  (`client.features.view_bytes`, so these are the very views a client run pays for);
- the test images (view 0), the same for every seed;
- the text features of every class under each template of open_clip's 80 OpenAI ImageNet
  templates, its 7 "simple" ones, and the two single templates the client uses.
Smaller shot counts are nested in the 16-shot draw (`few_shot_split` takes the first K of one
permutation per class), so 1/2/4/8-shot splits are rebuilt from the same file.

    python -m benchmarks.fewshot_features --data digits --out runs/fewshot/digits.pt
    python -m benchmarks.fewshot_features --data lfw-subset:runs/lfw --out runs/fewshot/lfw.pt
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from client.data import Example, few_shot_split, load_dataset
from client.features import view_bytes
from server.backends.base import Backend
from server.backends.registry import create_backend
from server.backends.torchvision_compat import ensure_torchvision_importable

logger = logging.getLogger("cbbt.fewshot_features")

MAX_SHOTS = 16
SINGLE_TEMPLATES = ("a photo of a {}.", "a {}.")


def template_sets() -> dict[str, list[str]]:
    ensure_torchvision_importable()
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {
        "openai80": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES],
        "simple7": [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES],
        "single": list(SINGLE_TEMPLATES),
    }


def encode_views(backend: Backend, examples: list[Example], views: int, batch: int = 32) -> torch.Tensor:
    """[N, views, D] image features of each example's views, encoded in batches."""
    jobs = [(i, v) for i in range(len(examples)) for v in range(views)]
    out = torch.empty(len(examples), views, backend.card.feature_dim)
    started = time.time()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        pixels = torch.stack(
            [
                backend.preprocess(Image.open(io.BytesIO(view_bytes(examples[i], v))).convert("RGB"))
                for i, v in chunk
            ]
        )
        feats = backend.encode_images(pixels)
        for (i, v), f in zip(chunk, feats, strict=True):
            out[i, v] = f
        done = start + len(chunk)
        if done % (batch * 20) < batch:
            logger.info("%d / %d images (%.1f img/s)", done, len(jobs), done / (time.time() - started))
    return out


def write_lfw_folder(root: Path) -> Path:
    """scikit-image's `lfw_subset` (100 faces, then 100 non-face patches of photos) as a
    class-per-folder tree, the form a user's data comes in."""
    import numpy as np
    from skimage.data import lfw_subset

    images = np.rint(lfw_subset() * 255).astype(np.uint8)
    for index, pixels in enumerate(images):
        folder = root / ("face" if index < 100 else "background")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.data.startswith("lfw-subset:"):
        args.data = "imagefolder:" + str(write_lfw_folder(Path(args.data.partition(":")[2])))
    dataset = load_dataset(args.data)
    backend = create_backend("devise-effnet-minilm")

    labelled: dict[str, Example] = {}
    seeds: dict[int, dict[str, list[str]]] = {}
    test: list[Example] = []
    for seed in args.seeds:
        split = few_shot_split(dataset, MAX_SHOTS, seed, max_test_per_class=args.test_per_class)
        seeds[seed] = {"train": [e.source for e in split.train], "val": [e.source for e in split.val]}
        for e in split.train + split.val:
            labelled[e.source] = e
        test = split.test
    sources = sorted(labelled)
    logger.info("%s: %d labelled images x %d views, %d test", args.data, len(sources), args.views, len(test))
    texts: dict[str, torch.Tensor] = {}
    for name, templates in template_sets().items():
        rows = [t.format(c) for t in templates for c in dataset.class_names]
        feats = torch.cat([backend.encode_texts(rows[i : i + 256]) for i in range(0, len(rows), 256)])
        texts[name] = feats.view(len(templates), len(dataset.class_names), -1)
    labelled_feats = encode_views(backend, [labelled[s] for s in sources], args.views)
    test_feats = encode_views(backend, test, 1)[:, 0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "data": args.data,
            "model": backend.card.id,
            "logit_scale": backend.card.logit_scale,
            "class_names": list(dataset.class_names),
            "templates": template_sets(),
            "text": texts,
            "sources": sources,
            "labels": torch.tensor([labelled[s].label for s in sources]),
            "features": labelled_feats,
            "seeds": seeds,
            "test": test_feats,
            "test_labels": torch.tensor([e.label for e in test]),
        },
        args.out,
    )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
