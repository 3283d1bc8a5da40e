"""Any open_clip architecture, from a local checkpoint (or a hub tag where a hub is reachable).

The text tower is run from token *embeddings* rather than token ids, so that the same
code serves plain texts and soft prompts. Causal towers (OpenAI/OpenCLIP CLIP) are cut
after the longest real sequence of the batch: the end-of-text token only attends to
earlier positions, so the padding after it never changes its output.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from server.backends.base import (
    MAX_CONTEXT_VECTORS,
    TOKEN_CACHE_ENTRIES,
    Backend,
    LruCache,
    PromptItem,
    TokenIds,
)
from server.backends.torchvision_compat import ensure_torchvision_importable
from shared.schemas import ModelCard

logger = logging.getLogger(__name__)

# The seed of random-init weights (pretrained=none): the same model in every process.
RANDOM_INIT_SEED = 0
BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


def register_model_configs(extra_dir: Path | None = None) -> None:
    """Make cbbt's own configs (and a user's folder of JSON configs) known to open_clip."""
    ensure_torchvision_importable()
    import open_clip

    for folder in (BUILTIN_CONFIG_DIR, extra_dir):
        if folder is not None and folder.is_dir():
            open_clip.add_model_config(folder)


class OpenClipBackend(Backend):
    def __init__(self, name: str, pretrained: str | None, *, device: str = "cpu") -> None:
        ensure_torchvision_importable()
        import open_clip

        weights = None if pretrained in (None, "", "none") else pretrained
        if weights is None:
            logger.warning(
                "open_clip model %s has RANDOM weights (pretrained=none): features have no semantics; "
                "use this for shapes, budgets and determinism only",
                name,
            )
        # Random weights are seeded: every process (a restart, a second server) must serve the
        # same model, or features cached by a client stop matching the ones served after it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=weights, device=device
            )
        # open_clip modules are duck-typed (CLIP vs CustomTextCLIP): Any keeps mypy out of
        # nn.Module.__getattr__.
        self.model: Any = model.eval()
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        # open_clip's SimpleTokenizer caches every word it ever saw (unbounded: random text grows
        # the process for ever); the bounded cache keeps its special tokens pinned.
        cache = getattr(self.tokenizer, "cache", None)
        if isinstance(cache, dict):
            self.tokenizer.cache = LruCache(TOKEN_CACHE_ENTRIES, pinned=cache)
        self._tokenizer_lock = threading.Lock()
        self.device = torch.device(device)
        self.tower: Any = self._text_tower(model)
        self.causal = getattr(self.tower, "attn_mask", None) is not None
        pool = getattr(self.tower, "text_pool_type", "argmax")
        if pool != "argmax" or getattr(self.tower, "cls_emb", None) is not None:
            raise ValueError(
                f"open_clip model {name}: text pooling {pool!r} is not supported for soft prompts"
            )
        sot, eot = self._special_ids()
        self.sot_id, self.eot_id = sot, eot
        context_length = int(self.tower.positional_embedding.shape[0])
        image_size = self._image_size(model)
        self.card = ModelCard(
            id=f"open_clip/{name}" + ("" if weights is None else f"@{Path(weights).name}"),
            backend="open_clip",
            feature_dim=int(self._encode_ids(self._tokenize(["a"]))[0].shape[-1]),
            token_width=int(self.tower.token_embedding.weight.shape[1]),
            max_context_vectors=min(MAX_CONTEXT_VECTORS, context_length - 3),
            context_length=context_length,
            logit_scale=float(model.logit_scale.exp().item()),
            image_size=image_size,
            causal_text=self.causal,
            has_semantics=weights is not None,
            description=f"open_clip {name}, weights: {weights or 'random init (no semantics)'}",
        )

    # -- construction helpers -------------------------------------------------------------
    @staticmethod
    def _text_tower(model: Any) -> Any:
        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "token_embedding"):
            return text
        if hasattr(model, "token_embedding"):
            return model
        raise ValueError(
            "this open_clip model has no token-embedding text tower (HF text towers unsupported)"
        )

    def _special_ids(self) -> tuple[int, int]:
        ids = self.tokenizer([""])[0].tolist()
        return int(ids[0]), int(ids[1])

    @staticmethod
    def _image_size(model: Any) -> int:
        size = getattr(model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, tuple | list) else size)

    # -- tokens ----------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text including start and end tokens, without padding."""
        with self._tokenizer_lock:
            ids = self.tokenizer(texts)
        rows = []
        for row in ids.tolist():
            end = row.index(self.eot_id) if self.eot_id in row else len(row) - 1
            rows.append(row[: end + 1])
        return rows

    def class_ids(self, class_name: str) -> TokenIds:
        return self._class_ids(class_name)

    @lru_cache(maxsize=TOKEN_CACHE_ENTRIES)  # noqa: B019 - the backend lives as long as the process
    def _class_ids(self, class_name: str) -> TokenIds:
        """Ids of `<class name> .` without start/end tokens."""
        return tuple(self._tokenize([f"{class_name}."])[0][1:-1])

    def tokenize(self, texts: list[str]) -> list[TokenIds]:
        return [tuple(row) for row in self._tokenize(texts)]

    def token_embeddings(self, text: str) -> tuple[list[str], torch.Tensor]:
        ids = self._tokenize([text])[0][1:-1]
        decoder = getattr(self.tokenizer, "decoder", {})
        tokens = [decoder.get(i, str(i)) for i in ids]
        with torch.inference_mode():
            emb = self.tower.token_embedding(torch.tensor(ids, dtype=torch.long, device=self.device))
        return tokens, emb.float().cpu()

    # -- encoders --------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            feats = self.model.encode_image(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()

    def encode_token_ids(self, rows: list[TokenIds]) -> torch.Tensor:
        return self._encode_ids(rows)

    def encode_prompts(self, items: list[PromptItem]) -> torch.Tensor:
        sot = torch.tensor([self.sot_id], device=self.device)
        with torch.inference_mode():
            embed = self.tower.token_embedding
            sequences = []
            for item in items:
                ids = item.class_ids if item.class_ids is not None else self.class_ids(item.class_name)
                tail = torch.tensor([*ids, self.eot_id], device=self.device)
                ctx = item.context.to(self.device, embed.weight.dtype)
                sequences.append(torch.cat([embed(sot), ctx, embed(tail)]))
        return self._encode_sequences(sequences)

    def _encode_ids(self, rows: list[TokenIds] | list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            embed = self.tower.token_embedding
            sequences = [embed(torch.tensor(row, device=self.device)) for row in rows]
        return self._encode_sequences(sequences)

    def _encode_sequences(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """Run the text transformer on token-embedding sequences whose last entry is EOT."""
        tower = self.tower
        full = int(tower.positional_embedding.shape[0])
        lengths = [int(s.shape[0]) for s in sequences]
        # Causal: cut after the longest sequence (identical output). Bidirectional: keep the
        # full context the tower was trained with, since padding would change the output.
        length = max(lengths) if self.causal else full
        with torch.inference_mode():
            cast = (
                tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else None
            )
            dtype = cast or tower.token_embedding.weight.dtype
            pad_row = tower.token_embedding.weight[0].to(dtype)
            x = torch.stack(
                [torch.cat([s.to(dtype), pad_row.expand(length - s.shape[0], -1)]) for s in sequences]
            )
            x = x + tower.positional_embedding[:length].to(dtype)
            mask = tower.attn_mask[:length, :length] if self.causal else None
            x = tower.transformer(x, attn_mask=mask)
            x = tower.ln_final(x)
            eot = torch.tensor([n - 1 for n in lengths], device=x.device)
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
            proj = tower.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return F.normalize(pooled.float(), dim=-1).cpu()
