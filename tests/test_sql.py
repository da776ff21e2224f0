"""Every shipped query against a freshly migrated schema: it parses, and its result has its kind's shape."""

from __future__ import annotations

import asyncpg
import pytest

from oban_py.db.sql import Queries

pytestmark = pytest.mark.anyio

# VACUUM cannot run inside the transaction a prepared statement check would use; it is run for real.
UTILITY = {"jobs_vacuum"}
# The job row of oban_py/db/rows.py, as the job_columns fragment spells it.
JOB_COLUMNS = [
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "result", "attempt",
    "max_attempts", "priority", "inserted_at", "scheduled_at", "attempted_at", "attempted_by",
    "completed_at", "cancelled_at", "discarded_at",
]  # fmt: skip


async def test_every_query_prepares_and_returns_what_its_kind_says(
    db: asyncpg.Connection, prefix: str
) -> None:
    queries = Queries(prefix)
    for name in queries.names():
        query = queries[name]
        if name in UTILITY:
            await db.execute(query.text)
            continue
        statement = await db.prepare(query.text)
        assert len(statement.get_parameters()) == len(query.params), name
        columns = [a.name for a in statement.get_attributes()]
        if query.kind == "scalar":
            assert len(columns) == 1, f"{name} is :scalar but returns {columns}"
        elif query.kind in ("many", "one"):
            assert columns, f"{name} is :{query.kind} but returns no rows"


@pytest.mark.parametrize(
    ("query", "extra"),
    [
        ("job_get", []),
        ("job_insert", ["inserted", "ord"]),
        ("job_insert_resolve", ["inserted", "ord", "unique_key"]),
        ("job_replace", ["holds"]),
    ],
)
async def test_job_rows_carry_the_job_columns(
    db: asyncpg.Connection, prefix: str, query: str, extra: list[str]
) -> None:
    statement = await db.prepare(Queries(prefix)[query].text)
    columns = [a.name for a in statement.get_attributes()]
    assert sorted(columns) == sorted(JOB_COLUMNS + extra)
    types = {a.name: a.type.name for a in statement.get_attributes()}
    # jsonb travels as text, so no connection-level codec can change it (see _fragments.sql).
    assert {types[c] for c in ("state", "args", "meta", "errors", "result")} == {"text"}
