"""Fast reuse of pooled connections.

``asyncpg.Pool.acquire``/``release`` cost about 40 µs per call on this kind of machine (release runs
as a shielded task, so every call spends extra event-loop turns): 10% of a single insert. ``Leases``
keeps connections the engine has released in a LIFO list and hands them straight to the next caller,
going to the asyncpg pool only to grow, to return a broken or dirty connection, and to give back
connections that sat unused for ``idle_return`` seconds (so code using ``oban.pool`` directly is never
starved for long). At most ``size`` connections are out of the pool at once; callers beyond that wait,
and released connections go to them first come, first served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import asyncpg

__all__ = ["Leases"]


class Leases:
    """Connections of one asyncpg pool, reused without a pool round trip."""

    def __init__(
        self, pool: asyncpg.Pool, size: int, *, idle_return: float = 0.25, keep: bool = True
    ) -> None:
        self.pool = pool
        self.size = size
        self.keep = keep  # False: every release goes straight back to the pool
        self.idle_return = idle_return
        self._idle: list[tuple[Any, float]] = []  # (connection, released at), most recent last
        self._out = 0  # connections taken from the pool: idle here or in use
        # Callers waiting for a connection: a released one is handed over directly (FIFO), or None
        # when a pool slot freed up.
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Task[None]] = set()
        self._closed = False

    async def acquire(self) -> Any:
        while True:
            if self._idle:
                return self._idle.pop()[0]
            if self._out < self.size:
                self._out += 1
                try:
                    return await self.pool.acquire()
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()  # woken, but cancelled before running: pass it on
                    if handed is not None:
                        await self.release(handed)
                    else:
                        self._wake()
                else:
                    self._waiters.remove(waiter)
                raise
            if conn is not None:
                return conn

    def use(self) -> _Lease:
        """``async with leases.use() as conn``: a connection, released on exit. An exception other than
        a server-side SQL error marks it failed (the pool then checks it)."""
        return _Lease(self)

    async def release(self, conn: Any, *, failed: bool = False) -> None:
        """Take ``conn`` back. ``failed``: the caller's use of it ended in an error other than a server-side
        SQL error (a cancelled query, a lost or confused connection): the pool then checks and resets it."""
        try:
            clean = self.keep and not (failed or self._closed or conn.is_closed() or conn.is_in_transaction())
        except asyncpg.InterfaceError:
            # asyncpg already took back a connection that was closed under us (its proxy is detached).
            self._out -= 1
            self._wake()
            return
        if not clean:
            # The pool rolls back a dirty connection and replaces a broken one.
            await self._give_back(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append((conn, time.monotonic()))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_return, self._sweep)

    async def close(self) -> None:
        """Return every idle connection to the pool (before the pool closes)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await self._give_back(conn)
        if self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    async def _give_back(self, conn: Any) -> None:
        self._out -= 1
        try:
            # InterfaceError: asyncpg already took it back when it was closed under us.
            with contextlib.suppress(asyncpg.InterfaceError):
                await self.pool.release(conn)
        finally:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle_return
        stale = [c for c, at in self._idle if at <= cutoff]
        if stale:
            self._idle = [(c, at) for c, at in self._idle if at > cutoff]
            for conn in stale:
                task = asyncio.ensure_future(self._give_back(conn))
                self._returning.add(task)
                task.add_done_callback(self._returning.discard)
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_return, self._sweep)


class _Lease:
    """The context manager behind :meth:`Leases.use` (a class: cheaper than a generator on hot paths)."""

    __slots__ = ("_conn", "_leases")

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        self._conn = await self._leases.acquire()
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        # A server-side SQL error leaves the connection usable; anything else may not have.
        failed = exc is not None and not isinstance(exc, asyncpg.PostgresError)
        await self._leases.release(self._conn, failed=failed)
