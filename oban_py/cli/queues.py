"""``oban-py queues``: every queue, its nodes and limits, and the busiest limit keys."""

from __future__ import annotations

import argparse
import asyncio

from .common import Sub, add_common, config_from

__all__ = ["register"]


def register(sub: Sub) -> None:
    queues = sub.add_parser("queues", help="show every queue, its nodes and limits, and busy limit keys")
    add_common(queues)
    queues.add_argument("--keys", type=int, default=20, metavar="N", help="limit keys to show (default: 20)")
    queues.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from ..oban import Oban

    async with Oban(config=config_from(args).model_copy(update={"queues": {}})) as oban:
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
