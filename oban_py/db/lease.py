"""Fast reuse of pooled connections.

``asyncpg.Pool.acquire``/``release`` cost about 40 µs per call on this kind of machine (release runs
as a shielded task, so every call spends extra event-loop turns): 10% of a single insert. ``Leases``
keeps connections the engine has released in a LIFO list and hands them straight to the next caller,
going to the asyncpg pool only to grow, to return a broken or dirty connection, and to give back
connections that sat unused for ``idle_return`` seconds (so code using ``oban.pool`` directly is never
starved for long). At most ``size`` connections are out of the pool at once; callers beyond that wait,
and released connections go to them first come, first served.

A connection is kept for reuse only if its last use ended cleanly or in an ordinary SQL error. One whose
use was cancelled or timed out (the protocol may still be mid-operation), hit an interface or protocol
error, or got a session-ending server error (``pg_terminate_backend``, shutdown: asyncpg may not have
seen the socket close yet) goes back to the pool, which waits out a pending cancel and resets or
replaces it. An idle connection that died meanwhile (asyncpg hands its slot back to the pool when the
socket closes) is dropped when it is next picked, never handed out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import asyncpg

from .connect import connection_broken, pool_recovered

__all__ = ["Leases"]

# A connection the pool cannot reset within this long is closed instead.
RELEASE_TIMEOUT = 5.0


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
            while self._idle:
                conn = self._idle.pop()[0]
                if _alive(conn):
                    return conn
                await self._give_back(conn)  # closed while idle: asyncpg already has (or now gets) its slot
            if self._out < self.size:
                self._out += 1
                try:
                    conn = await self.pool.acquire()
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
                pool_recovered()
                return conn
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
        """``async with leases.use() as conn``: a connection, released on exit. An exception that may have
        left it unusable (see :func:`~oban_py.db.connect.connection_broken`) marks it failed: the pool
        then checks it."""
        return _Lease(self)

    async def release(self, conn: Any, *, failed: bool = False) -> None:
        """Take ``conn`` back. ``failed``: the caller's use of it ended in an error that may have left it
        unusable (a cancelled or timed-out query, a lost or confused connection, a session-ending server
        error): it goes back to the pool, which waits out a pending cancel and resets or replaces it."""
        raw = getattr(conn, "_con", conn)
        if raw is None:
            # asyncpg already took back a connection that was closed under us (its proxy is detached).
            self._out -= 1
            self._wake()
            return
        clean = self.keep and not (
            failed or self._closed or raw.is_closed() or raw.is_in_transaction() or _cancelling(raw)
        )
        if not clean:
            if failed or _cancelling(raw):
                # Never wait on the network for a connection that failed: a cancel still in flight on a
                # black-holed socket would hold the release (and its caller) forever. Close it here;
                # terminating hands its holder back to the pool, which opens a fresh one when needed.
                raw.terminate()
                self._out -= 1
                self._wake()
                return
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
            # asyncpg already took it back when it was closed under us: InterfaceError for a detached
            # proxy, InternalClientError ("release() called on a free connection holder") for a raw one.
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError):
                try:
                    await asyncio.wait_for(self.pool.release(conn), RELEASE_TIMEOUT)
                except asyncio.TimeoutError:  # a reset stuck on a dead socket
                    raw = getattr(conn, "_con", None) or conn
                    raw.terminate()
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
        # An ordinary SQL error leaves the connection usable; anything else may not have.
        await self._leases.release(self._conn, failed=exc is not None and connection_broken(exc))


def _cancelling(raw: Any) -> bool:
    """True while a cancelled query's cancel request is still in flight (a timeout caught in the body)."""
    is_cancelling = getattr(getattr(raw, "_protocol", None), "_is_cancelling", None)
    return is_cancelling is not None and bool(is_cancelling())


def _alive(conn: Any) -> bool:
    """False once asyncpg has closed ``conn`` (a pool proxy is detached from its connection then)."""
    raw = getattr(conn, "_con", conn)
    return raw is not None and not raw.is_closed()
