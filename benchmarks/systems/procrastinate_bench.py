"""procrastinate (psycopg 3 connector).

Settings: ``App(connector=PsycopgConnector(conninfo=dsn))`` with default pool
options; worker ``run_worker_async(concurrency=C, wait=True, listen_notify=True
(default), install_signal_handlers=False)``; finished jobs kept (default
``delete_jobs="never"``).  Dedupe is ``queueing_lock`` (unique index on
``queueing_lock`` for status 'todo' only; a duplicate raises ``AlreadyEnqueued``).
The public batch API (``Task.batch_defer_async``) takes one ``configure()`` for
the whole batch, so per-job queueing locks in one call go through
``app.job_manager.batch_defer_jobs_async`` (the method batch_defer_async itself
calls), which inserts the batch in one statement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from procrastinate import App, PsycopgConnector, exceptions

import common


class ProcrastinateAdapter(common.Adapter):
    system = "procrastinate"
    version = version("procrastinate")
    notes = (
        "psycopg connector, default pool; run_worker_async(concurrency=C, listen_notify=True, "
        "delete_jobs='never'); dedupe = queueing_lock (status 'todo' only), duplicate raises "
        "AlreadyEnqueued; bulk with per-job locks via app.job_manager.batch_defer_jobs_async"
    )
    dup_exceptions = (exceptions.AlreadyEnqueued,)
    unsupported = {
        "process_keyed": (
            "no per-key limit N>1: Task/configure(lock=...) allows at most 1 running job per lock "
            "string (a limit of 1, enforced by a unique index on lock for status 'doing'); worker "
            "concurrency is per worker process only"
        ),
    }

    async def open(self) -> None:
        # one warning that the App lives in __main__ (fine here: tasks are registered explicitly)
        logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
        self.app = App(connector=PsycopgConnector(conninfo=self.dsn))

        async def noop(**kwargs: Any) -> None:
            await common.job_body(kwargs)

        self.task = self.app.task(name="noop", queue="default")(noop)
        await self.app.open_async()
        self.worker_task = None

    async def close(self) -> None:
        await self.app.close_async()

    async def install(self) -> None:
        await self.app.schema_manager.apply_schema_async()

    async def insert_one(self, args: dict[str, Any]) -> Any:
        return await self.task.defer_async(**args)

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        return await self.task.configure(queueing_lock=key).defer_async(**args)

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        return await self.task.batch_defer_async(*args_list)

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        jobs = [self.task.configure(queueing_lock=k).make_new_job() for k in keys]
        done = await self.app.job_manager.batch_defer_jobs_async(jobs)
        return [j.id for j in done]

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        run = lambda: self.app.run_worker_async(  # noqa: E731
            concurrency=spec.concurrency, wait=True, install_signal_handlers=False
        )
        # cancelling run_worker_async is procrastinate's documented way to stop an embedded worker
        async with common.background(run) as task:
            self.worker_task = task
            try:
                yield
            finally:
                self.worker_task = None

    def sql_count_jobs(self) -> str:
        return "SELECT count(*) FROM procrastinate_jobs"

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        if state == "done":
            return [
                "INSERT INTO procrastinate_jobs (queue_name, task_name, queueing_lock, args, status, attempts) "
                f"SELECT 'default', 'noop', 'r' || g, '{{}}', 'succeeded', 1 FROM generate_series(1, {n}) g"
            ]
        return [
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status) "
            f"SELECT 'default', 'noop', jsonb_build_object('i', g), 'todo' FROM generate_series(1, {n}) g"
        ]

    def fill_tables(self) -> list[str]:
        return ["procrastinate_jobs"]


if __name__ == "__main__":
    common.main(ProcrastinateAdapter)
