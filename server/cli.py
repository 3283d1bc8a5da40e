"""`cbbt-server`: serve the model (`serve`), administer keys (`keys ...`), list models (`models`).

Flags override `CBBT_*` environment variables, which override the defaults in ServerSettings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from server.cli_keys import add_keys_parser, run_keys_command
from server.settings import ServerSettings

# Flags of `serve`: (flag, settings field, type, help).
_SERVE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--host", "host", str, "bind address (default 127.0.0.1: loopback only)"),
    ("--port", "port", int, "port (default 8000)"),
    (
        "--model",
        "model",
        str,
        "devise-effnet-minilm (default, real weights, offline) or an open_clip architecture",
    ),
    ("--pretrained", "pretrained", str, "open_clip weights: a local checkpoint path, a hub tag, or 'none'"),
    ("--model-config-dir", "model_config_dir", str, "folder of extra open_clip model configs (JSON)"),
    (
        "--db",
        "db",
        str,
        "keys, budgets and the ledger: an SQLite file (one server) or a postgresql:// URL (replicas)",
    ),
    ("--threads", "threads", int, "torch threads"),
    ("--max-items-per-request", "max_items_per_request", int, "items one request may carry"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body"),
    ("--batch-max-items", "batch_max_items", int, "largest model batch"),
    ("--image-batch-max-items", "image_batch_max_items", int, "largest image batch (<= --batch-max-items)"),
    ("--batch-max-wait-ms", "batch_max_wait_ms", float, "how long a batch waits to fill"),
    ("--batch-max-tokens", "batch_max_tokens", int, "tokens per text/prompt model batch"),
    ("--queue-max-items", "queue_max_items", int, "items queued per modality before 503 overloaded"),
    ("--max-word-chars", "max_word_chars", int, "longest whitespace-free run in a text"),
    ("--max-json-elements", "max_json_elements", int, "most JSON values one request body may hold"),
    ("--max-connections", "max_connections", int, "open connections before new ones get 503 overloaded"),
    ("--header-timeout-s", "header_timeout_s", float, "seconds a request's headers may take"),
    ("--body-idle-timeout-s", "body_idle_timeout_s", float, "seconds between two chunks of a body"),
    ("--body-timeout-s", "body_timeout_s", float, "seconds a whole request body may take"),
    ("--drain-timeout-s", "drain_timeout_s", float, "seconds SIGTERM waits for in-flight requests"),
    ("--latency-ms", "latency_ms", float, "simulation: mean injected latency per /v1 request"),
    ("--latency-jitter-ms", "latency_jitter_ms", float, "simulation: +- uniform jitter on the latency"),
    ("--failure-rate", "failure_rate", float, "simulation: fraction of /v1 requests answered 500/503"),
    ("--drop-rate", "drop_rate", float, "simulation: fraction of /v1 requests whose connection is cut"),
    ("--fault-seed", "fault_seed", int, "simulation: seed of the fault injector"),
    ("--log-level", "log_level", str, "logging level"),
)


def _add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="serve the model over HTTP")
    for flag, field, kind, help_text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    serve.add_argument(
        "--no-auth", dest="auth", action="store_false", default=None, help="open access, no budgets"
    )
    ray = serve.add_argument_group("replicas on Ray Serve (needs the `ray` extra)")
    ray.add_argument(
        "--ray", action="store_true", help="serve N replicas on Ray Serve instead of one process"
    )
    ray.add_argument("--replicas", type=int, default=1, help="replicas, each with its own model (default 1)")
    ray.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: start a local one on loopback)"
    )
    subparsers.add_parser("models", help="list the model names this server can load")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = {
        field: getattr(args, field) for _, field, _, _ in _SERVE_FLAGS if getattr(args, field) is not None
    }
    if args.auth is not None:
        overrides["auth"] = args.auth
    return ServerSettings(**overrides)


def serve(
    settings: ServerSettings, *, ray: bool = False, replicas: int = 1, ray_address: str | None = None
) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torch loads OpenMP: its threads otherwise spin-wait between parallel regions and
    # starve the event loop, image decoding and any co-located client of the cores they share
    # (batches 5-20x slower on 2 busy vCPUs, scripts/bench_server.py). Sleeping costs ~nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if settings.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger(__name__).warning(
            "binding %s: the API is reachable from other machines", settings.host
        )
    if ray:
        from server.ray_serve import run as run_ray

        return run_ray(settings, replicas, ray_address)
    from server.app import create_app
    from server.http_server import run

    app = create_app(settings)
    run(app, app.state.cbbt, settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbbt-server", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(subparsers)
    add_keys_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.replicas < 1:
            parser.error("--replicas must be at least 1")
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:  # a flag or CBBT_* variable out of range: one line each, no traceback
            parser.error("; ".join(_describe(error) for error in exc.errors()))
        return serve(settings, ray=args.ray, replicas=args.replicas, ray_address=args.ray_address)
    if args.command == "models":
        from server.backends.registry import list_models

        print("\n".join(list_models()))
        return 0
    return run_keys_command(args)


def _describe(error: Any) -> str:
    """`field: message` for one setting; a rule across settings has no field, only its message."""
    message = str(error["msg"]).removeprefix("Value error, ")
    field = ".".join(map(str, error["loc"]))
    return f"{field}: {message}" if field else message


if __name__ == "__main__":
    sys.exit(main())
