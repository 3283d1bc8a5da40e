"""The service's live state (model, batchers, store, limiter, metrics), one per app."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request

from server.backends.base import Backend, PromptItem, TokenIds
from server.batching import DynamicBatcher
from server.errors import ApiError
from server.metrics import Metrics
from server.ratelimit import Limiter
from server.settings import ServerSettings
from server.store.base import Store
from shared.errors import ErrorCode


@dataclass
class Batchers:
    images: DynamicBatcher[torch.Tensor]
    texts: DynamicBatcher[TokenIds]
    prompts: DynamicBatcher[PromptItem]

    def all(
        self,
    ) -> tuple[DynamicBatcher[torch.Tensor], DynamicBatcher[TokenIds], DynamicBatcher[PromptItem]]:
        return (self.images, self.texts, self.prompts)


@dataclass
class ServiceState:
    settings: ServerSettings
    metrics: Metrics
    limiter: Limiter
    store: Store | None = None
    backend: Backend | None = None
    batchers: Batchers | None = None
    load_error: str | None = None
    # Set on SIGTERM (server/http_server.py): new requests are refused while these finish.
    draining: bool = False
    in_flight: int = 0
    # One thread runs the model: torch already spreads one batch over every core.
    model_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbbt-model")
    )

    @property
    def ready(self) -> bool:
        return self.backend is not None and self.batchers is not None

    def build_batchers(self, backend: Backend) -> Batchers:
        s = self.settings
        observer = self.metrics.batch_observer()

        def make(
            modality: str,
            run: Callable[[list[Any]], torch.Tensor],
            cost: Callable[[Any], int] | None = None,
            max_items: int = s.batch_max_items,
        ) -> DynamicBatcher[Any]:
            return DynamicBatcher(
                modality=modality,
                run_batch=run,
                executor=self.model_executor,
                max_items=max_items,
                max_wait_s=s.batch_max_wait_ms / 1000.0,
                queue_limit=s.queue_max_items,
                observer=observer,
                cost=cost,
                max_cost=s.batch_max_tokens,
                fair=True,
            )

        return Batchers(
            images=make(
                "image",
                lambda xs: backend.encode_images(torch.stack(xs)),
                max_items=min(s.batch_max_items, s.image_batch_max_items),
            ),
            texts=make("text", backend.encode_token_ids, len),
            prompts=make("prompt", backend.encode_prompts, _prompt_tokens),
        )


def _prompt_tokens(item: PromptItem) -> int:
    return int(item.context.shape[0]) + len(item.class_ids or ()) + 2


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.cbbt
    return state


def ready_state(request: Request) -> tuple[ServiceState, Backend, Batchers]:
    """The state of a service whose model is loaded; 503 model_not_ready otherwise."""
    state = get_state(request)
    if state.backend is None or state.batchers is None:
        raise ApiError(
            503,
            ErrorCode.model_not_ready,
            state.load_error or "the model is still loading; retry shortly",
            headers={"Retry-After": "2"},
        )
    return state, state.backend, state.batchers
