"""What the jobs table must say after (and during) a scenario, and database-side faults.

* :func:`wait_final`: every inserted job reaches a final state within a deadline (0 lost).
* :class:`UniqueSampler`: while the scenario runs, repeatedly counts holders per unique key (a key
  held by two rows is a broken invariant 1), tolerating the outages the scenario causes.
* :func:`terminate_backends` / :func:`listen_backends`: the runners' server processes, found by
  ``application_name`` (``oban_py:<node>``; the test's own client is never touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from .pgserver import connect

FINAL = ("completed", "discarded", "cancelled")
_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncio.TimeoutError)


class Db:
    """An assertion connection to the scenario's schema that reconnects after server restarts."""

    def __init__(self, dsn: str, prefix: str) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.q = f'"{prefix}"'
        self._conn: Any = None

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        sql = sql.replace("$p", self.q)
        for attempt in range(100):
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await connect(self.dsn)
                return list(await self._conn.fetch(sql, *args))
            except (*_LOST, asyncpg.exceptions.AdminShutdownError, asyncpg.CannotConnectNowError):
                await self._drop()
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.close(), 2)
            except Exception:
                self._conn.terminate()
            self._conn = None

    async def states(self, ids: Iterable[int] | None = None) -> dict[str, int]:
        if ids is None:
            rows = await self.fetch("SELECT state::text AS s, count(*) AS n FROM $p.oban_jobs GROUP BY 1")
        else:
            rows = await self.fetch(
                "SELECT state::text AS s, count(*) AS n FROM $p.oban_jobs WHERE id = ANY($1) GROUP BY 1",
                list(ids),
            )
        return {r["s"]: r["n"] for r in rows}

    async def jobs(self, ids: Iterable[int] | None = None) -> list[Any]:
        where = "" if ids is None else "WHERE id = ANY($1)"
        args = [] if ids is None else [list(ids)]
        return await self.fetch(
            "SELECT id, state::text AS state, attempt, max_attempts, attempted_by, errors::text AS errors,"
            " meta::text AS meta, result::text AS result, queue, worker"
            f" FROM $p.oban_jobs {where} ORDER BY id",
            *args,
        )

    async def unfinished(self, ids: Iterable[int] | None = None) -> list[Any]:
        return [j for j in await self.jobs(ids) if j["state"] not in FINAL]


async def wait_final(db: Db, total: int, timeout: float, context: Callable[[], str] = str) -> dict[str, int]:
    """Wait until the table holds ``total`` jobs, all final; on timeout fail with what is left."""
    deadline = time.monotonic() + timeout
    while True:
        counts = await db.states()
        done = sum(counts.get(s, 0) for s in FINAL)
        if done == total and sum(counts.values()) == total:
            return counts
        if time.monotonic() > deadline:
            left = await db.unfinished()
            sample = "\n".join(
                f"  job {j['id']} {j['state']} attempt {j['attempt']}/{j['max_attempts']}"
                f" by {j['attempted_by']}"
                for j in left[:10]
            )
            raise AssertionError(
                f"lost jobs: {total - done} of {total} not final after {timeout}s (states {counts}):\n"
                f"{sample}\n{context()}"
            )
        await asyncio.sleep(0.1)


class UniqueSampler:
    """Counts holders per unique key every ``interval`` s while running; ``violations`` lists offenders.

    It has its own connection (asyncpg connections serve one task at a time) and stops between
    samples, never by cancelling a query.
    """

    def __init__(self, db: Db, interval: float = 0.2) -> None:
        self.db = Db(db.dsn, db.prefix)
        self.interval = interval
        self.samples = 0
        self.violations: list[tuple[bytes, int]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UniqueSampler:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task
        await self.sample()
        await self.db.close()

    async def sample(self) -> None:
        rows = await self.db.fetch(
            "SELECT unique_key, count(*) AS n FROM $p.oban_jobs"
            " WHERE unique_key IS NOT NULL AND $p.oban_unique_holds(unique_states, state)"
            " GROUP BY unique_key HAVING count(*) > 1"
        )
        self.samples += 1
        self.violations += [(r["unique_key"], r["n"]) for r in rows]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sample()
            except Exception:  # an outage the scenario made; the next sample will do
                pass
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)


async def backends(db: Db, nodes: Iterable[str]) -> list[Any]:
    """The runners' backends: (pid, application_name, query)."""
    names = [f"oban_py:{n}" for n in nodes]
    return await db.fetch(
        "SELECT pid, application_name, state, query FROM pg_stat_activity"
        " WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
        names,
    )


async def terminate_backends(db: Db, nodes: Iterable[str]) -> int:
    """pg_terminate_backend on every connection of these runner nodes; returns how many."""
    names = [f"oban_py:{n}" for n in nodes]
    rows = await db.fetch(
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = ANY($1)",
        names,
    )
    return sum(1 for r in rows if r["ok"])


async def listen_backends(db: Db, node: str) -> list[int]:
    """Pids of the node's backends that are LISTENing (the notifier's connection).

    Another backend's channels cannot be read (pg_listening_channels is per session), so the
    notifier is recognised by its last statement: ``LISTEN ...``, or its periodic ``SELECT 1``
    health check, which no other engine connection sends.
    """
    rows = await backends(db, [node])
    found = []
    for r in rows:
        query = (r["query"] or "").strip()
        if query.upper().startswith("LISTEN") or query == "SELECT 1":
            found.append(r["pid"])
    return found


async def terminate(db: Db, pids: Iterable[int]) -> int:
    rows = await db.fetch("SELECT pg_terminate_backend(p) AS ok FROM unnest($1::int[]) AS p", list(pids))
    return sum(1 for r in rows if r["ok"])
