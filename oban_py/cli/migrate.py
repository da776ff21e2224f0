"""``oban-py migrate``: create or upgrade the schema, or roll it back."""

from __future__ import annotations

import argparse
import asyncio

from .common import Sub, add_common, config_from

__all__ = ["register"]


def register(sub: Sub) -> None:
    migrate = sub.add_parser("migrate", help="create or upgrade the schema (safe to run concurrently)")
    add_common(migrate)
    migrate.add_argument("--to", type=int, metavar="N", help="migrate up to version N (default: latest)")
    migrate.add_argument(
        "--rollback",
        type=int,
        metavar="N",
        help="undo migrations above version N (0 removes every oban table)",
    )
    migrate.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from ..db.connect import create_pool
    from ..db.migrate import current_version, migrate, rollback
    from ..oban import resolve_dsn

    config = config_from(args)
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
