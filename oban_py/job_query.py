"""Finding jobs by filter: :class:`JobFilter`, keyset pages (:class:`JobPage`), matching ids.

Every filter has an index behind it (migration 006, and the fetch/executing/staging indexes for the
hot states), so a page costs about ``limit`` index entries whatever the table holds. Pages are keyset
pages on ``id``, newest first: ``before_id`` is where the next page starts, so rows inserted or pruned
meanwhile never shift a page (an OFFSET would re-read every skipped row, and skip or repeat rows as the
table changes).

The statements (``sql/queries/jobs_admin.sql``) write each filter as ``(:x IS NULL OR ...)`` and are
run with custom plans (``job_plan_custom``): planned for the values given, so unused filters fold
away and the used ones can pick their index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .db.rows import job_from_record
from .errors import ValidationError
from .job import Job, JobState
from .validation import validate_queue, validate_tags, validate_worker_name

if TYPE_CHECKING:
    from .db.driver import Driver

__all__ = ["MAX_PAGE", "NO_FILTER", "JobFilter", "JobPage", "list_jobs", "matching_ids"]

#: The largest page ``list_jobs`` returns (a bigger one is a report, not a page: use ``before_id``).
MAX_PAGE = 10_000

# States whose rows the filter indexes leave out (the working set; see migration 006).
_HOT = frozenset({"available", "executing"})
_STATES = [s.value for s in JobState]


@dataclass(frozen=True)
class JobFilter:
    """Which jobs: every given field must match (None: any; an empty one is refused, see :attr:`empty`).

    ``state`` is one state or several; ``args_contains`` matches jobs whose args contain that JSON
    (``{"user_id": 7}`` matches ``{"user_id": 7, "kind": "x"}``: jsonb ``@>``); ``tags`` matches jobs
    that have all of those tags; ``ids`` restricts to those ids.
    """

    state: str | Sequence[str] | None = None
    queue: str | None = None
    worker: str | None = None
    args_contains: Mapping[str, Any] | None = None
    tags: Sequence[str] | None = None
    ids: Sequence[int] | None = None

    @property
    def empty(self) -> bool:
        """True when it would match every job (computed from the validated :meth:`params`).

        A field given but empty (``tags=[]``, ``args_contains={}``, ``state=[]``, ``queue=""``) is not
        "no filter": :meth:`params` refuses it naming the field, because it would match every job.
        """
        return all(v is None for v in self.params().values())

    def states(self) -> list[str] | None:
        """The state filter as a validated list (ValidationError naming ``state`` otherwise)."""
        if self.state is None:
            return None
        given = [self.state] if isinstance(self.state, str) else list(self.state)
        names = [s.value if isinstance(s, JobState) else s for s in given]
        for name in names:
            if name not in _STATES:
                raise ValidationError("state", name, f"must be one of {', '.join(_STATES)}")
        if not names:
            raise ValidationError("state", self.state, "give at least one state")
        return names

    def params(self) -> dict[str, Any]:
        """The ``match_*`` parameters of the ``job_filter`` fragment (validated; None: no filter).

        The filtered cancel/delete/retry/update pass them to their statements as well, so a row that
        stopped matching after it was selected is left alone (the locking read re-checks the filter).
        """
        states = self.states()
        args = None
        if self.args_contains is not None:
            if not isinstance(self.args_contains, Mapping):
                raise ValidationError("args_contains", self.args_contains, "must be a dict")
            if not self.args_contains:
                raise ValidationError(
                    "args_contains", self.args_contains, "give at least one key ({} matches every job)"
                )
            args = json.dumps(self.args_contains)
        tags = None
        if self.tags is not None:
            tags = validate_tags(self.tags)
            if not tags:
                raise ValidationError("tags", self.tags, "give at least one tag ([] matches every job)")
        ids = None if self.ids is None else [_job_id(i) for i in self.ids]
        return {
            "match_states": states,
            "match_queue": None if self.queue is None else validate_queue(self.queue),
            "match_worker": None if self.worker is None else validate_worker_name(self.worker),
            "match_args": args,
            "match_tags": tags,
            "match_ids": ids,
        }


#: The ``job_filter`` parameters that match every job: what a by-id statement passes.
NO_FILTER: dict[str, Any] = JobFilter().params()


def _branches(params: dict[str, Any]) -> dict[str, bool]:
    """``hot``/``cold`` of job_list(_ids): whether the state filter lets each branch match at all."""
    states = params["match_states"]
    return {
        "hot": states is None or bool(_HOT.intersection(states)),
        "cold": states is None or bool(set(states) - _HOT),
    }


@dataclass
class JobPage:
    """One page of :meth:`Oban.list_jobs`: jobs newest first, and where the next page starts.

    ``next_before_id`` is None on the last page; otherwise pass it as ``before_id``.
    """

    jobs: list[Job[Any]]
    next_before_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": [job_dict(j) for j in self.jobs], "next_before_id": self.next_before_id}


def job_dict(job: Job[Any]) -> dict[str, Any]:
    """A job as JSON-ready data (datetimes stay datetimes: the CLI prints them as ISO 8601)."""
    fields = (
        "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "attempt", "max_attempts",
        "priority", "inserted_at", "scheduled_at", "attempted_at", "attempted_by", "completed_at",
        "cancelled_at", "discarded_at",
    )  # fmt: skip
    out = {name: getattr(job, name) for name in fields}
    out["state"] = str(job.state.value)
    return out


def _job_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("ids", value, "job ids are positive integers")
    return value


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValidationError("limit", limit, f"must be an integer from 1 to {MAX_PAGE}")
    return limit


async def list_jobs(
    driver: Driver, where: JobFilter, *, limit: int = 50, before_id: int | None = None
) -> JobPage:
    """A page of jobs matching ``where``, newest first, starting below ``before_id``."""
    filters = where.params()
    params = {**filters, **_branches(filters), "limit": _check_limit(limit) + 1}  # one more: a next page?
    params["before_id"] = None if before_id is None else _job_id(before_id)
    async with driver.transaction() as conn:
        await driver.execute("job_plan_custom", conn)
        rows = await driver.fetch("job_list", conn, **params)
    jobs = [job_from_record(r) for r in rows[:limit]]
    more = len(rows) > limit
    return JobPage(jobs, jobs[-1].id if more and jobs[-1].id is not None else None)


async def matching_ids(driver: Driver, where: JobFilter, conn: Any = None) -> list[int]:
    """Every id matching ``where`` (for the filtered retry, cancel, delete and update), ascending."""
    filters = where.params()
    params = {**filters, **_branches(filters)}
    async with driver.transaction(conn) as c:
        await driver.execute("job_plan_custom", c)
        rows = await driver.fetch("job_list_ids", c, **params)
    return sorted(r["id"] for r in rows)
