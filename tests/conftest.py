"""Test fixtures: a real PostgreSQL, and a fresh schema per test.

The server is the embedded one (started once per session from the ``embedded`` extra, with fsync off
for speed) unless ``OBAN_TEST_DSN`` points at another. Each session works in its own database, and
each test in its own schema (``prefix``), migrated from scratch and dropped afterwards, so tests never
see each other's rows, and every test exercises the prefix support.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from oban_py import Oban
from oban_py.db.migrate import migrate

_counter = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of the server under test (any database on it)."""
    configured = os.environ.get("OBAN_TEST_DSN")
    if configured:
        yield configured
        return
    from oban_py.embedded import EmbeddedPostgres, default_data_dir

    server = EmbeddedPostgres(
        default_data_dir().with_name("pg-test"),
        settings={
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 300,
        },
    )
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_dsn(server_dsn: str) -> Iterator[str]:
    """A database of our own for this session, dropped at the end."""
    name = f"oban_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(server_dsn, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def prefix(test_dsn: str) -> AsyncIterator[str]:
    """A freshly migrated schema for this test."""
    name = f"t{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(test_dsn)
    try:
        await migrate(conn, name)
    finally:
        await conn.close()
    yield name
    conn = await asyncpg.connect(test_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def db(test_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions."""
    conn = await asyncpg.connect(test_dsn)
    try:
        yield conn
    finally:
        await conn.close()


FAST = {
    "poll_interval": 0.2,
    "stage_interval": 0.1,
    "heartbeat_interval": 0.2,
    "rescue_after": 1.0,
    "shutdown_timeout": 2.0,
}


@pytest.fixture
async def make_oban(test_dsn: str, prefix: str) -> AsyncIterator[Callable[..., Awaitable[Oban]]]:
    """Start Oban instances on this test's schema (stopped at teardown)."""
    started: list[Oban] = []

    async def factory(*, before_start: Callable[[Oban], object] | None = None, **options: Any) -> Oban:
        settings = {**FAST, **options}
        settings.setdefault("name", f"test-{len(started)}" if started else "default")
        oban = Oban(test_dsn, prefix=prefix, **settings)
        if before_start is not None:  # e.g. EventLog.attach: see the events start() emits
            before_start(oban)
        await oban.start()
        started.append(oban)
        return oban

    yield factory
    for oban in reversed(started):
        try:
            await asyncio.wait_for(oban.stop(shutdown_timeout=1.0), 60.0)
        except asyncio.TimeoutError:  # a stop that hangs is a bug: fail the test, show what waits
            for task in asyncio.all_tasks():
                task.print_stack()
            raise AssertionError(f"Oban {oban.name!r} did not stop within 60 s") from None


@pytest.fixture
async def oban(make_oban: Callable[..., Awaitable[Oban]]) -> Oban:
    """A client-only instance (no queues) on this test's schema."""
    return await make_oban()
