"""``oban-py``: migrate, start, demo, version.

Settings come from oban.toml (or ``-c PATH``), then ``OBAN_*`` environment variables, then flags.
Errors print one line naming what to fix (never a traceback wall, never a password) and exit
non-zero: 2 for configuration problems, 1 for everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .errors import ConfigError, ObanError

__all__ = ["main"]


def _one_line(exc: BaseException) -> str:
    """An error as one line, with any password that reached its text masked."""
    from ._secrets import mask_secrets

    return mask_secrets(str(exc)).replace("\r", "\\r").replace("\n", "\\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="PATH", help="TOML config file (default: ./oban.toml if present)"
    )
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN (default: OBAN_DSN, the config file, or embedded PostgreSQL)"
    )
    parser.add_argument("--prefix", help="schema holding the oban tables (default: public)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oban-py", description="PostgreSQL-backed job queue for asyncio.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version")

    migrate = sub.add_parser("migrate", help="create or upgrade the schema (safe to run concurrently)")
    _common(migrate)
    migrate.add_argument("--to", type=int, metavar="N", help="migrate up to version N (default: latest)")
    migrate.add_argument(
        "--rollback",
        type=int,
        metavar="N",
        help="undo migrations above version N (0 removes every oban table)",
    )

    start = sub.add_parser("start", help="run queues until SIGTERM/SIGINT")
    _common(start)
    start.add_argument("--queues", metavar="Q:N,...", help="queues and limits, e.g. default:10,mail:5")
    start.add_argument("--node", help="node name (default: hostname.pid)")
    start.add_argument("--modules", metavar="M,...", help="worker modules to import, comma-separated")
    start.add_argument(
        "--migrate", action="store_true", default=None, help="apply migrations before starting"
    )
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    start.add_argument("--log-format", choices=["text", "json"])

    queues = sub.add_parser("queues", help="show every queue, its nodes and limits, and busy limit keys")
    _common(queues)
    queues.add_argument("--keys", type=int, default=20, metavar="N", help="limit keys to show (default: 20)")

    demo = sub.add_parser("demo", help="insert example jobs and run them with live progress")
    demo.add_argument("--dsn", help="PostgreSQL DSN (default: OBAN_DSN or embedded PostgreSQL)")
    demo.add_argument("--jobs", type=int, default=40, help="how many example jobs (default: 40)")
    return parser


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from .config import load_config

    overrides = {"dsn": args.dsn, "prefix": args.prefix, **extra}
    return load_config(args.config, overrides=overrides)


async def _migrate(args: argparse.Namespace) -> int:
    from .db.connect import create_pool
    from .db.migrate import current_version, migrate, rollback
    from .oban import resolve_dsn

    config = _config(args)
    dsn, _ = await asyncio.to_thread(resolve_dsn, config)
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            if args.rollback is not None:
                done = await rollback(conn, config.prefix, target=args.rollback)
                verb = "rolled back"
            else:
                done = await migrate(conn, config.prefix, target=args.to)
                verb = "applied"
            version = await current_version(conn, config.prefix)
        print(f"{verb} {done or 'nothing'}; schema {config.prefix!r} is at version {version}")
    finally:
        await pool.close()
    return 0


async def _queues(args: argparse.Namespace) -> int:
    from .oban import Oban

    async with Oban(config=_config(args).model_copy(update={"queues": {}})) as oban:
        view = await oban.check_queues(limit_keys=args.keys)
    print(f"{'queue':<24} {'available':>9} {'executing':>9} {'scheduled':>9} {'retryable':>9}  nodes")
    for q in view.queues:
        nodes = (
            ", ".join(f"{n.node} {n.running}/{n.limit}{' paused' if n.paused else ''}" for n in q.nodes)
            or "-"
        )
        extra = f" global {q.global_limit}" if q.global_limit else ""
        extra += f" rate {q.rate_limit['allowed']}/{q.rate_limit['period']}s" if q.rate_limit else ""
        counts = f"{q.available:>9} {q.executing:>9} {q.scheduled:>9} {q.retryable:>9}"
        print(f"{q.name:<24} {counts}  {nodes}{extra}")
    if view.limits:
        print(f"\n{'limit key':<48} {'running':>7} {'waiting':>7} {'limit':>5}")
        for lim in view.limits:
            flag = "  blocked" if lim.blocked else ""
            print(f"{lim.key[:48]:<48} {lim.running:>7} {lim.waiting:>7} {lim.limit:>5}{flag}")
        print(f"\n{view.blocked_jobs} job(s) waiting on a full limit")
    return 0


def _start(args: argparse.Namespace) -> int:
    from ._logging import setup_logging
    from .runner import import_modules, run

    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    config = _config(
        args,
        queues=args.queues,
        node=args.node,
        modules=modules,
        migrate=args.migrate,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    setup_logging(config.log_level, config.log_format)
    import_modules(config.modules, source=args.config or "oban.toml")
    return asyncio.run(run(config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "version":
            print(f"oban-py {__version__}")
            return 0
        if args.command == "migrate":
            return asyncio.run(_migrate(args))
        if args.command == "start":
            return _start(args)
        if args.command == "queues":
            return asyncio.run(_queues(args))
        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(dsn=args.dsn, jobs=args.jobs))
        parser.print_help()
        return 2
    except ConfigError as exc:
        print(f"oban-py: configuration error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ObanError as exc:
        print(f"oban-py: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
