"""The node's lifeline: heartbeats from a thread of their own, and a watchdog on the event loop.

Heartbeats run on a daemon thread with its own event loop and its own connection, so a job that
blocks the event loop (``time.sleep`` in ``async def process``) does not make a live node look dead
and get its other jobs run twice. The thread also watches the loop: a loop that has not turned for a
second is logged with the job that blocks it and where (file and line). A loop blocked for longer
than ``stall_limit`` is treated as dead: heartbeats stop, so other nodes rescue its jobs.

The main loop reads ``lease_age()`` on every tick (:class:`LeaseGuard`): once it passes the lease
(``rescue_after`` less one heartbeat interval) other nodes may already have rescued this node's jobs,
so the node stops them. After a SIGSTOP the tick is the first timer to fire, before any job's own
timer, so a frozen node's jobs are stopped before they can finish work another node has taken over.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ...hooks.reporting import ErrorReporter
from ..execution import Execution
from ..executor import execute
from ..outcome import scrub

if TYPE_CHECKING:
    from ...db.driver import Driver
    from ...db.query_names import QueryName

__all__ = ["LeaseGuard", "Lifeline", "find_blocker", "heartbeat"]

log = logging.getLogger("oban_py.node")

WATCH_INTERVAL = 0.25
BLOCKED_AFTER = 1.0
MAX_LINGER = 3600.0


async def heartbeat(driver: Driver, *, instance: str, node: str, meta: str | None) -> None:
    """Write one heartbeat from the event loop: a node's first (before it claims anything), and each
    of ``drain_queue``'s (a drain registers as a short-lived node of its own)."""
    await driver.fetchval("node_heartbeat", instance=instance, node=node, meta=meta)


def find_blocker(thread_id: int) -> tuple[Execution | None, str]:
    """The job whose code is running on thread ``thread_id`` right now, and where (``file:line``)."""
    frame: types.FrameType | None = sys._current_frames().get(thread_id)
    where = ""
    if frame is not None:
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
    while frame is not None:
        if frame.f_code is execute.__code__:
            found = frame.f_locals.get("execution")
            return (found if isinstance(found, Execution) else None), where
        frame = frame.f_back
    return None, where


