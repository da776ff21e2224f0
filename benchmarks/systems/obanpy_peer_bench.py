"""oban-py, the PyPI package ``oban`` (import name ``oban``; needs Python >= 3.12).

Not this repository's ``oban_py``: this is the peer, measured as released.
Settings: ``Oban.create_pool(dsn)`` (psycopg pool, defaults min 1 / max 10); a
client-mode instance (no queues) inserts; the worker is ``Oban(pool=pool,
queues={"default": C})`` with every other option at its default; the plain
``asyncio.run`` loop (uvloop is a dependency but not used).  The open-source
package has no unique jobs and no partitioned/global limits (both are listed
under Oban Pro), so those phases are reported as unsupported instead of run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from oban import Oban, worker
from oban.schema import install

import common

NO_UNIQUE = "no unique/dedupe option in open-source oban 0.7.0 (the README lists Unique Jobs under Oban Pro)"


@worker(queue="default")
class NoopWorker:
    async def process(self, job: Any) -> None:
        await common.job_body(job.args)


class ObanPeerAdapter(common.Adapter):
    system = "obanpy_peer"
    version = version("oban")
    notes = (
        "psycopg pool via Oban.create_pool (min 1 / max 10); client-mode Oban for inserts, "
        "Oban(queues={'default': C}) worker; enqueue_many does one INSERT per job in one "
        "transaction in the OSS package"
    )
    unsupported = {
        "single_unique_insert": NO_UNIQUE,
        "bulk_unique_half_dup": NO_UNIQUE,
        "dup_contention": NO_UNIQUE,
        "retained_unique": NO_UNIQUE,
        "process_keyed": (
            "queue limits are per node only; partitioned (per-key) and global limits are Oban Pro features"
        ),
    }

    async def open(self) -> None:
        self.pool = await Oban.create_pool(self.dsn)
        self.client: Oban | None = None
        self.worker_task = None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.stop()
        await self.pool.close()

    async def install(self) -> None:
        await install(self.pool)
        self.client = Oban(pool=self.pool, name="client")
        await self.client.start()

    async def insert_one(self, args: dict[str, Any]) -> Any:
        assert self.client is not None
        return (await self.client.enqueue(NoopWorker.new(args))).id

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        assert self.client is not None
        jobs = await self.client.enqueue_many([NoopWorker.new(a) for a in args_list])
        return [j.id for j in jobs]

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        async with Oban(pool=self.pool, queues={"default": spec.concurrency}):
            yield

    def sql_count_jobs(self) -> str:
        return "SELECT count(*) FROM oban_jobs"

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM oban_jobs WHERE state = 'completed'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        name = f"{NoopWorker.__module__}.{NoopWorker.__qualname__}".replace("'", "''")
        if state == "done":
            return [
                "INSERT INTO oban_jobs (state, queue, worker, attempt, attempted_at, completed_at) "
                f"SELECT 'completed', 'default', '{name}', 1, now(), now() FROM generate_series(1, {n}) g"
            ]
        return [
            "INSERT INTO oban_jobs (state, queue, worker, args) "
            f"SELECT 'available', 'default', '{name}', jsonb_build_object('i', g) FROM generate_series(1, {n}) g"
        ]

    def fill_tables(self) -> list[str]:
        return ["oban_jobs"]


if __name__ == "__main__":
    common.main(ObanPeerAdapter)
