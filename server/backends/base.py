"""The interface every hosted model implements; the routes and the batcher see only this.

All encoders return L2-normalised float32 features and run under `torch.inference_mode`.
A prompt item is one (context vectors, class name) pair: the backend builds
`[SOS] ctx_1..ctx_M <class tokens> . [EOS]` (or its tokenizer's equivalent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image

from shared.schemas import ModelCard

# A sane cap on soft-prompt length, whatever the tower's context allows: long prompts are
# both useless for estimated-gradient tuning (the estimate degrades with the dimension)
# and a cheap way to make the server work hard.
MAX_CONTEXT_VECTORS = 64


@dataclass(frozen=True)
class PromptItem:
    context: torch.Tensor  # [M, W] float32
    class_name: str


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
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N plain texts -> [N, D] normalised text features."""

    @abstractmethod
    def encode_prompts(self, items: list[PromptItem]) -> torch.Tensor:
        """N (context, class name) pairs -> [N, D] normalised text features."""

    @abstractmethod
    def token_embeddings(self, text: str) -> tuple[list[str], torch.Tensor]:
        """The token strings of `text` (no special tokens) and their [M, W] input embeddings."""

    @abstractmethod
    def class_token_count(self, class_name: str) -> int:
        """How many tokens `<class name> .` takes (to check a prompt fits the context)."""

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
