"""Ray Serve: N replicas of the unchanged app (create_app), one model each, behind Serve's proxy.

Each replica loads and warms its own model before it reports ready, runs the project's own
DynamicBatcher (it splits a request's items across batches and bounds its queue, which
`@serve.batch` does not) and registers as an owner of the shared store. Serve's backpressure
(max_ongoing_requests per replica, max_queued_requests in front) is only the outer guard; the
app's queue bound, rate limits and budget stay the inner ones, in the error envelope.

Metrics: Serve's proxy sends `/metrics` to any one replica, so each replica also serves its own
on a loopback port of its node and lists itself in a small directory actor; `GET
/metrics/targets` (through the proxy) answers Prometheus' HTTP service discovery with every
live replica's address and label (see README, "Scaling out").

Entry points:
- `cbbt-server serve --ray --replicas N [--ray-address ADDR]` (`run`, below);
- `serve run server.ray_serve:app_builder replicas=N` (`app_builder`), with CBBT_* settings
  from the environment, on a cluster started by the operator.

Needs the `ray` extra (`pip install '.[ray]'`); the plain `cbbt-server serve` path does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client import start_http_server
from ray import serve
from ray.serve import Application

from server.backends.base import Backend
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

APP_NAME = "cbbt"
DEPLOYMENT_NAME = "cbbt"
# Ray's minimum is 75 MB: the replicas exchange HTTP bodies only, never large objects.
_OBJECT_STORE_BYTES = 80 * 2**20
# Before anything of Ray is imported in a child: no usage statistics leave the machine.
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


# A replica that has not re-registered for this long (killed, replaced) leaves the targets.
_TARGET_TTL_S = 30.0
_DIRECTORY = "cbbt-metrics-targets"


@ray.remote(num_cpus=0)
class MetricsDirectory:
    """replica -> (host:port of its metrics, last seen): the scrape targets of all replicas."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, float]] = {}

    def register(self, replica: str, target: str) -> None:
        self._targets[replica] = (target, time.time())

    def targets(self) -> list[dict[str, Any]]:
        """Prometheus http_sd format: one group per replica, labelled with its name."""
        now = time.time()
        self._targets = {r: t for r, t in self._targets.items() if now - t[1] < _TARGET_TTL_S}
        return [{"targets": [t], "labels": {"replica": r}} for r, (t, _) in sorted(self._targets.items())]


def _directory() -> Any:
    return MetricsDirectory.options(  # type: ignore[attr-defined]
        name=_DIRECTORY, namespace="cbbt", get_if_exists=True, lifetime="detached"
    ).remote()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CbbtReplica:
    """One replica: its own model (loaded and warmed up in the constructor), its own app."""

    async def __init__(self, settings: ServerSettings) -> None:  # type: ignore[misc]  # Serve awaits it
        from server.app import load_backend

        replica = serve.get_replica_context().replica_tag
        self._settings = settings.model_copy(update={"replica": replica})
        # Serve routes no request to a replica before its constructor returns: loading the
        # model here is what makes "ready" mean "model loaded and warmed up".
        self._backend: Backend = await asyncio.to_thread(load_backend, self._settings)
        self._app: FastAPI | None = None
        self._metrics_target = ""
        self._directory = _directory()

    def __serve_build_asgi_app__(self) -> FastAPI:
        from server.app import create_app

        app = create_app(self._settings, backend=self._backend)
        # This replica's own /metrics, on a free port of the node address (loopback by default).
        host = ray.util.get_node_ip_address()
        exporter, _ = start_http_server(0, addr=host, registry=app.state.cbbt.metrics.exported())
        self._metrics_target = f"{host}:{exporter.server_port}"
        self._register()
        directory = self._directory

        @app.get("/metrics/targets", tags=["health"])
        async def metrics_targets() -> list[dict[str, Any]]:
            """Every replica's metrics address, for Prometheus `http_sd_configs`."""
            targets: list[dict[str, Any]] = await directory.targets.remote()
            return targets

        self._app = app
        return app

    def _register(self) -> None:
        self._directory.register.remote(self._settings.replica, self._metrics_target)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model failed is replaced; a live one re-registers."""
        state = None if self._app is None else self._app.state.cbbt
        if state is not None and state.load_error:
            raise RuntimeError(state.load_error)
        self._register()


def build_app(settings: ServerSettings, replicas: int) -> Application:
    """The Serve application: `replicas` copies, each with `--threads` CPUs reserved."""
    cpus = float(settings.threads or 1)
    deployment: Any = CbbtReplica  # a serve.Deployment once decorated
    return deployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus},
        max_ongoing_requests=settings.ray_max_ongoing_requests,
        max_queued_requests=settings.ray_max_queued_requests,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=10.0,
    ).bind(settings)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run server.ray_serve:app_builder replicas=2`; other settings from CBBT_* variables."""
    replicas = int(args.pop("replicas", "1"))
    return build_app(ServerSettings(**args), replicas)  # type: ignore[arg-type]


def _start_ray(settings: ServerSettings, replicas: int, address: str | None) -> None:
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if address:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        return
    # A local cluster on loopback: every port Ray opens (GCS, raylet, object manager, metrics
    # export, agents) binds the node address, given here so nothing is reachable from outside.
    cpus = max(os.cpu_count() or 1, replicas * int(settings.threads or 1))
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=_OBJECT_STORE_BYTES,
        _node_ip_address=settings.ray_node_ip,
        logging_level=logging.WARNING,
    )


def run(settings: ServerSettings, replicas: int, address: str | None = None) -> int:
    """Start (or join) a Ray cluster, deploy `replicas` copies, serve until SIGTERM/SIGINT."""
    _start_ray(settings, replicas, address)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": settings.host, "port": settings.port},
    )
    serve.run(build_app(settings, replicas), name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("serving %d Ray replicas on http://%s:%d", replicas, settings.host, settings.port)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    logger.info("shutting down the Ray replicas")
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
