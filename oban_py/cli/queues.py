"""``oban-py queues [pause|resume|scale]``: every queue across the cluster, and controlling one.

Plain ``oban-py queues`` shows each queue's jobs by state, its nodes (running/limit, paused), global
and rate limits, and the busiest limit keys. ``pause``/``resume``/``scale QUEUE`` persist a control
for every node, or for ``--node``, as :meth:`Oban.pause_queue` and friends do. The action is a
positional with choices rather than a subcommand, so the connection flags work before or after it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .common import Sub, add_common, config_from, print_json, print_table

if TYPE_CHECKING:
    from ..oban import Oban
    from ..overview import Overview

__all__ = ["register"]

_STATES = ("available", "executing", "scheduled", "retryable", "completed", "discarded", "cancelled")


def register(sub: Sub) -> None:
    queues = sub.add_parser(
        "queues",
        help="show every queue (jobs by state, nodes, limits, paused); pause, resume or scale one",
        description="Without an action: every queue and the busiest limit keys.",
    )
    add_common(queues)
    queues.add_argument("action", nargs="?", choices=["show", "pause", "resume", "scale"], default="show")
    queues.add_argument("queue", nargs="?", help="the queue to pause, resume or scale")
    queues.add_argument("--node", help="only this node (default: every node)")
    queues.add_argument("--limit", type=int, metavar="N", help="scale: jobs at once per node")
    queues.add_argument("--global-limit", type=int, metavar="N", help="scale: jobs at once, cluster-wide")
    queues.add_argument("--keys", type=int, default=20, metavar="N", help="limit keys to show (default: 20)")
    queues.add_argument("--json", action="store_true", help="print JSON instead of text")
    queues.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from ..oban import Oban

    if args.action != "show" and not args.queue:
        raise ValidationError("queue", None, f"`oban-py queues {args.action}` needs a queue name")
    config = config_from(args).model_copy(update={"queues": {}, "pool_size": 1})
    async with Oban(config=config) as oban:
        if args.action == "show":
            view = await oban.check_queues(limit_keys=args.keys)
        else:
            await _control(oban, args)
    if args.action != "show":
        where = f"on node {args.node!r}" if args.node else "on every node"
        if args.json:
            print_json({"queue": args.queue, "action": args.action, "node": args.node})
        else:
            print(f"{args.action.rstrip('e')}ed queue {args.queue!r} {where}")
        return 0
    if args.json:
        print_json(_as_data(view))
    else:
        _print(view)
    return 0


async def _control(oban: Oban, args: argparse.Namespace) -> None:
    if args.action == "pause":
        await oban.pause_queue(args.queue, node=args.node)
    elif args.action == "resume":
        await oban.resume_queue(args.queue, node=args.node)
    else:
        await oban.scale_queue(args.queue, limit=args.limit, global_limit=args.global_limit, node=args.node)


def _as_data(view: Overview) -> dict[str, Any]:
    queues = [{**dataclasses.asdict(q), "paused": q.paused} for q in view.queues]
    limits = [{**dataclasses.asdict(lim), "blocked": lim.blocked} for lim in view.limits]
    return {"queues": queues, "limits": limits, "blocked_jobs": view.blocked_jobs}


def _print(view: Overview) -> None:
    rows = []
    for q in view.queues:
        nodes = ", ".join(f"{n.node} {n.running}/{n.limit}{' paused' if n.paused else ''}" for n in q.nodes)
        limits = f"global {q.global_limit}" if q.global_limit else ""
        if q.rate_limit:
            limits += f" rate {q.rate_limit['allowed']}/{q.rate_limit['period']}s"
        paused = {True: "yes", False: "no", None: "some" if q.nodes else "-"}[q.paused]
        rows.append([q.name, *(getattr(q, s) for s in _STATES), paused, limits.strip(), nodes or "-"])
    print_table(["queue", *_STATES, "paused", "limits", "nodes"], rows, right=range(1, len(_STATES) + 1))
    if view.limits:
        print()
        print_table(
            ["limit key", "running", "waiting", "limit", ""],
            [
                [lim.key[:48], lim.running, lim.waiting, lim.limit, "blocked" if lim.blocked else ""]
                for lim in view.limits
            ],
            right=[1, 2, 3],
        )
        print(f"\n{view.blocked_jobs} job(s) waiting on a full limit")
