"""The Oban facade: lifecycle, inserting jobs, job and queue control.

::

    async with Oban(dsn, queues={"default": 10}) as oban:   # runs queues in this process
        job = await oban.insert(SendEmail.new({"to": "a@example.com"}))

Without ``queues`` an instance only inserts and controls jobs (a web app, a script). With no DSN
(``dsn=``, ``OBAN_DSN``, or oban.toml through ``Oban.from_toml``) it starts the embedded PostgreSQL,
which needs ``pip install 'oban-py[embedded]'``.

Started instances are registered by ``name`` (default ``"default"``); ``Worker.enqueue`` inserts through
the default one, or the one named by the worker's ``oban=`` option.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import asyncpg

from . import _insert
from ._secrets import masked_dsn
from .config import Config, build_config, env_settings, load_config
from .db.connect import create_pool
from .db.driver import Driver
from .db.lease import Leases
from .db.migrate import current_version, latest_version, migrate, rollback
from .db.rows import job_from_record
from .errors import JobNotFound, LimitOptionsError, MigrationError, ObanError, UniqueConflict
from .job import Job
from .overview import Overview, overview
from .runtime.executor import Execution, execute
from .runtime.node import Node
from .worker import spec_for, validate_queue

__all__ = ["Oban", "resolve_dsn"]

log = logging.getLogger("oban_py")


def resolve_dsn(config: Config) -> tuple[str, bool]:
    """The configured DSN, or the embedded server's (started or attached); second item: embedded?"""
    if config.dsn:
        return config.dsn, False
    from .embedded import embedded_dsn

    return embedded_dsn(config.embedded_dir), True


