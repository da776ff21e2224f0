"""What every command shares: the connection options, the layered config, output helpers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .._secrets import mask_secrets

__all__ = ["Sub", "add_common", "config_from", "one_line", "print_json", "print_table"]

# argparse keeps its subparsers type private; this is what ``register(sub)`` receives.
Sub = Any


def one_line(exc: BaseException) -> str:
    """An error as one line, with any password that reached its text masked."""
    return mask_secrets(str(exc)).replace("\r", "\\r").replace("\n", "\\n")


def add_common(parser: argparse.ArgumentParser) -> None:
    """``-c/--config``, ``--dsn`` and ``--prefix``: where the database and the schema are."""
    parser.add_argument(
        "-c", "--config", metavar="PATH", help="TOML config file (default: ./oban.toml if present)"
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN (default: OBAN_DSN, the config file, DATABASE_URL, or embedded PostgreSQL)",
    )
    parser.add_argument("--prefix", help="schema holding the oban tables (default: public)")


def config_from(args: argparse.Namespace, **extra: Any) -> Any:
    """The config file (``-c`` or ./oban.toml), then ``OBAN_*`` variables, then these flags."""
    from ..config import load_config

    overrides = {"dsn": args.dsn, "prefix": args.prefix, **extra}
    return load_config(args.config, overrides=overrides)


def print_json(value: Any) -> None:
    """``--json`` output: one document on stdout (datetimes as ISO 8601 text)."""
    print(json.dumps(value, indent=2, default=str, sort_keys=False))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()) -> None:
    """A plain-text table sized to its content; columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        padded = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(padded).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
