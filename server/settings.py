"""Server configuration: every knob is a `CBBT_*` environment variable or a CLI flag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "devise-effnet-minilm"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBBT_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    # Model: a registry name (see server.backends.registry) and its weights.
    model: str = DEFAULT_MODEL
    pretrained: str | None = Field(
        default=None, description="local checkpoint path, a hub tag, or 'none' (random init, tests only)"
    )
    model_config_dir: Path | None = Field(default=None, description="extra open_clip model configs (JSON)")
    cache_dir: Path | None = Field(
        default=None, description="where derived model state (ridge map) is cached"
    )
    device: str = "cpu"
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's choice)"
    )

    # Accounting.
    db: str = Field(
        default="cbbt.db", description="SQLite file path (one server) or postgresql:// URL (replicas)"
    )
    auth: bool = Field(default=True, description="require API keys on /v1 (off only for local experiments)")
    admin_token: SecretStr | None = None
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    # Owner lease: a server that stops renewing it for this long is dead, and any replica then
    # refunds the requests it left unanswered. Renewed every lease_renew_s (default: TTL / 3).
    lease_ttl_s: float = Field(default=30.0, gt=0)
    lease_renew_s: float | None = Field(default=None, gt=0)

    # Request limits.
    max_items_per_request: int = Field(default=4096, ge=1)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_class_name_chars: int = Field(default=200, ge=1)
    max_text_chars: int = Field(default=2000, ge=1)
    # Tokenisers (BPE) cost superlinear time in a word's length: a bound keeps an item's cost flat.
    max_word_chars: int = Field(default=100, ge=1)
    # Bounds values (not only bytes): a small body of `[{},{},...]` parses into a huge object graph.
    max_json_elements: int = Field(default=1_000_000, ge=1)

    # Connections: what a client that never finishes a request can hold.
    max_connections: int = Field(default=256, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_idle_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=120.0, gt=0)
    keep_alive_timeout_s: int = Field(default=5, ge=0)
    # SIGTERM: in-flight requests get this long to finish; new ones are answered 503 shutting_down.
    drain_timeout_s: float = Field(default=30.0, ge=0)

    # Dynamic batching.
    batch_max_items: int = Field(default=64, ge=1)
    # Images batch smaller: a convolutional image tower on CPU costs more per image in larger
    # batches (the activations outgrow the caches); EfficientNet-Lite0 on 2 cores ran ~3x
    # faster per image at 8 than at 64 (docs/benchmarks/server.md, "Image throughput"). Image
    # batches hold at most min(batch_max_items, image_batch_max_items).
    image_batch_max_items: int = Field(default=8, ge=1)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    # Tokens per text/prompt batch: 64 CLIP-length (77) sequences; long texts make smaller batches.
    batch_max_tokens: int = Field(default=64 * 77, ge=1)
    queue_max_items: int = Field(default=16384, ge=1)

    # Commercial-API simulation: injected latency and transient failures (never charged).
    latency_ms: float = Field(default=0.0, ge=0)
    latency_jitter_ms: float = Field(default=0.0, ge=0)
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    fault_seed: int | None = None

    cors_origins: list[str] = Field(default_factory=list)
    log_level: str = "info"

    # Replicas (Ray Serve, or plain servers on one PostgreSQL database).
    replica: str | None = Field(default=None, description="label on every /metrics series and in /ready")
    ray_max_ongoing_requests: int = Field(default=64, ge=1, description="requests one replica runs at once")
    ray_max_queued_requests: int = Field(
        default=256, ge=-1, description="requests Serve queues before answering 503 (-1: no bound)"
    )
    ray_node_ip: str = Field(default="127.0.0.1", description="address a local Ray cluster binds")

    @field_validator("db", mode="before")
    @classmethod
    def _path_to_text(cls, value: Any) -> Any:
        """Paths are accepted as they are; kept as text so that a URL's '//' survives."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _lease_renewed_before_it_expires(self) -> ServerSettings:
        # A lease renewed less often than it expires looks dead between renewals: another
        # replica would refund this one's requests in flight, and they would be answered free.
        if self.lease_interval_s >= self.lease_ttl_s:
            raise ValueError(
                f"lease_renew_s ({self.lease_interval_s:g}) must be below lease_ttl_s ({self.lease_ttl_s:g})"
            )
        return self

    @property
    def lease_interval_s(self) -> float:
        return self.lease_renew_s if self.lease_renew_s is not None else self.lease_ttl_s / 3
