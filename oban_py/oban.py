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
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg

from . import _insert, instances
from ._secrets import masked_dsn
from .api.cron import CronAPI
from .api.jobs import JobsAPI
from .api.queues import QueuesAPI
from .config import Config, build_config, env_settings, load_config
from .db.connect import create_pool
from .db.driver import Driver
from .db.lease import Leases
from .db.migrate import current_version, latest_version, migrate, rollback
from .errors import MigrationError, ObanError
from .hooks.lifecycle import HOOK_KEYS, HookSpec, call_hooks, resolve_hooks
from .job import Job
from .runtime.events import Events
from .runtime.node import Node
from .worker import spec_for

__all__ = ["Oban", "resolve_dsn"]

log = logging.getLogger("oban_py")

#: A hook parameter: a callable or dotted path, or a list of them (see docs/hooks.md).
HookSetting = HookSpec | Sequence[HookSpec]


def resolve_dsn(config: Config) -> tuple[str, bool]:
    """The configured DSN, or the embedded server's (started or attached); second item: embedded?"""
    if config.dsn:
        return config.dsn, False
    from .embedded import embedded_dsn

    return embedded_dsn(config.embedded_dir), True


class Oban(JobsAPI, QueuesAPI, CronAPI):
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
        on_start: HookSetting | None = None,
        on_stop: HookSetting | None = None,
        on_error: HookSetting | None = None,
        **options: Any,
    ) -> None:
        # None means "not given" for the named parameters; in **options it is a value (prune_after=None).
        named: dict[str, Any] = {"dsn": dsn, "queues": queues, "prefix": prefix, "node": node}
        named.update(on_start=on_start, on_stop=on_stop, on_error=on_error)  # hooks: docs/hooks.md
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
        self._hooks: dict[str, tuple[Callable[..., Any], ...]] = {}

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
            # Every hook path is imported now: a typo fails the start, not the first error or stop.
            self._hooks = {key: resolve_hooks(self.config, key) for key in HOOK_KEYS}
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
                    self.node = Node(
                        self._driver, self.config, events=self.events, on_error=self._hooks["on_error"]
                    )
                    await self.node.start()
            except BaseException:
                await self._close_pool()
                raise
            self._started = True
            instances.register(self)
            await call_hooks(self._hooks["on_start"], "on_start")
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
            await call_hooks(self._hooks.get("on_stop", ()), "on_stop")
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
