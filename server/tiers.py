"""API tiers: each kind of commercial API a key can simulate, expressed as a set of key scopes.

Tiers sit on top of the store's scopes, so the store's schema knows nothing about them:

- `embeddings`: OpenAI-style `/v1/embeddings` only (text and images): what commercial
  multimodal embedding APIs sell.
- `predictions`: `/v1/classify` only (images + class prompts, texts or a soft prompt, in;
  logits out), plus `/v1/token-embeddings` to start a soft prompt from words: the
  "prediction-only" tier most black-box tuning papers assume.
- `full`: everything, the soft-prompt endpoint `/v1/prompt-embeddings` included (cbbt's own).

Each route needs one scope. Keys made before tiers existed carry exactly the old default scopes
{embed, classify} and could call every route; `granted_scopes` keeps them on the full tier.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.tiers import Tier

SCOPE_EMBED = "embed"  # /v1/embeddings
SCOPE_CLASSIFY = "classify"  # /v1/classify
SCOPE_TOKENS = "tokens"  # /v1/token-embeddings
SCOPE_PROMPT = "prompt"  # /v1/prompt-embeddings


TIER_SCOPES: dict[Tier, frozenset[str]] = {
    Tier.embeddings: frozenset({SCOPE_EMBED}),
    Tier.predictions: frozenset({SCOPE_CLASSIFY, SCOPE_TOKENS}),
    Tier.full: frozenset({SCOPE_EMBED, SCOPE_CLASSIFY, SCOPE_TOKENS, SCOPE_PROMPT}),
}
# The scopes every key got before tiers existed (store.base.DEFAULT_SCOPES): the full tier then.
LEGACY_FULL_SCOPES: frozenset[str] = frozenset({SCOPE_EMBED, SCOPE_CLASSIFY})
DEFAULT_TIER = Tier.full


def scopes_for_tier(tier: Tier | str) -> frozenset[str]:
    return TIER_SCOPES[Tier(tier)]


def granted_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """What a key's stored scopes let it do (a pre-tier default key keeps every route)."""
    stored = frozenset(scopes)
    return TIER_SCOPES[Tier.full] if stored == LEGACY_FULL_SCOPES else stored


def tier_of(scopes: Iterable[str]) -> Tier | None:
    """The tier a key's scopes amount to; None for a custom scope set."""
    granted = granted_scopes(scopes)
    for tier, tier_scopes in TIER_SCOPES.items():
        if granted == tier_scopes:
            return tier
    return None


def tiers_allowing(scope: str) -> list[Tier]:
    return [tier for tier, tier_scopes in TIER_SCOPES.items() if scope in tier_scopes]
