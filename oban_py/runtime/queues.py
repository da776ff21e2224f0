"""The producers of one node, as one set: routing wake-ups, interrupts and controls to them.

A producer serves one queue, or an ordered selection of queues (``queues = ["mail", "mail_*"]``) whose
wildcard patterns are resolved against the queues that have jobs (:meth:`QueueSet.expand`). The node's
duties (poller, controls, reconciler, lease guard) act on the set, never on a producer's internals.

Queues started and stopped at run time (``start_queue``/``stop_queue``, stored in ``oban_queues``) are
applied by the controls duty through :meth:`QueueSet.apply_started`. A stopped producer drains like
shutdown (running jobs get ``shutdown_timeout``); until it has, it is *retiring*: it still counts for
:meth:`held`, interrupts and :meth:`stuck`, so the reconciler never takes back a job it still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import QueueConfig
from .claims import Target
from .execution import Execution
from .producer import Producer, ProducerContext

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["QueueSet", "QueueState"]

log = logging.getLogger("oban_py.node")


@dataclass(frozen=True)
class QueueState:
    """What a queue's producer on this node is doing now (``Oban.queue_states()``)."""

    name: str
    limit: int
    paused: bool
    running: int
    #: The queues it takes jobs from, in order (one, or a selection's resolved list).
    queues: tuple[str, ...]
    #: Cluster-wide limits in force, by queue (``None``: none).
    global_limits: dict[str, int | None]


