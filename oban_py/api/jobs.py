"""Job control on the facade: get, cancel, delete, retry.

The statements are in :mod:`oban_py.job_control`; what is here is the part that needs the instance:
interrupting jobs that were running (at once on this node, by NOTIFY on the others) and settling
parked rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from .. import job_control
from ..db import parking
from ..db.rows import job_from_record
from ..errors import JobNotFound
from ..job import Job
from .base import EngineBase

__all__ = ["JobsAPI"]


class JobsAPI(EngineBase):
    async def get_job(self, job_id: int) -> Job[Any]:
        """The job's current row; raises JobNotFound."""
        rows = await self.driver.fetch("job_get", ids=[job_id])
        if not rows:
            raise JobNotFound(job_id)
        return job_from_record(rows[0])

    async def get_jobs(self, job_ids: Sequence[int]) -> list[Job[Any]]:
        rows = await self.driver.fetch("job_get", ids=list(job_ids))
        by_id = {r["id"]: job_from_record(r) for r in rows}
        return [by_id[i] for i in job_ids if i in by_id]

    async def cancel_job(self, job_id: int, *, reason: str | None = None) -> bool:
        """Cancel a job that has not finished; a running one has its task cancelled. True if it changed."""
        return await self.cancel_jobs([job_id], reason=reason) == 1

    async def cancel_jobs(self, job_ids: Iterable[int], *, reason: str | None = None) -> int:
        rows = await job_control.cancel(self.driver, [int(i) for i in job_ids], reason)
        await self._after_control(rows, "cancelled")
        return len(rows)

    async def delete_job(self, job_id: int) -> bool:
        """Delete a job in any state (a running one has its task cancelled). True if it existed."""
        return await self.delete_jobs([job_id]) == 1

    async def delete_jobs(self, job_ids: Iterable[int]) -> int:
        rows = await job_control.delete(self.driver, [int(i) for i in job_ids])
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

    async def retry_jobs(self, job_ids: Iterable[int]) -> int:
        """Retry several jobs, all or nothing: a unique conflict on any of them raises and retries none.

        A retry is an insert of the job again: it takes its unique key (even one it gave up: lost to
        another job, released when it started, or past its period, then with a fresh period), and a
        job that would not take it (the ``scheduled`` group) still conflicts with a live holder.
        """
        return await job_control.retry(self.driver, [int(i) for i in job_ids])
