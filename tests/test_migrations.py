"""Schema migrations: idempotent, versioned, concurrent-safe, reversible, and index-backed queries."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from oban_py.db.migrate import current_version, latest_version, migrate, rollback
from oban_py.db.sql import Queries

pytestmark = pytest.mark.anyio


async def _schema_objects(conn: asyncpg.Connection, schema: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT c.relkind::text || ':' || c.relname AS o FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
           UNION ALL SELECT 'f:' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = $1
           UNION ALL SELECT 't:' || t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = $1 AND t.typtype = 'e' ORDER BY 1""",
        schema,
    )
    return [r["o"] for r in rows]


async def test_migrate_is_idempotent_and_versioned(test_dsn: str) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(test_dsn)
    try:
        assert await current_version(conn, schema) == 0
        assert await migrate(conn, schema) == list(range(1, latest_version() + 1))
        assert await migrate(conn, schema) == []
        assert await current_version(conn, schema) == latest_version()
        rows = await conn.fetch(f'SELECT version, name FROM "{schema}".oban_migrations ORDER BY version')
        assert [r["version"] for r in rows] == list(range(1, latest_version() + 1))
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_concurrent_migrations(test_dsn: str) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    conns = [await asyncpg.connect(test_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, schema) for c in conns))
        applied = [r for r in results if r]
        assert len(applied) == 1 and applied[0] == list(range(1, latest_version() + 1))
        assert await current_version(conns[0], schema) == latest_version()
    finally:
        await conns[0].execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for c in conns:
            await c.close()


async def test_each_step_round_trips(test_dsn: str) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(test_dsn)
    try:
        snapshots = {0: await _schema_objects(conn, schema)}
        for version in range(1, latest_version() + 1):
            await migrate(conn, schema, target=version)
            snapshots[version] = await _schema_objects(conn, schema)
        for version in range(latest_version() - 1, -1, -1):
            await rollback(conn, schema, target=version)
            after = await _schema_objects(conn, schema)
            if version == 0:
                assert after == []
            else:
                assert after == snapshots[version]
        await migrate(conn, schema)
        assert await _schema_objects(conn, schema) == snapshots[latest_version()]
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


HOT_PATH = {
    "job_fetch": {
        "queues": ["q1"],
        "global_limits": [None],
        "rate_allowed": [None],
        "rate_periods": [None],
        "rate_by": [None],
        "demand": 10,
        "node": "n",
        "instance": str(uuid.uuid4()),
        "scan": 20,
        "ack_ids": [1, 2],
        "ack_claims": [None, None],
    },
    "job_stage": {"channel": "c", "limit": 100},
    "job_prune": {"max_age": 3600.0, "limit": 100},
    "job_unique_sweep": {"limit": 100},
    "job_rescue": {"instance": str(uuid.uuid4()), "rescue_after": 30.0, "limit": 100, "channel": "c"},
    "job_parked": {"limit": 100},
}


@pytest.mark.parametrize("query", sorted(HOT_PATH))
async def test_hot_path_queries_use_indexes(db: asyncpg.Connection, prefix: str, query: str) -> None:
    """With a big history of finished jobs, no hot-path query scans the whole jobs table."""
    await db.execute(
        f"""INSERT INTO "{prefix}".oban_jobs
                (queue, worker, state, args, completed_at, unique_key, unique_states)
            SELECT 'q' || (i % 10), 'W', 'completed', jsonb_build_object('i', i), now(),
                   decode(md5(i::text), 'hex'), 31
            FROM generate_series(1, 50000) i"""
    )
    await db.execute(
        f"""INSERT INTO "{prefix}".oban_jobs (queue, worker, state, scheduled_at)
            SELECT 'q' || (i % 10), 'W', 'available', now() FROM generate_series(1, 200) i"""
    )
    await db.execute(f'ANALYZE "{prefix}".oban_jobs')
    q = Queries(prefix)[query]
    plan = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {q.text}", *q.args(HOT_PATH[query])))
    assert not _seq_scans_on_jobs(plan), json.dumps(plan, indent=1)
    # EXPLAIN cannot see inside oban_fetch: count the sequential scans the query really made.
    tx = db.transaction()
    await tx.start()
    try:
        await db.fetch(q.text, *q.args(HOT_PATH[query]))
        seq_scans = await db.fetchval(
            "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = $1::regclass",
            f'"{prefix}".oban_jobs',
        )
    finally:
        await tx.rollback()
    assert seq_scans == 0


def _seq_scans_on_jobs(node: object) -> list[object]:
    found: list[object] = []
    if isinstance(node, dict):
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") == "oban_jobs":
            found.append(node)
        for value in node.values():
            found.extend(_seq_scans_on_jobs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_seq_scans_on_jobs(item))
    return found
