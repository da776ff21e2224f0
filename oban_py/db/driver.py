"""The one place SQL is sent from.

:class:`Driver` runs named queries (``sql/queries/*.sql``) on the pool or on a caller's connection,
and turns lost connections into :class:`~oban_py.errors.DatabaseUnavailable`. Everything above it deals in
query names and keyword parameters, never in SQL text or asyncpg exceptions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg

from ..errors import DatabaseUnavailable
from .connect import connect_like, is_transient, quiet_pool_log, unavailable
from .lease import Leases
from .sql import Queries

__all__ = ["Driver"]

log = logging.getLogger("oban_py.db")


def _raise_mapped(exc: Exception, where: str = "") -> None:
    """Raise ``exc`` as DatabaseUnavailable if it means the connection or server was lost."""
    if is_transient(exc) and not isinstance(exc, DatabaseUnavailable):
        raise unavailable(exc, where) from exc


class Driver:
    """Named queries for one schema prefix over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, prefix: str = "public", *, leases: Leases | None = None) -> None:
        self.pool = pool
        # Default: every connection goes straight back to the pool (right for a caller's pool, whose
        # owner may need them); the engine's own pool gets Leases that keep released ones.
        self.leases = leases or Leases(pool, pool.get_max_size(), keep=False)
        self.prefix = prefix
        self.queries = Queries(prefix)
        self.insert_channel = f"{prefix}.oban_insert"
        self.signal_channel = f"{prefix}.oban_signal"
        quiet_pool_log()

    # -- plumbing ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, conn: Any = None) -> AsyncIterator[Any]:
        """The caller's connection if given, else one from the pool (lost connections mapped)."""
        if conn is not None:
            yield conn
            return
        try:
            async with self.leases.use() as leased:
                yield leased
        except Exception as exc:
            _raise_mapped(exc)
            raise

    @contextlib.asynccontextmanager
    async def transaction(self, conn: Any = None) -> AsyncIterator[Any]:
        """A transaction on the caller's connection (nested as a savepoint) or a pooled one."""
        async with self.connection(conn) as c:
            try:
                async with c.transaction():
                    yield c
            except Exception as exc:
                _raise_mapped(exc)
                raise

    async def _call(self, method: str, name: str, conn: Any, params: dict[str, Any]) -> Any:
        query = self.queries[name]
        args = query.args(params)
        try:
            if conn is not None:
                return await getattr(conn, method)(query.text, *args)
            async with self.leases.use() as leased:
                return await getattr(leased, method)(query.text, *args)
        except Exception as exc:
            _raise_mapped(exc, name)
            raise

    async def fetch(self, query: str, conn: Any = None, /, **params: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._call("fetch", query, conn, params)
        return rows

    async def fetchrow(self, query: str, conn: Any = None, /, **params: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._call("fetchrow", query, conn, params)
        return row

    async def fetchval(self, query: str, conn: Any = None, /, **params: Any) -> Any:
        return await self._call("fetchval", query, conn, params)

    async def execute(self, query: str, conn: Any = None, /, **params: Any) -> str:
        status: str = await self._call("execute", query, conn, params)
        return status

    async def notify(self, channel: str, payload: str, conn: Any = None) -> None:
        await self.execute("notify", conn, channel=channel, payload=payload)

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A new connection outside the pool, made with the pool's connect arguments.

        For long-lived engine connections (LISTEN, heartbeats) whose loss must never touch the pool
        queries run on. Same DSN, settings and ``application_name``; the caller closes it. Failures are
        raised as :class:`DatabaseUnavailable` when they mean the server is unreachable.
        """
        try:
            return await connect_like(self.pool)
        except Exception as exc:
            _raise_mapped(exc, "connect")
            raise

    async def connect_listener(self) -> asyncpg.Connection:
        """The notifier's LISTEN connection: a :meth:`connect_dedicated` connection."""
        return await self.connect_dedicated()

    # -- unique keys ------------------------------------------------------------------------------

    async def transition(self, query: str, conn: Any = None, /, **params: Any) -> list[asyncpg.Record]:
        """Run a state-changing query whose rows may become fetchable, settling parked rows first.

        Rows returned with ``parked`` (they re-entered their unique group) take their key back, or lose
        it to the holder, inside the same transaction: no producer can fetch them before that is
        settled. Used for staging, rescue and jobs returned to the queue.

        When the transaction is ours (no connection given, or one outside a transaction), a deadlock
        runs it again, a bounded number of times: it was rolled back entirely.
        """
        from .._insert import retry_deadlocks  # the insert path owns the retry rule; imported late

        async def run() -> list[asyncpg.Record]:
            async with self.transaction(conn) as c:
                rows = await self.fetch(query, c, **params)
                parked = [r["id"] for r in rows if r["parked"]]
                if parked:
                    for job_id in parked:
                        await self._unpark_one(c, job_id, 200)
                    await c.execute("SET LOCAL lock_timeout TO DEFAULT")
                return rows

        if conn is None or not conn.is_in_transaction():
            return await retry_deadlocks(run)
        return await run()

    async def unpark(self, ids: Iterable[int], *, lock_timeout_ms: int = 200) -> dict[int, str]:
        """Give parked rows their unique key back, one short transaction each.

        Returns ``{id: outcome}`` with outcome ``"held"`` (took the key), ``"cancelled"`` (another job
        holds it and this one had not started), ``"released"`` (it runs without the key) or
        ``"waiting"`` (an uncommitted holder blocked us past the lock timeout; the sweep retries).
        A job that is no longer parked is left out.
        """
        outcomes: dict[int, str] = {}
        async with self.connection() as conn:
            for job_id in ids:
                outcome = await self._unpark_one(conn, job_id, lock_timeout_ms)
                if outcome is not None:
                    outcomes[job_id] = outcome
        return outcomes

    async def _unpark_one(self, conn: Any, job_id: int, lock_timeout_ms: int) -> str | None:
        """Unpark one row in its own transaction, or in a savepoint of the caller's."""
        for _ in range(3):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
                    row = await self.fetchrow("job_unpark", conn, id=job_id)
                return "held" if row is not None else None
            except asyncpg.UniqueViolationError:
                holder = await self.fetchrow("job_unique_holder", conn, id=job_id)
                if holder is None:
                    continue  # the holder left between our attempt and the lookup: try again
                lost = await self.fetchrow("job_unpark_lost", conn, id=job_id, holder=holder["id"])
                if lost is None:
                    return None
                outcome = "cancelled" if lost["state"] == "cancelled" else "released"
                log.info(
                    "unique key of job %s is held by job %s; job %s %s",
                    job_id,
                    holder["id"],
                    job_id,
                    outcome,
                    extra={"job_id": job_id, "holder_id": holder["id"], "outcome": outcome},
                )
                return outcome
            except asyncpg.LockNotAvailableError:
                return "waiting"
        return "waiting"
