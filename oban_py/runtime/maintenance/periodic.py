"""The shared lifecycle of a periodic duty.

Each maintenance duty (rescue, staging, polling, pruning, the unique sweep, queue controls, ...)
runs on a :class:`Periodic`: a ``run_once`` coroutine called every ``interval`` seconds (with jitter, so
nodes spread out), optionally only while this node holds the leader lease. ``stop()`` is idempotent
and safe before ``start()``. A lost database connection is logged once and retried on the next tick;
any other error is logged with its traceback and the service keeps going. Either is reported to
``on_error`` once per episode (until a run succeeds again). Each run has a
``deadline``: a statement stuck on a dead socket is abandoned (its connection discarded) instead of
stopping the service for good.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from ...errors import DatabaseUnavailable
from ...hooks.reporting import ErrorReporter

__all__ = ["Periodic"]

log = logging.getLogger("oban_py.maintenance")


class Periodic:
    def __init__(
        self,
        name: str,
        interval: float,
        run_once: Callable[[], Awaitable[object]],
        *,
        leader_only: bool = False,
        is_leader: Callable[[], bool] = lambda: True,
        jitter: float = 0.1,
        run_at_start: bool = True,
        deadline: float = 30.0,
        reporter: ErrorReporter | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.run_once = run_once
        self.leader_only = leader_only
        self.is_leader = is_leader
        self.jitter = jitter
        self.run_at_start = run_at_start
        self.deadline = deadline
        self.reporter = reporter or ErrorReporter()
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._down = False
        self._failing = False  # a run failed since the last success (an on_error episode is open)
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"oban-{self.name}")

    def kick(self) -> None:
        """Run as soon as possible instead of waiting for the next tick."""
        self._kick.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        while not task.done():
            # Again if need be: before Python 3.12, asyncio.wait_for can swallow a cancel that lands
            # just as its inner await completes, and the loop would go on (stop() would never return).
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("%s stopped with an error", self.name, exc_info=error)
            self.reporter.report(error, "duty", self.name, final=True)

    async def _loop(self) -> None:
        first = True
        while not self._stopping:
            if not (first and self.run_at_start):
                delay = self.interval * random.uniform(1 - self.jitter, 1 + self.jitter)
                try:
                    await asyncio.wait_for(self._kick.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            first = False
            self._kick.clear()
            if self.leader_only and not self.is_leader():
                continue
            try:
                await asyncio.wait_for(self.run_once(), self.deadline)
                if self._down:
                    log.info("%s: database reachable again", self.name)
                self._down = False
                if self._failing:
                    self._failing = False
                    self.reporter.recovered("duty", self.name)
            except asyncio.CancelledError:
                raise
            except (DatabaseUnavailable, asyncio.TimeoutError) as exc:
                if not self._down:
                    reason = (
                        exc if isinstance(exc, DatabaseUnavailable) else f"took over {self.deadline:.0f}s"
                    )
                    log.warning("%s: %s", self.name, reason)
                self._down = True
                self._failed(exc)
            except Exception as exc:
                log.exception("%s failed; retrying in %.1fs", self.name, self.interval)
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self._failing = True
        self.reporter.report(exc, "duty", self.name)
