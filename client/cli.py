"""`cbbt`: tune a black-box model over HTTP (`tune`), use the result (`eval`, `predict`), check
the key's budget (`usage`), compare methods (`bench`), or run it all on a local server (`demo`).

Server URL, API key and cache folder also come from CBBT_SERVER, CBBT_API_KEY, CBBT_CACHE_DIR
(or OPENAI_BASE_URL, OPENAI_API_KEY); CBBT_RETRY_TOTAL_S bounds how long a call is retried.
Errors print one line naming the fix and exit with the code of their kind
(client/errors.py); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client import commands
from client.commands import BenchArgs, DemoArgs, EvalArgs, PredictArgs, TuneArgs
from client.errors import CbbtError
from client.grid import BenchConfig
from client.methods import DEFAULT_METHOD, DEFAULT_METHODS, METHODS
from client.runner import DataSpec
from client.settings import ClientSettings
from client.tiers import API_KINDS
from client.tune_config import ESTIMATOR_PRESETS

logger = logging.getLogger("cbbt")

EXIT_INTERRUPTED = 130
EXIT_BAD_INPUT = 2


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Tuning flags: (flag, TuneConfig or CollabConfig field, type, help). Defaults come from the
# method's settings; a flag the method has no setting for is refused.
TUNE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--estimator", "estimator", str, f"prompt estimator preset: {', '.join(ESTIMATOR_PRESETS)}"),
    ("--init-text", "init_text", str, "words the context vectors start from (1 token: 'a')"),
    ("--directions", "directions", int, "random directions per gradient estimate (q)"),
    ("--mu", "mu", float, "finite-difference radius (default max(1/d, 1e-3))"),
    ("--clip-norm", "clip_norm", float, "clip the estimated gradient to this norm"),
    ("--subspace-dim", "subspace_dim", int, "estimate in a random subspace of this dimension"),
    ("--prompt-lr", "prompt_lr", float, "Adam learning rate of the prompt"),
    ("--epochs", "epochs", int, "epochs of the faithful schedule (scaled to the budget)"),
    ("--batch-size", "batch_size", int, "images per prompt step (0: all cached training views)"),
    (
        "--optimizer",
        "optimizer",
        str,
        "estimator (CBBT), surrogate (cbbt: a model of the text features) or a peer's: cmaes, spsa-gc, zip",
    ),
    ("--antithetic", "antithetic", _bool, "two-sided differences (true/false)"),
    ("--orthogonal", "orthogonal", _bool, "orthonormal directions (true/false)"),
    ("--history", "history", int, "directions spent on the span of recent estimates"),
    ("--clip-sqrt-d", "clip_sqrt_d", _bool, "clip the estimate at sqrt(d) (ZIP) (true/false)"),
    ("--adapter", "adapter", str, "residual (CLIP-Adapter), tip (Tip-Adapter-F) or none"),
    ("--adapter-lr", "adapter_lr", float, "adapter learning rate"),
    ("--adapter-epochs", "adapter_epochs", int, "adapter epochs on cached features (free)"),
    ("--adapter-start-epoch", "adapter_start_epoch", int, "prompt-only epochs before the adapter joins"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
    # The default `cbbt` method's own (client/collab.py).
    ("--prompt-steps", "prompt_steps", int, "cbbt: most prompt steps on top of the feature method"),
    ("--patience", "patience", int, "cbbt: steps without a better held-out loss before stopping"),
    ("--class-subset", "class_subset", int, "cbbt: classes a step's perturbed prompts are scored on"),
    ("--template-set", "template_set", str, "cbbt: zero-shot templates (openai80, simple7, single)"),
)


def _add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log every phase")
    parser.add_argument("--debug", action="store_true", default=default, help="tracebacks on errors")


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help="server URL, with or without /v1 (CBBT_SERVER)")
    parser.add_argument("--api-key", default=None, help="API key (CBBT_API_KEY)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (CBBT_CACHE_DIR)")
    parser.add_argument(
        "--api",
        choices=list(API_KINDS),
        default=None,
        help="cbbt: a cbbt server; openai: any OpenAI-compatible /v1/embeddings (the embeddings tier); "
        "predictions: /v1/classify only (the prediction-only tier: loss-only prompt tuners); "
        "auto (default): cbbt when /v1/models has cbbt model cards (CBBT_API)",
    )
    parser.add_argument("--model", default=None, help="model id on an OpenAI-compatible API (CBBT_MODEL)")


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="fashion-mnist | digits | imagefolder:PATH | coop:SPLIT_JSON:IMAGE_ROOT"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx folder")
    parser.add_argument(
        "--test-per-class", type=int, default=None, help="evaluate on at most N test images per class"
    )


def _add_tune_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    for flag, name, kind, help_text in TUNE_FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=None, help=prefix + help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbbt", description=__doc__)
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    tune = sub.add_parser(
        "tune", help="tune a method against a server (default cbbt: the CV-chosen feature method + a prompt)"
    )
    _add_common(tune)
    _add_connection(tune)
    _add_data(tune)
    tune.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(METHODS)}")
    tune.add_argument("--shots", type=int, default=16, help="training images per class")
    tune.add_argument("--seed", type=int, default=1, help="seed of the few-shot draw and of the run")
    tune.add_argument("--budget", type=int, default=None, help="hard cap on items (images + texts) to spend")
    tune.add_argument(
        "--views", type=int, default=None, help="cached views per training image (1 = no augmentation)"
    )
    _add_tune_flags(tune)
    tune.add_argument("--out", type=Path, required=True, help="output folder (artifact, report, checkpoints)")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tune.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="accuracy of a tuned artifact on a data set's test split")
    _add_common(ev)
    _add_connection(ev)
    _add_data(ev)
    ev.add_argument("--artifact", type=Path, required=True)

    predict = sub.add_parser("predict", help="label and probability for image files")
    _add_common(predict)
    _add_connection(predict)
    predict.add_argument("--artifact", type=Path, required=True)
    predict.add_argument("images", nargs="+", type=Path)

    usage = sub.add_parser("usage", help="the key's budget, spent and remaining")
    _add_common(usage)
    _add_connection(usage)

    demo = sub.add_parser("demo", help="start a local server, tune on Fashion-MNIST, print the result")
    _add_common(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--budget", type=int, default=None, help="items (default: the demo's own budget)")
    demo.add_argument("--port", type=int, default=None)
    demo.add_argument("--data", default="fashion-mnist")

    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="run methods x shots x seeds under one query counter; tables and plots"
    )
    _add_common(bench)
    _add_connection(bench)
    _add_data(bench)
    bench.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help=f"of: {', '.join(METHODS)}"
    )
    bench.add_argument("--shots", nargs="+", type=int, default=[16])
    bench.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    bench.add_argument("--budget", type=int, default=None, help="items per run, image features included")
    bench.add_argument("--views", type=int, default=2, help="cached views per training image")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--local", action="store_true", help="start a local server (and allow coop-whitebox)")
    bench.add_argument("--local-model", default=None, help="model the local server serves (default: devise)")
    bench.add_argument("--local-pretrained", default=None, help="its open_clip weights ('none': random)")
    bench.add_argument("--local-arg", action="append", default=[], help="another `serve` flag (repeatable)")
    bench.add_argument(
        "--define", action="append", default=[], metavar="NAME=BASE:KEY=VALUE,...",
        help="add a method: BASE's spec with more settings (repeatable)",
    )  # fmt: skip
    bench.add_argument("--grid-only", action="store_true", help="summarise only this grid's runs")
    bench.add_argument(
        "--client-threads", type=int, default=1,
        help="torch threads for the client's local work (0: torch's choice); 1 leaves the local "
        "server a core, and the client's tensors are small",
    )  # fmt: skip
    bench.add_argument("--no-progress", action="store_true")
    _add_tune_flags(bench, prefix="(every tuner run) ")


# -- argv -> typed arguments ------------------------------------------------------------------
def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name) for _, name, _, _ in TUNE_FLAGS if getattr(args, name, None) is not None
    }


def _data(args: argparse.Namespace) -> DataSpec:
    return DataSpec(args.data, args.data_dir, args.test_per_class)


def _settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings().with_overrides(
        server=getattr(args, "server", None),
        api=getattr(args, "api", None),
        model=getattr(args, "model", None),
        api_key=getattr(args, "api_key", None),
        cache_dir=getattr(args, "cache_dir", None),
    )


def _tune(args: argparse.Namespace) -> int:
    typed = TuneArgs(
        data=_data(args), out=args.out, method=args.method, shots=args.shots, seed=args.seed,
        views=args.views, budget=args.budget, flags=_flags(args), resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip
    return commands.tune(typed, _settings(args))


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        data=args.data, out=args.out, methods=tuple(args.methods), shots=tuple(args.shots),
        seeds=tuple(args.seeds), budget=args.budget, views=args.views, test_per_class=args.test_per_class,
        data_dir=args.data_dir, tune_flags=_flags(args), grid_only=args.grid_only,
        progress=not args.no_progress,
    )  # fmt: skip
    typed = BenchArgs(
        config=config, cache_dir=args.cache_dir, defines=tuple(args.define), local=args.local,
        local_model=args.local_model, local_pretrained=args.local_pretrained,
        local_args=tuple(args.local_arg), client_threads=args.client_threads,
    )  # fmt: skip
    return commands.bench(typed, _settings(args))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "tune": _tune,
    "eval": lambda a: commands.evaluate(EvalArgs(_data(a), a.artifact), _settings(a)),
    "predict": lambda a: commands.predict(PredictArgs(a.artifact, tuple(a.images)), _settings(a)),
    "usage": lambda a: commands.usage(_settings(a)),
    "demo": lambda a: commands.demo(DemoArgs(a.out, a.budget, a.port, a.data)),
    "bench": _bench,
}


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C: Python's default would exit without running `finally`
    blocks, leaving the server `demo` and `bench --local` started running as an orphan."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    try:
        with _sigterm_unwinds():
            return HANDLERS[args.command](args)
    except CbbtError as exc:  # what the user can act on: one line naming the fix
        logger.error("%s", exc, exc_info=args.debug)
        return exc.exit_code
    except (FileNotFoundError, ValueError) as exc:  # bad data spec, split file, artifact, setting
        logger.error("%s", exc, exc_info=args.debug)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
