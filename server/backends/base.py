"""The interface every hosted model implements; the routes and the batcher see only this.

All encoders return L2-normalised float32 features and run under `torch.inference_mode`.
A prompt item is one (context vectors, class name) pair: the backend builds
`[SOS] ctx_1..ctx_M <class tokens> . [EOS]` (or its tokenizer's equivalent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from shared.schemas import ModelCard

# A sane cap on soft-prompt length, whatever the tower's context allows: long prompts are
# both useless for estimated-gradient tuning (the estimate degrades with the dimension)
# and a cheap way to make the server work hard.
MAX_CONTEXT_VECTORS = 64
# Entries of the tokenizers' word caches: enough for any vocabulary of class names and prompts,
# bounded so that random text cannot grow the server's memory.
TOKEN_CACHE_ENTRIES = 4096

# The token ids the text tower reads for one text, special tokens included, truncated as it would.
TokenIds = tuple[int, ...]


@dataclass(frozen=True)
class PromptItem:
    context: torch.Tensor  # [M, W] float32
    class_name: str
    # Tokenised off the model thread when the request is checked (see Backend.class_ids).
    class_ids: TokenIds | None = None


class LruCache:
    """A bounded stand-in for a tokenizer's word cache dict (`in`, `[]`, `[]=`), least recently
    used out first; `pinned` entries (special tokens) are never evicted. Not thread-safe: the
    backends call their tokenizer under a lock."""

    def __init__(self, max_entries: int, pinned: Mapping[str, str] | None = None) -> None:
        self.max_entries = max_entries
        self.pinned = dict(pinned or {})
        self._entries: OrderedDict[str, str] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self.pinned or key in self._entries

    def __getitem__(self, key: str) -> str:
        if key in self.pinned:
            return self.pinned[key]
        self._entries.move_to_end(key)
        return self._entries[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.pinned) + len(self._entries)


class PromptTooLong(ValueError):
    """The context vectors plus the class name do not fit the text tower's context."""


class Backend(ABC):
    card: ModelCard

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> a [3, S, S] float tensor ready for `encode_images`."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, D] normalised image features."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[TokenIds]:
        """The ids the text tower reads for each text (thread-safe; run off the model thread)."""

    @abstractmethod
    def encode_token_ids(self, rows: list[TokenIds]) -> torch.Tensor:
        """N tokenised texts (from `tokenize`) -> [N, D] normalised text features."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N plain texts -> [N, D] normalised text features."""
        return self.encode_token_ids(self.tokenize(texts))

    @abstractmethod
    def encode_prompts(self, items: list[PromptItem]) -> torch.Tensor:
        """N (context, class name) pairs -> [N, D] normalised text features."""

    @abstractmethod
    def token_embeddings(self, text: str) -> tuple[list[str], torch.Tensor]:
        """The token strings of `text` (no special tokens) and their [M, W] input embeddings."""

    @abstractmethod
    def class_ids(self, class_name: str) -> TokenIds:
        """The ids of `<class name> .` without start/end tokens (thread-safe, cached)."""

    def class_token_count(self, class_name: str) -> int:
        """How many tokens `<class name> .` takes (to check a prompt fits the context)."""
        return len(self.class_ids(class_name))

    def check_prompt_fits(self, n_context: int, class_name: str) -> None:
        if n_context > self.card.max_context_vectors:
            raise PromptTooLong(
                f"{n_context} context vectors exceed this model's maximum of {self.card.max_context_vectors}"
            )
        needed = n_context + self.class_token_count(class_name) + 2  # + start and end tokens
        if needed > self.card.context_length:
            raise PromptTooLong(
                f"{n_context} context vectors plus class name {class_name[:40]!r} need {needed} tokens; "
                f"the text tower's context length is {self.card.context_length}"
            )

    def warm_up(self) -> None:
        """One forward pass of each tower, so /ready means "answers at full speed"."""
        size = self.card.image_size
        self.encode_images(self.preprocess(Image.new("RGB", (size, size), (128, 128, 128))).unsqueeze(0))
        self.encode_texts(["a photo of a cat."])
        _, ctx = self.token_embeddings("a photo of a")
        self.encode_prompts([PromptItem(ctx, "cat")])
