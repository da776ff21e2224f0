"""Raw asyncpg: no queue library, the physical limit of this machine.

Inserts are the plainest statements that do the job (one autocommit INSERT per
call; one ``INSERT ... SELECT unnest(...)`` per bulk call).  The worker is the
smallest correct fetch/ack loop: claim up to ``free slots`` jobs with
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``, run the
bodies as tasks, and ack finished ids in batches with one ``UPDATE ... = ANY($1)``.
No retries, no heartbeats, no rescue: a lower bound on overhead, not a product.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import asyncpg

import common

DDL = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL DEFAULT 'default',
    state text NOT NULL DEFAULT 'available',
    key text,
    pkey text,
    args jsonb NOT NULL DEFAULT '{}',
    inserted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_fetch_idx ON jobs (queue, id) WHERE state = 'available';
CREATE UNIQUE INDEX jobs_key_idx ON jobs (key) WHERE state IN ('available', 'executing');
CREATE INDEX jobs_executing_idx ON jobs (pkey) WHERE state = 'executing';
"""
UNIQUE_CONFLICT = "ON CONFLICT (key) WHERE state IN ('available', 'executing') DO NOTHING"

FETCH = """
UPDATE jobs SET state = 'executing'
WHERE id IN (SELECT id FROM jobs WHERE state = 'available' AND queue = 'default'
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING id, pkey, args
"""
# Per-key limit, single fetcher: look at the head of the queue (the first 20 x free
# slots available jobs), skip keys that already have `limit` executing jobs, and
# take at most `limit - running` jobs per key.
FETCH_KEYED = """
WITH running AS (
    SELECT pkey, count(*) AS n FROM jobs WHERE state = 'executing' GROUP BY pkey
), head AS (
    SELECT id, pkey, row_number() OVER (PARTITION BY pkey ORDER BY id) AS rn
    FROM (SELECT id, pkey FROM jobs WHERE state = 'available' AND queue = 'default'
          ORDER BY id LIMIT 20 * $1) h
), pick AS (
    SELECT head.id FROM head LEFT JOIN running USING (pkey)
    WHERE head.rn + coalesce(running.n, 0) <= $2
    ORDER BY head.id LIMIT $1
)
UPDATE jobs SET state = 'executing'
WHERE id IN (SELECT id FROM jobs WHERE id IN (SELECT id FROM pick) FOR UPDATE SKIP LOCKED)
RETURNING id, pkey, args
"""
ACK = "UPDATE jobs SET state = 'completed' WHERE id = ANY($1::bigint[])"


class RawWorker:
    def __init__(self, dsn: str, spec: common.WorkerSpec) -> None:
        self.dsn = dsn
        self.spec = spec
        self.running: set[asyncio.Task[None]] = set()
        self.acks: list[int] = []
        self.wake = asyncio.Event()
        self.ack_wake = asyncio.Event()
        self.stopping = False

    async def run(self) -> None:
        fetch_conn = await asyncpg.connect(self.dsn)
        ack_conn = await asyncpg.connect(self.dsn)
        await fetch_conn.add_listener("raw_jobs", lambda *_: self.wake.set())
        acker = asyncio.create_task(self._ack_loop(ack_conn))
        try:
            while not self.stopping:
                self.wake.clear()
                free = self.spec.concurrency - len(self.running)
                if free > 0:
                    if self.spec.key_limit:
                        rows = await fetch_conn.fetch(FETCH_KEYED, free, self.spec.key_limit)
                    else:
                        rows = await fetch_conn.fetch(FETCH, free)
                    for row in rows:
                        task = asyncio.create_task(self._execute(row["id"], json.loads(row["args"])))
                        self.running.add(task)
                    if rows and len(rows) == free:
                        continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 1.0)
        finally:
            self.stopping = True
            self.ack_wake.set()
            await acker
            await fetch_conn.close()
            await ack_conn.close()

    async def _execute(self, job_id: int, args: dict[str, Any]) -> None:
        try:
            await common.job_body(args)
        finally:
            self.running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self.acks.append(job_id)
            self.ack_wake.set()

    async def _ack_loop(self, conn: asyncpg.Connection) -> None:
        while True:
            await self.ack_wake.wait()
            self.ack_wake.clear()
            batch, self.acks = self.acks, []
            if batch:
                await conn.execute(ACK, batch)
                self.wake.set()  # slots are free
            elif self.stopping:
                return


class RawAdapter(common.Adapter):
    system = "raw_asyncpg"
    version = f"asyncpg {version('asyncpg')}"
    notes = (
        "no library: table jobs(id bigserial, state, key, pkey, args jsonb) with a partial unique "
        "index on key for available/executing rows; minimal SKIP LOCKED fetch + batched ack worker "
        "on 2 connections (+LISTEN); inserts while a worker runs add pg_notify in the same statement"
    )

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.dsn)
        self.worker_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await self.conn.close()

    async def install(self) -> None:
        await self.conn.execute(DDL)

    async def insert_one(self, args: dict[str, Any]) -> Any:
        if self.worker_task is not None:  # wake the idle worker, as a queue library would
            return await self.conn.fetchval(
                "WITH j AS (INSERT INTO jobs (args) VALUES ($1::jsonb) RETURNING id) "
                "SELECT id FROM j, pg_notify('raw_jobs', '')",
                json.dumps(args),
            )
        return await self.conn.fetchval(
            "INSERT INTO jobs (args) VALUES ($1::jsonb) RETURNING id", json.dumps(args)
        )

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        return await self.conn.fetchval(
            f"INSERT INTO jobs (key, args) VALUES ($1, $2::jsonb) {UNIQUE_CONFLICT} RETURNING id",
            key,
            json.dumps(args),
        )

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        rows = await self.conn.fetch(
            "INSERT INTO jobs (pkey, args) SELECT a->>'pk', a FROM unnest($1::jsonb[]) a RETURNING id",
            [json.dumps(a) for a in args_list],
        )
        return [r["id"] for r in rows]

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        rows = await self.conn.fetch(
            f"INSERT INTO jobs (key, args) SELECT k, jsonb_build_object('k', k) FROM unnest($1::text[]) k "
            f"{UNIQUE_CONFLICT} RETURNING id",
            keys,
        )
        return [r["id"] for r in rows]

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        w = RawWorker(self.dsn, spec)

        def stop() -> None:
            w.stopping = True
            w.wake.set()

        async with common.background(w.run, stop) as task:
            self.worker_task = task
            try:
                yield
            finally:
                self.worker_task = None

    def sql_count_jobs(self) -> str:
        return "SELECT count(*) FROM jobs"

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM jobs WHERE state = 'completed'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        if state == "done":
            return [
                f"INSERT INTO jobs (state, key) SELECT 'completed', 'r' || g FROM generate_series(1, {n}) g"
            ]
        return [f"INSERT INTO jobs (args) SELECT jsonb_build_object('i', g) FROM generate_series(1, {n}) g"]

    def fill_tables(self) -> list[str]:
        return ["jobs"]


if __name__ == "__main__":
    common.main(RawAdapter)
