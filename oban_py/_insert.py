"""Inserting jobs: validation, batch dedupe, and the conflict-resolution loop.

Every input gets a definite answer: a new row (``conflicted=False``), the row that holds its unique
key (``conflicted=True``, real id and state), or an exception raised before anything is written
(bad input) or with the transaction rolled back (database error).

The unique path, per chunk:

1. ``job_insert``: one ``INSERT ... SELECT unnest(...) ON CONFLICT DO NOTHING``. Rows whose key is held
   are skipped without touching the holder. If the holder was still uncommitted, PostgreSQL waited for it.
2. ``job_insert_resolve`` for the skipped rows, a fresh statement (so it sees holders that committed
   during that wait): holders past their period lose the key and the rows are inserted in their place;
   the others get their live holder back.
3. A row that got neither (its holder left the group, or a new holder raced in) goes round again.

Unique rows are sent in key order, so two concurrent batches lock keys in the same order and cannot
deadlock each other.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from . import _json
from .db.rows import job_from_record
from .errors import ObanError, UnknownWorker, ValidationError
from .job import Job, JobState
from .limits import KeyedLimit, LimitOptions, resolve_limit
from .unique import UniqueOptions, UniqueSpec, resolve_unique
from .worker import MAX_ATTEMPTS_LIMIT, WorkerSpec, get_worker, validate_queue

if TYPE_CHECKING:
    from .db.driver import Driver

__all__ = ["insert_jobs"]

DEFAULT_CHUNK = 5_000
DEFAULT_MAX_ARGS_BYTES = 1024 * 1024
_MAX_ROUNDS = 20
_STATES = {s.value: s for s in JobState}


@dataclass
class _Item:
    index: int
    job: Job[Any]
    args: str
    meta: str
    tags: str
    unique: UniqueSpec | None
    limit: KeyedLimit | None = None
    result: Job[Any] | None = None


def _prepare(index: int, job: Job[Any], max_bytes: int) -> _Item:
    if not isinstance(job, Job):
        raise ValidationError(f"jobs[{index}]", job, "must be a Job (build one with Worker.new(...))")
    worker = job.worker
    if not isinstance(worker, str) or not worker or len(worker) > 255:
        raise ValidationError("worker", worker, "must be a non-empty string of at most 255 characters")
    validate_queue(job.queue, worker=worker)
    if isinstance(job.priority, bool) or not isinstance(job.priority, int) or not 0 <= job.priority <= 9:
        raise ValidationError("priority", job.priority, "must be an integer from 0 to 9", worker=worker)
    ma = job.max_attempts
    if isinstance(ma, bool) or not isinstance(ma, int) or not 1 <= ma <= MAX_ATTEMPTS_LIMIT:
        raise ValidationError(
            "max_attempts", ma, f"must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}", worker=worker
        )
    at = job.scheduled_at
    if at is not None and (not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None):
        raise ValidationError("scheduled_at", at, "must be a timezone-aware datetime", worker=worker)
    args = job.args
    if isinstance(args, BaseModel):
        args = args.model_dump(mode="json")
    if not isinstance(args, Mapping):
        raise ValidationError("args", args, "must be a dict", worker=worker)
    if not isinstance(job.meta, Mapping):
        raise ValidationError("meta", job.meta, "must be a dict", worker=worker)
    tags: Any = job.tags
    if (
        isinstance(tags, str)
        or not isinstance(tags, (list, tuple))
        or not all(isinstance(t, str) for t in tags)
    ):
        raise ValidationError("tags", tags, "must be a list of strings", worker=worker)
    args_text, canonical = _json.encode_checked(args, "args", limit=max_bytes, worker=worker)
    meta_text = _json.encode(job.meta, "meta", limit=max_bytes, worker=worker) if job.meta else "{}"
    try:
        spec: WorkerSpec | None = get_worker(worker)
    except UnknownWorker:
        spec = None
    worker_cls = spec.cls if spec is not None else None
    unique: UniqueSpec | None = None
    options: Any = job.unique
    if options is not None:
        if not isinstance(options, UniqueOptions):  # a hand-built Job may carry True or a dict
            options = UniqueOptions.parse(options, worker=worker)
        if options is not None:
            unique = resolve_unique(
                options, job, args, worker_cls=worker_cls, args_text=args_text if canonical else None
            )
    # A keyed limit belongs to the worker: a hand-built Job of a registered worker gets it too.
    limit_options: Any = job.limit if job.limit is not None else (spec.limit if spec is not None else None)
    limit: KeyedLimit | None = None
    if limit_options is not None:
        if not isinstance(limit_options, LimitOptions):
            limit_options = LimitOptions.parse(limit_options, worker=worker)
        if limit_options is not None:
            limit = resolve_limit(limit_options, job, args, worker_cls=worker_cls)
    tags_text = json.dumps(list(tags)) if tags else "[]"
    return _Item(index, job, args_text, meta_text, tags_text, unique, limit)


def _columns(items: Sequence[_Item], *, plain: bool = False) -> dict[str, list[Any]]:
    """The column arrays of ``items``; ``plain`` leaves out the unique and limit columns."""
    columns: dict[str, list[Any]] = {
        "workers": [it.job.worker for it in items],
        "queues": [it.job.queue for it in items],
        "args": [it.args for it in items],
        "metas": [it.meta for it in items],
        "tags": [it.tags for it in items],
        "priorities": [it.job.priority for it in items],
        "max_attempts": [it.job.max_attempts for it in items],
        "scheduled_ats": [it.job.scheduled_at for it in items],
    }
    if plain:
        return columns
    return {
        **columns,
        "unique_keys": [it.unique.key if it.unique else None for it in items],
        "unique_states": [it.unique.mask if it.unique else None for it in items],
        "unique_periods": [it.unique.period if it.unique else None for it in items],
        "limit_keys": [it.limit.key if it.limit else None for it in items],
        "limit_tos": [it.limit.to if it.limit else None for it in items],
        "limit_skips": [it.limit.skip if it.limit else False for it in items],
    }


def _mark_inserted(item: _Item, row: Any) -> None:
    job = item.job
    job.id = row["id"]
    job.state = _STATES[row["state"]]
    job.inserted_at = row["inserted_at"]
    job.scheduled_at = row["scheduled_at"]
    job.attempt = 0
    job.conflicted = False
    job.unique_key = item.unique.key if item.unique else None
    item.result = job


async def _insert_round(driver: Driver, conn: Any, items: list[_Item]) -> list[_Item]:
    """job_insert for ``items``; returns the unique items that were skipped as conflicts."""
    if len(items) == 1:
        it = items[0]
        rows = await driver.fetch(
            "job_insert_one",
            conn,
            channel=driver.insert_channel,
            worker=it.job.worker,
            queue=it.job.queue,
            args=it.args,
            meta=it.meta,
            tags=list(it.job.tags),
            priority=it.job.priority,
            max_attempts=it.job.max_attempts,
            scheduled_at=it.job.scheduled_at,
            unique_key=it.unique.key if it.unique else None,
            unique_states=it.unique.mask if it.unique else None,
            unique_period=it.unique.period if it.unique else None,
            limit_key=it.limit.key if it.limit else None,
            limit_to=it.limit.to if it.limit else None,
            limit_skip=it.limit.skip if it.limit else False,
        )
        for row in rows:
            _mark_inserted(items[row["ord"] - 1], row)
        return [it for it in items if it.result is None]
    # One NOTIFY per queue, computed here (a scheduled job's queue gets a harmless extra wake-up).
    notify = sorted({it.job.queue for it in items})
    if all(it.unique is None and it.limit is None for it in items):
        rows = await driver.fetch(
            "job_insert_plain",
            conn,
            channel=driver.insert_channel,
            notify=notify,
            **_columns(items, plain=True),
        )
        for row in rows:
            _mark_inserted(items[row["ord"] - 1], row)
        if len(rows) != len(items):  # cannot conflict: every row must come back
            raise ObanError(f"insert returned {len(rows)} rows for {len(items)} jobs")
        return []
    rows = await driver.fetch(
        "job_insert", conn, channel=driver.insert_channel, notify=notify, **_columns(items)
    )
    for row in rows:
        item = items[row["ord"] - 1]
        if row["inserted"]:
            _mark_inserted(item, row)
        else:  # a holder committed before this statement
            holder = job_from_record(row, conflicted=True)
            holder.unique_key = item.unique.key if item.unique else None
            item.result = holder
    return [it for it in items if it.result is None]


async def _resolve_round(driver: Driver, conn: Any, items: list[_Item]) -> list[_Item]:
    """job_insert_resolve for skipped items; returns those still without an answer."""
    rows = await driver.fetch("job_insert_resolve", conn, channel=driver.insert_channel, **_columns(items))
    holders: dict[bytes, Any] = {}
    for row in rows:
        if row["inserted"]:
            _mark_inserted(items[row["ord"] - 1], row)
        else:
            holders[bytes(row["unique_key"])] = row
    left: list[_Item] = []
    for it in items:
        if it.result is not None:
            continue
        assert it.unique is not None
        holder = holders.get(it.unique.key)
        if holder is None:
            left.append(it)
        else:
            found = job_from_record(holder, conflicted=True)
            found.unique_key = it.unique.key
            it.result = found
    return left


async def _replace(driver: Driver, conn: Any, items: list[_Item]) -> None:
    """Apply ``replace={state: [fields]}`` to the holders these conflicted items found."""
    todo = [
        it for it in items if it.unique and it.unique.options.replace and it.result and it.result.conflicted
    ]
    if not todo:
        return
    by_holder: dict[int, _Item] = {}
    for it in todo:  # one replacement per holder; the last input wins, as sequential inserts would
        assert it.result is not None
        assert it.result.id is not None
        by_holder[it.result.id] = it
    chosen = list(by_holder.values())
    rows = await driver.fetch(
        "job_replace",
        conn,
        ids=[it.result.id for it in chosen if it.result],
        replaces=[it.unique.replace_json if it.unique else None for it in chosen],
        args=[it.args for it in chosen],
        metas=[it.meta for it in chosen],
        tags=[it.tags for it in chosen],
        priorities=[it.job.priority for it in chosen],
        max_attempts=[it.job.max_attempts for it in chosen],
        queues=[it.job.queue for it in chosen],
        scheduled_ats=[it.job.scheduled_at for it in chosen],
        unique_periods=[it.unique.period if it.unique else None for it in chosen],
    )
    updated = {row["id"]: row for row in rows}
    for it in todo:
        assert it.result is not None
        row = updated.get(it.result.id)
        if row is not None:
            fresh = job_from_record(row, conflicted=True)
            fresh.unique_key = it.result.unique_key
            it.result = fresh


async def _run(driver: Driver, conn: Any, primary: list[_Item], chunk: int) -> None:
    for start in range(0, len(primary), chunk):
        pending = await _insert_round(driver, conn, primary[start : start + chunk])
        rounds = 0
        while pending:
            rounds += 1
            if rounds > _MAX_ROUNDS:
                ids = [it.index for it in pending]
                raise ObanError(
                    f"could not settle unique inserts at positions {ids[:10]} after {_MAX_ROUNDS} rounds: "
                    "their holders kept changing; nothing was inserted for them"
                )
            pending = await _resolve_round(driver, conn, pending)
            if pending:
                pending = await _insert_round(driver, conn, pending)
        await _replace(driver, conn, primary[start : start + chunk])


async def insert_jobs(
    driver: Driver,
    jobs: Sequence[Job[Any]],
    conn: Any = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
) -> list[Job[Any]]:
    """Insert ``jobs``; one result per input, in input order."""
    items = [_prepare(i, job, max_args_bytes) for i, job in enumerate(jobs)]
    if not items:
        return []
    first: dict[bytes, _Item] = {}
    primary: list[_Item] = []
    dupes: list[tuple[_Item, _Item]] = []
    for it in items:
        if it.unique is not None:
            seen = first.get(it.unique.key)
            if seen is not None:
                dupes.append((it, seen))
                continue
            first[it.unique.key] = it
        primary.append(it)
    if dupes or len(primary) > 1:
        # Non-unique rows first in input order, then unique rows in key order (no lock-order deadlocks).
        primary.sort(key=lambda it: (it.unique is not None, it.unique.key if it.unique else b"", it.index))

    if len(primary) == 1 or (conn is not None and len(primary) <= chunk_size):
        async with driver.connection(conn) as c:
            await _run(driver, c, primary, chunk_size)
    else:
        async with driver.transaction(conn) as c:
            await _run(driver, c, primary, chunk_size)

    for dup, original in dupes:
        assert original.result is not None
        twin = copy.copy(original.result)
        twin.conflicted = True
        twin.meta = dict(twin.meta)
        dup.result = twin
    out: list[Job[Any]] = []
    for it in items:
        assert it.result is not None
        out.append(it.result)
    return out
