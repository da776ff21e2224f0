"""Versioned schema migrations, safe to run from several processes at once.

``sql/migrations/NNN_name.up.sql`` (and ``.down.sql``) are applied in order inside one transaction that
first takes an advisory lock keyed on the schema, so a second concurrent ``migrate`` waits, then finds
everything applied and does nothing. Applied versions are recorded in ``<prefix>.oban_migrations``.

A migration may include a versioned function file (``-- include: functions/oban_fetch_v1.sql``, see
:func:`oban_py.db.sql.migrations`); shipped files, migrations and functions alike, never change. The
schema after the last migration is ``sql/schema.sql``, checked by ``tests/test_schema.py`` and
rewritten by ``python -m oban_py.db.schema_dump <dsn>`` (:mod:`oban_py.db.schema_dump`).
"""

from __future__ import annotations

from typing import Any

from ..errors import MigrationError
from .sql import migrations, quote_ident

__all__ = ["current_version", "latest_version", "migrate", "rollback"]


def latest_version() -> int:
    return len(migrations("public"))


# What the migrating role needs, beyond what the application role needs (USAGE on the schema and
# SELECT, INSERT, UPDATE, DELETE on its tables).
_MIGRATE_NEEDS = (
    "migrations need the CREATE privilege on schema {schema} and ownership of its oban tables: run "
    "`oban-py migrate` as the schema's owner (the application itself only needs USAGE on the schema and "
    "SELECT, INSERT, UPDATE, DELETE on its tables)"
)
_INSUFFICIENT_PRIVILEGE = "42501"


class _Target:
    """Who migrates what: the role, the database, and what already exists in the schema."""

    def __init__(self, row: Any, prefix: str) -> None:
        self.role: str = row["role"]
        self.database: str = row["database"]
        self.schema_exists: bool = row["schema_exists"]
        self.table_exists: bool = row["table_exists"]
        self.prefix = prefix

    def denied(self, exc: BaseException, step: str) -> MigrationError:
        reason = str(exc).strip() or type(exc).__name__
        needs = _MIGRATE_NEEDS.format(schema=quote_ident(self.prefix))
        return MigrationError(f"role {self.role!r} cannot {step} ({reason}): {needs}")


def _is_denied(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE


# Oban for Elixir (and the `oban` Python package, which shares its schema) name their tables like ours
# and record their version as a comment on oban_jobs; ours always comes with our oban_migrations.
_OUR_MIGRATION_COLUMNS = frozenset({"version", "name", "applied_at"})
_THEIR_TABLES = ("oban_jobs", "oban_peers", "oban_producers", "oban_crons")


async def _foreign_tables(conn: Any, prefix: str) -> str | None:
    """What in ``prefix`` belongs to another Oban, or None: ``oban_jobs`` without our migrations table
    (or before our first migration), or an ``oban_migrations`` table that is not ours."""
    rows = await conn.fetch(
        "SELECT c.relname::text AS name, obj_description(c.oid, 'pg_class') AS comment,"
        " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0"
        "       AND NOT a.attisdropped) AS columns"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname LIKE 'oban\\_%'",
        prefix,
    )
    tables = {r["name"]: r for r in rows}
    ledger = tables.get("oban_migrations")
    if ledger is not None and not set(ledger["columns"]) >= _OUR_MIGRATION_COLUMNS:
        return "an oban_migrations table that is not oban_py's"
    if "oban_jobs" not in tables:
        return None
    if ledger is not None:
        q = quote_ident(prefix)
        if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {q}.oban_migrations WHERE version = 1)"):
            return None  # ours: migration 001 created oban_jobs
    found = ", ".join(t for t in _THEIR_TABLES if t in tables)
    comment = (tables["oban_jobs"]["comment"] or "").strip()
    marker = f"; oban_jobs is marked as Oban version {comment}" if comment.isdigit() else ""
    return f"tables of another Oban ({found}{marker})"


