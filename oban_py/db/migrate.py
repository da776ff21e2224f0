"""Versioned schema migrations, safe to run from several processes at once.

``sql/migrations/NNN_name.up.sql`` (and ``.down.sql``) are applied in order inside one transaction that
first takes an advisory lock keyed on the schema, so a second concurrent ``migrate`` waits, then finds
everything applied and does nothing. Applied versions are recorded in ``<prefix>.oban_migrations``.
"""

from __future__ import annotations

from typing import Any

from ..errors import MigrationError
from .sql import migrations, quote_ident

__all__ = ["current_version", "latest_version", "migrate", "rollback"]


def latest_version() -> int:
    return len(migrations("public"))


async def _locked_versions(conn: Any, prefix: str) -> set[int]:
    q = quote_ident(prefix)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"oban_py.migrate:{prefix}")
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {q}.oban_migrations ("
        "version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {r["version"] for r in await conn.fetch(f"SELECT version FROM {q}.oban_migrations")}


async def migrate(conn: Any, prefix: str = "public", *, target: int | None = None) -> list[int]:
    """Apply missing migrations up to ``target`` (default: latest); returns the versions applied."""
    q = quote_ident(prefix)
    applied_now: list[int] = []
    async with conn.transaction():
        applied = await _locked_versions(conn, prefix)
        for m in migrations(prefix):
            if m.version in applied or (target is not None and m.version > target):
                continue
            try:
                await conn.execute(m.up)
            except Exception as exc:
                raise MigrationError(f"migration {m.version:03d}_{m.name} failed: {exc}") from exc
            await conn.execute(
                f"INSERT INTO {q}.oban_migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
            applied_now.append(m.version)
    return applied_now


async def rollback(conn: Any, prefix: str = "public", *, target: int = 0) -> list[int]:
    """Undo applied migrations above ``target`` (0 removes everything); returns the versions undone."""
    q = quote_ident(prefix)
    undone: list[int] = []
    async with conn.transaction():
        applied = await _locked_versions(conn, prefix)
        for m in reversed(migrations(prefix)):
            if m.version <= target or m.version not in applied:
                continue
            if not m.down:
                raise MigrationError(f"migration {m.version:03d}_{m.name} has no down migration")
            await conn.execute(m.down)
            await conn.execute(f"DELETE FROM {q}.oban_migrations WHERE version = $1", m.version)
            undone.append(m.version)
        if target == 0:
            await conn.execute(f"DROP TABLE IF EXISTS {q}.oban_migrations")
    return undone


async def current_version(conn: Any, prefix: str = "public") -> int:
    """Highest applied version, 0 when the schema has never been migrated."""
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(prefix)}.oban_migrations"
    )
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT max(version) FROM {quote_ident(prefix)}.oban_migrations")
    return int(version or 0)
