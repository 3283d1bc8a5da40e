"""White-box reference: CoOp with EXACT gradients through the same model. NOT black-box.

This is the ceiling the black-box tuners are measured against (method.md §6.4). It loads the
server's model in this process (`server.backends`), which a black-box tuner can never do, and
back-propagates through the text encoder into the soft prompt:
- devise (the default model): through BERT's `inputs_embeds`, the mean pooling and the ridge map;
- open_clip: through the text transformer, `ln_final` and the text projection.
`Backend.encode_prompts` runs under `torch.inference_mode`, so the grad-enabled forward passes
below re-implement it on the backend's own modules; `check_forward` asserts they reproduce its
features before any training.

Everything else is the black-box `cbbt` run's: one context token initialised from "a", the
same residual adapter, batch, warm-up + cosine schedule, AdamW settings, adapter start epoch
and adapter-only epochs (`TuneConfig` defaults, overridable with `--config-json`), the same
few-shot split, the same cached image views (read from, and written to, the client's feature
cache under the same keys), and model selection on validation only. With
`--config-json '{"method": "cbbt-prompt"}' --name coop-prompt-whitebox` it is CoOp alone
(prompt only). The report has the tuner's report fields, the method name, and
`"white_box": true`; its `queries` count in-process encodings (not API calls: `calls` is 0).

    python -m benchmarks.whitebox --data fashion-mnist --shots 16 --seed 1 \
        --test-per-class 100 --views 2 --cache runs/bench/cache/features.sqlite \
        --out runs/bench/fashion-mnist/coop-whitebox/16shot/seed1
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from client.api import QueryCounter
from client.data import FewShotSplit, few_shot_split, load_dataset
from client.errors import RequestError
from client.features import FeatureCache, FeatureStore
from client.model import accuracy_and_loss, logits_of, make_adapter, state_of
from client.report import RunReport, finish_report
from client.run_context import fetch_split_features
from client.run_folder import RunFolder
from client.selection import BATCH_SEED_OFFSET, Best, Selection, sample_batch
from client.steppers import cosine_with_warmup
from client.tune_config import TuneConfig
from server.backends.base import Backend, PromptItem
from server.backends.registry import create_backend
from server.images import ImageLimits, decode_image
from shared.schemas import ModelCard

logger = logging.getLogger("cbbt.whitebox")

METHOD = "coop-whitebox"
DEFAULT_MODEL = "devise-effnet-minilm"
_LIMITS = ImageLimits(max_bytes=50_000_000, max_pixels=100_000_000)
FORWARD_TOLERANCE = 1e-4

# context [M, W] -> class text features [C, D], differentiable in the context.
TextEncoder = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Grad-enabled text forwards on the backend's own modules
# ---------------------------------------------------------------------------------------------


def devise_encoder(backend: Any, class_names: Sequence[str]) -> TextEncoder:
    """[CLS] ctx <class tokens> . [SEP] -> BERT -> mean pool -> normalise -> ridge map -> normalise."""
    bert = backend.bert
    for p in bert.parameters():
        p.requires_grad_(False)
    device = backend.device
    emb = backend.word_embeddings
    with torch.no_grad():
        cls = emb(torch.tensor([backend.cls_id], device=device)).clone()
        tails = [
            emb(torch.tensor([*backend._class_ids(n), backend.sep_id], device=device)).clone()
            for n in class_names
        ]
    ridge = backend.ridge.clone()  # a plain tensor (the backend's was built from inference tensors)

    def encode(context: torch.Tensor) -> torch.Tensor:
        ctx = context.to(device, emb.weight.dtype)
        sequences = [torch.cat([cls, ctx, tail]) for tail in tails]
        length = max(int(s.shape[0]) for s in sequences)
        x = torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in sequences])
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=device)
        for i, s in enumerate(sequences):
            mask[i, : s.shape[0]] = 1
        hidden = bert(inputs_embeds=x, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = F.normalize(((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).float(), dim=-1)
        ones = torch.ones(pooled.shape[0], 1, device=pooled.device)
        return F.normalize(torch.cat([pooled, ones], dim=1) @ ridge, dim=-1).cpu()

    return encode


def openclip_encoder(backend: Any, class_names: Sequence[str]) -> TextEncoder:
    """[SOT] ctx <class tokens> . [EOT] -> text transformer -> ln_final at EOT -> projection."""
    tower = backend.tower
    for p in backend.model.parameters():
        p.requires_grad_(False)
    device = backend.device
    embed = tower.token_embedding
    with torch.no_grad():
        sot = embed(torch.tensor([backend.sot_id], device=device)).clone()
        tails = [
            embed(torch.tensor([*backend._class_ids(n), backend.eot_id], device=device)).clone()
            for n in class_names
        ]
        full = int(tower.positional_embedding.shape[0])
        positional = tower.positional_embedding.detach().clone()
        pad_row = embed.weight[0].detach().clone()
        attn_mask = tower.attn_mask.detach().clone() if backend.causal else None

    def encode(context: torch.Tensor) -> torch.Tensor:
        ctx = context.to(device, embed.weight.dtype)
        sequences = [torch.cat([sot, ctx, tail]) for tail in tails]
        lengths = [int(s.shape[0]) for s in sequences]
        length = max(lengths) if backend.causal else full
        x = torch.stack([torch.cat([s, pad_row.expand(length - s.shape[0], -1)]) for s in sequences])
        x = x + positional[:length]
        mask = attn_mask[:length, :length] if attn_mask is not None else None
        x = tower.ln_final(tower.transformer(x, attn_mask=mask))
        eot = torch.tensor([n - 1 for n in lengths], device=x.device)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = tower.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return F.normalize(pooled.float(), dim=-1).cpu()

    return encode


def text_encoder(backend: Backend, class_names: Sequence[str]) -> TextEncoder:
    if backend.card.backend == "devise":
        return devise_encoder(backend, class_names)
    if backend.card.backend == "open_clip":
        return openclip_encoder(backend, class_names)
    raise ValueError(f"no white-box forward for backend {backend.card.backend!r}")


def check_forward(
    backend: Backend, encode: TextEncoder, context: torch.Tensor, classes: Sequence[str]
) -> float:
    """The grad-enabled forward must reproduce the served features (max abs difference)."""
    served = backend.encode_prompts([PromptItem(context, name) for name in classes])
    with torch.no_grad():
        ours = encode(context)
    diff = float((served - ours).abs().max())
    if diff > FORWARD_TOLERANCE:
        raise RuntimeError(f"white-box forward differs from the served features by {diff:.2e}")
    return diff


# ---------------------------------------------------------------------------------------------
# Image features: the client's cache, filled in-process when a feature is missing
# ---------------------------------------------------------------------------------------------


class InProcessService:
    """An `ImageEmbedder` (what `FeatureStore` needs): image features from the backend, counted."""

    def __init__(self, backend: Backend, batch_size: int = 32) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.counter = QueryCounter()

    def model_card(self) -> ModelCard:
        return self.backend.card

    def embed_images(
        self, images: Sequence[bytes], *, idempotency_key: str | None = None
    ) -> npt.NDArray[np.float32]:
        # Decoded exactly as the server's route decodes an upload.
        pixels = [
            self.backend.preprocess(decode_image(base64.b64encode(raw).decode("ascii"), _LIMITS))
            for raw in images
        ]
        out = [
            self.backend.encode_images(torch.stack(pixels[i : i + self.batch_size]))
            for i in range(0, len(pixels), self.batch_size)
        ]
        self.counter.items += len(images)
        return torch.cat(out).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------
# CoOp + adapter, with the tuner's schedule
# ---------------------------------------------------------------------------------------------


def run_coop(
    backend: Backend,
    cache: FeatureCache,
    split: FewShotSplit,
    cfg: TuneConfig,
    out_dir: Path,
    *,
    name: str = METHOD,
) -> RunReport:
    """CoOp (+ the adapter when `cfg.method` is "cbbt"; prompt only for "cbbt-prompt").

    The tuner's loop with exact gradients: setup -> for each step (select on validation) ->
    adapter-only epochs -> test the selected checkpoint once.
    """
    started = time.time()
    folder = RunFolder(out_dir).create()
    torch.manual_seed(cfg.seed)
    batch_gen = torch.Generator().manual_seed(cfg.seed + BATCH_SEED_OFFSET)
    card = backend.card
    classes = list(split.class_names)
    scale = card.logit_scale
    service = InProcessService(backend)
    store = FeatureStore(service, cache)
    cached = fetch_split_features(store, split, cfg.views)
    train, val, test = cached.train, cached.val, cached.test
    y_train, y_val, y_test = cached.train_labels, cached.val_labels, cached.test_labels
    counter = service.counter
    feature_items = counter.items

    encode = text_encoder(backend, classes)
    theta0 = backend.token_embeddings(cfg.init_text)[1].float()
    diff = check_forward(backend, encode, theta0, classes)
    logger.info("white-box forward matches the served features (max abs diff %.1e)", diff)
    with torch.no_grad():
        text0 = encode(theta0)
    counter.items += len(classes)
    counter.loss_evaluations += 1
    zero_val, _ = accuracy_and_loss(None, val, y_val, text0, scale)
    zero_test, _ = accuracy_and_loss(None, test, y_test, text0, scale)

    theta = theta0.clone().requires_grad_(True)
    prompt_opt = torch.optim.AdamW([theta], lr=cfg.prompt_lr, weight_decay=cfg.prompt_weight_decay)
    adapter = make_adapter(
        cfg.adapter_kind, card.feature_dim, train, y_train, len(classes), ratio=cfg.adapter_ratio
    )
    adapter_opt = (
        torch.optim.AdamW(adapter.parameters(), lr=cfg.adapter_lr, weight_decay=cfg.adapter_weight_decay)
        if adapter is not None and any(p.requires_grad for p in adapter.parameters())
        else None
    )
    n_train = train.shape[0]
    steps_per_epoch = max(1, math.ceil(n_train / (cfg.batch_size if cfg.batch_size > 0 else n_train)))
    steps = steps_per_epoch * cfg.epochs if cfg.tunes_prompt else 0
    warmup = min(steps, steps_per_epoch)
    adapter_start = steps_per_epoch * cfg.adapter_joins_epoch
    lr_at = cosine_with_warmup(steps, warmup, cfg.prompt_lr, cfg.warmup_lr)

    selection = Selection(counter)
    selection.start(Best(zero_val, math.inf, 0, theta0.clone(), text0, state_of(adapter)))

    def select(step: int, texts: torch.Tensor, train_loss: float) -> None:
        acc, loss = accuracy_and_loss(adapter, val, y_val, texts, scale)
        selection.offer(
            step, acc, loss, train_loss,
            lambda: Best(acc, loss, step, theta.detach().clone(), texts.detach().clone(), state_of(adapter)),
        )  # fmt: skip

    for step in range(steps):
        images, labels = sample_batch(train, y_train, cfg.batch_size, batch_gen)
        for group in prompt_opt.param_groups:
            group["lr"] = lr_at(step)
        prompt_opt.zero_grad()
        if adapter_opt is not None:
            adapter_opt.zero_grad()
        if adapter is not None:
            adapter.train()
        texts = encode(theta)
        counter.items += len(classes)
        counter.loss_evaluations += 1
        loss = F.cross_entropy(logits_of(adapter, images, texts, scale), labels)
        loss.backward()
        if adapter is not None:
            adapter.eval()
        # Selection sees the prompt the loss was computed at (as the tuner's base point).
        select(step, texts, loss.item())
        prompt_opt.step()
        if adapter_opt is not None and step >= adapter_start:
            adapter_opt.step()

    # The adapter alone on cached features with the best prompt (as the tuner's last phase).
    best = selection.best
    assert best.theta is not None and best.text_features is not None
    text_best = best.text_features
    with torch.no_grad():
        theta.copy_(best.theta)
    adapter_epochs = 0
    if adapter is not None and adapter_opt is not None:
        if best.adapter is not None:
            adapter.load_state_dict(best.adapter)
        per_epoch = max(1, math.ceil(train.shape[0] * train.shape[1] / cfg.adapter_batch_size))
        for epoch in range(cfg.adapter_epochs):
            for _ in range(per_epoch):
                images, labels = sample_batch(train, y_train, cfg.adapter_batch_size, batch_gen)
                adapter.train()
                adapter_opt.zero_grad()
                loss = F.cross_entropy(logits_of(adapter, images, text_best, scale), labels)
                loss.backward()
                adapter_opt.step()
                adapter.eval()
            adapter_epochs = epoch + 1
            select(steps + adapter_epochs, text_best, math.nan)

    best = selection.best
    assert best.text_features is not None
    if adapter is not None and best.adapter is not None:
        adapter.load_state_dict(best.adapter)
    test_acc, _ = accuracy_and_loss(adapter, test, y_test, best.text_features, scale)
    logger.info("%s: val %.4f, test %.4f (zero-shot %.4f)", name, best.val_accuracy, test_acc, zero_test)
    return finish_report(
        folder,
        selection.curve,
        method=name,
        split=split,
        card=card,
        counter=counter,
        scores=(zero_val, zero_test, best.val_accuracy, best.val_loss, test_acc),
        feature_items_charged=feature_items,
        started=started,
        white_box=True,
        note="NOT black-box: exact gradients through the model, in-process (a reference ceiling)",
        selected_step=best.step,
        prompt_steps=steps,
        adapter_epochs=adapter_epochs,
        config=asdict(cfg),
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whitebox", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the server's model name")
    parser.add_argument("--pretrained", default=None, help="open_clip weights (a local file)")
    parser.add_argument("--cache", type=Path, required=True, help="the client's feature cache (SQLite)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the text batches are tiny; 0: torch's choice)",
    )
    parser.add_argument(
        "--config-json", default="{}", help="TuneConfig overrides as JSON (method defaults to cbbt)"
    )
    parser.add_argument("--name", default=METHOD, help="the method name written into the report")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def tune_config(shots: int, seed: int, views: int, overrides: dict[str, Any]) -> TuneConfig:
    names = {f.name for f in fields(TuneConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RequestError(f"unknown TuneConfig fields: {', '.join(unknown)}")
    values = {"method": "cbbt", **overrides, "shots": shots, "seed": seed, "views": views, "budget": None}
    return TuneConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = tune_config(args.shots, args.seed, args.views, json.loads(args.config_json))
    dataset = load_dataset(args.data, data_dir=args.data_dir)
    split = few_shot_split(dataset, cfg.shots, cfg.seed, max_test_per_class=args.test_per_class)
    backend = create_backend(args.model, args.pretrained)
    if not backend.card.has_semantics:
        logger.warning("random-init model: in-process weights may differ from the server's; shapes only")
    cache = FeatureCache(args.cache)
    try:
        report = run_coop(backend, cache, split, cfg, args.out, name=args.name)
    finally:
        cache.close()
    print(
        f"{args.name} (white-box, not black-box), {cfg.shots}-shot, seed {cfg.seed}: "
        f"test {report.test_accuracy:.4f}, val {report.val_accuracy:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
