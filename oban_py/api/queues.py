"""Queue control on the facade: pause, resume, scale, start and stop, the cluster overview, and draining
a queue."""

from __future__ import annotations

import json
import os

from ..errors import LimitOptionsError, ValidationError
from ..overview import Overview, overview
from ..runtime.drain import drain
from ..runtime.queues import QueueState
from ..validation import validate_queue, validate_queue_limits, validate_queue_pattern
from .base import EngineBase

__all__ = ["QueuesAPI"]


class QueuesAPI(EngineBase):
    @property
    def is_leader(self) -> bool:
        """True while this instance's node holds the cluster's leader lease (pruning and sweeps run
        there)."""
        return self.node is not None and self.node.is_leader

    def queue_states(self) -> dict[str, QueueState]:
        """What each queue running in this process is doing now: limit, paused, running jobs, the
        queues it takes from and their global limits (no database query; ``check_queues`` gives the
        whole cluster)."""
        return self.node.queue_states() if self.node is not None else {}

    async def _control(
        self,
        queue: str,
        node: str | None,
        *,
        paused: bool | None = None,
        limit: int | None = None,
        global_limit: int | None = None,
        started: bool | None = None,
    ) -> None:
        if started is None:
            validate_queue_pattern(queue)
        else:
            validate_queue(queue)  # a producer serves a name; a selection belongs in the config
        if node is not None and (not isinstance(node, str) or not node.strip()):
            raise ValidationError("node", node, "must be a non-empty node name (or None: every node)")
        validate_queue_limits(limit, global_limit)
        await self.driver.execute(
            "queue_control_upsert",
            name=queue,
            node=node or "",
            paused=paused,
            local_limit=limit,
            global_limit=global_limit,
            started=started,
        )
        await self.driver.notify(
            self.driver.signal_channel, json.dumps({"kind": "control", "queue": queue, "node": node})
        )
        if self.node is not None and (node is None or node == self.node.name):
            await self.node.refresh_controls()

    async def pause_queue(self, queue: str, *, node: str | None = None) -> None:
        """Stop fetching from ``queue`` on every node (or one); running jobs finish. Survives restarts."""
        await self._control(queue, node, paused=True)

    async def resume_queue(self, queue: str, *, node: str | None = None) -> None:
        await self._control(queue, node, paused=False)

    async def scale_queue(
        self,
        queue: str,
        *,
        limit: int | None = None,
        global_limit: int | None = None,
        node: str | None = None,
    ) -> None:
        """Change the per-node ``limit`` of ``queue`` on every node (or one), and/or its cluster-wide
        ``global_limit``. Stored in the database: survives restarts and wins over the config."""
        if limit is None and global_limit is None:
            raise LimitOptionsError("limit", None, "give limit and/or global_limit")
        if global_limit is not None and node is not None:
            raise LimitOptionsError("node", node, "global_limit applies to every node; do not name one")
        await self._control(queue, node, limit=limit, global_limit=global_limit)

    async def start_queue(self, queue: str, *, limit: int | None = None, node: str | None = None) -> None:
        """Run ``queue`` on every node with queues, or on ``node``.

        Stored in ``oban_queues``: a node started or restarted later runs it too, until ``stop_queue``.
        Takes effect within a second (at once where the signal is heard). A node that starts it runs
        ``limit`` jobs at once (default: its configured limit, else 10). A queue already running keeps
        its producer and, without ``limit``, its limit; a ``limit`` given is stored like
        ``scale_queue``'s, so it applies where the queue already runs too.
        """
        await self._control(queue, node, limit=limit, started=True)

    async def stop_queue(self, queue: str, *, node: str | None = None) -> None:
        """Stop running ``queue`` on every node (or ``node``), configured or started at run time.

        Like a shutdown: fetching stops, running jobs get ``shutdown_timeout`` to finish, then are
        put back in the queue; nothing is lost. Stored, so restarts keep it stopped until
        ``start_queue``. Jobs stay in the queue for whoever runs it.
        """
        await self._control(queue, node, started=False)

    async def check_queues(self, *, limit_keys: int = 50) -> Overview:
        """Every queue (jobs by state, nodes running it and their limits) and the busiest limit keys
        (running and waiting jobs), across the cluster."""
        return await overview(self.driver, limit_keys=limit_keys)

    # -- running jobs inline ----------------------------------------------------------------------

    async def drain_queue(
        self, queue: str = "default", *, with_scheduled: bool = False, limit: int = 10_000
    ) -> dict[str, int]:
        """Run the queue's available jobs in this task, one at a time, until none are left.

        Meant for tests and scripts: no producer is needed. ``with_scheduled`` first makes the queue's
        scheduled and retryable jobs due now (repeatedly, so retries run too, up to ``limit`` jobs).
        Returns counts by final state.
        """
        validate_queue(queue)
        return await drain(
            self.driver,
            queue,
            node=str(self.config.node or os.getpid()),
            heartbeat_interval=self.config.heartbeat_interval,
            with_scheduled=with_scheduled,
            limit=limit,
        )
