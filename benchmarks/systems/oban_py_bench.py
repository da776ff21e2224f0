"""oban_py, this repository (installed editable into its own venv).

Settings: ``Oban(queues={"bench": C})``: one producer, local limit C, LISTEN/NOTIFY wake-ups with a
1 s poll fallback, acks batched per producer cycle. Unique inserts use ``unique={"keys": ["key"]}``
(fields worker+queue+args restricted to the ``key`` arg, group ``successful``, no period): a duplicate
comes back as the holder with ``conflicted=True``, counted here as a duplicate (None). process_keyed
uses a keyed limit (``limit={"key": "pk", "to": key_limit}``) on the worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from oban_py import Job, Oban, worker

import common

logging.getLogger("oban_py").setLevel(logging.WARNING)


@worker(name="bench.Noop", queue="bench")
class Noop:
    async def process(self, job: Job[Any]) -> None:
        await common.job_body(job.args)


@worker(name="bench.Keyed", queue="bench", limit={"key": "pk", "to": 2})
class Keyed:
    async def process(self, job: Job[Any]) -> None:
        await common.job_body(job.args)


UNIQUE = {"keys": ["key"]}


class ObanPyAdapter(common.Adapter):
    system = "oban_py"
    version = version("oban-py")
    notes = (
        "asyncpg pool; worker Oban(queues={'bench': C}) with LISTEN/NOTIFY + 1 s poll fallback, batched "
        "acks; unique={'keys': ['key']} (group successful, no period): duplicates return the holder with "
        "conflicted=True"
    )
    dup_exceptions = ()
    supports_global_limit = True

    async def open(self) -> None:
        # migrate=True is a no-op once applied, and safe when several processes open at once.
        self.oban = Oban(self.dsn, migrate=True, pool_size=4, name=f"bench-{id(self)}")
        await self.oban.start()

    async def close(self) -> None:
        await self.oban.stop()

    async def install(self) -> None:
        await self.oban.migrate()

    async def insert_one(self, args: dict[str, Any]) -> Any:
        return (await self.oban.insert(Noop.new(args))).id  # type: ignore[attr-defined]

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        job = await self.oban.insert(Noop.new({**args, "key": key}, unique=UNIQUE))  # type: ignore[attr-defined]
        return None if job.conflicted else job.id

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        # process_keyed jobs carry a partition key "pk": they go to the keyed worker (limit per pk).
        jobs = await self.oban.insert_all(
            [(Keyed if "pk" in a else Noop).new(a) for a in args_list]  # type: ignore[attr-defined]
        )
        return [j.id for j in jobs]

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        jobs = await self.oban.insert_all([Noop.new({"key": k}, unique=UNIQUE) for k in keys])  # type: ignore[attr-defined]
        return [None if j.conflicted else j.id for j in jobs]

    @contextlib.asynccontextmanager
    async def worker(self, spec: common.WorkerSpec) -> AsyncIterator[None]:
        queue: dict[str, Any] = {"limit": spec.concurrency}
        if spec.global_limit:
            queue["global_limit"] = spec.global_limit
        runner = Oban(self.dsn, queues={"bench": queue}, name=f"bench-worker-{id(self)}")
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    def sql_count_jobs(self) -> str:
        return "SELECT count(*) FROM oban_jobs"

    def sql_count_done(self) -> str:
        return "SELECT count(*) FROM oban_jobs WHERE state = 'completed'"

    def sql_fill(self, n: int, state: str) -> list[str]:
        if state == "done":
            # Retained history that still holds unique keys (group successful, no period).
            return [
                "INSERT INTO oban_jobs (state, queue, worker, args, attempt, completed_at, unique_key, "
                "unique_states) SELECT 'completed', 'bench', 'bench.Noop', jsonb_build_object('key', 'r' || g), "
                f"1, now(), decode(md5('r' || g), 'hex'), 31 FROM generate_series(1, {n}) g"
            ]
        return [
            "INSERT INTO oban_jobs (queue, worker, args) "
            f"SELECT 'bench', 'bench.Noop', jsonb_build_object('i', g) FROM generate_series(1, {n}) g"
        ]

    def fill_tables(self) -> list[str]:
        return ["oban_jobs"]


if __name__ == "__main__":
    common.main(ObanPyAdapter)
