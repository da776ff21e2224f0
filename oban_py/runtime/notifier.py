"""LISTEN/NOTIFY wake-ups, with reconnect.

One dedicated connection per node (opened with the pool's connect arguments, but not taken from the
pool, so losing it never touches the connections queries run on) LISTENs on two channels:
``<prefix>.oban_insert`` (payload: a queue name; sent by inserts and the stager) and
``<prefix>.oban_signal`` (JSON control messages: pause, scale, interrupt a running job).

Failure modes:

* The connection is killed or the server restarts: asyncpg's termination listener fires at once.
* The connection goes silent (a dead peer, a network partition): every ``health_interval`` a
  ``SELECT 1`` must answer within ``health_timeout``, or the connection is given up.

Either way ``connected`` is cleared, the connection is discarded, and the notifier reconnects with
backoff (up to 5 s), LISTENs again and calls ``on_connect``, which wakes every producer so that inserts
notified during the gap are picked up at once; meanwhile producers poll every ``poll_interval``. One
warning is logged per outage, one info line when it ends, and the outage is reported to ``on_error``
once. ``stop()`` never raises.

With PgBouncer in transaction pooling mode LISTEN does not work: set ``notifier = "poll"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..db.connect import is_transient
from ..errors import DatabaseUnavailable
from ..hooks.reporting import ErrorReporter
from .backoff import Backoff

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["Notifier"]

log = logging.getLogger("oban_py.notifier")


class Notifier:
    """Keeps a LISTEN connection open and dispatches notifications.

    :param health_interval: seconds between health checks of an idle connection.
    :param health_timeout: deadline for the health check, and for connecting and LISTENing.
    """

    def __init__(
        self,
        driver: Driver,
        *,
        on_insert: Callable[[str], None],
        on_signal: Callable[[dict[str, Any]], None],
        on_connect: Callable[[], None],
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
        reporter: ErrorReporter | None = None,
    ) -> None:
        self.driver = driver
        self.on_insert = on_insert
        self.on_signal = on_signal
        self.on_connect = on_connect
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.reporter = reporter or ErrorReporter()
        #: Set while a LISTEN connection is up.
        self.connected = asyncio.Event()
        #: Set once the first connect-and-LISTEN attempt has ended, in success or failure (a node's
        #: start waits for it, so "started" means "listening" whenever the server allows it).
        self.tried = asyncio.Event()
        #: Connections established after the first one (each one ended an outage).
        self.reconnects = 0
        #: Backend pid of the current LISTEN connection, if any.
        self.pid: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ever_connected = False

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="oban-notifier")

    async def stop(self) -> None:
        """Close the connection and end the loop. Idempotent, safe before start, never raises."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            # Again if need be: a cancel that lands as a wait_for completes can be swallowed (Python < 3.12).
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.error("notifier stopped with an error", exc_info=task.exception())

    # -- callbacks (run by asyncpg via loop.call_soon) --------------------------------------------

    def _insert(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self.on_insert(payload)
        except Exception:
            log.exception("insert notification handler failed")

    def _signal(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("ignoring malformed signal %r", payload[:200])
            return
        if isinstance(message, dict):
            try:
                self.on_signal(message)
            except Exception:
                log.exception("signal handler failed for %r", payload[:200])

    # -- the loop ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        down_since: float | None = None
        while not self._stopping:
            conn: Any = None
            try:
                conn = await asyncio.wait_for(self.driver.connect_listener(), self.health_timeout * 2)
                if self._stopped():  # stop() raced the connect: do not start watching
                    break
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await asyncio.wait_for(self._listen(conn), self.health_timeout)
                self.pid = conn.get_server_pid()
                if self._ever_connected:
                    self.reconnects += 1
                    gap = f" after {time.monotonic() - down_since:.1f}s" if down_since is not None else ""
                    log.info("notifier reconnected%s", gap)
                self._ever_connected = True
                down_since = None
                backoff.reset()
                self.reporter.recovered("notifier")
                self.connected.set()
                self.tried.set()
                try:
                    self.on_connect()
                except Exception:
                    log.exception("notifier on_connect handler failed")
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if down_since is None:
                    down_since = time.monotonic()
                self.tried.set()
                self._report(exc, backoff.failures)
            finally:
                self.connected.clear()
                self.pid = None
                if conn is not None:
                    await self._discard(conn, graceful=self._stopping)
            if not self._stopping:
                await asyncio.sleep(backoff.next())

    def _stopped(self) -> bool:
        return self._stopping

    async def _listen(self, conn: Any) -> None:
        await conn.add_listener(self.driver.insert_channel, self._insert)
        await conn.add_listener(self.driver.signal_channel, self._signal)

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        """Return never; raise once the connection is closed or fails its health check."""
        while True:
            try:
                await asyncio.wait_for(lost.wait(), self.health_interval)
            except asyncio.TimeoutError:
                try:
                    await asyncio.wait_for(conn.execute("SELECT 1"), self.health_timeout)
                except asyncio.TimeoutError:
                    raise DatabaseUnavailable(
                        f"LISTEN connection did not answer a health check within {self.health_timeout}s"
                    ) from None
                continue
            raise DatabaseUnavailable("LISTEN connection closed")

    def _report(self, exc: Exception, failures: int) -> None:
        """One warning per outage; a non-transient error (a bug) with its traceback, now and then."""
        self.reporter.report(exc, "notifier")  # once per outage: the reporter knows it is still open
        if not is_transient(exc):
            if failures in (0, 9, 99):
                log.error("notifier failed; retrying", exc_info=exc)
            return
        if failures == 0:
            reason = str(exc).strip() or type(exc).__name__
            if not isinstance(exc, DatabaseUnavailable):
                reason = f"{type(exc).__name__}: {reason}"
            if self._ever_connected:
                log.warning("notifier lost its LISTEN connection (%s); polling until it reconnects", reason)
            else:
                log.warning("notifier could not LISTEN (%s); polling until it can", reason)
        else:
            log.debug("notifier reconnect failed: %s", exc)

    async def _discard(self, conn: Any, *, graceful: bool) -> None:
        """Close the connection (politely when stopping and still open); never raises."""
        try:
            if graceful and not conn.is_closed():
                await conn.close(timeout=1.0)
            else:
                conn.terminate()
        except BaseException as exc:
            try:
                conn.terminate()
            except Exception:
                log.debug("notifier connection could not be terminated", exc_info=True)
            if not isinstance(exc, Exception):  # cancelled (stop) or exiting: after cleaning up
                raise