class Oban:
    """An engine instance: a connection pool, optionally queues running in this process."""

    # Started instances by name; the latest started one of a name answers until it stops.
    _instances: ClassVar[dict[str, list[Oban]]] = {}

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        queues: dict[str, Any] | str | None = None,
        prefix: str | None = None,
        node: str | None = None,
        name: str = "default",
        config: Config | None = None,
        **options: Any,
    ) -> None:
        # None means "not given" for the named parameters; in **options it is a value (prune_after=None).
        named = {"dsn": dsn, "queues": queues, "prefix": prefix, "node": node}
        overrides = {**{k: v for k, v in named.items() if v is not None}, **options}
        if config is None:
            # OBAN_* environment variables, then arguments (oban.toml is read only by from_toml/the runner).
            config = build_config([("env", env_settings(os.environ)), ("arguments", overrides)])
        elif overrides:
            config = build_config(
                [("config", config.model_dump(exclude_unset=True)), ("arguments", overrides)]
            )
        self.config = config
        self.name = name
        self._external_pool = pool
        self.pool: asyncpg.Pool | None = pool
        self._driver: Driver | None = None
        self.node: Node | None = None
        self._started = False
        self._lock = asyncio.Lock()
        self._stuck: list[int] = []

    # -- construction helpers ---------------------------------------------------------------------

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str] | None = None, *, name: str = "default", **overrides: Any
    ) -> Oban:
        """Build from oban.toml (``path`` or ./oban.toml), then ``OBAN_*`` env vars, then ``overrides``."""
        return cls(config=load_config(path, overrides=overrides), name=name)

    @classmethod
    def get_instance(cls, name: str | None = None) -> Oban | None:
        """A started instance by name; ``None`` means "default", or the only one running."""
        if name is not None:
            found = cls._instances.get(name)
            return found[-1] if found else None
        if cls._instances.get("default"):
            return cls._instances["default"][-1]
        if len(cls._instances) == 1:
            return next(iter(cls._instances.values()))[-1]
        return None

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def driver(self) -> Driver:
        if self._driver is None:
            raise ObanError(
                "this Oban instance is not started: use `async with Oban(...)` or `await oban.start()`"
            )
        return self._driver

    async def __aenter__(self) -> Oban:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> Oban:
        """Connect, check (or apply) migrations, and start queues if any are configured."""
        async with self._lock:
            if self._started:
                return self
            embedded = False
            if self.pool is None:
                dsn, embedded = await asyncio.to_thread(resolve_dsn, self.config)
                self.pool = await create_pool(
                    dsn,
                    min_size=1,
                    max_size=self.config.pool_size,
                    application_name=f"oban_py:{self.config.node or os.getpid()}",
                )
                log.debug("connected to %s", masked_dsn(dsn))
            # Our own pool: released connections are kept for reuse (a caller's pool is left alone).
            leases = Leases(self.pool, self.config.pool_size) if self._external_pool is None else None
            self._driver = Driver(self.pool, self.config.prefix, leases=leases)
            try:
                auto = self.config.migrate if self.config.migrate is not None else embedded
                if auto:
                    await self.migrate()
                else:
                    await self._check_schema()
                if self.config.queues:
                    self.node = Node(self._driver, self.config)
                    await self.node.start()
            except BaseException:
                await self._close_pool()
                raise
            self._started = True
            Oban._instances.setdefault(self.name, []).append(self)
            return self

    @property
    def stuck_jobs(self) -> list[int]:
        """Ids of jobs whose bodies did not end when the last stop() interrupted them (see
        docs/guarantees.md): they stay claimed by this process, heartbeating, until they end."""
        return list(self._stuck)

    async def stop(self, *, shutdown_timeout: float | None = None) -> None:
        """Drain queues gracefully (up to ``shutdown_timeout``), then close the pool. Idempotent."""
        async with self._lock:
            if not self._started:
                return
            stack = Oban._instances.get(self.name, [])
            if self in stack:
                stack.remove(self)
            if not stack:
                Oban._instances.pop(self.name, None)
            if self.node is not None:
                await self.node.stop(shutdown_timeout)
                self._stuck = [e.job.id for e in self.node.stuck if e.job.id is not None]
                self.node = None
            self._started = False
            await self._close_pool()

    async def _close_pool(self) -> None:
        """Return and close connections, within 2 s: a database that cannot be reached (a black hole)
        must not hold shutdown up; what is left is terminated."""
        try:
            await asyncio.wait_for(self._close_connections(), 2.0)
        except (asyncio.TimeoutError, Exception):
            log.debug("connections could not be closed cleanly", exc_info=True)
            if self.pool is not None and self._external_pool is None:
                self.pool.terminate()
        if self._external_pool is None:
            self.pool = None
        self._driver = None

    async def _close_connections(self) -> None:
        if self._driver is not None:
            await self._driver.leases.close()
        if self.pool is not None and self._external_pool is None:
            await self.pool.close()

    async def _check_schema(self) -> None:
        async with self.driver.connection() as conn:
            version = await current_version(conn, self.config.prefix)
        latest = latest_version()
        if version < latest:
            raise MigrationError(
                f"schema {self.config.prefix!r} is at version {version}, this oban_py needs {latest}: run "
                f"`oban-py migrate` (or pass migrate=True)"
            )

    async def migrate(self) -> list[int]:
        """Apply missing migrations (safe to call from many processes at once)."""
        async with self.driver.connection() as conn:
            applied = await migrate(conn, self.config.prefix)
        if applied:
            log.info("migrated schema %s: applied %s", self.config.prefix, applied)
        return applied

    async def rollback(self, target: int = 0) -> list[int]:
        """Undo migrations above ``target`` (0 drops every oban table in the schema)."""
        async with self.driver.connection() as conn:
            return await rollback(conn, self.config.prefix, target=target)

    # -- inserting --------------------------------------------------------------------------------

    async def insert(self, job: Job[Any], *, conn: Any = None) -> Job[Any]:
        """Insert one job. Returns it with its id, or the holder of its unique key (``conflicted=True``).

        ``conn``: an asyncpg connection (or SQLAlchemy AsyncConnection/AsyncSession on asyncpg) whose
        transaction the insert joins; it is rolled back with it.
        """
        return (await self.insert_all([job], conn=conn))[0]

    async def insert_all(self, jobs: Iterable[Job[Any]], *, conn: Any = None) -> list[Job[Any]]:
        """Insert many jobs in one statement per chunk; one result per input, in input order.

        Unique jobs are deduplicated inside the batch and against the table; each result carries its
        own ``conflicted``. Invalid input raises before anything is written.
        """
        jobs = list(jobs)
        raw = None
        if conn is not None:
            from .db.connect import raw_connection

            raw = await raw_connection(conn)
        return await _insert.insert_jobs(
            self.driver,
            jobs,
            raw,
            chunk_size=self.config.insert_chunk_size,
            max_args_bytes=self.config.max_args_bytes,
        )

    async def enqueue(
        self, worker: Any, args: Any = None, /, *, conn: Any = None, **overrides: Any
    ) -> Job[Any]:
        """Insert a job for a registered worker (class, @job function or name)."""
        spec = spec_for(worker)
        return await self.insert(spec.new(args, **overrides), conn=conn)

    # -- job control ------------------------------------------------------------------------------

    async def get_job(self, job_id: int) -> Job[Any]:
        """The job's current row; raises JobNotFound."""
        rows = await self.driver.fetch("job_get", ids=[job_id])
        if not rows:
            raise JobNotFound(job_id)
        return job_from_record(rows[0])

    async def get_jobs(self, job_ids: Sequence[int]) -> list[Job[Any]]:
        rows = await self.driver.fetch("job_get", ids=list(job_ids))
        by_id = {r["id"]: job_from_record(r) for r in rows}
        return [by_id[i] for i in job_ids if i in by_id]

    async def cancel_job(self, job_id: int, *, reason: str | None = None) -> bool:
        """Cancel a job that has not finished; a running one has its task cancelled. True if it changed."""
        return await self.cancel_jobs([job_id], reason=reason) == 1

    async def cancel_jobs(self, job_ids: Iterable[int], *, reason: str | None = None) -> int:
        ids = [int(i) for i in job_ids]
        # One statement, a whole transaction of its own: safe to run again if it deadlocks.
        rows = await _insert.retry_deadlocks(lambda: self.driver.fetch("job_cancel", ids=ids, reason=reason))
        await self._after_control(rows, "cancelled")
        return len(rows)

    async def delete_job(self, job_id: int) -> bool:
        """Delete a job in any state (a running one has its task cancelled). True if it existed."""
        return await self.delete_jobs([job_id]) == 1

    async def delete_jobs(self, job_ids: Iterable[int]) -> int:
        rows = await self.driver.fetch("job_delete", ids=[int(i) for i in job_ids])
        await self._after_control(rows, "deleted")
        return len(rows)

    async def _after_control(self, rows: list[Any], reason: str) -> None:
        running = [r["id"] for r in rows if r["was"] == "executing"]
        if running:
            payload = json.dumps({"kind": "interrupt", "ids": running, "reason": reason})
            if self.node is not None:
                self.node._on_signal(json.loads(payload))
            await self.driver.notify(self.driver.signal_channel, payload)
        parked = [r["id"] for r in rows if r.get("parked")]
        if parked:
            await self.driver.unpark(parked)

    async def retry_job(self, job_id: int) -> bool:
        """Make a finished, scheduled or retryable job available now. False if it was not retryable.

        Raises UniqueConflict (naming the holder) if another job holds its unique key; nothing changes.
        """
        return await self.retry_jobs([job_id]) == 1

    async def retry_jobs(self, job_ids: Iterable[int]) -> int:
        """Retry several jobs, all or nothing: a unique conflict on any of them raises and retries none.

        A retry is an insert of the job again: it takes its unique key (even one it gave up: lost to
        another job, released when it started, or past its period, then with a fresh period), and a
        job that would not take it (the ``scheduled`` group) still conflicts with a live holder.
        """
        ids = [int(i) for i in job_ids]

        async def run() -> list[Any]:
            async with self.driver.transaction() as conn:
                rows = await self.driver.fetch("job_retry", conn, ids=ids)
                blocked = [r for r in rows if r["holder"] is not None]
                if blocked:  # a duplicate of a live holder, without taking the key: retry none
                    raise _Rollback(blocked[0])
                for queue in {r["queue"] for r in rows}:
                    await self.driver.notify(self.driver.insert_channel, queue, conn)
            return rows

        try:
            rows = await _insert.retry_deadlocks(run)
        except asyncpg.UniqueViolationError:
            raise await self._retry_conflict(ids) from None
        except _Rollback as found:
            raise await self._retry_conflict(ids, blocked=found.args[0]) from None
        return len(rows)

    async def _retry_conflict(self, ids: list[int], *, blocked: Any = None) -> UniqueConflict:
        """Which job of a failed retry_jobs collides, and with whom (a rare path: one try per prefix).

        ``blocked``: a job_retry row whose job does not take its key and met a live holder.
        """
        if blocked is not None:
            found = await self.driver.fetch("job_get", ids=[blocked["holder"]])
            return UniqueConflict(blocked["id"], blocked["holder"], found[0]["state"] if found else None)
        for k in range(1, len(ids) + 1):
            try:
                async with self.driver.transaction() as conn:
                    rows = await self.driver.fetch("job_retry", conn, ids=ids[:k])
                    raise _Rollback(next((r for r in rows if r["holder"] is not None), None))
            except _Rollback as tried:
                if tried.args[0] is not None:
                    return await self._retry_conflict(ids, blocked=tried.args[0])
                continue
            except asyncpg.UniqueViolationError:
                # ids[k-1] collides, with an existing holder or with one of ids[:k-1] retried before it.
                try:
                    async with self.driver.transaction() as conn:
                        if k > 1:
                            await self.driver.fetch("job_retry", conn, ids=ids[: k - 1])
                        holder = await self.driver.fetchrow("job_unique_holder", conn, id=ids[k - 1])
                        raise _Rollback(holder)
                except _Rollback as found:
                    row = found.args[0] if found.args else None
                    if row is not None:
                        return UniqueConflict(ids[k - 1], row["id"], row["state"])
        return UniqueConflict(ids[0], -1)  # pragma: no cover - the holder vanished meanwhile

    # -- queue control ----------------------------------------------------------------------------

    async def _control(
        self,
        queue: str,
        node: str | None,
        *,
        paused: bool | None = None,
        limit: int | None = None,
        global_limit: int | None = None,
    ) -> None:
        if queue != "*" and not queue.endswith("*"):
            validate_queue(queue)
        for field, value, high in (("limit", limit, 10_000), ("global_limit", global_limit, 100_000)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high
            ):
                raise LimitOptionsError(field, value, f"must be an integer from 1 to {high}")
        if limit is not None and global_limit is not None and limit > global_limit:
            raise LimitOptionsError("limit", limit, f"is above global_limit ({global_limit})")
        await self.driver.execute(
            "queue_control_upsert",
            name=queue,
            node=node or "",
            paused=paused,
            local_limit=limit,
            global_limit=global_limit,
        )
        await self.driver.notify(
            self.driver.signal_channel, json.dumps({"kind": "control", "queue": queue, "node": node})
        )
        if self.node is not None and (node is None or node == self.node.name):
            await self.node._refresh_controls()

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
        driver = self.driver
        # The drain registers as a short-lived node of its own: a cluster's rescuer treats jobs claimed
        # by an unregistered instance as orphans and would run them twice, and a running node's
        # reconciler puts back claims of its own instance that none of its producers holds.
        instance = str(uuid.uuid4())
        name = f"drain:{self.config.node or os.getpid()}"
        meta = json.dumps({"drain": queue})
        interval = min(1.0, self.config.heartbeat_interval)

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                await driver.execute("node_heartbeat", instance=instance, node=name, meta=meta)

        await driver.execute("node_heartbeat", instance=instance, node=name, meta=meta)
        heartbeat = asyncio.create_task(beat())
        try:
            return await self._drain(queue, instance, with_scheduled, limit)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await asyncio.shield(driver.execute("node_delete", instance=instance))

    async def _drain(self, queue: str, instance: str, with_scheduled: bool, limit: int) -> dict[str, int]:
        from .runtime.producer import Target, claim_jobs, write_acks

        driver = self.driver
        counts: dict[str, int] = {}
        done = 0
        while done < limit:
            if with_scheduled:
                await driver.execute("job_make_due", queue=queue)
                await driver.fetch("job_stage", channel=driver.insert_channel, limit=limit)
            rows = await claim_jobs(driver, None, [Target(queue)], 1, node="drain", instance=instance)
            if not rows:
                break
            for row in rows:
                if row["kind"] == "skipped":
                    counts["cancelled"] = counts.get("cancelled", 0) + 1
                    continue
                ack = await execute(Execution(job_from_record(row), row["attempted_at"]))
                if ack is None:
                    continue
                async with driver.connection() as conn:
                    parked = await write_acks(driver, conn, [ack])
                if parked:
                    await driver.unpark(parked)
                counts[ack.state] = counts.get(ack.state, 0) + 1
                done += 1
        return counts


class _Rollback(Exception):
    """Raised inside a transaction only to roll it back."""
