"""Turning database rows into :class:`~oban_py.job.Job` objects."""

from __future__ import annotations

import json
from typing import Any

from ..job import Job, JobState

__all__ = ["job_from_record"]

_STATES = {s.value: s for s in JobState}


def _object(text: str) -> Any:
    return {} if text == "{}" else json.loads(text)  # most jobs have no meta: skip the parser


def job_from_record(row: Any, *, conflicted: bool = False) -> Job[Any]:
    """A Job from a row that has the standard job columns (jsonb ones cast to text)."""
    get = row.get
    errors = get("errors")
    result = get("result")
    return Job(
        id=row["id"],
        state=_STATES[row["state"]],
        queue=row["queue"],
        worker=row["worker"],
        args=_object(row["args"]),
        meta=_object(row["meta"]),
        tags=list(row["tags"]),
        errors=json.loads(errors) if errors and errors != "[]" else [],
        result=json.loads(result) if result is not None else None,
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        inserted_at=row["inserted_at"],
        scheduled_at=row["scheduled_at"],
        attempted_at=get("attempted_at"),
        attempted_by=get("attempted_by"),
        completed_at=get("completed_at"),
        cancelled_at=get("cancelled_at"),
        discarded_at=get("discarded_at"),
        conflicted=conflicted,
    )
