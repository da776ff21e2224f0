"""8 OS processes inserting the same 500 unique keys at once: one row per key, a real answer each time."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, worker

from helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROCESSES = 8
INSERTS = 2_000
KEYS = 500
SCRIPT = Path(__file__).with_name("contend.py")


@worker(name="contend.Unique", queue="contend", unique=True)
class Unique:
    async def process(self, job: Job[Any]) -> None:
        pass


async def run_children(
    test_dsn: str,
    prefix: str,
    tmp_path: Path,
    started: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    outs = [tmp_path / f"out{i}.json" for i in range(PROCESSES)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            test_dsn,
            prefix,
            str(KEYS),
            str(INSERTS),
            str(i),
            str(outs[i]),
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(PROCESSES)
    ]
    if started is not None:
        started.set()
    stderrs = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0] * PROCESSES, [e[1].decode()[-2000:] for e in stderrs]
    return [json.loads(o.read_text()) for o in outs]


async def check(
    db: asyncpg.Connection, prefix: str, outputs: list[dict[str, Any]], extra_holders: int = 0
) -> None:
    rows = await db.fetch(f"SELECT id, (args->>'k')::int AS k FROM \"{prefix}\".oban_jobs")
    by_key = {r["k"]: r["id"] for r in rows}
    assert len(rows) == KEYS and len(by_key) == KEYS  # exactly one row per key
    errors = [e for o in outputs for e in o["errors"]]
    assert errors == []
    results = [r for o in outputs for r in o["results"]]
    assert len(results) == PROCESSES * INSERTS
    for key, job_id, _conflicted in results:
        assert job_id == by_key[key]  # every answer is the real row for its key
    fresh = Counter(key for key, _id, conflicted in results if not conflicted)
    assert sum(fresh.values()) == KEYS - extra_holders and max(fresh.values()) == 1


async def test_concurrent_inserters(
    test_dsn: str, prefix: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    outputs = await run_children(test_dsn, prefix, tmp_path)
    await check(db, prefix, outputs)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_holder_in_an_open_transaction(
    test_dsn: str, prefix: str, db: asyncpg.Connection, tmp_path: Path, oban: Oban, outcome: str
) -> None:
    held = list(range(50))
    conn = await asyncpg.connect(test_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        mine = await oban.insert_all([Unique.new({"k": k}) for k in held], conn=conn)  # type: ignore[attr-defined]
        started = asyncio.Event()
        children = asyncio.create_task(run_children(test_dsn, prefix, tmp_path, started))
        await started.wait()

        async def blocked() -> bool:  # the children run into our uncommitted keys and wait on them
            n = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return bool(n)

        await wait_for(blocked, timeout=30)
        await (tx.commit() if outcome == "commit" else tx.rollback())
        outputs = await children
    finally:
        await conn.close()
    if outcome == "commit":
        await check(db, prefix, outputs, extra_holders=len(held))
        ids = {j.id for j in mine}
        answered = {job_id for o in outputs for key, job_id, _ in o["results"] if key in held}
        assert answered <= ids
    else:
        await check(db, prefix, outputs)
