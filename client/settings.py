"""Client settings: where the server is, which key, where to cache, how long to retry.

Environment variables CBBT_SERVER, CBBT_API_KEY, CBBT_CACHE_DIR, CBBT_RETRY_TOTAL_S; when the
CBBT_ ones are not set, OPENAI_BASE_URL and OPENAI_API_KEY are honoured (cbbt speaks an
OpenAI-style API). Flags on the command line win over both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.schemas import API_PREFIX

DEFAULT_SERVER = "http://127.0.0.1:8000"


def normalise_base_url(url: str) -> str:
    """The server's root: with or without a trailing `/v1` (OpenAI-style base URLs have it)."""
    url = url.strip().rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    return url


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    server: str = Field(DEFAULT_SERVER, validation_alias=AliasChoices("CBBT_SERVER", "OPENAI_BASE_URL"))
    api_key: str | None = Field(None, validation_alias=AliasChoices("CBBT_API_KEY", "OPENAI_API_KEY"))
    cache_dir: Path = Field(Path.home() / ".cache" / "cbbt", validation_alias=AliasChoices("CBBT_CACHE_DIR"))
    # Retrying what is worth retrying (429 with Retry-After, 503, timeouts, resets) stops after
    # this many seconds for one call; then the run fails with "try again later".
    retry_total_s: float = Field(600.0, gt=0, validation_alias=AliasChoices("CBBT_RETRY_TOTAL_S"))
    # Which kind of API the URL is: cbbt's own (every tier), an OpenAI-compatible embeddings
    # API (the embeddings tier), a /v1/classify-only API (the prediction-only tier), or
    # `auto`: cbbt when /v1/models carries cbbt model cards (client/tiers.py).
    api: Literal["auto", "cbbt", "openai", "predictions"] = Field(
        "auto", validation_alias=AliasChoices("CBBT_API")
    )
    model: str | None = Field(None, validation_alias=AliasChoices("CBBT_MODEL"))  # embeddings tier

    @field_validator("server")
    @classmethod
    def _root(cls, value: str) -> str:
        return normalise_base_url(value)

    def with_overrides(self, **values: object) -> ClientSettings:
        """Command-line values (None = not given) on top of the environment's."""
        given = {k: v for k, v in values.items() if v is not None}
        if "server" in given:
            given["server"] = normalise_base_url(str(given["server"]))
        return self.model_copy(update=given)