class QueueSet:
    def __init__(self, config: Config, ctx: ProducerContext) -> None:
        self.config = config
        self.ctx = ctx
        #: What each producer was made from: its [queues] table, or ``limit`` of a ``start_queue``.
        self.specs: dict[str, QueueConfig] = dict(config.queues)
        self.producers: dict[str, Producer] = {}
        self.retiring: dict[Producer, asyncio.Task[None]] = {}
        self.stopped_stuck: list[Execution] = []
        self.started = self.closed = False
        self.shutdown_timeout = config.shutdown_timeout
        for queue, qc in config.queues.items():
            self.producers[queue] = self._producer(queue, qc)

    def __iter__(self) -> Iterator[Producer]:
        return iter(self.producers.values())

    def start(self) -> None:
        """Start every producer; those added later (``start_queue``) start as they are added."""
        self.started = True
        for producer in self.producers.values():
            producer.start()

    async def stop(self, timeout: float) -> None:
        """Drain every producer, and wait for those ``stop_queue`` is stopping; none starts after."""
        self.started, self.closed = False, True
        await asyncio.gather(
            *(p.stop(timeout) for p in list(self.producers.values())),
            *self.retiring.values(),
        )

    def _all(self) -> list[Producer]:
        return [*self.producers.values(), *self.retiring]

    def target(self, queue: str) -> Target:
        """A queue with the limits configured for it on this node (in its own [queues.<name>] table)."""
        qc = self.config.queues.get(queue)
        if qc is None or qc.queues is not None:
            return Target(queue)
        return Target(queue, qc.global_limit, qc.rate_limit)

    def _producer(self, name: str, qc: QueueConfig) -> Producer:
        if qc.queues is None:
            return Producer(self.ctx, name, qc.limit, paused=qc.paused, targets=[self.target(name)])
        exact = [self.target(q) for q in qc.queues if not q.endswith("*")]
        patterns = qc.queues if any(q.endswith("*") for q in qc.queues) else None
        return Producer(self.ctx, name, qc.limit, paused=qc.paused, targets=exact, patterns=patterns)

    # -- started and stopped at run time ------------------------------------------------------------

    def apply_started(self, wanted: dict[str, tuple[bool, int | None]]) -> list[str]:
        """Apply stored ``start_queue``/``stop_queue`` commands: ``{queue: (started, limit)}``.

        A started queue this node does not run gets a producer (``limit``, else 10); a stopped one it
        runs is retired. Returns the queues changed. A queue with no command keeps its config.
        """
        changed: list[str] = []
        if self.closed:
            return changed  # the node is stopping: leave the set as it is
        for name, (started, limit) in wanted.items():
            if started and name not in self.producers:
                qc = self.config.queues.get(name) or QueueConfig(limit=limit or 10)
                self.specs[name] = qc
                producer = self.producers[name] = self._producer(name, qc)
                if self.started:
                    producer.start()
                log.info("queue %s started (limit %s)", name, producer.limit, extra={"queue": name})
                changed.append(name)
            elif not started and name in self.producers:
                self._retire(name)
                changed.append(name)
        return changed

    def _retire(self, name: str) -> None:
        producer = self.producers.pop(name)
        self.specs.pop(name, None)
        if not self.started:
            return  # never ran: nothing to drain
        log.info("queue %s stopping: running jobs finish first", name, extra={"queue": name})

        async def stop() -> None:
            try:
                await producer.stop(self.shutdown_timeout)
            except Exception:
                log.exception("queue %s: stopping failed", name, extra={"queue": name})
            finally:
                self.stopped_stuck.extend(producer.stuck)
                self.retiring.pop(producer, None)
                log.info("queue %s stopped", name, extra={"queue": name})

        self.retiring[producer] = asyncio.get_running_loop().create_task(stop(), name=f"oban-stop-{name}")

    # -- routing ----------------------------------------------------------------------------------

    def serving(self, queue: str) -> list[Producer]:
        return [p for p in self.producers.values() if queue in p.queues]

    def wake(self, queue: str) -> bool:
        """Wake the producers serving ``queue``. False if none does but a wildcard selection could
        (the caller re-resolves patterns: a new queue has appeared)."""
        serving = self.serving(queue)
        for producer in serving:
            producer.notify()
        if serving:
            return True
        return not any(
            p.patterns and any(x.endswith("*") and queue.startswith(x[:-1]) for x in p.patterns)
            for p in self.producers.values()
        )

    def notify_all(self) -> None:
        for producer in self.producers.values():
            producer.notify()

    @property
    def has_patterns(self) -> bool:
        return any(p.patterns for p in self.producers.values())

    def any_active(self) -> bool:
        return any(not p.paused for p in self.producers.values())

    def expand(self, available: list[str]) -> None:
        """Resolve every selection's patterns against the queues that have jobs, keeping list order."""
        for producer in self.producers.values():
            if producer.patterns is None:
                continue
            known = {t.queue: t for t in producer.targets}
            ordered: list[Target] = []
            for pattern in producer.patterns:
                if pattern.endswith("*"):
                    names = sorted(q for q in available if q.startswith(pattern[:-1]))
                else:
                    names = [pattern]
                for name in names:
                    if all(t.queue != name for t in ordered):
                        ordered.append(known.get(name) or self.target(name))
            if [t.queue for t in ordered] != producer.queues:
                producer.targets = ordered
                producer.notify()

    # -- running jobs -----------------------------------------------------------------------------

    def held(self) -> set[int]:
        """Ids of every job a producer of this node holds a claim on."""
        held = {i for p in self._all() for i in p.held()}
        # A stopped queue's job whose body ignored its interrupt keeps its claim while it runs. Once
        # that body ends, its outcome has no producer to write it: the reconciler puts the job back and
        # it runs again (at least once, as for a body stuck at shutdown; docs/guarantees.md).
        return held | {e.job.id for e in self._still_stuck() if e.job.id is not None}

    def _still_stuck(self) -> list[Execution]:
        """Stopped queues' stuck executions whose bodies still run (the ended ones are dropped)."""
        self.stopped_stuck = [e for e in self.stopped_stuck if e.body_alive]
        return self.stopped_stuck

    def interrupt(self, job_id: int, reason: str) -> bool:
        return any(p.interrupt(job_id, reason) for p in self._all())

    def revoke(self) -> int:
        """Stop every running job (the lease may be lost); returns how many ran."""
        return sum(p.revoke() for p in self._all())

    def stuck(self) -> list[Execution]:
        return [*self._still_stuck(), *(e for p in self._all() for e in p.stuck)]

    # -- state ------------------------------------------------------------------------------------

    def states(self) -> dict[str, QueueState]:
        return {
            name: QueueState(
                name=name,
                limit=p.limit,
                paused=p.paused,
                running=p.running,
                queues=tuple(p.queues),
                global_limits={t.queue: t.global_limit for t in p.targets},
            )
            for name, p in self.producers.items()
        }

    def meta(self) -> dict[str, Any]:
        """The queues part of this node's ``oban_nodes.meta`` (read by ``check_queues``)."""
        return {
            q: {
                "limit": p.limit,
                "paused": p.paused,
                "running": p.running,
                "targets": [
                    {
                        "queue": t.queue,
                        "global_limit": t.global_limit,
                        "rate_limit": t.rate.model_dump() if t.rate else None,
                    }
                    for t in p.targets
                ],
            }
            for q, p in self.producers.items()
        }
