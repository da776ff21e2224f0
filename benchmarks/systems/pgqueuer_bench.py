"""pgqueuer (asyncpg driver).

Settings: worker = ``PgQueuer.run(max_concurrent_tasks=C, batch_size=C // 2)``
(pgqueuer requires max_concurrent_tasks >= 2 * batch_size; without
max_concurrent_tasks a worker has no in-process cap).  Single unique inserts use
``dedupe_key`` with the default ``on_conflict="raise"`` (``DuplicateJobError``
is the duplicate signal); bulk unique inserts use ``on_conflict="skip"`` (one
result per input, ``None`` for a skipped duplicate), the documented way to
batch-insert with duplicates.  process_keyed: pgqueuer has no per-key limit
inside an entrypoint; the closest mechanism is ``entrypoint(name,
concurrency_limit=N)``, enforced in SQL across the fleet, so each partition key
is its own entrypoint (``k0``..``k99``, each limit 2).  That only works when the
key set is known when the worker starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer import __version__ as PGQ_VERSION
from pgqueuer.db import AsyncpgDriver
from pgqueuer.errors import DuplicateJobError
from pgqueuer.models import Job
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode

import common

ENTRYPOINT = "noop"


def _payload(args: dict[str, Any]) -> bytes:
    return json.dumps(args).encode()


class PgqueuerAdapter(common.Adapter):
    system = "pgqueuer"
    version = PGQ_VERSION
    notes = (
        "asyncpg driver; worker run(max_concurrent_tasks=C, batch_size=C//2, mode=continuous) on its "
        "own connection; dedupe_key with on_conflict='raise' for single calls, 'skip' for bulk; "
        "process_keyed emulated as one entrypoint per key with concurrency_limit=key_limit; "
        "finished jobs are moved out of the pgqueuer table into pgqueuer_log (status 'successful')"
    )
    dup_exceptions = (DuplicateJobError,)
    supports_global_limit = True  # entrypoint(concurrency_limit=N) is enforced across workers

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.dsn)
        self.q = Queries(AsyncpgDriver(self.conn))
        self.worker_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await self.conn.close()

    async def install(self) -> None:
        await self.q.install()

    async def insert_one(self, args: dict[str, Any]) -> Any:
        return (await self.q.enqueue(ENTRYPOINT, _payload(args)))[0]

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        return (await self.q.enqueue(ENTRYPOINT, _payload(args), dedupe_key=key))[0]

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        n = len(args_list)
        eps = [a.get("pk", ENTRYPOINT) for a in args_list]
        return await self.q.enqueue(eps, [_payload(a) for a in args_list], [0] * n)

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        n = len(keys)
        return await self.q.enqueue(
            [ENTRYPOINT] * n, [None] * n, [0] * n, dedupe_key=list(keys), on_conflict="skip"
        )

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        wconn = await asyncpg.connect(self.dsn)
        pgq = PgQueuer.from_asyncpg_connection(wconn)

        async def handler(job: Job) -> None:
            args = json.loads(job.payload) if job.payload else {}
            await common.job_body(args)

        if spec.key_limit:
            for key in spec.partition_keys:
                pgq.entrypoint(key, concurrency_limit=spec.key_limit)(handler)
        elif spec.global_limit:
            pgq.entrypoint(ENTRYPOINT, concurrency_limit=spec.global_limit)(handler)
        else:
            pgq.entrypoint(ENTRYPOINT)(handler)
        run = lambda: pgq.run(  # noqa: E731
            mode=QueueExecutionMode.continuous,
            max_concurrent_tasks=spec.concurrency,
            batch_size=max(1, spec.concurrency // 2),
        )
        try:
            async with common.background(run, pgq.shutdown.set) as task:
                self.worker_task = task
                yield
        finally:
            self.worker_task = None
            with contextlib.suppress(Exception):
                await wconn.close()

    def sql_count_jobs(self) -> str:
        # rows still queued/picked plus finished ones (moved to the log)
        return (
            "SELECT (SELECT count(*) FROM pgqueuer) + "
            "(SELECT count(*) FROM pgqueuer_log WHERE status = 'successful')"
        )

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        if state == "done":
            # pgqueuer deletes finished jobs from `pgqueuer`; what it retains is the log
            # (kept until the user prunes it): 3 rows per job, 'queued', 'picked', 'successful',
            # already folded into statistics (aggregated = true).
            return [
                "INSERT INTO pgqueuer_log (job_id, status, priority, entrypoint, aggregated) "
                "SELECT g, s::pgqueuer_status, 0, 'noop', true FROM generate_series(1, "
                f"{n}) g, unnest(ARRAY['queued', 'picked', 'successful']) s"
            ]
        return [
            "INSERT INTO pgqueuer (priority, status, entrypoint, payload) "
            "SELECT 0, 'queued', 'noop', convert_to(json_build_object('i', g)::text, 'UTF8') "
            f"FROM generate_series(1, {n}) g"
        ]

    def fill_tables(self) -> list[str]:
        return ["pgqueuer", "pgqueuer_log"]


if __name__ == "__main__":
    common.main(PgqueuerAdapter)
