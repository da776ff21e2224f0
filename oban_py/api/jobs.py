"""Job control on the facade: list, get, update, cancel, delete, retry.

The statements are in :mod:`oban_py.job_control` and :mod:`oban_py.job_query`; what is here is the
part that needs the instance: interrupting jobs that were running (at once on this node, by NOTIFY on
the others) and settling parked rows.

The bulk forms take ids, or filters (``state``, ``queue``, ``worker``, ``args_contains``, ``tags``:
see :class:`~oban_py.job_query.JobFilter`), or both (the ids that also match). With neither they
refuse: "retry everything" is never what a missing argument meant, and neither is an empty filter
(``tags=[]``, ``args_contains={}``: refused naming the field, as they would match every job). The
filtered forms select the matching ids, then change them by a statement that re-checks the filter on
the rows it locks: a job that stopped matching meanwhile (retried and started, say) is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from .. import job_control
from ..db import parking
from ..db.rows import job_from_record
from ..errors import JobNotFound, ValidationError
from ..job import Job
from ..job_query import JobFilter, JobPage, list_jobs, matching_ids
from .base import EngineBase

__all__ = ["JobsAPI"]

States = str | Sequence[str] | None


def _where(
    job_ids: Iterable[int] | JobFilter | None,
    state: States,
    queue: str | None,
    worker: str | None,
    args_contains: Mapping[str, Any] | None,
    tags: Sequence[str] | None,
) -> JobFilter:
    """One filter from ids and/or filter keywords; refuses to stand for every job."""
    if isinstance(job_ids, JobFilter):
        where = job_ids
    else:
        ids = None if job_ids is None else list(job_ids)
        where = JobFilter(state, queue, worker, args_contains, tags, ids)
    if where.empty:
        raise ValidationError("job_ids", None, "give job ids or at least one filter")
    return where


class JobsAPI(EngineBase):
    async def list_jobs(
        self,
        *,
        state: States = None,
        queue: str | None = None,
        worker: str | None = None,
        args_contains: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> JobPage:
        """A page of jobs matching every filter given, newest first.

        The next page: ``before_id=page.next_before_id`` (None on the last page). Keyset pages on id:
        each costs about ``limit`` index entries, however deep into the table it is.
        """
        where = JobFilter(state, queue, worker, args_contains, tags)
        return await list_jobs(self.driver, where, limit=limit, before_id=before_id)

    async def get_job(self, job_id: int) -> Job[Any]:
        """The job's current row; raises JobNotFound."""
        rows = await self.driver.fetch("job_get", ids=[job_id])
        if not rows:
            raise JobNotFound(job_id)
        return job_from_record(rows[0])

    async def get_jobs(
        self,
        job_ids: Iterable[int] | None = None,
        *,
        state: States = None,
        queue: str | None = None,
        worker: str | None = None,
        args_contains: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
    ) -> list[Job[Any]]:
        """The jobs of ``job_ids`` (in that order; missing ones left out), or every job matching the
        filters, newest first (all of them: page with :meth:`list_jobs` when there may be many)."""
        if job_ids is not None and all(v is None for v in (state, queue, worker, args_contains, tags)):
            wanted = [int(i) for i in job_ids]
            rows = await self.driver.fetch("job_get", ids=wanted)
            by_id = {r["id"]: job_from_record(r) for r in rows}
            return [by_id[i] for i in wanted if i in by_id]
        ids, _ = await self._ids(job_ids, state, queue, worker, args_contains, tags)
        rows = await self.driver.fetch("job_get", ids=ids)
        return sorted((job_from_record(r) for r in rows), key=lambda j: -(j.id or 0))

    async def _ids(
        self,
        job_ids: Iterable[int] | JobFilter | None,
        state: States,
        queue: str | None,
        worker: str | None,
        args_contains: Mapping[str, Any] | None,
        tags: Sequence[str] | None,
    ) -> tuple[list[int], dict[str, Any] | None]:
        """The ids to act on, and the filter (``match_*``) the action must re-check (None: ids alone)."""
        where = _where(job_ids, state, queue, worker, args_contains, tags)
        if where.ids is not None and where == JobFilter(ids=where.ids):
            return [int(i) for i in where.ids], None  # ids alone: each statement checks its rows itself
        return await matching_ids(self.driver, where), where.params()

    # -- updating ---------------------------------------------------------------------------------

    async def update_job(
        self,
        job_id: int,
        *,
        priority: int | None = None,
        scheduled_at: datetime | None = None,
        queue: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Job[Any]:
        """Change a job that has not started; returns its new row. ``meta`` is merged into the job's.

        Raises JobNotFound, ValidationError naming the field (a bad value, or ``state`` when the job
        is past ``available``/``scheduled``), or UniqueConflict when the change would make it a
        second holder of its unique key. A new ``scheduled_at`` in the future makes it scheduled, in
        the past available.
        """
        changes = job_control.update_params(
            priority=priority, scheduled_at=scheduled_at, queue=queue, tags=tags, meta=meta
        )
        rows = await job_control.update(self.driver, [int(job_id)], changes)
        if rows:
            return job_from_record(rows[0])
        current = await self.get_job(job_id)
        raise ValidationError(
            "state", current.state.value, f"only {' or '.join(job_control.UPDATABLE)} jobs can be updated"
        )

    async def update_jobs(
        self,
        jobs: Iterable[int] | JobFilter,
        *,
        priority: int | None = None,
        scheduled_at: datetime | None = None,
        queue: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Change several jobs (ids, or a :class:`JobFilter`) all or nothing; returns how many changed.

        Jobs past ``available``/``scheduled`` are left out. The keywords are the changes, as for
        :meth:`update_job`; filters go in a JobFilter because ``queue`` and ``tags`` are both.
        """
        changes = job_control.update_params(
            priority=priority, scheduled_at=scheduled_at, queue=queue, tags=tags, meta=meta
        )
        ids, match = await self._ids(jobs, None, None, None, None, None)
        return len(await job_control.update(self.driver, ids, changes, match)) if ids else 0

    # -- cancel, delete, retry --------------------------------------------------------------------

    async def cancel_job(self, job_id: int, *, reason: str | None = None) -> bool:
        """Cancel a job that has not finished; a running one has its task cancelled. True if it changed."""
        return await self.cancel_jobs([job_id], reason=reason) == 1

    async def cancel_jobs(
        self,
        job_ids: Iterable[int] | None = None,
        *,
        reason: str | None = None,
        state: States = None,
        queue: str | None = None,
        worker: str | None = None,
        args_contains: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
    ) -> int:
        """Cancel the jobs of ``job_ids`` and/or matching the filters that have not finished."""
        ids, match = await self._ids(job_ids, state, queue, worker, args_contains, tags)
        rows = await job_control.cancel(self.driver, ids, reason, match) if ids else []
        await self._after_control(rows, "cancelled")
        return len(rows)

    async def delete_job(self, job_id: int) -> bool:
        """Delete a job in any state (a running one has its task cancelled). True if it existed."""
        return await self.delete_jobs([job_id]) == 1

    async def delete_jobs(
        self,
        job_ids: Iterable[int] | None = None,
        *,
        state: States = None,
        queue: str | None = None,
        worker: str | None = None,
        args_contains: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
    ) -> int:
        """Delete the jobs of ``job_ids`` and/or matching the filters, in any state."""
        ids, match = await self._ids(job_ids, state, queue, worker, args_contains, tags)
        rows = await job_control.delete(self.driver, ids, match) if ids else []
        await self._after_control(rows, "deleted")
        return len(rows)

    async def _after_control(self, rows: list[Any], reason: str) -> None:
        """Stop the jobs that were running (here at once, elsewhere by NOTIFY); settle parked rows."""
        message = job_control.interrupt_message(rows, reason)
        if message is not None:
            if self.node is not None:
                self.node.apply_signal(message)
            await self.driver.notify(self.driver.signal_channel, json.dumps(message))
        parked = [r["id"] for r in rows if r.get("parked")]
        if parked:
            await parking.unpark(self.driver, parked)

    async def retry_job(self, job_id: int) -> bool:
        """Make a finished, scheduled or retryable job available now. False if it was not retryable.

        Raises UniqueConflict (naming the holder) if another job holds its unique key; nothing changes.
        """
        return await self.retry_jobs([job_id]) == 1

    async def retry_jobs(
        self,
        job_ids: Iterable[int] | None = None,
        *,
        state: States = None,
        queue: str | None = None,
        worker: str | None = None,
        args_contains: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
    ) -> int:
        """Retry several jobs (ids and/or filters), all or nothing: a unique conflict on any of them
        raises and retries none (``retry_jobs(state="discarded", queue="mail")``).

        A retry is an insert of the job again: it takes its unique key (even one it gave up: lost to
        another job, released when it started, or past its period, then with a fresh period), and a
        job that would not take it (the ``scheduled`` group) still conflicts with a live holder.
        """
        ids, match = await self._ids(job_ids, state, queue, worker, args_contains, tags)
        return await job_control.retry(self.driver, ids, match) if ids else 0