class Lifeline:
    """Keeps this node's row in ``oban_nodes`` fresh from a thread, while the node deserves it."""

    def __init__(
        self,
        driver: Driver,
        *,
        instance: str,
        node: str,
        interval: float,
        rescue_after: float,
        stall_limit: float,
        meta: Callable[[], str],
        on_rejoined: Callable[[], None],
        reporter: ErrorReporter | None = None,
    ) -> None:
        self.driver = driver
        self.instance = instance
        self.node = node
        self.interval = interval
        self.rescue_after = rescue_after
        self.stall_limit = stall_limit
        self.meta = meta
        self.on_rejoined = on_rejoined
        #: Failed heartbeats and a stalled loop are reported to ``on_error`` (handed to the main loop).
        self.reporter = reporter or ErrorReporter()
        self.lease = max(rescue_after - interval, rescue_after / 2)
        self.last_beat: float | None = None  # monotonic time a successful heartbeat was sent
        self.healthy_since: float | None = None
        self.loop_seen = time.monotonic()  # the main loop's last tick
        self.beats = 0
        self.lapsed = False  # the lease ran out at some point since the loop last looked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._linger: Callable[[], bool] | None = None
        self._linger_since: float | None = None
        self._sent_meta: str | None = None  # the meta the stored row has
        self._conn: Any = None
        self._down = False
        self._stalled = False
        self._reported = 0.0  # how long the loop had been blocked when last reported
        self._watched = time.monotonic()  # this thread's last watch

    # -- control (main loop) -----------------------------------------------------------------------

    def start(self, first_beat_at: float, meta: str | None = None) -> None:
        """Start beating (the first heartbeat, with ``meta``, was written by the node at
        ``first_beat_at``)."""
        self._sent_meta = meta
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.last_beat = self.healthy_since = first_beat_at
        self.loop_seen = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="oban-lifeline", daemon=True)
        self._thread.start()

    def lease_age(self) -> float:
        return float("inf") if self.last_beat is None else time.monotonic() - self.last_beat

    def linger(self, until: Callable[[], bool]) -> None:
        """Keep beating after stop() until ``until()`` is true (stuck job bodies), then deregister."""
        self._linger = until

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._linger is None:
            # A heartbeat stuck on a dead socket is not worth waiting for: the thread is a daemon.
            await asyncio.to_thread(self._thread.join, 1.0)

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # pragma: no cover - the lifeline must never take the process down
            log.exception("node %s: lifeline failed", self.node)
            self.reporter.report(exc, "lifeline", "thread", final=True)

    async def _main(self) -> None:
        next_beat = time.monotonic() + self.interval
        try:
            while True:
                if self._stop.is_set() and (self._linger is None or self._lingered()):
                    break
                now = time.monotonic()
                try:
                    self._watch(now)
                    if now >= next_beat:
                        next_beat = now + self.interval
                        if self._deserves_beat(now):
                            await self._beat()
                except Exception:  # pragma: no cover - a bug here must not end the heartbeats
                    log.exception("node %s: lifeline step failed", self.node)
                await asyncio.sleep(WATCH_INTERVAL)
            if self._linger is not None:
                log.info("node %s: the last stuck job body ended; deregistering", self.node)
                await self._query("node_delete", instance=self.instance)
        finally:
            if self._conn is not None:
                self._conn.terminate()

    def _lingered(self) -> bool:
        """Done lingering: the stuck bodies ended, their loop is gone (nothing can run them), or an
        hour has passed (a body that old is treated as dead; other nodes may then rescue its job)."""
        assert self._linger is not None
        if self._linger_since is None:
            self._linger_since = time.monotonic()
        loop_gone = self._loop is None or self._loop.is_closed()
        return self._linger() or loop_gone or time.monotonic() - self._linger_since > MAX_LINGER

    def _deserves_beat(self, now: float) -> bool:
        """A node whose loop has not turned for ``stall_limit`` no longer counts as alive."""
        if self._stop.is_set():
            return True  # lingering: the loop may be done, the stuck bodies are not
        stalled = now - self.loop_seen > self.stall_limit
        if stalled and not self._stalled:
            message = (
                f"node {self.node}: event loop blocked for over {self.stall_limit:.0f}s; heartbeats stop so "
                "other nodes can rescue its jobs"
            )
            log.error("%s", message, extra={"node": self.node})
            self.reporter.report(RuntimeError(message), "lifeline", "event_loop")
        elif self._stalled and not stalled:
            self.reporter.recovered("lifeline", "event_loop")
        self._stalled = stalled
        return not stalled

    def _watch(self, now: float) -> None:
        if now - self._watched > BLOCKED_AFTER:
            # This thread did not run either: the whole process was frozen (SIGSTOP, a VM pause), which
            # is not the loop's fault. Measure the loop from here on.
            self.loop_seen = max(self.loop_seen, now)
        self._watched = now
        blocked = now - self.loop_seen
        if blocked < BLOCKED_AFTER or self._stop.is_set():
            return
        # Once after a second, then every 10 s while it lasts.
        if self._reported and blocked - self._reported < 10.0:
            return
        self._reported = blocked
        execution, where = find_blocker(self._loop_thread)
        if execution is not None:
            job = execution.job
            log.warning(
                "event loop blocked for %.1fs by job %s (%s) at %s: async jobs must not call blocking code "
                "(use `def process` for blocking work)",
                blocked,
                job.id,
                job.worker,
                scrub(where),
                extra={
                    "job_id": job.id,
                    "worker": job.worker,
                    "queue": job.queue,
                    "blocked_s": round(blocked, 1),
                },
            )
        else:
            log.warning(
                "event loop blocked for %.1fs at %s", blocked, scrub(where), extra={"blocked_s": blocked}
            )

    def loop_turned(self, now: float) -> None:
        """Called by the main loop on every tick."""
        self.loop_seen = now
        self._reported = 0.0

    async def _beat(self) -> None:
        sent = time.monotonic()
        if self.last_beat is not None and sent - self.last_beat > self.lease:
            # The lease ran out before this beat (a freeze, an outage): tell the loop even if this beat
            # succeeds before the loop's next tick, since the node's jobs may have been rescued.
            self.lapsed = True
        try:
            text = self.meta()
            rejoined = await self._query(
                "node_heartbeat",
                instance=self.instance,
                node=self.node,
                meta=None if text == self._sent_meta else text,  # sent only when it changed
            )
        except Exception as exc:
            self.healthy_since = None
            if not self._down:
                log.warning(
                    "node %s: heartbeat failed: %s: %s", self.node, type(exc).__name__, scrub(str(exc), 300)
                )
                self.reporter.report(exc, "lifeline", "heartbeat")
            self._down = True
            return
        if self._down:
            log.info("node %s: heartbeats resumed", self.node)
            self.reporter.recovered("lifeline", "heartbeat")
        self._down = False
        self.beats += 1
        self.last_beat = sent
        if self.healthy_since is None:
            self.healthy_since = sent
        self._sent_meta = text if not rejoined else None
        if rejoined and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_rejoined)
            except RuntimeError:  # the main loop is closed
                pass

    async def _query(self, name: QueryName, **params: Any) -> Any:
        query = self.driver.queries[name]
        timeout = max(2.0, min(self.interval * 2, 10.0))
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = None
                self._conn = await asyncio.wait_for(self.driver.connect_dedicated(), timeout)
            return await self._conn.fetchval(query.text, *query.args(params), timeout=timeout)
        except (Exception, asyncio.CancelledError):
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            raise


