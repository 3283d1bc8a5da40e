"""The API tiers a cbbt server can simulate per key, as the routes each one offers.

The server restricts keys to a tier (server/tiers.py maps tiers to key scopes); the client
says which tier a run needed from the routes it actually called (client/tiers.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

__all__ = ["ROUTE_CLASSIFY", "ROUTE_EMBEDDINGS", "ROUTE_PROMPTS", "ROUTE_TOKENS", "TIER_ROUTES", "Tier",
           "smallest_tier"]  # fmt: skip

ROUTE_EMBEDDINGS = "embeddings"  # /v1/embeddings: texts and images in, features out
ROUTE_CLASSIFY = "classify"  # /v1/classify: images + class prompts in, logits out
ROUTE_TOKENS = "token-embeddings"  # /v1/token-embeddings: a soft prompt's start from words
ROUTE_PROMPTS = "prompt-embeddings"  # /v1/prompt-embeddings: soft prompts in, class features out


class Tier(StrEnum):
    embeddings = "embeddings"
    predictions = "predictions"
    full = "full"


TIER_ROUTES: dict[Tier, frozenset[str]] = {
    Tier.embeddings: frozenset({ROUTE_EMBEDDINGS}),
    Tier.predictions: frozenset({ROUTE_CLASSIFY, ROUTE_TOKENS}),
    Tier.full: frozenset({ROUTE_EMBEDDINGS, ROUTE_CLASSIFY, ROUTE_TOKENS, ROUTE_PROMPTS}),
}


def smallest_tier(routes: Iterable[str]) -> Tier | None:
    """The narrowest tier offering every route in `routes` (None when nothing was called)."""
    used = frozenset(routes)
    if not used:
        return None
    for tier, offered in TIER_ROUTES.items():  # narrowest first
        if used <= offered:
            return tier
    return None
