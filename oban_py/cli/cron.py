"""``oban-py cron list|pause|resume|run``: the recurring tasks, their next run and last job.

The tasks are read as a runner reads them: ``[cron.<name>]`` tables, and ``cron=`` workers of the
``modules`` in the config (imported, so that their workers are known). Pause and resume are stored in
the database and hold on every node.
"""

from __future__ import annotations

import argparse
import asyncio

from .common import Sub, add_common, config_from, print_json, print_table

__all__ = ["register"]


def register(sub: Sub) -> None:
    cron = sub.add_parser("cron", help="list, pause, resume or run recurring tasks")
    actions = cron.add_subparsers(dest="cron_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every task: schedule, next run, paused, last job")
    add_common(listing)
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    listing.set_defaults(handler=lambda args: asyncio.run(run(args)))
    for action, text in (
        ("pause", "stop enqueuing a task on every node (until resume)"),
        ("resume", "enqueue a paused task again, from its next tick"),
        ("run", "insert a job of a task now, whatever its schedule"),
    ):
        parser = actions.add_parser(action, help=text)
        add_common(parser)
        parser.add_argument("name", help="the task's name ([cron.<name>], or the worker's name)")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        parser.set_defaults(handler=lambda args: asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    from ..oban import Oban
    from ..runner import import_modules

    config = config_from(args).model_copy(update={"queues": {}})
    import_modules(config.modules)
    async with Oban(config=config) as oban:
        if args.cron_action == "list":
            tasks = [task.as_dict() for task in await oban.cron_tasks()]
            if args.json:
                print_json(tasks)
            else:
                rows = [
                    [
                        t["name"],
                        t["schedule"],
                        t["timezone"],
                        "paused" if t["paused"] else ("disabled" if not t["enabled"] else "active"),
                        t["next_at"] or "-",
                        t["last_job_id"] or "-",
                    ]
                    for t in tasks
                ]
                print_table(["task", "schedule", "timezone", "state", "next run", "last job"], rows)
            return 0
        if args.cron_action == "run":
            job = await oban.run_cron(args.name)
            result = {"task": args.name, "job_id": job.id, "queue": job.queue, "worker": job.worker}
            if args.json:
                print_json(result)
            else:
                print(f"cron {args.name}: inserted job {job.id}")
            return 0
        await (oban.pause_cron if args.cron_action == "pause" else oban.resume_cron)(args.name)
        paused = args.cron_action == "pause"
        if args.json:
            print_json({"task": args.name, "paused": paused})
        else:
            print(f"cron {args.name}: {'paused' if paused else 'resumed'} on every node")
    return 0
