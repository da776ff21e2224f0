"""LISTEN/NOTIFY wake-ups, with reconnect.

One connection per node LISTENs on two channels: ``<prefix>.oban_insert`` (payload: a queue name;
sent by inserts and the stager) and ``<prefix>.oban_signal`` (JSON control messages: pause, scale,
interrupt a running job). When the connection drops, the notifier reconnects with backoff; meanwhile
producers keep polling every ``poll_interval``, and on reconnect every producer is woken, so inserts
notified during the gap are picked up at once.

With PgBouncer in transaction pooling mode LISTEN does not work: set ``notifier = "poll"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..db.connect import is_transient
from .producer import Backoff

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["Notifier"]

log = logging.getLogger("oban_py.notifier")


class Notifier:
    """Keeps a LISTEN connection open and dispatches notifications."""

    def __init__(
        self,
        driver: Driver,
        *,
        on_insert: Callable[[str], None],
        on_signal: Callable[[dict[str, Any]], None],
        on_connect: Callable[[], None],
        health_interval: float = 10.0,
    ) -> None:
        self.driver = driver
        self.on_insert = on_insert
        self.on_signal = on_signal
        self.on_connect = on_connect
        self.health_interval = health_interval
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="oban-notifier")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _insert(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.on_insert(payload)

    def _signal(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("ignoring malformed signal %r", payload[:200])
            return
        if isinstance(message, dict):
            self.on_signal(message)

    async def _loop(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not self._stopping:
            lost = asyncio.Event()
            conn: Any = None
            try:
                conn = await self.driver.pool.acquire()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.driver.insert_channel, self._insert)
                await conn.add_listener(self.driver.signal_channel, self._signal)
                if backoff.failures:
                    log.info("notifier reconnected")
                backoff.reset()
                self.connected.set()
                self.on_connect()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), self.health_interval)
                    except asyncio.TimeoutError:
                        await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("notifier failed")
                elif backoff.failures == 0:
                    log.warning(
                        "notifier lost its connection (%s); polling until it reconnects", type(exc).__name__
                    )
            finally:
                self.connected.clear()
                if conn is not None:
                    await self._release(conn)
            if not self._stopping:
                await asyncio.sleep(backoff.next())

    async def _release(self, conn: Any) -> None:
        """Hand the connection back (the pool replaces it if it is broken); never raises."""
        try:
            if not conn.is_closed():
                await conn.remove_listener(self.driver.insert_channel, self._insert)
                await conn.remove_listener(self.driver.signal_channel, self._signal)
        except Exception:
            conn.terminate()
        try:
            await asyncio.wait_for(self.driver.pool.release(conn), 2.0)
        except Exception:
            log.debug("notifier connection could not be released cleanly", exc_info=True)
