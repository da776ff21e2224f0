"""Schema migrations: idempotent, versioned, concurrent-safe, reversible, and index-backed queries."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import asyncpg
import pytest

from oban_py.db import sql
from oban_py.db.flags import PARKED
from oban_py.db.migrate import current_version, latest_version, migrate, rollback
from oban_py.db.schema_dump import render_schema, schema_diff
from oban_py.db.sql import Queries, migrations

pytestmark = pytest.mark.anyio


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
    """Each down step restores exactly the schema its up step found (types, columns, function bodies)."""
    schema = f"m_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(test_dsn)
    try:
        snapshots = {0: await render_schema(conn, schema)}
        for version in range(1, latest_version() + 1):
            await migrate(conn, schema, target=version)
            snapshots[version] = await render_schema(conn, schema)
        for version in range(latest_version() - 1, -1, -1):
            await rollback(conn, schema, target=version)
            diff = schema_diff(await render_schema(conn, schema), snapshots[version])
            assert not diff, f"rolling back to {version} left another schema than migrating to it:\n{diff}"
        await migrate(conn, schema)
        assert await render_schema(conn, schema) == snapshots[latest_version()]
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def test_include_lines_are_replaced_by_the_file_they_name() -> None:
    fetch = migrations("s")[3]
    assert fetch.name == "fetch_v1" and "-- include:" not in fetch.up
    text = (sql.sql_dir() / "functions" / "oban_fetch_v1.sql").read_text()
    assert text.replace("__parked__", str(PARKED)).replace("__prefix__", '"s"') in fetch.up
    assert "__parked__" not in fetch.up and "__prefix__" not in fetch.up


def test_an_include_must_name_a_file_under_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sql"
    (root / "migrations").mkdir(parents=True)
    (root / "parts").mkdir()
    (root / "parts" / "one.sql").write_text("SELECT 1;\n")
    (tmp_path / "outside.sql").write_text("SELECT 2;\n")
    monkeypatch.setattr(sql, "sql_dir", lambda: root)
    step = root / "migrations" / "001_a.up.sql"
    step.write_text("-- 001\n-- include: parts/one.sql\n")
    assert migrations("s")[0].up == "-- 001\nSELECT 1;\n\n"
    for bad in ("../outside.sql", "parts/missing.sql"):
        step.write_text(f"-- include: {bad}\n")
        with pytest.raises(RuntimeError, match="cannot include"):
            migrations("s")


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
    # EXPLAIN cannot see inside oban_fetch_v1 and its parts: count the sequential scans really made.
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
