"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.batching import BatchObserver

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Labelled(Collector):
    """Every sample of another registry with constant labels added (a replica's name)."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]) -> None:
        self._inner = inner
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name,
                    {**sample.labels, **self._labels},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # Constant labels on every series, e.g. {"replica": ...}: replicas scraped together stay apart.
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("cbbt_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "cbbt_request_latency_seconds", "request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.items = Counter("cbbt_items_encoded", "items encoded by the model", ["modality"], registry=r)
        self.items_charged = Counter("cbbt_items_charged", "items charged to API keys", registry=r)
        self.batch_size = Histogram(
            "cbbt_batch_size", "items per model batch", ["modality"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "cbbt_batch_seconds", "model time per batch", ["modality"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("cbbt_queue_depth", "items waiting for the model", ["modality"], registry=r)
        self.overloaded = Counter("cbbt_overloaded", "requests refused because a queue was full", registry=r)
        self.injected_failures = Counter(
            "cbbt_injected_failures", "failures injected on purpose", ["kind"], registry=r
        )

    def batch_observer(self) -> BatchObserver:
        def on_batch(modality: str, size: int, seconds: float) -> None:
            self.batch_size.labels(modality).observe(size)
            self.batch_seconds.labels(modality).observe(seconds)
            self.items.labels(modality).inc(size)

        def on_queue_depth(modality: str, depth: int) -> None:
            self.queue_depth.labels(modality).set(depth)

        return BatchObserver(on_batch=on_batch, on_queue_depth=on_queue_depth)

    def exported(self) -> CollectorRegistry:
        """What /metrics shows: the registry, with the constant labels on every series."""
        if not self.labels:
            return self.registry
        labelled = CollectorRegistry(auto_describe=False)
        labelled.register(_Labelled(self.registry, self.labels))
        return labelled

    def render(self) -> bytes:
        return generate_latest(self.exported())
