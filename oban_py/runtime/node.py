"""A running engine process: its producers and its maintenance services.

Lifecycle: ``start()`` registers this process in ``oban_nodes`` (so its claims are covered by a live
heartbeat before it makes any), applies stored queue controls, starts the notifier, the services and
one producer per queue. ``stop()`` drains the producers (see :class:`Producer.stop`), stops the
services, resigns leadership and removes the node row.

Services (all intervals configurable):

* **lifeline** (:mod:`.lifeline`, a thread of its own): every ``heartbeat_interval`` refresh this
  node's heartbeat, whatever the event loop is doing; a tick on the loop stops every running job once
  the last heartbeat is older than the lease, and when a heartbeat finds the node was presumed dead.
* **rescuer**: every ``heartbeat_interval`` rescue jobs claimed by processes whose heartbeat is older
  than ``rescue_after``. A node that has just (re)connected waits ``rescue_after`` before rescuing
  anyone, so after a database outage the other nodes get the chance to heartbeat first.
* **poller**: every ``poll_interval`` one query finds the queues with available jobs and wakes their
  producers (the fallback for a missed NOTIFY, and for keyed slots freed on other nodes): idle cost
  does not grow with the number of queues.
* **reconciler**: after a fetch whose reply was lost (and every 10 s), put back jobs claimed by this
  node that none of its producers holds (see :class:`ClaimGate`).
* **stager**: every ``stage_interval`` move due scheduled/retryable jobs to available.
* **controls**: every second re-read paused/limit controls from ``oban_queues`` (the fallback for a
  missed NOTIFY).
* **leader** (lease in ``oban_leaders``) and, while leader, **pruner** and **unique sweep**.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import DatabaseUnavailable
from .executor import Execution
from .lifeline import WATCH_INTERVAL, Lifeline
from .notifier import Notifier
from .producer import ClaimGate, Producer, ProducerContext, Target
from .service import Periodic

if TYPE_CHECKING:
    from ..config import Config, QueueConfig
    from ..db.driver import Driver

__all__ = ["Node", "default_node_name"]

log = logging.getLogger("oban_py.node")

LEADER_NAME = "oban"
PRUNE_BATCH = 10_000
SWEEP_BATCH = 10_000
RESCUE_BATCH = 1_000
STAGE_BATCH = 10_000
RECONCILE_INTERVAL = 10.0
DEREGISTER_TIMEOUT = 2.0


def default_node_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


class Node:
    def __init__(self, driver: Driver, config: Config) -> None:
        self.driver = driver
        self.config = config
        self.name = config.node or default_node_name()
        self.instance = str(uuid.uuid4())
        self.is_leader = False
        self.producers: dict[str, Producer] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._revoked = False
        self._meta_text: str | None = None
        self.stuck: list[Execution] = []
        self.gate = ClaimGate()
        self.ctx = ProducerContext(
            driver=driver,
            node=self.name,
            instance=self.instance,
            poll_interval=config.poll_interval,
            spawn=self.spawn,
            gate=self.gate,
            reconcile=self.request_reconcile,
            may_claim=lambda: not self._revoked,
        )
        for queue, qc in config.queues.items():
            self.producers[queue] = self._producer(queue, qc)
        self.notifier: Notifier | None = None
        if config.notifier == "listen":
            self.notifier = Notifier(
                driver, on_insert=self._on_insert, on_signal=self._on_signal, on_connect=self._on_connect
            )
        leader = lambda: self.is_leader  # noqa: E731
        self.lifeline = Lifeline(
            driver,
            instance=self.instance,
            node=self.name,
            interval=config.heartbeat_interval,
            rescue_after=config.rescue_after,
            stall_limit=max(60.0, 2 * config.rescue_after),
            meta=self._meta_for_beat,
            on_rejoined=self._on_rejoined,
        )
        self.rescuer = Periodic("rescuer", config.heartbeat_interval, self._rescue, run_at_start=False)
        self.stager = Periodic("stager", config.stage_interval, self._stage)
        self.controls = Periodic("controls", 1.0, self._refresh_controls, run_at_start=False)
        self.poller = Periodic("poller", config.poll_interval, self._poll)
        self.reconciler = Periodic("reconciler", RECONCILE_INTERVAL, self._reconcile, run_at_start=False)
        self.services = [self.rescuer, self.stager, self.controls, self.poller, self.reconciler]
        if config.leadership:
            self.services.append(Periodic("leader", max(1.0, config.heartbeat_interval), self._elect))
            if config.prune_after:
                self.services.append(
                    Periodic(
                        "pruner",
                        config.prune_interval,
                        self._prune,
                        leader_only=True,
                        is_leader=leader,
                        deadline=300.0,
                    )
                )
            self.services.append(
                Periodic("unique-sweep", 10.0, self._sweep_unique, leader_only=True, is_leader=leader)
            )
            if config.vacuum_interval:
                self.services.append(
                    Periodic(
                        "vacuum",
                        config.vacuum_interval,
                        self._vacuum,
                        leader_only=True,
                        is_leader=leader,
                        deadline=300.0,
                    )
                )
        self._may_vacuum = True

    def _target(self, queue: str) -> Target:
        """A queue with the limits configured for it on this node (in its own [queues.<name>] table)."""
        qc = self.config.queues.get(queue)
        if qc is None or qc.queues is not None:
            return Target(queue)
        return Target(queue, qc.global_limit, qc.rate_limit)

    def _producer(self, name: str, qc: QueueConfig) -> Producer:
        if qc.queues is None:
            return Producer(self.ctx, name, qc.limit, paused=qc.paused, targets=[self._target(name)])
        exact = [self._target(q) for q in qc.queues if not q.endswith("*")]
        patterns = qc.queues if any(q.endswith("*") for q in qc.queues) else None
        return Producer(self.ctx, name, qc.limit, paused=qc.paused, targets=exact, patterns=patterns)

    def _serving(self, queue: str) -> list[Producer]:
        return [p for p in self.producers.values() if queue in p.queues]

    def _expand(self, producer: Producer, available: list[str]) -> None:
        """Resolve a selection's patterns against the queues that have jobs, keeping the list order."""
        assert producer.patterns is not None
        known = {t.queue: t for t in producer.targets}
        ordered: list[Target] = []
        for pattern in producer.patterns:
            if pattern.endswith("*"):
                names = sorted(q for q in available if q.startswith(pattern[:-1]))
            else:
                names = [pattern]
            for name in names:
                if all(t.queue != name for t in ordered):
                    ordered.append(known.get(name) or self._target(name))
        if [t.queue for t in ordered] != producer.queues:
            producer.targets = ordered
            producer.notify()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._meta_text = self._meta()
        sent = time.monotonic()
        await self.driver.fetchval(
            "node_heartbeat", instance=self.instance, node=self.name, meta=self._meta_text
        )
        await self._refresh_controls()
        self.lifeline.start(sent, self._meta_text)
        self._tick()
        if self.notifier is not None:
            self.notifier.start()
        for service in self.services:
            service.start()
        for producer in self.producers.values():
            producer.start()
        self._started = True
        log.info(
            "node %s started: queues %s",
            self.name,
            ", ".join(f"{q}={p.limit}{' (paused)' if p.paused else ''}" for q, p in self.producers.items())
            or "none",
            extra={"node": self.name, "instance": self.instance},
        )

    async def stop(self, shutdown_timeout: float | None = None) -> None:
        if not self._started:
            return
        self._started = False
        timeout = self.config.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        await asyncio.gather(*(p.stop(timeout) for p in self.producers.values()))
        self.stuck = [e for p in self.producers.values() for e in p.stuck]
        for service in self.services:
            await service.stop()
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
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        await self.lifeline.stop()  # first: a heartbeat in flight would re-create the row
        try:
            await asyncio.wait_for(self._deregister(), DEREGISTER_TIMEOUT)
        except (DatabaseUnavailable, asyncio.TimeoutError) as exc:
            log.warning("node %s: could not deregister (%s); other nodes will time it out", self.name, exc)
        self.is_leader = False
        log.info("node %s stopped", self.name, extra={"node": self.name})

    async def _deregister(self) -> None:
        if self.is_leader:
            await self.driver.execute("leader_resign", name=LEADER_NAME, instance=self.instance)
            await self.driver.notify(self.driver.signal_channel, json.dumps({"kind": "leader"}))
        if not self.stuck:
            await self.driver.execute("node_delete", instance=self.instance)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background coroutine owned by this node (errors logged, cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                if isinstance(exc, DatabaseUnavailable):
                    log.warning("background task: %s", exc)
                else:
                    log.error("background task failed", exc_info=exc)

        task.add_done_callback(done)

    # -- notifications ----------------------------------------------------------------------------

    def _on_insert(self, queue: str) -> None:
        serving = self._serving(queue)
        for producer in serving:
            producer.notify()
        if not serving and any(
            p.patterns and any(x.endswith("*") and queue.startswith(x[:-1]) for x in p.patterns)
            for p in self.producers.values()
        ):
            self.controls.kick()  # a new queue for a wildcard selection

    def _on_signal(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "control":
            node = message.get("node")
            if not node or node == self.name:
                self.controls.kick()
        elif kind == "interrupt":
            reason = str(message.get("reason", "cancelled"))
            for job_id in message.get("ids", []):
                for producer in self.producers.values():
                    if producer.interrupt(int(job_id), reason):
                        break
        elif kind == "leader" and not self.is_leader:
            for service in self.services:
                if service.name == "leader":
                    service.kick()

    def _on_connect(self) -> None:
        """(Re)connected to LISTEN: inserts notified during the gap were missed; one poll finds them."""
        self.poller.kick()

    # -- services ---------------------------------------------------------------------------------

    def _meta(self) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "version": __version__,
                "queues": {
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
                },
            }
        )

    def _meta_for_beat(self) -> str:
        """Read from the lifeline's thread: the node meta, as last computed on the loop."""
        return self._meta_text or "{}"

    def _tick(self) -> None:
        """A timer on the event loop: tells the lifeline the loop turns, and stops this node's jobs when
        its lease has run out (other nodes may have rescued them already)."""
        now = time.monotonic()
        self.lifeline.loop_turned(now)
        age = self.lifeline.lease_age()
        lapsed, self.lifeline.lapsed = self.lifeline.lapsed, False
        if age > self.lifeline.lease or lapsed:
            if not self._revoked:
                self._revoked = True
                running = sum(p.revoke() for p in self.producers.values())
                log.warning(
                    "node %s: no heartbeat for %.1fs (lease %.1fs); it may be presumed dead, so its %d "
                    "running job(s) were stopped and go back to the queue",
                    self.name,
                    age,
                    self.lifeline.lease,
                    running,
                    extra={"node": self.name},
                )
        elif self._revoked:
            self._revoked = False
            log.info("node %s: heartbeats resumed; taking jobs again", self.name, extra={"node": self.name})
            for producer in self.producers.values():
                producer.notify()
        self._tick_handle = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._tick)

    def _on_rejoined(self) -> None:
        """A heartbeat had to re-create this node's row: another node presumed it dead and may have run
        its jobs. Stop them now; their acks go back to the queue only where the claim is still ours."""
        if not self._started:
            return
        running = sum(p.revoke() for p in self.producers.values())
        log.warning(
            "node %s had been presumed dead (no heartbeat for %ss); its %d running job(s) were stopped, as "
            "they may have been rescued and run elsewhere",
            self.name,
            self.config.rescue_after,
            running,
            extra={"node": self.name},
        )

    async def _rescue(self) -> None:
        self._meta_text = self._meta()
        healthy = self.lifeline.healthy_since
        if healthy is None or time.monotonic() - healthy < self.config.rescue_after:
            return
        rows = await self.driver.transition(
            "job_rescue",
            instance=self.instance,
            rescue_after=self.config.rescue_after,
            limit=RESCUE_BATCH,
            channel=self.driver.insert_channel,
        )
        if rows:
            log.warning(
                "rescued %d job(s) from processes that stopped heartbeating",
                len(rows),
                extra={"job_ids": [r["id"] for r in rows][:50]},
            )
            self._after_transition(rows)

    async def _poll(self) -> None:
        """Wake the producers whose queues have available jobs (one query for every queue)."""
        if not any(not p.paused for p in self.producers.values()):
            return
        available = [r["queue"] for r in await self.driver.fetch("queue_names_available")]
        for queue in available:
            for producer in self._serving(queue):
                producer.notify()
        for producer in self.producers.values():
            if producer.patterns:
                self._expand(producer, available)
                if any(q in available for q in producer.queues):
                    producer.notify()

    def request_reconcile(self) -> None:
        self.reconciler.kick()

    async def _reconcile(self) -> None:
        """Put back jobs claimed by this node that none of its producers holds: the claims of a fetch
        whose reply was lost. Runs alone (no cycle in flight), so every real claim is held somewhere.
        A cheap ungated look first: the gate closes only when there is something to put back."""
        claimed = {r["id"] for r in await self.driver.fetch("job_claims_of", instance=self.instance)}
        if claimed - {i for p in self.producers.values() for i in p.held()}:
            async with self.gate.exclusive():
                known = [i for p in self.producers.values() for i in p.held()]
                rows = await self.driver.transition(
                    "job_release_unknown", instance=self.instance, known=known
                )
            if rows:
                log.info(
                    "put back %d job(s) claimed by an interrupted fetch", len(rows), extra={"node": self.name}
                )
                self._after_transition(rows)
        # A cancel whose interrupt NOTIFY was missed (the notifier was reconnecting, or notifier =
        # "poll") still stops the job.
        for row in await self.driver.fetch("job_cancel_requested", instance=self.instance):
            for producer in self.producers.values():
                if producer.interrupt(row["id"], "cancelled"):
                    break

    async def _stage(self) -> None:
        rows = await self.driver.transition(
            "job_stage", channel=self.driver.insert_channel, limit=STAGE_BATCH
        )
        self._after_transition(rows)

    def _after_transition(self, rows: list[Any]) -> None:
        for queue in {r["queue"] for r in rows}:
            self._on_insert(queue)

    async def _refresh_controls(self) -> None:
        rows = await self.driver.fetch("queue_controls", node=self.name)
        desired: dict[str, dict[str, Any]] = {}
        for row in rows:  # oldest first: the latest command wins
            entry = desired.setdefault(row["name"], {})
            for field, column in (("paused", "paused"), ("limit", "local_limit"), ("global", "global_limit")):
                if row[column] is not None:
                    entry[field] = row[column]
        for name, producer in self.producers.items():
            qc = self.config.queues[name]
            entry = desired.get(name, {})
            paused = entry.get("paused", qc.paused)
            limit = entry.get("limit", qc.limit)
            if paused != producer.paused:
                log.info("queue %s %s", name, "paused" if paused else "resumed", extra={"queue": name})
                producer.set_paused(paused)
            if limit != producer.limit:
                log.info("queue %s scaled to %s", name, limit, extra={"queue": name})
                producer.set_limit(limit)
            for target in producer.targets:
                configured = self._target(target.queue).global_limit
                wanted = desired.get(target.queue, {}).get("global", configured)
                if wanted != target.global_limit:
                    log.info(
                        "queue %s global limit set to %s", target.queue, wanted, extra={"queue": target.queue}
                    )
                    target.global_limit = wanted
                    producer.notify()
        if any(p.patterns for p in self.producers.values()):
            available = [r["queue"] for r in await self.driver.fetch("queue_names_available")]
            for producer in self.producers.values():
                if producer.patterns:
                    self._expand(producer, available)

    async def _elect(self) -> None:
        ttl = max(3.0, self.config.heartbeat_interval * 3)
        holder = await self.driver.fetchval(
            "leader_elect", name=LEADER_NAME, instance=self.instance, node=self.name, ttl=ttl
        )
        leader = holder is not None and str(holder) == self.instance
        if leader != self.is_leader:
            log.info(
                "node %s %s leadership", self.name, "took" if leader else "lost", extra={"node": self.name}
            )
        self.is_leader = leader

    async def _prune(self) -> None:
        assert self.config.prune_after is not None
        for _ in range(10):
            status = await self.driver.execute(
                "job_prune", max_age=self.config.prune_after, limit=PRUNE_BATCH
            )
            if int(status.split()[-1]) < PRUNE_BATCH:
                break

    async def _vacuum(self) -> None:
        if not self._may_vacuum:
            return
        row = await self.driver.fetchrow("jobs_dead_tuples")
        if row is None:
            return
        if not row["owner"]:
            self._may_vacuum = False
            log.info("not vacuuming the jobs table: this role does not own it (autovacuum still runs)")
            return
        if row["dead"] >= self.config.vacuum_threshold:
            await self.driver.execute("jobs_vacuum")

    async def _sweep_unique(self) -> None:
        await self.driver.execute("job_unique_sweep", limit=SWEEP_BATCH)
        parked = await self.driver.fetch("job_parked", limit=1000)
        if parked:
            await self.driver.unpark([r["id"] for r in parked])
