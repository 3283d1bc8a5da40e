"""Which API tier the client talks to, and which methods run on it.

- `cbbt`: cbbt's own API (the full tier: soft prompts, features, logits);
- `openai`: any OpenAI-compatible `/v1/embeddings` (the embeddings tier; client/openai_api.py);
- `predictions`: a `/v1/classify`-only API (the prediction-only tier; client/prediction_tier.py);
- `auto`: `openai` when `/v1/models` carries no cbbt model card; on a cbbt server, `predictions`
  for a predictions-tier key (its `/v1/usage` says so), else `cbbt`.

A method a tier cannot run is refused before anything is spent, in one line naming the tier
it needs. Which tier a finished run needed is measured, not declared: client/report.py's
`tier_used` (the narrowest tier offering every route the run called).
"""

from __future__ import annotations

from typing import Literal

import httpx

from client.api import DEFAULT_RETRY, CbbtClient, QueryCounter
from client.methods import METHODS, MethodSpec
from client.openai_api import OpenAIEmbeddingsClient, TierNotAllowed, detect_api
from client.prediction_tier import ClassifyClient
from client.session import RetryPolicy
from shared.schemas import API_PREFIX
from shared.tiers import Tier

__all__ = ["API_KINDS", "ApiChoice", "check_runs_on", "connect", "detect", "methods_on", "runs_on",
           "tier_of_client"]  # fmt: skip

ApiChoice = Literal["auto", "cbbt", "openai", "predictions"]
API_KINDS: tuple[str, ...] = ("auto", "cbbt", "openai", "predictions")


def connect(
    api: str,
    url: str,
    api_key: str | None,
    *,
    model: str | None = None,
    counter: QueryCounter | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> CbbtClient:
    """A client of the tier `api` names at `url` (`auto`: detected from /v1/models)."""
    kind = api if api != "auto" else detect(url, api_key)
    if kind == "openai":
        return OpenAIEmbeddingsClient(url, api_key, model=model, counter=counter, retry=retry)
    if kind == "predictions":
        return ClassifyClient(url, api_key, counter=counter, retry=retry)
    return CbbtClient(url, api_key, counter=counter, retry=retry)


def detect(url: str, api_key: str | None, *, timeout_s: float = 30.0) -> str:
    """What `auto` means at `url` for this key: openai, predictions or cbbt (free GETs only)."""
    if detect_api(url, api_key, timeout_s=timeout_s) == "openai":
        return "openai"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
            response = http.get(f"{API_PREFIX}/usage")
        tier = response.json().get("tier") if response.is_success else None
    except (httpx.TransportError, ValueError, AttributeError):
        tier = None  # the cbbt client then reports what is wrong, with its retries
    # An embeddings-tier key keeps the cbbt client: it reads the card's logit scale, and the
    # server's 403 names the tier of a route the key lacks.
    return "predictions" if tier == Tier.predictions.value else "cbbt"


def tier_of_client(client: object) -> Tier:
    """The tier a client speaks: what the methods it may run are checked against."""
    if isinstance(client, OpenAIEmbeddingsClient):
        return Tier.embeddings
    if isinstance(client, ClassifyClient):
        return Tier.predictions
    return Tier.full


def needed_tier(spec: MethodSpec) -> Tier:
    """The narrowest tier a method can run on, from how it runs: feature methods (and the
    collaborative `cbbt`, which skips its prompt stage without soft prompts) need image and text
    features; a tuner of the prompt alone (or none) needs only the loss; the rest, soft prompts'
    class features."""
    if spec.kind == "feature" or spec.kind == "collab":  # collab: its feature stages only there
        return Tier.embeddings
    if spec.kind == "tune" and spec.settings.get("method") in ("cbbt-prompt", "zero-shot"):
        return Tier.predictions
    return Tier.full


def runs_on(spec: MethodSpec, tier: Tier) -> bool:
    return spec.kind != "whitebox" and (tier == Tier.full or needed_tier(spec) == tier)


def methods_on(tier: Tier) -> list[str]:
    return [name for name, spec in METHODS.items() if runs_on(spec, tier)]


def check_runs_on(spec: MethodSpec, client: object) -> None:
    """TierNotAllowed (one line: the tier it needs, the methods that do run) unless it runs here."""
    tier = tier_of_client(client)
    if runs_on(spec, tier):
        return
    needs = needed_tier(spec)
    what = {
        Tier.embeddings: "image and text features (/v1/embeddings)",
        Tier.predictions: "soft-prompt logits (/v1/classify)",
        Tier.full: "soft prompts' class features (/v1/prompt-embeddings)",
    }[needs]
    other = "" if needs == Tier.full else " or cbbt's full tier"
    raise TierNotAllowed(
        f"{spec.name} needs {what}: the {needs.value} tier{other}; this API is the {tier.value} tier "
        f"(methods that run on it: {', '.join(methods_on(tier))})"
    )
