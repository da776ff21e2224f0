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
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from . import _insert, instances, job_control
from ._secrets import masked_dsn
from .config import Config, build_config, env_settings, load_config
from .db import parking
from .db.connect import create_pool
from .db.driver import Driver
from .db.lease import Leases
from .db.migrate import current_version, latest_version, migrate, rollback
from .db.rows import job_from_record
from .errors import JobNotFound, LimitOptionsError, MigrationError, ObanError
from .job import Job
from .overview import Overview, overview
from .runtime.drain import drain
from .runtime.events import Events
from .runtime.node import Node
from .runtime.queues import QueueState
from .validation import validate_queue, validate_queue_limits, validate_queue_pattern
from .worker import spec_for

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
        #: In-process events of this instance (see :mod:`oban_py.runtime.events`): subscribe, or
        #: ``await oban.events.next(name)`` instead of sleeping in a test.
        self.events = Events()
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
        """A started instance by name; ``None`` means "default", or the only one running.

        The latest started instance of a name answers until it stops (see :mod:`oban_py.instances`).
        """
        found = instances.lookup(name)
        return found if isinstance(found, Oban) else None

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
                    self.node = Node(self._driver, self.config, events=self.events)
                    await self.node.start()
            except BaseException:
                await self._close_pool()
                raise
            self._started = True
            instances.register(self)
            return self

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
            instances.unregister(self)
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
        return await spec_for(worker).enqueue(args, overrides, conn=conn, oban=self)

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
        rows = await job_control.cancel(self.driver, [int(i) for i in job_ids], reason)
        await self._after_control(rows, "cancelled")
        return len(rows)

    async def delete_job(self, job_id: int) -> bool:
        """Delete a job in any state (a running one has its task cancelled). True if it existed."""
        return await self.delete_jobs([job_id]) == 1

    async def delete_jobs(self, job_ids: Iterable[int]) -> int:
        rows = await job_control.delete(self.driver, [int(i) for i in job_ids])
        await self._after_control(rows, "deleted")
        return len(rows)

    async def _after_control(self, rows: list[Any], reason: str) -> None:
        """Stop the jobs that were running (here at once, elsewhere by NOTIFY); settle parked rows."""
        message = job_control.interrupt_message(rows, reason)
        if message is not None:
            if self.node is not None:
                self.node.apply_signal(message)
            await self.driver.notify(self.driver.signal_channel, json.dumps(message))
        parked = [r["id"] for r in rows if r.get("parked")]
        if parked:
            await parking.unpark(self.driver, parked)

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
        return await job_control.retry(self.driver, [int(i) for i in job_ids])

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
        validate_queue_pattern(queue)
        validate_queue_limits(limit, global_limit)
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
