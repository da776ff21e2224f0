"""The notifier's LISTEN connection: replaced promptly when it is killed or goes silent, never borrowed
from the job pool, and stopped without raising.

Kills use pg_terminate_backend on this test's own notifier backend (found by its node's
``application_name`` and its last statement), never on anyone else's connection. The notifier is what
these tests are about, so besides the ``notifier.listening`` event they read its state (``connected``,
``pid``) and the pool's connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, Worker, worker
from oban_py.errors import DatabaseUnavailable
from oban_py.runtime.notifier import Notifier

from helpers import EventLog, wait_for

pytestmark = pytest.mark.anyio

POLL = 5.0  # producers poll this rarely: a job that starts sooner was woken by a NOTIFY

started: dict[str, float] = {}
interrupted: dict[str, float] = {}


@worker(queue="notifier_probe")
class NotifierProbe(Worker):
    async def process(self, job: Job[Any]) -> None:
        key = job.args["key"]
        started[key] = time.monotonic()
        try:
            await asyncio.sleep(job.args.get("sleep", 0))
        except asyncio.CancelledError:
            interrupted[key] = time.monotonic()
            raise


def _node() -> str:
    return f"notif-{uuid.uuid4().hex[:8]}"


async def _listen_pids(db: asyncpg.Connection, node: str) -> list[int]:
    """Backends of ``node`` whose last statement was a LISTEN or the notifier's health check."""
    rows = await db.fetch(
        "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
        f"oban_py:{node}",
    )
    return [r["pid"] for r in rows if (r["query"] or "").startswith("LISTEN") or r["query"] == "SELECT 1"]


async def _kill_listener(db: asyncpg.Connection, node: str) -> int:
    pids = await wait_for(lambda: _listen_pids(db, node), timeout=5)
    assert len(pids) == 1, pids
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pids[0])
    return int(pids[0])


async def _replaced(db: asyncpg.Connection, node: str, old: int) -> int:
    """Wait for a LISTEN backend other than ``old``; its pid."""

    async def check() -> int | None:
        pids = [p for p in await _listen_pids(db, node) if p != old]
        return pids[0] if pids else None

    return int(await wait_for(check, timeout=5))


async def _start_latency(client: Oban, key: str, *, sleep: float = 0) -> float:
    """Seconds from inserting a job to its body starting."""
    before = time.monotonic()
    await client.insert(NotifierProbe.new({"key": key, "sleep": sleep}))
    await wait_for(lambda: key in started, timeout=POLL * 2, interval=0.002)
    return started[key] - before


async def _queues(make_oban: Callable[..., Awaitable[Oban]], node: str, log: EventLog | None = None) -> Oban:
    log = log or EventLog()
    runner = await make_oban(
        name=f"runner-{node}",
        node=node,
        queues={"notifier_probe": 5},
        poll_interval=POLL,
        before_start=log.attach,
    )
    assert log.count("notifier.listening") == 1  # start() returns once LISTEN is up
    return runner


async def test_a_killed_listen_connection_is_replaced_and_inserts_start_at_notify_speed(
    make_oban: Callable[..., Awaitable[Oban]], oban: Oban, db: asyncpg.Connection
) -> None:
    node, log = _node(), EventLog()
    runner = await _queues(make_oban, node, log)
    assert await _start_latency(oban, f"{node}-before") < 0.5

    old = await _kill_listener(db, node)
    new = await _replaced(db, node, old)  # before the fix: never replaced, inserts waited for the poll
    await log.wait("notifier.listening", reconnects=1)
    assert runner.node is not None and runner.node.notifier is not None
    assert runner.node.notifier.pid == new

    latencies = [await _start_latency(oban, f"{node}-after-{i}") for i in range(3)]
    assert max(latencies) < 0.5, latencies  # NOTIFY speed again, far below the 5 s poll
    # The LISTEN connection is not one of the pool's: its loss never touched the pool.
    assert runner.pool is not None
    pooled = {h._con.get_server_pid() for h in runner.pool._holders if h._con is not None}
    assert new not in pooled and old not in pooled


async def test_cancel_interrupts_a_running_job_after_the_listen_connection_was_killed(
    make_oban: Callable[..., Awaitable[Oban]], oban: Oban, db: asyncpg.Connection
) -> None:
    node = _node()
    await _queues(make_oban, node)
    old = await _kill_listener(db, node)
    await _replaced(db, node, old)
    key = f"{node}-long"
    await _start_latency(oban, key, sleep=30)
    job_id = await db.fetchval(
        f"SELECT id FROM \"{oban.config.prefix}\".oban_jobs WHERE args->>'key' = $1", key
    )
    cancelled_at = time.monotonic()
    # From another instance: the interrupt reaches the runner only by NOTIFY on the signal channel.
    assert await oban.cancel_job(job_id)
    await wait_for(lambda: key in interrupted, timeout=3)
    assert interrupted[key] - cancelled_at < 1.0


