"""`cbbt`: tune a black-box model over HTTP (`tune`), use the result (`eval`, `predict`),
check the key's budget (`usage`), or run the whole thing end to end on a local server (`demo`).

Server URL, API key and cache folder also come from CBBT_SERVER, CBBT_API_KEY, CBBT_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from client.plan import BudgetTooSmall
from client.train import ESTIMATOR_PRESETS, METHODS, TuneConfig
from client.train import tune_config as make_tune_config

# The estimator preset each method uses unless told otherwise: the benchmark's winner for that
# method (docs/benchmarks.md, "Estimator"). For the prompt alone `fast` is far better at equal
# items; with the adapter the two tie within seed noise, so `cbbt` keeps CBBT's own estimator.
DEFAULT_ESTIMATOR_BY_METHOD = {"cbbt": "faithful", "cbbt-prompt": "fast"}

logger = logging.getLogger("cbbt")


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBBT_", extra="ignore")

    server: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "cbbt"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Tuning flags: (flag, TuneConfig field, type, help). Defaults come from TuneConfig.
_TUNE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--method", "method", str, f"one of {', '.join(METHODS)}"),
    ("--estimator", "estimator", str, f"prompt estimator preset: {', '.join(ESTIMATOR_PRESETS)}"),
    ("--shots", "shots", int, "training images per class"),
    ("--seed", "seed", int, "seed of the few-shot draw and of the run"),
    ("--budget", "budget", int, "hard cap on items (images + text sequences) this run may spend"),
    ("--init-text", "init_text", str, "words the context vectors start from (1 token: 'a')"),
    ("--directions", "directions", int, "random directions per gradient estimate (q)"),
    ("--mu", "mu", float, "finite-difference radius (default max(1/d, 1e-3))"),
    ("--clip-norm", "clip_norm", float, "clip the estimated gradient to this norm"),
    ("--subspace-dim", "subspace_dim", int, "estimate in a random subspace of this dimension"),
    ("--prompt-lr", "prompt_lr", float, "Adam learning rate of the prompt"),
    ("--epochs", "epochs", int, "epochs of the faithful schedule (scaled to the budget)"),
    ("--batch-size", "batch_size", int, "images per prompt step (0: all cached training views)"),
    ("--optimizer", "optimizer", str, "estimator (CBBT) or a peer's: cmaes, spsa-gc, zip"),
    ("--antithetic", "antithetic", _bool, "two-sided differences (true/false)"),
    ("--orthogonal", "orthogonal", _bool, "orthonormal directions (true/false)"),
    ("--history", "history", int, "directions spent on the span of recent estimates"),
    ("--clip-sqrt-d", "clip_sqrt_d", _bool, "clip the estimate at sqrt(d) (ZIP) (true/false)"),
    ("--adapter", "adapter", str, "residual (CLIP-Adapter), tip (Tip-Adapter-F) or none"),
    ("--adapter-lr", "adapter_lr", float, "adapter learning rate"),
    ("--adapter-epochs", "adapter_epochs", int, "adapter epochs on cached features (free)"),
    ("--adapter-start-epoch", "adapter_start_epoch", int, "prompt-only epochs before the adapter joins"),
    ("--views", "views", int, "cached views per training image (1 = no augmentation)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help="server URL (CBBT_SERVER)")
    parser.add_argument("--api-key", default=None, help="API key (CBBT_API_KEY)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (CBBT_CACHE_DIR)")


def _add_data(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--data",
        required=required,
        help="fashion-mnist | digits | imagefolder:PATH | coop:SPLIT_JSON:IMAGE_ROOT",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx folder")
    parser.add_argument(
        "--test-per-class", type=int, default=None, help="evaluate on at most N test images per class"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbbt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    tune = sub.add_parser("tune", help="tune a prompt and an adapter against a server")
    _add_connection(tune)
    _add_data(tune)
    for flag, name, kind, help_text in _TUNE_FLAGS:
        tune.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    tune.add_argument("--out", type=Path, required=True, help="output folder (artifact, report, checkpoints)")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="accuracy of a tuned artifact on a data set's test split")
    _add_connection(ev)
    _add_data(ev)
    ev.add_argument("--artifact", type=Path, required=True)

    predict = sub.add_parser("predict", help="label and probability for image files")
    _add_connection(predict)
    predict.add_argument("--artifact", type=Path, required=True)
    predict.add_argument("images", nargs="+", type=Path)

    usage = sub.add_parser("usage", help="the key's budget, spent and remaining")
    _add_connection(usage)

    demo = sub.add_parser("demo", help="start a local server, tune on Fashion-MNIST, print the result")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--budget", type=int, default=None, help="items (default: the demo's own budget)")
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--data", default="fashion-mnist")

    from client.bench import add_bench_parser  # here: client.bench imports this module

    add_bench_parser(sub)
    return parser


def tune_config(args: argparse.Namespace) -> TuneConfig:
    names = {f.name for f in fields(TuneConfig)}
    overrides = {
        name: getattr(args, name) for _, name, _, _ in _TUNE_FLAGS if getattr(args, name, None) is not None
    }
    if overrides.get("method") not in (None, *METHODS):
        raise SystemExit(f"--method must be one of {', '.join(METHODS)}")
    method = str(overrides.get("method", "cbbt"))
    estimator = str(overrides.pop("estimator", DEFAULT_ESTIMATOR_BY_METHOD.get(method, "faithful")))
    try:
        return make_tune_config(estimator, **{k: v for k, v in overrides.items() if k in names})
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def _settings(args: argparse.Namespace) -> ClientSettings:
    settings = ClientSettings()
    updates = {
        k: getattr(args, k) for k in ("server", "api_key", "cache_dir") if getattr(args, k, None) is not None
    }
    return settings.model_copy(update=updates)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    from client import bench, commands

    handlers: dict[str, Callable[[argparse.Namespace, ClientSettings], int]] = {
        "tune": commands.tune,
        "eval": commands.evaluate,
        "predict": commands.predict,
        "usage": commands.usage,
        "bench": bench.command,
    }
    try:
        if args.command == "demo":
            return commands.demo(args)
        return handlers[args.command](args, _settings(args))
    except BudgetTooSmall as exc:  # refused before anything was spent: a message, not a traceback
        logger.error("%s", exc)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # bad data spec or split file, artifact, resume
        logger.error("%s", exc, exc_info=args.verbose)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


if __name__ == "__main__":
    sys.exit(main())
