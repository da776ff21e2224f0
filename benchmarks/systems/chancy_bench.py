"""chancy (psycopg 3 pool).

Settings: ``Chancy(dsn, log=setup_default_logger(logging.WARNING))`` -- chancy's
default logger prints one INFO line per pulled job (which halves its processing
rate), the other systems print nothing per job.  Queue ``default`` is declared
with ``concurrency=C, executor=Chancy.Executor.Async, polling_interval=1,
eager_polling=True``: chancy's defaults (polling_interval=5, eager_polling=False)
drain a pre-filled backlog at ~2 jobs/s at concurrency 10, which would measure
the poll timer, not the engine.  The worker flushes job state changes every
``send_outgoing_interval`` = 1 s (default, unchanged); that delay is inside the
process time because "done" means durable in the DB.  Default plugins
(Leadership, Pruner, Recovery, Metrics, Workflow) are left on.  Dedupe is
``Job.with_unique_key`` (partial unique index over states other than
succeeded/failed); a duplicate is not signalled: push returns a Reference to the
existing job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from chancy import Chancy, Queue, Worker, job
from chancy.app import setup_default_logger

import common


@job(queue="default")
async def noop(**kwargs: Any) -> None:
    await common.job_body(kwargs)


class ChancyAdapter(common.Adapter):
    system = "chancy"
    version = version("chancy")
    notes = (
        "log level WARNING (default INFO logs every job); Queue(concurrency=C, executor=Async, "
        "polling_interval=1, eager_polling=True) instead of the 5 s / non-eager defaults; state "
        "updates flushed every 1 s (default); dedupe = unique_key, duplicates return the existing "
        "job's Reference silently; push_many = one INSERT per job, 1,000 per transaction"
    )
    unsupported = {
        "process_keyed": (
            "no per-key limit: Queue.concurrency is per worker per queue, Queue.rate_limit is a "
            "global per-queue rate; per-partition-key limits are only proposed upstream"
        ),
    }

    async def open(self) -> None:
        self.chancy = Chancy(self.dsn, log=setup_default_logger(logging.WARNING))
        await self.chancy.__aenter__()
        self.worker_task = None

    async def close(self) -> None:
        await self.chancy.__aexit__(None, None, None)

    async def install(self) -> None:
        await self.chancy.migrate()
        await self.chancy.declare(
            Queue(
                "default",
                concurrency=self.opts.concurrency,
                executor=Chancy.Executor.Async,
                polling_interval=1,
                eager_polling=True,
            )
        )

    async def insert_one(self, args: dict[str, Any]) -> Any:
        return (await self.chancy.push(noop.job.with_kwargs(**args))).identifier

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        ref = await self.chancy.push(noop.job.with_kwargs(**args).with_unique_key(key))
        return ref.identifier

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        jobs = [noop.job.with_kwargs(**a) for a in args_list]
        return [r.identifier async for batch in self.chancy.push_many(jobs) for r in batch]

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        jobs = [noop.job.with_unique_key(k) for k in keys]
        return [r.identifier async for batch in self.chancy.push_many(jobs) for r in batch]

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        if spec.concurrency != self.opts.concurrency:
            raise RuntimeError("chancy queue concurrency is fixed at install time")
        async with Worker(self.chancy, register_signal_handlers=False):
            yield

    def sql_count_jobs(self) -> str:
        return "SELECT count(*) FROM chancy_jobs"

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM chancy_jobs WHERE state = 'succeeded'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        func = noop.job.func.replace("'", "''")
        if state == "done":
            return [
                "INSERT INTO chancy_jobs (id, queue, func, state, unique_key, attempts, started_at, completed_at) "
                f"SELECT gen_random_uuid(), 'default', '{func}', 'succeeded', 'r' || g, 1, now(), now() "
                f"FROM generate_series(1, {n}) g"
            ]
        return [
            "INSERT INTO chancy_jobs (id, queue, func, kwargs, state) "
            f"SELECT gen_random_uuid(), 'default', '{func}', jsonb_build_object('i', g), 'pending' "
            f"FROM generate_series(1, {n}) g"
        ]

    def fill_tables(self) -> list[str]:
        return ["chancy_jobs"]


if __name__ == "__main__":
    common.main(ChancyAdapter)
