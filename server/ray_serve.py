"""Ray Serve: N replicas of the unchanged app (create_app), one model each, behind Serve's proxy.

Each replica loads and warms its own model before it reports ready, runs the project's own
DynamicBatcher (it splits a request's items across batches and bounds its queue, which
`@serve.batch` does not) and registers as an owner of the shared store. Serve's backpressure
(max_ongoing_requests per replica, max_queued_requests in front) is only the outer guard; the
app's queue bound, rate limits and budget stay the inner ones, in the error envelope.

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
from typing import Any

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
        self._app: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from server.app import create_app

        self._app = create_app(self._settings, backend=self._backend)
        return self._app

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model failed, or whose app is gone, is replaced."""
        state = None if self._app is None else self._app.state.cbbt
        if state is not None and state.load_error:
            raise RuntimeError(state.load_error)


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
    import ray

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
    import ray

    ray.shutdown()
    return 0