async def test_stop_is_clean_after_the_listen_connection_was_killed(
    make_oban: Callable[..., Awaitable[Oban]], db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node()
    runner = await _queues(make_oban, node)
    notifier = runner.node.notifier  # type: ignore[union-attr]
    assert notifier is not None
    await _kill_listener(db, node)
    await wait_for(lambda: not notifier.connected.is_set(), timeout=5)
    with caplog.at_level(logging.WARNING, logger="oban_py"):
        await runner.stop()  # before the fix: InterfaceError ("released back to the pool")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    lost = [r for r in caplog.records if r.name == "oban_py.notifier" and r.levelno == logging.WARNING]
    assert len(lost) <= 1


# -- the loop itself, against a scripted driver ---------------------------------------------------------


class FakeConn:
    """Just enough of an asyncpg connection for the notifier."""

    _pids = iter(range(1000, 2000))

    def __init__(self, *, silent: bool = False, close_raises: bool = False) -> None:
        self.silent = silent  # the health check never answers (a dead peer)
        self.close_raises = close_raises
        self.pid = next(self._pids)
        self.closed = False
        self.terminated = False
        self.listening: list[str] = []
        self._on_close: list[Callable[[Any], None]] = []

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None:
        self._on_close.append(callback)

    async def add_listener(self, channel: str, _callback: Any) -> None:
        self.listening.append(channel)

    def get_server_pid(self) -> int:
        return self.pid

    async def execute(self, _query: str) -> str:
        if self.silent:
            await asyncio.Event().wait()
        return "SELECT 1"

    def is_closed(self) -> bool:
        return self.closed

    async def close(self, *, timeout: float | None = None) -> None:
        if self.close_raises:
            raise OSError("connection reset")
        self.closed = True

    def terminate(self) -> None:
        self.closed = self.terminated = True

    def kill(self) -> None:
        self.closed = True
        for callback in self._on_close:
            asyncio.get_running_loop().call_soon(callback, self)


class FakeDriver:
    insert_channel = "p.oban_insert"
    signal_channel = "p.oban_signal"

    def __init__(self, script: list[FakeConn | BaseException]) -> None:
        self.script = script
        self.made: list[FakeConn] = []

    async def connect_listener(self) -> FakeConn:
        step = self.script.pop(0) if self.script else FakeConn()
        if isinstance(step, BaseException):
            raise step
        self.made.append(step)
        return step


def _notifier(driver: FakeDriver, connects: list[float], **options: Any) -> Notifier:
    return Notifier(
        driver,  # type: ignore[arg-type]
        on_insert=lambda _q: None,
        on_signal=lambda _m: None,
        on_connect=lambda: connects.append(time.monotonic()),
        **options,
    )


async def test_a_silent_connection_is_given_up_at_its_health_check_deadline() -> None:
    driver = FakeDriver([FakeConn(silent=True), FakeConn()])
    connects: list[float] = []
    notifier = _notifier(driver, connects, health_interval=0.05, health_timeout=0.1)
    notifier.start()
    try:
        await wait_for(lambda: notifier.reconnects == 1 and notifier.connected.is_set(), timeout=3)
        assert driver.made[0].terminated  # discarded, not left open
        assert len(connects) == 2  # producers woken on each (re)connect
        assert driver.made[1].listening == [driver.insert_channel, driver.signal_channel]
        assert notifier.pid == driver.made[1].pid
    finally:
        await notifier.stop()


async def test_a_closed_connection_is_replaced_at_once() -> None:
    driver = FakeDriver([FakeConn(), FakeConn()])
    connects: list[float] = []
    notifier = _notifier(driver, connects, health_interval=60)
    notifier.start()
    try:
        await wait_for(lambda: notifier.connected.is_set(), timeout=3)
        killed = time.monotonic()
        driver.made[0].kill()
        await wait_for(lambda: notifier.reconnects == 1, timeout=3)
        assert connects[-1] - killed < 0.5  # the termination listener, not the 60 s health check
    finally:
        await notifier.stop()


async def test_failed_connects_back_off_log_once_and_stop_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = DatabaseUnavailable("database unavailable (connect): ConnectionRefusedError")
    driver = FakeDriver([down, down, down, FakeConn(close_raises=True)])
    connects: list[float] = []
    notifier = _notifier(driver, connects)
    with caplog.at_level(logging.DEBUG, logger="oban_py.notifier"):
        notifier.start()
        await wait_for(lambda: notifier.connected.is_set(), timeout=5)
        assert notifier.reconnects == 0  # the first connection ends no outage of a live one
        assert len(connects) == 1
        await notifier.stop()  # closing fails: still no exception
        await notifier.stop()  # idempotent
    assert driver.made[0].terminated
    assert not notifier.connected.is_set()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "polling" in warnings[0].getMessage()


async def test_stop_before_start_and_while_connecting() -> None:
    never = asyncio.get_running_loop().create_future()
    connecting = asyncio.Event()

    class Hanging(FakeDriver):
        async def connect_listener(self) -> FakeConn:
            connecting.set()
            await never
            raise AssertionError

    notifier = _notifier(Hanging([]), [])
    await notifier.stop()
    notifier.start()
    await asyncio.wait_for(connecting.wait(), 2)
    await asyncio.wait_for(notifier.stop(), 2)
