"""`keys create|list|show|revoke|top-up`: manage API keys directly in the database (file or URL).

Standard output carries only the result (the new key for `create`, JSON otherwise) so that
scripts can capture it; every message for humans goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from server.store import DEFAULT_SCOPES, ApiKey, Store, StoreError, StoreUnavailable
from server.store.factory import describe, open_store
from server.tiers import Tier, scopes_for_tier, tier_of

DB_ENV = "CBBT_DB"
DEFAULT_DB = "cbbt.db"
RECENT_USAGE_ROWS = 20


def default_db_path() -> str:
    return os.environ.get(DB_ENV) or DEFAULT_DB


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    # Resolved when the command runs, so CBBT_DB set after parser construction still counts.
    parser.add_argument(
        "--db",
        default=None,
        metavar="DB",
        help=f"SQLite file or postgresql:// URL (default: ${DB_ENV} or {DEFAULT_DB})",
    )


def _add_create(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("create", help="create a key; prints the key alone on stdout (shown only once)")
    _add_db_option(p)
    p.add_argument("--name", required=True)
    p.add_argument("--budget-items", type=_non_negative_int, required=True, metavar="N")
    p.add_argument("--budget-requests", type=_non_negative_int, default=None, metavar="N")
    p.add_argument("--rpm", type=_non_negative_int, default=None, metavar="N", help="requests per minute")
    p.add_argument("--ipm", type=_non_negative_int, default=None, metavar="N", help="items per minute")
    access = p.add_mutually_exclusive_group()
    access.add_argument(
        "--tier",
        choices=[t.value for t in Tier],
        default=None,
        help="the kind of API this key simulates: embeddings (/v1/embeddings only), predictions "
        "(/v1/classify only), full (every route, soft prompts included; the default)",
    )
    access.add_argument("--scopes", nargs="+", default=None, metavar="SCOPE", help="a custom scope set")


def _add_named(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    _add_db_option(p)
    p.add_argument("name", help="key name (or numeric id)")


def _add_top_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("top-up", help="raise a key's budgets")
    _add_db_option(p)
    p.add_argument("name", help="key name (or numeric id)")
    p.add_argument("--items", type=_non_negative_int, default=0, metavar="N")
    p.add_argument("--requests", type=_non_negative_int, default=0, metavar="N")


def add_keys_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys in the database directly")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{create,list,show,revoke,top-up}")
    _add_create(sub)
    p = sub.add_parser("list", help="list keys as JSON")
    _add_db_option(p)
    _add_named(sub, "show", "show one key and its recent usage as JSON")
    _add_named(sub, "revoke", "revoke a key (it gets 401 from then on)")
    _add_top_up(sub)


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _note(message: str) -> None:
    sys.stderr.write(message + "\n")


def _scopes(args: argparse.Namespace) -> frozenset[str]:
    if args.tier is not None:
        return scopes_for_tier(args.tier)
    return frozenset(args.scopes) if args.scopes is not None else DEFAULT_SCOPES


def _create(store: Store, args: argparse.Namespace) -> None:
    plaintext, key = store.create_key(
        args.name,
        _scopes(args),
        args.budget_items,
        budget_requests=args.budget_requests,
        rpm=args.rpm,
        ipm=args.ipm,
    )
    tier = tier_of(key.scopes)
    where = describe(args.db or default_db_path())
    _note(
        f"created key {key.name!r} (id {key.id}, prefix {key.prefix}, "
        f"tier {tier.value if tier else 'custom: ' + ' '.join(sorted(key.scopes))}) in {where}; "
        "store it now, it is not shown again"
    )
    sys.stdout.write(plaintext + "\n")


def _record(key: ApiKey) -> dict[str, Any]:
    tier = tier_of(key.scopes)
    return {**key.public_dict(), "tier": None if tier is None else tier.value}


def _list(store: Store, _: argparse.Namespace) -> None:
    _emit_json([_record(key) for key in store.list_keys()])


def _show(store: Store, args: argparse.Namespace) -> None:
    key, rows = store.usage(store.get_key(args.name).id, recent=RECENT_USAGE_ROWS)
    _emit_json({**_record(key), "recent": [row.public_dict() for row in rows]})


def _revoke(store: Store, args: argparse.Namespace) -> None:
    key = store.revoke(args.name)
    _note(f"revoked key {key.name!r}")
    _emit_json(_record(key))


def _top_up(store: Store, args: argparse.Namespace) -> None:
    key = store.top_up(args.name, items=args.items, requests=args.requests)
    _note(f"topped up key {key.name!r}: {args.items} items, {args.requests} requests")
    _emit_json(_record(key))


_COMMANDS: dict[str, Callable[[Store, argparse.Namespace], None]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "revoke": _revoke,
    "top-up": _top_up,
}


def run_keys_command(args: argparse.Namespace) -> int:
    """Run a parsed `keys ...` command. 0 ok, 1 store/lookup failure, 2 invalid input."""
    handler = _COMMANDS[args.keys_command]
    try:
        store = open_store(args.db or default_db_path())
        try:
            handler(store, args)
        finally:
            store.close()
    except StoreUnavailable as exc:
        _note(f"error: database unavailable: {exc}")
        return 1
    except StoreError as exc:
        _note(f"error: {exc}")
        return 1
    except ValueError as exc:
        _note(f"error: {exc}")
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli_keys", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_keys_parser(subparsers)
    return run_keys_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
