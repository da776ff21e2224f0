"""Leases: fast reuse of pooled connections never exceeds its size, starves nobody, leaks nothing.

These tests are about :class:`~oban_py.db.lease.Leases` itself, so they read its internals (``_idle``,
``_waiters``, ``_out``) and asyncpg's (a proxy's ``_con``): there is no public view of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, Worker, worker
from oban_py.db.connect import create_pool
from oban_py.db.driver import Driver
from oban_py.db.lease import Leases

from helpers import wait_for

pytestmark = pytest.mark.anyio


@worker(queue="lease_probe")
class LeaseProbe(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


@pytest.fixture
async def pool(test_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(test_dsn, min_size=1, max_size=4)
    yield pool
    try:
        await asyncio.wait_for(pool.close(), 5.0)  # a failed test may leave a connection out
    except asyncio.TimeoutError:
        pool.terminate()


async def _backends(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_many_callers_share_at_most_size_connections(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 3)
    in_use = {"now": 0, "max": 0}
    pids: set[int] = set()

    async def call(i: int) -> None:
        conn = await leases.acquire()
        in_use["now"] += 1
        in_use["max"] = max(in_use["max"], in_use["now"])
        try:
            pids.add(await _backends(conn))
            await conn.execute("SELECT pg_sleep(0.005)")
        finally:
            in_use["now"] -= 1
            await leases.release(conn)

    await asyncio.gather(*(call(i) for i in range(60)))
    assert in_use["max"] == 3
    assert len(pids) <= 3
    await leases.close()
    assert pool.get_idle_size() == pool.get_size()  # every connection is back in the pool


async def test_released_connection_is_reused_without_the_pool(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 3)
    first = await leases.acquire()
    pid = await _backends(first)
    await leases.release(first)
    again = await leases.acquire()
    assert again is first and await _backends(again) == pid
    await leases.release(again)
    await leases.close()


async def test_idle_connections_go_back_so_direct_pool_users_are_not_starved(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 4, idle_return=0.1)
    held = [await leases.acquire() for _ in range(4)]
    for conn in held:
        await leases.release(conn)
    # All four pool connections now sit idle in the leases; code using the pool directly gets them back.
    direct = await asyncio.wait_for(asyncio.gather(*(pool.acquire() for _ in range(4))), 2.0)
    for conn in direct:
        await pool.release(conn)
    await leases.close()


async def test_dirty_and_broken_connections_go_back_to_the_pool(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 2)
    conn = await leases.acquire()
    tx = conn.transaction()
    await tx.start()
    await conn.execute("CREATE TEMP TABLE lease_probe (x int)")
    await leases.release(conn)  # left in a transaction: the pool's reset rolls it back

    victim = await leases.acquire()
    pid = await _backends(victim)
    async with pool.acquire() as killer:
        await killer.execute("SELECT pg_terminate_backend($1)", pid)

    async def broken() -> BaseException | None:
        try:
            await victim.fetchval("SELECT 1")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as exc:
            return exc
        return None

    await wait_for(broken, timeout=2)  # the backend exits a moment after pg_terminate_backend returns
    await leases.release(victim, failed=True)  # broken: handed back for the pool to replace
    fresh = [await leases.acquire() for _ in range(2)]
    assert all([await c.fetchval("SELECT 1") == 1 for c in fresh])
    assert all([await c.fetchval("SELECT to_regclass('lease_probe')") is None for c in fresh])
    for c in fresh:
        await leases.release(c)
    await leases.close()


async def test_cancelled_waiter_does_not_leak_a_slot(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 1)
    holder = await leases.acquire()
    waiter = asyncio.create_task(leases.acquire())
    await wait_for(lambda: len(leases._waiters) == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # A connection handed to a waiter that is cancelled before it runs is passed on, not lost.
    second = asyncio.create_task(leases.acquire())
    third = asyncio.create_task(leases.acquire())
    await wait_for(lambda: len(leases._waiters) == 2)
    await leases.release(holder)  # handed to `second`...
    second.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await second
    conn = await asyncio.wait_for(third, 2.0)
    assert conn is holder
    await leases.release(conn)
    await leases.close()
    assert pool.get_idle_size() == pool.get_size()


async def test_a_connection_whose_query_was_cancelled_is_not_reused_as_is(pool: asyncpg.Pool) -> None:
    driver = Driver(pool, leases=Leases(pool, 1))
    backend: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        async with driver.connection() as conn:
            backend.set_result(await _backends(conn))
            await conn.execute("SELECT pg_sleep(5)")

    async def sleeping(pid: int) -> bool:
        async with pool.acquire() as other:
            query = "SELECT query FROM pg_stat_activity WHERE pid = $1 AND state = 'active'"
            return await other.fetchval(query, pid) == "SELECT pg_sleep(5)"

    task = asyncio.create_task(slow())
    pid = await backend
    await wait_for(lambda: sleeping(pid), timeout=5)  # the query runs on the server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next user of the only slot gets a working connection, not one still busy with the old query.
    async with driver.connection() as conn:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 2.0) == 1
    await driver.leases.close()


async def test_a_callers_pool_is_used_but_never_held(pool: asyncpg.Pool, prefix: str) -> None:
    async with Oban(pool=pool, prefix=prefix) as oban:
        jobs = await oban.insert_all([LeaseProbe.new({"i": i}) for i in range(3)])
        assert await oban.drain_queue("lease_probe") == {"completed": 3}
        assert pool.get_idle_size() == pool.get_size()  # nothing kept aside between calls
        assert all(j.id is not None for j in jobs)
    assert not pool.is_closing()  # the caller's pool outlives the Oban instance
    assert await pool.fetchval("SELECT count(*) FROM " + prefix + ".oban_jobs WHERE state = 'completed'") == 3


async def test_a_session_ending_server_error_is_not_kept_for_reuse(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 1)
    used: list[Any] = []

    async def failing(error: str | BaseException) -> None:
        async with leases.use() as conn:
            used.append(conn)
            if isinstance(error, BaseException):
                raise error
            await conn.fetchval(error)

    with pytest.raises(asyncpg.DivisionByZeroError):
        await failing("SELECT 1 / 0")
    assert [c for c, _ in leases._idle] == used  # an ordinary SQL error: reused as is
    # pg_terminate_backend's FATAL can reach a query before asyncpg sees the socket close; the
    # connection must go back to the pool, not to the next caller.
    with pytest.raises(asyncpg.exceptions.AdminShutdownError):
        await failing(
            asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")
        )
    assert used[1] is used[0] and not leases._idle
    async with leases.use() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    await leases.close()
    assert pool.get_idle_size() == pool.get_size()


async def test_an_idle_connection_whose_backend_died_is_not_handed_out(pool: asyncpg.Pool) -> None:
    leases = Leases(pool, 2, idle_return=30)
    conn = await leases.acquire()
    pid = await _backends(conn)
    await leases.release(conn)
    assert [c for c, _ in leases._idle] == [conn]
    async with pool.acquire() as killer:
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
    # asyncpg notices the closed socket and takes the slot back, detaching the proxy we keep.
    await wait_for(lambda: conn._con is None, timeout=2)
    fresh = await leases.acquire()  # before the fix: the detached proxy ("released back to the pool")
    assert await fresh.fetchval("SELECT 1") == 1 and await _backends(fresh) != pid
    await leases.release(fresh)
    await leases.close()
    assert leases._out == 0
    assert pool.get_idle_size() == pool.get_size()


async def test_a_timed_out_query_never_goes_back_to_the_idle_list(pool: asyncpg.Pool, prefix: str) -> None:
    driver = Driver(pool, prefix, leases=Leases(pool, 1, idle_return=30))
    seen: list[Any] = []

    async def slow() -> None:
        async with driver.connection() as conn:
            seen.append(conn)
            await conn.execute("SELECT pg_sleep(5)")

    async def swallowed() -> None:  # the body catches its own timeout and exits normally
        async with driver.connection() as conn:
            seen.append(conn)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(5)"), 0.1)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(slow(), 0.1)
    assert all(c is not seen[0] for c, _ in driver.leases._idle)  # still cancelling: never reused as is
    assert await asyncio.wait_for(driver.fetch("node_list"), 2.0) == []
    await swallowed()
    assert all(c is not seen[1] for c, _ in driver.leases._idle)
    assert await asyncio.wait_for(driver.fetch("node_list"), 2.0) == []
    await driver.leases.close()
