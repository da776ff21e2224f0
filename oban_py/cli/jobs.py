"""``oban-py jobs list|show|retry|cancel|delete|update``: find and change jobs without SQL.

The filters are those of :meth:`Oban.list_jobs` (``--state``, ``--queue``, ``--worker``, ``--args``
JSON, ``--tag``, repeatable). The bulk commands take ids, filters or both, and refuse neither: a
forgotten filter must not retry or delete every job. ``--json`` prints one document for a script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .common import Sub, add_common, config_from, print_json, print_table

if TYPE_CHECKING:
    from ..job import Job
    from ..job_query import JobFilter
    from ..oban import Oban

__all__ = ["register"]


def _json_object(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"user_id\": 7}'")
    return value


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", action="append", help="job state (repeat for several)")
    parser.add_argument("--queue", help="queue name")
    parser.add_argument("--worker", help="worker name")
    parser.add_argument("--args", type=_json_object, metavar="JSON", help="args contain this JSON object")
    parser.add_argument("--tag", action="append", dest="tags", help="has this tag (repeat: all of them)")


def _parser(sub: Any, name: str, help: str, *, ids: str | int | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    add_common(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if ids is not None:
        parser.add_argument("ids", nargs=ids, type=int, metavar="ID", help="job id")
    return parser


def register(sub: Sub) -> None:
    jobs = sub.add_parser("jobs", help="list, show, retry, cancel, delete or update jobs")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = _parser(actions, "list", "jobs matching the filters, newest first, a page at a time")
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=50, help="jobs per page (default: 50)")
    listing.add_argument("--before", type=int, metavar="ID", help="the page below this id (keyset)")
    listing.set_defaults(handler=_run(_list))

    show = _parser(actions, "show", "one job, every field", ids=1)
    show.set_defaults(handler=_run(_show))

    for name, help in (
        ("retry", "make jobs available now (all or nothing)"),
        ("cancel", "cancel jobs that have not finished"),
        ("delete", "delete jobs in any state"),
    ):
        parser = _parser(actions, name, help, ids="*")
        _add_filters(parser)
        if name == "cancel":
            parser.add_argument("--reason", help="recorded in the job's errors")
        parser.set_defaults(handler=_run(_bulk))

    update = _parser(actions, "update", "change jobs that have not started (available, scheduled)", ids="*")
    _add_filters(update)
    update.add_argument("--set-priority", type=int, metavar="N", help="new priority (0 runs first)")
    when = update.add_mutually_exclusive_group()
    when.add_argument("--set-scheduled-at", type=datetime.fromisoformat, metavar="ISO", help="run at")
    when.add_argument(
        "--set-schedule-in", type=float, metavar="SECONDS", help="run this many seconds from now"
    )
    update.add_argument("--set-queue", metavar="QUEUE", help="move to this queue")
    update.add_argument("--set-tag", action="append", dest="set_tags", metavar="TAG", help="replace tags")
    update.add_argument("--merge-meta", type=_json_object, metavar="JSON", help="merge into meta")
    update.set_defaults(handler=_run(_update))


def _run(action: Callable[[Oban, argparse.Namespace], Awaitable[Any]]) -> Callable[[argparse.Namespace], int]:
    """A handler: an Oban without queues (one connection) for the action; its result to stdout."""

    def handler(args: argparse.Namespace) -> int:
        from ..oban import Oban

        async def main() -> int:
            config = config_from(args).model_copy(update={"queues": {}, "pool_size": 1})
            async with Oban(config=config) as oban:
                result = await action(oban, args)
            if args.json:
                print_json(result)
            return 0

        return asyncio.run(main())

    return handler


def _filter(args: argparse.Namespace) -> JobFilter:
    from ..job_query import JobFilter

    ids = getattr(args, "ids", None) or None
    return JobFilter(args.state, args.queue, args.worker, args.args, args.tags, ids)


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(jobs: list[Job[Any]]) -> None:
    rows = [
        (j.id, j.state.value, j.queue, j.worker, f"{j.attempt}/{j.max_attempts}", _when(j.scheduled_at),
         _short(j.args))
        for j in jobs
    ]  # fmt: skip
    print_table(["id", "state", "queue", "worker", "attempt", "scheduled_at (UTC)", "args"], rows, right=[0])


async def _list(oban: Oban, args: argparse.Namespace) -> Any:
    where = _filter(args)
    page = await oban.list_jobs(
        state=where.state, queue=where.queue, worker=where.worker, args_contains=where.args_contains,
        tags=where.tags, limit=args.limit, before_id=args.before,
    )  # fmt: skip
    if args.json:
        return page.to_dict()
    _table(page.jobs)
    if page.next_before_id is not None:
        print(f"\nmore: add --before {page.next_before_id}")
    elif not page.jobs:
        print("no jobs match")
    return None


async def _show(oban: Oban, args: argparse.Namespace) -> Any:
    from ..job_query import job_dict

    data = job_dict(await oban.get_job(args.ids[0]))
    if args.json:
        return data
    width = max(len(k) for k in data)
    for key, value in data.items():
        text = _when(value) + " UTC" if isinstance(value, datetime) else value
        if isinstance(value, (dict, list)):
            text = json.dumps(value, default=str)
        print(f"{key:<{width}}  {'' if text is None else text}")
    return None


async def _bulk(oban: Oban, args: argparse.Namespace) -> Any:
    where = _filter(args)
    kwargs: dict[str, Any] = {
        "state": where.state, "queue": where.queue, "worker": where.worker,
        "args_contains": where.args_contains, "tags": where.tags,
    }  # fmt: skip
    if args.action == "cancel":
        kwargs["reason"] = args.reason
    method = {"retry": oban.retry_jobs, "cancel": oban.cancel_jobs, "delete": oban.delete_jobs}[args.action]
    count = await method(where.ids, **kwargs)
    past = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[args.action]
    if args.json:
        return {past: count}
    print(f"{past} {count} job(s)")
    return None


async def _update(oban: Oban, args: argparse.Namespace) -> Any:
    when = args.set_scheduled_at
    if when is not None and when.tzinfo is None:
        raise ValidationError("--set-scheduled-at", args.set_scheduled_at, "give a UTC offset, e.g. +00:00")
    if args.set_schedule_in is not None:
        when = datetime.now(timezone.utc) + timedelta(seconds=args.set_schedule_in)
    count = await oban.update_jobs(
        _filter(args), priority=args.set_priority, scheduled_at=when, queue=args.set_queue,
        tags=args.set_tags, meta=args.merge_meta,
    )  # fmt: skip
    if args.json:
        return {"updated": count}
    print(f"updated {count} job(s)")
    return None