async def _locked_versions(conn: Any, prefix: str) -> tuple[_Target, set[int]]:
    q = quote_ident(prefix)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"oban_py.migrate:{prefix}")
    # Look before creating: CREATE SCHEMA IF NOT EXISTS checks the CREATE privilege on the database
    # before it looks for the schema, and CREATE TABLE IF NOT EXISTS checks CREATE on the schema first,
    # so a role that owns an existing schema (or an app role, when nothing is pending) would be refused.
    # The catalogs are readable by every role, whatever its privileges on the schema.
    target = _Target(
        await conn.fetchrow(
            "SELECT current_user::text AS role, current_database()::text AS database,"
            " EXISTS (SELECT FROM pg_namespace WHERE nspname = $1) AS schema_exists,"
            " EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            "         WHERE n.nspname = $1 AND c.relname = 'oban_migrations') AS table_exists",
            prefix,
        ),
        prefix,
    )
    foreign = await _foreign_tables(conn, prefix) if target.schema_exists else None
    if foreign is not None:
        raise MigrationError(
            f"schema {prefix!r} already holds {foreign}: Oban for Elixir and the `oban` Python package use "
            "the same table names, and oban_py's tables differ. Give oban_py a schema of its own: "
            f'`oban-py migrate --prefix oban_py` (and prefix = "oban_py" in its config)'
        )
    if not target.schema_exists:
        try:
            await conn.execute(f"CREATE SCHEMA {q}")
        except Exception as exc:
            if not _is_denied(exc):
                raise
            raise MigrationError(
                f"role {target.role!r} cannot create schema {prefix!r}: that needs the CREATE privilege on "
                f"database {target.database!r}. Create the schema once as an administrator "
                f"(CREATE SCHEMA {q} AUTHORIZATION {quote_ident(target.role)}), then migrate as its owner"
            ) from exc
    try:
        if not target.table_exists:
            await conn.execute(
                f"CREATE TABLE {q}.oban_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        rows = await conn.fetch(f"SELECT version FROM {q}.oban_migrations")
    except Exception as exc:
        if not _is_denied(exc):
            raise
        raise target.denied(exc, f"read or create {q}.oban_migrations") from exc
    return target, {r["version"] for r in rows}


async def migrate(conn: Any, prefix: str = "public", *, target: int | None = None) -> list[int]:
    """Apply missing migrations up to ``target`` (default: latest); returns the versions applied.

    Needs no privilege when nothing is pending beyond reading ``oban_migrations``; creating the schema
    needs CREATE on the database, everything else CREATE on the schema and ownership of its tables. A
    missing privilege raises :class:`MigrationError` naming it.
    """
    q = quote_ident(prefix)
    applied_now: list[int] = []
    async with conn.transaction():
        who, applied = await _locked_versions(conn, prefix)
        for m in migrations(prefix):
            if m.version in applied or (target is not None and m.version > target):
                continue
            try:
                await conn.execute(m.up)
                await conn.execute(
                    f"INSERT INTO {q}.oban_migrations (version, name) VALUES ($1, $2)", m.version, m.name
                )
            except Exception as exc:
                if _is_denied(exc):
                    raise who.denied(exc, f"apply migration {m.version:03d}_{m.name}") from exc
                raise MigrationError(f"migration {m.version:03d}_{m.name} failed: {exc}") from exc
            applied_now.append(m.version)
    return applied_now


async def rollback(conn: Any, prefix: str = "public", *, target: int = 0) -> list[int]:
    """Undo applied migrations above ``target`` (0 removes everything); returns the versions undone."""
    q = quote_ident(prefix)
    undone: list[int] = []
    async with conn.transaction():
        who, applied = await _locked_versions(conn, prefix)
        for m in reversed(migrations(prefix)):
            if m.version <= target or m.version not in applied:
                continue
            if not m.down:
                raise MigrationError(f"migration {m.version:03d}_{m.name} has no down migration")
            try:
                await conn.execute(m.down)
                await conn.execute(f"DELETE FROM {q}.oban_migrations WHERE version = $1", m.version)
            except Exception as exc:
                if _is_denied(exc):
                    raise who.denied(exc, f"roll back migration {m.version:03d}_{m.name}") from exc
                raise
            undone.append(m.version)
        if target == 0:
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {q}.oban_migrations")
            except Exception as exc:
                if _is_denied(exc):
                    raise who.denied(exc, f"drop {q}.oban_migrations") from exc
                raise
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
