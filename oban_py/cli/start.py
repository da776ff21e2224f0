"""``oban-py start``: run the configured queues until SIGTERM/SIGINT (see :mod:`oban_py.runner`)."""

from __future__ import annotations

import argparse
import os

from .common import Sub, add_common, config_from

__all__ = ["register"]


def register(sub: Sub) -> None:
    start = sub.add_parser("start", help="run queues until SIGTERM/SIGINT")
    add_common(start)
    start.add_argument("--queues", metavar="Q:N,...", help="queues and limits, e.g. default:10,mail:5")
    start.add_argument("--node", help="node name (default: hostname.pid)")
    start.add_argument("--modules", metavar="M,...", help="worker modules to import, comma-separated")
    start.add_argument(
        "--migrate", action="store_true", default=None, help="apply migrations before starting"
    )
    start.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes under a supervisor (default: 1, no supervisor)",
    )
    start.add_argument("--pidfile", metavar="PATH", help="write (and lock) the pid here while running")
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    start.add_argument("--log-format", choices=["text", "json"])
    start.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .._logging import setup_logging
    from ..runner import start

    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    config = config_from(
        args,
        queues=args.queues,
        node=args.node,
        modules=modules,
        migrate=args.migrate,
        processes=args.processes,
        pidfile=args.pidfile,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    setup_logging(config.log_level, config.log_format)
    return start(config, source=args.config or os.environ.get("OBAN_CONFIG") or "oban.toml")
