"""The one place SQL is sent from.

:class:`Driver` runs named queries (``sql/queries/*.sql``) on the pool or on a caller's connection,
and turns lost connections into :class:`~oban_py.errors.DatabaseUnavailable`. Everything above it deals in
query names and keyword parameters, never in SQL text or asyncpg exceptions. Statements that must settle
parked unique keys go through :mod:`~oban_py.db.parking`, which runs them here.

Each method takes only the names of its result kind (``fetch`` the ``:many`` queries, ``fetchrow``
``:one``, ``fetchval`` ``:scalar``, ``execute`` ``:exec``): the ``Literal`` types of
:mod:`~oban_py.db.query_names` make mypy check it, and a cheap compare at call time catches the rest
(a name built at run time, an untyped caller).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from ..errors import DatabaseUnavailable
from .connect import connect_like, is_transient, quiet_pool_log, unavailable
from .lease import Leases
from .query_names import ExecQuery, ManyQuery, OneQuery, QueryName, ScalarQuery
from .sql import METHODS, Kind, Queries, Query

__all__ = ["Driver"]


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

    def _query(self, kind: Kind, name: QueryName) -> Query:
        """The compiled query, if it is of ``kind`` (a name built at run time escapes mypy)."""
        query = self.queries[name]
        if query.kind != kind:
            raise TypeError(
                f"query {name} is :{query.kind}: run it with Driver.{METHODS[query.kind]}(), "
                f"not Driver.{METHODS[kind]}()"
            )
        return query

    async def _call(self, kind: Kind, name: QueryName, conn: Any, params: dict[str, Any]) -> Any:
        query = self._query(kind, name)
        method = METHODS[kind]
        args = query.args(params)
        try:
            if conn is not None:
                return await getattr(conn, method)(query.text, *args)
            async with self.leases.use() as leased:
                return await getattr(leased, method)(query.text, *args)
        except Exception as exc:
            _raise_mapped(exc, name)
            raise

    async def fetch(self, query: ManyQuery, conn: Any = None, /, **params: Any) -> list[asyncpg.Record]:
        """Run a ``:many`` query: every row it returns."""
        rows: list[asyncpg.Record] = await self._call("many", query, conn, params)
        return rows

    async def fetchrow(self, query: OneQuery, conn: Any = None, /, **params: Any) -> asyncpg.Record | None:
        """Run a ``:one`` query: its row, or ``None`` when it matched nothing."""
        row: asyncpg.Record | None = await self._call("one", query, conn, params)
        return row

    async def fetchval(self, query: ScalarQuery, conn: Any = None, /, **params: Any) -> Any:
        """Run a ``:scalar`` query: the first column of its first row (``None`` without one)."""
        return await self._call("scalar", query, conn, params)

    async def execute(self, query: ExecQuery, conn: Any = None, /, **params: Any) -> str:
        """Run an ``:exec`` query: its status string (``"UPDATE 3"``)."""
        status: str = await self._call("exec", query, conn, params)
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
