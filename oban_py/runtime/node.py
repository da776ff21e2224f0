"""A running engine process: it supervises its producers and its maintenance duties.

Lifecycle: ``start()`` registers this process in ``oban_nodes`` (so its claims are covered by a live
heartbeat before it makes any), applies stored queue controls, starts the lifeline, the notifier (and
waits for its first LISTEN attempt, so a control sent right after start is heard), the duties and one
producer per queue. ``stop()`` drains the producers (see :meth:`Producer.stop`), stops the duties,
resigns leadership and removes the node row, all bounded in time.

The duties live in :mod:`.maintenance`, one module each; the producers in a :class:`QueueSet`. The
facade talks to a node only through its public methods: :meth:`apply_signal`,
:meth:`refresh_controls`, :meth:`queue_states`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import DatabaseUnavailable
from ..hooks.lifecycle import resolve_hooks
from ..hooks.reporting import ErrorReporter
from .claims import ClaimGate
from .events import Events
from .execution import Execution
from .maintenance import DutyContext, LeaseGuard, Lifeline
from .maintenance.lifeline import heartbeat
from .maintenance.roster import Roster
from .notifier import Notifier
from .producer import ProducerContext
from .queues import QueueSet, QueueState

if TYPE_CHECKING:
    from ..config import Config
    from ..db.driver import Driver

__all__ = ["Node", "default_node_name"]

log = logging.getLogger("oban_py.node")

DEREGISTER_TIMEOUT = 2.0
# How long start() waits for the notifier's first LISTEN attempt (it keeps trying after that).
LISTEN_WAIT = 5.0


def default_node_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


class Node:
    def __init__(
        self,
        driver: Driver,
        config: Config,
        *,
        events: Events | None = None,
        on_error: Sequence[Callable[..., Any]] | None = None,
    ) -> None:
        self.driver = driver
        self.config = config
        self.name = config.node or default_node_name()
        handlers = resolve_hooks(config, "on_error") if on_error is None else on_error
        #: Where the node's components report their own failures (``on_error``, docs/hooks.md).
        self.reporter = ErrorReporter(handlers, node=self.name)
        self.instance = str(uuid.uuid4())
        self.events = events or Events()
        self.stuck: list[Execution] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._meta_text: str | None = None
        self._meta_at = 0.0
        self.gate = ClaimGate()
        self.lifeline = Lifeline(
            driver,
            instance=self.instance,
            node=self.name,
            interval=config.heartbeat_interval,
            rescue_after=config.rescue_after,
            stall_limit=max(60.0, 2 * config.rescue_after),
            meta=lambda: self._meta_text or "{}",  # read from the lifeline's thread
            on_rejoined=lambda: self.guard.rejoined(),
            reporter=self.reporter,
        )
        self.queues = QueueSet(
            config,
            ProducerContext(
                driver=driver,
                node=self.name,
                instance=self.instance,
                poll_interval=config.poll_interval,
                spawn=self.spawn,
                gate=self.gate,
                reconcile=lambda: self.roster.reconciler.kick(),
                may_claim=lambda: self.guard.may_claim(),
                reporter=self.reporter,
            ),
        )
        self.guard = LeaseGuard(
            self.lifeline,
            self.queues,
            node=self.name,
            on_tick=self._refresh_meta,
            active=lambda: self._started,
        )
        self.notifier: Notifier | None = None
        if config.notifier == "listen":
            self.notifier = Notifier(
                driver,
                on_insert=self._on_insert,
                on_signal=self.apply_signal,
                on_connect=self._on_connect,
                reporter=self.reporter,
            )
        ctx = DutyContext(
            driver,
            self.name,
            self.instance,
            self.events,
            wake=self._wake,
            is_leader=self._is_leader,
            reporter=self.reporter,
        )
        self.roster = Roster.build(
            ctx, config, queues=self.queues, gate=self.gate, healthy_since=lambda: self.lifeline.healthy_since
        )
        self.duties, self.controls, self.leader = self.roster.all, self.roster.controls, self.roster.leader

    @property
    def is_leader(self) -> bool:
        return self.leader.is_leader

    def _is_leader(self) -> bool:
        return self.leader.is_leader

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.reporter.bind()
        self._meta_text = self._meta()
        sent = time.monotonic()
        await heartbeat(self.driver, instance=self.instance, node=self.name, meta=self._meta_text)
        try:
            await self.controls.run_once()
            self.lifeline.start(sent, self._meta_text)
            self._meta_at = sent
            self.guard.start()
            if self.notifier is not None:
                self.notifier.start()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.notifier.tried.wait(), LISTEN_WAIT)
            for duty in self.duties:
                duty.start()
            self.queues.start()
        except BaseException:
            # Cancelled or failed part-way (a SIGTERM while LISTEN is slow, a caller's timeout): undo
            # what runs, or a heartbeat thread would keep a dead node looking alive.
            await self._abort_start()
            raise
        self._started = True
        log.info(
            "node %s started: queues %s",
            self.name,
            ", ".join(
                f"{q}={s.limit}{' (paused)' if s.paused else ''}" for q, s in self.queue_states().items()
            )
            or "none",
            extra={"node": self.name, "instance": self.instance},
        )
        self.events.emit("node.started", node=self.name)

    async def _abort_start(self) -> None:
        """Stop what a failed start() had started; never raises (the start's own error wins)."""
        try:
            self.guard.stop()
            for duty in self.duties:
                await duty.stop()
            if self.notifier is not None:
                await self.notifier.stop()
            await self.lifeline.stop()
            await asyncio.wait_for(
                self.driver.execute("node_delete", instance=self.instance), DEREGISTER_TIMEOUT
            )
        except BaseException:
            log.debug("node %s: cleanup after a failed start was incomplete", self.name, exc_info=True)

    async def stop(self, shutdown_timeout: float | None = None) -> None:
        if not self._started:
            return
        self._started = False
        timeout = self.config.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        await self.queues.stop(timeout)
        self.stuck = self.queues.stuck()
        for duty in self.duties:
            await duty.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.stuck:
            # Their bodies still run: keep heartbeating for them (from the lifeline's thread) until
            # they end, so no other node starts them meanwhile; the thread deregisters then.
            stuck = list(self.stuck)
            self.lifeline.linger(lambda: not any(e.body_alive for e in stuck))
        self.guard.stop()
        await self.lifeline.stop()  # first: a heartbeat in flight would re-create the row
        try:
            await asyncio.wait_for(self._deregister(), DEREGISTER_TIMEOUT)
        except (DatabaseUnavailable, asyncio.TimeoutError) as exc:
            log.warning("node %s: could not deregister (%s); other nodes will time it out", self.name, exc)
        self.leader.is_leader = False
        await self.reporter.flush()
        log.info("node %s stopped", self.name, extra={"node": self.name})
        self.events.emit("node.stopped", node=self.name)

    async def _deregister(self) -> None:
        await self.leader.resign()
        if not self.stuck:
            await self.driver.execute("node_delete", instance=self.instance)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background coroutine owned by this node (errors logged, cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            exc = None if t.cancelled() else t.exception()
            if isinstance(exc, DatabaseUnavailable):
                log.warning("background task: %s", exc)
            elif exc is not None:
                log.error("background task failed", exc_info=exc)
                self.reporter.report(exc, "node", "background")

        task.add_done_callback(done)

    # -- what the facade uses ---------------------------------------------------------------------

    def apply_signal(self, message: dict[str, Any]) -> None:
        """Act on a signal (``oban_signal`` NOTIFY payload, or the facade's own, applied locally first):
        ``control`` (re-read queue controls: pause, scale, start, stop), ``interrupt`` (stop running
        jobs: cancel/delete), ``leader`` (the leader resigned: contend now)."""
        kind = message.get("kind")
        if kind == "control":
            node = message.get("node")
            if not node or node == self.name:
                self.controls.kick()
        elif kind == "interrupt":
            reason = str(message.get("reason", "cancelled"))
            for job_id in message.get("ids", []):
                self.queues.interrupt(int(job_id), reason)
        elif kind == "leader" and not self.is_leader:
            self.leader.kick()

    async def refresh_controls(self) -> None:
        """Read and apply stored queue controls now (``pause_queue`` and friends call it for this node)."""
        await self.controls.run_once()

    def queue_states(self) -> dict[str, QueueState]:
        return self.queues.states()

    # -- notifications ----------------------------------------------------------------------------

    def _on_insert(self, queue: str) -> None:
        if not self.queues.wake(queue):
            self.controls.kick()  # a new queue for a wildcard selection

    def _wake(self, queues: Iterable[str]) -> None:
        for queue in queues:
            self._on_insert(queue)

    def _on_connect(self) -> None:
        """(Re)connected to LISTEN: inserts notified during the gap were missed; one poll finds them."""
        self.roster.poller.kick()
        assert self.notifier is not None
        self.events.emit("notifier.listening", reconnects=self.notifier.reconnects)

    # -- meta -------------------------------------------------------------------------------------

    def _meta(self) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "version": __version__,
                "queues": self.queues.meta(),
            }
        )

    def _refresh_meta(self, now: float) -> None:
        """On the loop, once per heartbeat interval: the meta the lifeline's thread sends."""
        if now - self._meta_at >= self.config.heartbeat_interval:
            self._meta_at = now
            self._meta_text = self._meta()
