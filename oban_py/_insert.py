"""Inserting jobs: validation, batch dedupe, and the conflict-resolution loop.

Every input gets a definite answer: a new row (``conflicted=False``), the row that holds its unique
key (``conflicted=True``, real id and state), or an exception raised before anything is written
(bad input) or with the transaction rolled back (database error). A batch answers exactly as the
same jobs inserted one by one in input order would (see ``_execute``).

The unique path, per chunk:

1. ``job_insert``: one ``INSERT ... SELECT unnest(...) ON CONFLICT DO NOTHING``. Rows whose key is held
   are skipped without touching the holder. If the holder was still uncommitted, PostgreSQL waited for it.
2. ``job_insert_resolve`` for the skipped rows, a fresh statement (so it sees holders that committed
   during that wait): holders past their period lose the key and the rows are inserted in their place;
   the others get their live holder back.
3. A row that got neither (its holder left the group, or a new holder raced in) goes round again.
4. ``job_replace`` for the jobs with ``replace`` that met a holder, one step per key at a time.

Unique rows are sent in key order in every round, and every statement that locks several rows locks
them in (key, id) order, so concurrent batches, replaces and cancels take keys in one order. A round
after the first can still revisit a lower key, so a deadlock is possible in principle: when the whole
transaction is ours, it is run again (``db.retry.retry_deadlocks``) instead of surfacing.
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _json
from .db.retry import retry_deadlocks
from .db.rows import job_from_record
from .errors import ObanError, UnknownWorker, ValidationError
from .job import Job, JobState
from .limits import KeyedLimit, LimitOptions, resolve_limit
from .unique import STATE_BITS, UniqueOptions, UniqueSpec, resolve_unique
from .validation import (
    validate_args,
    validate_max_attempts,
    validate_meta,
    validate_priority,
    validate_queue,
    validate_scheduled_at,
    validate_tags,
    validate_worker_name,
)
from .worker_spec import WorkerSpec, get_worker

if TYPE_CHECKING:
    from .db.driver import Driver
    from .db.query_names import ManyQuery

__all__ = ["insert_jobs"]

DEFAULT_CHUNK = 5_000
DEFAULT_MAX_ARGS_BYTES = 1024 * 1024
_MAX_ROUNDS = 20
_STATES = {s.value: s for s in JobState}
_INSERT_BITS = STATE_BITS["scheduled"] | STATE_BITS["available"]


@dataclass
class _Session:
    """Where the statements of one insert_jobs call go.

    ``retry``: each statement is a whole transaction of ours (a pooled connection outside a
    transaction), so one that deadlocks can simply run again.
    """

    driver: Driver
    conn: Any
    retry: bool

    async def fetch(self, query: ManyQuery, /, **params: Any) -> list[Any]:
        if not self.retry:
            return await self.driver.fetch(query, self.conn, **params)
        return await retry_deadlocks(lambda: self.driver.fetch(query, self.conn, **params))


@dataclass
class _Item:
    index: int
    job: Job[Any]
    args: str
    meta: str
    tags: str
    #: The tags as stored (stripped, deduplicated): what the inserted job reports back.
    tag_list: list[str]
    unique: UniqueSpec | None
    limit: KeyedLimit | None = None
    result: Job[Any] | None = None


def _prepare(index: int, job: Job[Any], max_bytes: int) -> _Item:
    """Check ``job`` with the rules ``Worker.new`` used (it may be hand-built, or changed since)."""
    if not isinstance(job, Job):
        raise ValidationError(f"jobs[{index}]", job, "must be a Job (build one with Worker.new(...))")
    worker = validate_worker_name(job.worker)
    validate_queue(job.queue, worker=worker)
    validate_priority(job.priority, worker)
    validate_max_attempts(job.max_attempts, worker)
    if job.scheduled_at is not None:
        validate_scheduled_at(job.scheduled_at, worker)
    args = validate_args(job.args, worker)
    validate_meta(job.meta, worker)
    tags = validate_tags(job.tags, worker)
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
    tags_text = json.dumps(tags) if tags else "[]"
    return _Item(index, job, args_text, meta_text, tags_text, tags, unique, limit)


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


#: The fields of an input job that _mark_inserted sets.
_MARKED = ("id", "state", "inserted_at", "scheduled_at", "attempt", "conflicted", "unique_key", "tags")


def _mark_inserted(item: _Item, row: Any) -> None:
    job = item.job
    job.id = row["id"]
    job.state = _STATES[row["state"]]
    job.inserted_at = row["inserted_at"]
    job.scheduled_at = row["scheduled_at"]
    job.attempt = 0
    job.conflicted = False
    job.unique_key = item.unique.key if item.unique else None
    job.tags = list(item.tag_list)
    item.result = job


async def _insert_round(s: _Session, items: list[_Item]) -> list[_Item]:
    """job_insert for ``items``; returns the unique items that were skipped as conflicts."""
    if len(items) == 1 and (items[0].unique is None or _always_takes(items[0])):
        it = items[0]
        rows = await s.fetch(
            "job_insert_one",
            channel=s.driver.insert_channel,
            worker=it.job.worker,
            queue=it.job.queue,
            args=it.args,
            meta=it.meta,
            tags=it.tag_list,
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
        rows = await s.fetch(
            "job_insert_plain", channel=s.driver.insert_channel, notify=notify, **_columns(items, plain=True)
        )
        for row in rows:
            _mark_inserted(items[row["ord"] - 1], row)
        if len(rows) != len(items):  # cannot conflict: every row must come back
            raise ObanError(f"insert returned {len(rows)} rows for {len(items)} jobs")
        return []
    rows = await s.fetch("job_insert", channel=s.driver.insert_channel, notify=notify, **_columns(items))
    for row in rows:
        item = items[row["ord"] - 1]
        if row["inserted"]:
            _mark_inserted(item, row)
        else:  # a holder committed before this statement
            holder = job_from_record(row, conflicted=True)
            holder.unique_key = item.unique.key if item.unique else None
            item.result = holder
    return [it for it in items if it.result is None]


async def _resolve_round(s: _Session, items: list[_Item]) -> list[_Item]:
    """job_insert_resolve for skipped items; returns those still without an answer."""
    rows = await s.fetch("job_insert_resolve", channel=s.driver.insert_channel, **_columns(items))
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


async def _insert_chunks(s: _Session, items: list[_Item], chunk: int) -> None:
    """Insert ``items`` (in key order), chunk by chunk, until each has a row or its holder."""
    for start in range(0, len(items), chunk):
        pending = await _insert_round(s, items[start : start + chunk])
        rounds = 0
        while pending:  # a subset of a sorted chunk: still in key order
            rounds += 1
            if rounds > _MAX_ROUNDS:
                ids = [it.index for it in pending]
                raise ObanError(
                    f"could not settle unique inserts at positions {ids[:10]} after {_MAX_ROUNDS} rounds: "
                    "their holders kept changing; nothing was inserted for them"
                )
            pending = await _resolve_round(s, pending)
            if pending:
                pending = await _insert_round(s, pending)


async def _replace(s: _Session, steps: dict[bytes, _Item], holders: dict[bytes, Job[Any]]) -> None:
    """One replace step per key: ``steps[key]`` overwrites fields of ``holders[key]``.

    The item's answer becomes the holder as replaced (or as it was, when its state is not one the
    item replaces in). A holder that no longer holds its key afterwards is dropped from ``holders``.
    """
    keys = sorted(steps)  # key order, like the inserts (the statement also locks in that order)
    chosen = [steps[k] for k in keys]
    rows = await s.fetch(
        "job_replace",
        ids=[holders[k].id for k in keys],
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
    for key, it in zip(keys, chosen, strict=True):
        row = updated.get(holders[key].id)
        if row is None:
            continue  # not in a state this item replaces in: its answer is the holder as it was
        fresh = job_from_record(row, conflicted=True)
        fresh.unique_key = key
        it.result = fresh
        if row["holds"]:
            holders[key] = fresh
        else:  # e.g. a debounce made a `scheduled` group job due now: it left its group
            del holders[key]


def _twin(holder: Job[Any], key: bytes) -> Job[Any]:
    twin = copy.copy(holder)
    twin.conflicted = True
    twin.meta = dict(twin.meta)
    twin.unique_key = key
    return twin


def _always_takes(it: _Item) -> bool:
    """Takes its key when free whatever its insert state (the group has scheduled and available)."""
    return it.unique is not None and it.unique.mask & _INSERT_BITS == _INSERT_BITS


def _may_take(it: _Item) -> bool:
    """False only for a job certain to be inserted in a state outside its group.

    That is an immediate job (no ``scheduled_at``: the database makes it ``available``) of a group
    without ``available``. A job with a ``scheduled_at`` is scheduled or available by the database's
    clock, so for a group with only one of the two it may take its key or not.
    """
    assert it.unique is not None
    return bool(it.unique.mask & STATE_BITS["available"]) or it.job.scheduled_at is not None


async def _execute(s: _Session, items: list[_Item], chunk: int) -> None:
    """Give every item its answer, as if the items were inserted one by one in input order.

    Per key, the items go through steps. An *insert* step sends the key's next items up to the first
    one that may take the key, or that has ``replace`` (the earlier ones cannot take it: they only
    look for a holder). Once a key has a live holder, its next items are duplicates of it, answered
    here without a statement, except that each one with ``replace`` is a *replace* step on the holder.
    A holder that leaves its group by a replacement sends the key back to an insert step. Steps of all
    keys run together: usually one insert statement per chunk and at most one replace statement.
    """
    queues: dict[bytes, deque[_Item]] = {}
    plain: list[_Item] = []
    for it in items:
        if it.unique is None:
            plain.append(it)
        else:
            queues.setdefault(it.unique.key, deque()).append(it)
    holders: dict[bytes, Job[Any]] = {}
    while True:
        batch, lasts = plain, []
        plain = []
        for key, queue in queues.items():
            if not queue or key in holders:
                continue
            while queue:
                it = queue.popleft()
                batch.append(it)
                if _may_take(it) or (it.unique is not None and it.unique.options.replace):
                    break
            lasts.append(it)
        if not batch:
            return
        if len(batch) > 1:  # non-unique rows first in input order, then unique rows in key order
            batch.sort(key=lambda it: (it.unique is not None, it.unique.key if it.unique else b"", it.index))
        await _insert_chunks(s, batch, chunk)
        steps: dict[bytes, _Item] = {}
        for it in lasts:
            assert it.unique is not None
            assert it.result is not None
            key, result = it.unique.key, it.result
            if result.conflicted:
                holders[key] = result
                if it.unique.options.replace:
                    steps[key] = it
            elif it.unique.mask & STATE_BITS[result.state.value]:
                holders[key] = result
        while True:
            for key, holder in holders.items():
                queue = queues[key]
                while queue and key not in steps:
                    it = queue.popleft()
                    it.result = _twin(holder, key)
                    if it.unique is not None and it.unique.options.replace:
                        steps[key] = it
            if not steps:
                break
            await _replace(s, steps, holders)
            steps = {}


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
    firsts = sum(1 for it in items if it.unique is None) + len({it.unique.key for it in items if it.unique})
    if firsts == 1 or (conn is not None and len(items) <= chunk_size):
        # Without a transaction of our own, every statement is one (retried alone on a deadlock).
        async with driver.connection(conn) as c:
            await _execute(_Session(driver, c, retry=conn is None), items, chunk_size)
    else:
        before = [tuple(getattr(it.job, f) for f in _MARKED) for it in items]

        async def run() -> None:
            for it, fields in zip(items, before, strict=True):  # undo a rolled-back attempt's answers
                it.result = None
                for name, value in zip(_MARKED, fields, strict=True):
                    setattr(it.job, name, value)
            async with driver.transaction(conn) as c:
                await _execute(_Session(driver, c, retry=False), items, chunk_size)

        if conn is None:
            await retry_deadlocks(run)
        else:  # the caller's transaction is aborted: only the caller can run it again
            await run()
    out: list[Job[Any]] = []
    for it in items:
        assert it.result is not None
        out.append(it.result)
    return out
