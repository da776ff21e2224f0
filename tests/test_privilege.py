"""Least privilege, with real roles: the schema's owner migrates without CREATE on the database, an
application role with USAGE + DML runs jobs (and a migrate with nothing pending is a no-op for it), and a
missing privilege is a typed MigrationError naming it, also through the CLI (one line, no traceback).

Roles are cluster-wide, so each test creates its own (random names) and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from conftest import FAST

from oban_py import Oban, Worker, worker
from oban_py.db.migrate import current_version, latest_version, migrate
from oban_py.errors import MigrationError
from oban_py.job import Job

from helpers import wait_for

pytestmark = pytest.mark.anyio

_PASSWORD = "pw-least-privilege"


@dataclass
class Roles:
    owner: str
    app: str
    schema: str  # owned by ``owner``, not migrated yet
    database: str
    owner_dsn: str
    app_dsn: str


def _dsn_as(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{role}:{_PASSWORD}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def roles(test_dsn: str, db: asyncpg.Connection) -> AsyncIterator[Roles]:
    tag = uuid.uuid4().hex[:10]
    owner, app, schema = f"oban_owner_{tag}", f"oban_app_{tag}", f"priv_{tag}"
    database = await db.fetchval("SELECT current_database()")
    try:
        for role in (owner, app):
            await db.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{_PASSWORD}'")
        await db.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC, "{owner}", "{app}"')
        await db.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{owner}"')
        yield Roles(owner, app, schema, database, _dsn_as(test_dsn, owner), _dsn_as(test_dsn, app))
    finally:
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])",
            [owner, app],
        )
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for role in (app, owner):
            exists = await db.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role)
            if exists:
                await db.execute(f'DROP OWNED BY "{role}"')
                await db.execute(f'DROP ROLE "{role}"')


async def _grant_app(db: asyncpg.Connection, roles: Roles) -> None:
    """What an application role gets: USAGE on the schema and DML on its tables, nothing more."""
    s, app = f'"{roles.schema}"', f'"{roles.app}"'
    await db.execute(f"GRANT USAGE ON SCHEMA {s} TO {app}")
    await db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {app}")
    await db.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {app}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oban_py", *args],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_schema_owner_migrates_without_create_on_the_database(
    roles: Roles, db: asyncpg.Connection
) -> None:
    assert not await db.fetchval(
        "SELECT has_database_privilege($1, $2, 'CREATE')", roles.owner, roles.database
    )
    result = await asyncio.to_thread(_cli, "migrate", "--dsn", roles.owner_dsn, "--prefix", roles.schema)
    assert result.returncode == 0, result.stderr
    assert f"is at version {latest_version()}" in result.stdout
    conn = await asyncpg.connect(roles.owner_dsn)
    try:
        assert await migrate(conn, roles.schema) == []  # again: nothing to do, still no CREATE needed
        assert await current_version(conn, roles.schema) == latest_version()
    finally:
        await conn.close()
    owner = await db.fetchval(
        "SELECT tableowner FROM pg_tables WHERE schemaname = $1 AND tablename = 'oban_jobs'", roles.schema
    )
    assert owner == roles.owner


async def test_app_role_with_usage_and_dml_runs_jobs(roles: Roles, db: asyncpg.Connection) -> None:
    conn = await asyncpg.connect(roles.owner_dsn)
    try:
        await migrate(conn, roles.schema)
    finally:
        await conn.close()
    await _grant_app(db, roles)
    assert not await db.fetchval("SELECT has_schema_privilege($1, $2, 'CREATE')", roles.app, roles.schema)

    # Nothing pending: migrate (and so Oban(migrate=True)) is a no-op that needs no CREATE privilege.
    conn = await asyncpg.connect(roles.app_dsn)
    try:
        assert await migrate(conn, roles.schema) == []
    finally:
        await conn.close()

    ran = asyncio.Event()

    @worker(queue="least", name=f"privilege.{roles.app}")
    class Probe(Worker):
        async def process(self, job: Job[Any]) -> None:
            ran.set()

    async with Oban(roles.app_dsn, prefix=roles.schema, queues={"least": 2}, migrate=True, **FAST) as oban:
        job = await oban.insert(Probe.new({"n": 1}))
        await asyncio.wait_for(ran.wait(), 30)

        async def completed() -> bool:
            state = await db.fetchval(
                f'SELECT state::text FROM "{roles.schema}".oban_jobs WHERE id = $1', job.id
            )
            return bool(state == "completed")

        await wait_for(completed, timeout=30)


async def test_missing_privilege_is_a_typed_migration_error(roles: Roles, db: asyncpg.Connection) -> None:
    missing = f"{roles.schema}_new"  # does not exist; the app role may not create schemas
    conn = await asyncpg.connect(roles.app_dsn)
    try:
        with pytest.raises(MigrationError, match="CREATE privilege on database") as info:
            await migrate(conn, missing)
        assert roles.app in str(info.value) and "AUTHORIZATION" in str(info.value)

        # The owner's schema, not migrated yet: USAGE alone does not let the app role create tables.
        await db.execute(f'GRANT USAGE ON SCHEMA "{roles.schema}" TO "{roles.app}"')
        with pytest.raises(MigrationError, match=f'CREATE privilege on schema "{roles.schema}"'):
            await migrate(conn, roles.schema)
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", missing) == 0
    tables = await db.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", roles.schema)
    assert tables == 0

    result = await asyncio.to_thread(_cli, "migrate", "--dsn", roles.app_dsn, "--prefix", missing)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "CREATE privilege on database" in result.stderr
    assert _PASSWORD not in result.stderr + result.stdout