class Revocable(Protocol):
    """What the lease guard stops and resumes: the node's producers (a :class:`~..queues.QueueSet`)."""

    def revoke(self) -> int: ...

    def notify_all(self) -> None: ...


class LeaseGuard:
    """On the event loop: every ``WATCH_INTERVAL`` tells the lifeline the loop turns, and stops every
    running job once the last heartbeat is older than the lease, or when a heartbeat found the node
    presumed dead (other nodes may have rescued its jobs). Claims resume when heartbeats do.

    ``on_tick`` also runs every tick (the node refreshes its meta from it, on the loop); ``active``
    says whether the node is running (a node that is stopping ignores a late "rejoined").
    """

    def __init__(
        self,
        lifeline: Lifeline,
        queues: Revocable,
        *,
        node: str,
        on_tick: Callable[[float], None],
        active: Callable[[], bool],
    ) -> None:
        self.lifeline = lifeline
        self.queues = queues
        self.node = node
        self.on_tick = on_tick
        self.active = active
        self.revoked = False
        self._handle: asyncio.TimerHandle | None = None

    def may_claim(self) -> bool:
        """False while the lease may have run out: claims made then could be rescued at once."""
        return not self.revoked

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        # Rescheduled first: a tick that failed half-way must not end the guard (the lifeline would
        # then see a stalled loop and stop heartbeating, while this node never revoked its jobs).
        self._handle = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._tick)
        now = time.monotonic()
        self.lifeline.loop_turned(now)
        try:
            self.on_tick(now)
        except Exception:
            log.exception("node %s: refreshing the node meta failed", self.node)
        age = self.lifeline.lease_age()
        lapsed, self.lifeline.lapsed = self.lifeline.lapsed, False
        if age > self.lifeline.lease or lapsed:
            if not self.revoked:
                self.revoked = True
                running = self.queues.revoke()
                log.warning(
                    "node %s: no heartbeat for %.1fs (lease %.1fs); it may be presumed dead, so its %d "
                    "running job(s) were stopped and go back to the queue",
                    self.node,
                    age,
                    self.lifeline.lease,
                    running,
                    extra={"node": self.node},
                )
        elif self.revoked:
            self.revoked = False
            log.info("node %s: heartbeats resumed; taking jobs again", self.node, extra={"node": self.node})
            self.queues.notify_all()

    def rejoined(self) -> None:
        """A heartbeat had to re-create this node's row: another node presumed it dead and may have run
        its jobs. Stop them now; their acks go back to the queue only where the claim is still ours."""
        if not self.active():
            return
        running = self.queues.revoke()
        log.warning(
            "node %s had been presumed dead (no heartbeat for %ss); its %d running job(s) were stopped, as "
            "they may have been rescued and run elsewhere",
            self.node,
            self.lifeline.rescue_after,
            running,
            extra={"node": self.node},
        )
