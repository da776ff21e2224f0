"""``oban-py``: one module per command group, each registering its subcommands.

Settings come from oban.toml (or ``-c PATH``), then ``OBAN_*`` environment variables, then flags.
Errors print one line naming what to fix (never a traceback wall, never a password) and exit
non-zero: 2 for configuration problems, 1 for everything else.

A command module exposes ``register(sub)``, which adds its parser(s) to ``sub`` and sets
``handler`` (a function of the parsed arguments returning the exit status) with ``set_defaults``.
Add a module to ``COMMANDS`` to add a command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigError, ObanError
from . import cron, demo, health, jobs, migrate, queues, start, version
from .common import one_line

__all__ = ["main"]

#: The command modules, in the order ``--help`` lists them.
COMMANDS = [version, migrate, start, health, jobs, queues, cron, demo]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="oban-py", description="PostgreSQL-backed job queue for asyncio.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        top.print_help()
        return 2
    try:
        status: int = handler(args)
        return status
    except ConfigError as exc:
        print(f"oban-py: configuration error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ObanError as exc:
        print(f"oban-py: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
