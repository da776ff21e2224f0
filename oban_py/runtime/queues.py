"""The producers of one node, as one set: routing wake-ups, interrupts and controls to them.

A producer serves one queue, or an ordered selection of queues (``queues = ["mail", "mail_*"]``) whose
wildcard patterns are resolved against the queues that have jobs (:meth:`QueueSet.expand`). The node's
duties (poller, controls, reconciler, lease guard) act on the set, never on a producer's internals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .claims import Target
from .execution import Execution
from .producer import Producer, ProducerContext

if TYPE_CHECKING:
    from ..config import Config, QueueConfig

__all__ = ["QueueSet", "QueueState"]


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
        self.producers: dict[str, Producer] = {}
        for queue, qc in config.queues.items():
            self.producers[queue] = self._producer(ctx, queue, qc)

    def __iter__(self) -> Iterator[Producer]:
        return iter(self.producers.values())

    def target(self, queue: str) -> Target:
        """A queue with the limits configured for it on this node (in its own [queues.<name>] table)."""
        qc = self.config.queues.get(queue)
        if qc is None or qc.queues is not None:
            return Target(queue)
        return Target(queue, qc.global_limit, qc.rate_limit)

    def _producer(self, ctx: ProducerContext, name: str, qc: QueueConfig) -> Producer:
        if qc.queues is None:
            return Producer(ctx, name, qc.limit, paused=qc.paused, targets=[self.target(name)])
        exact = [self.target(q) for q in qc.queues if not q.endswith("*")]
        patterns = qc.queues if any(q.endswith("*") for q in qc.queues) else None
        return Producer(ctx, name, qc.limit, paused=qc.paused, targets=exact, patterns=patterns)

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
        return {i for p in self.producers.values() for i in p.held()}

    def interrupt(self, job_id: int, reason: str) -> bool:
        return any(p.interrupt(job_id, reason) for p in self.producers.values())

    def revoke(self) -> int:
        """Stop every running job (the lease may be lost); returns how many ran."""
        return sum(p.revoke() for p in self.producers.values())

    def stuck(self) -> list[Execution]:
        return [e for p in self.producers.values() for e in p.stuck]

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
