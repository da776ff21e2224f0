"""Configuration papercuts: DATABASE_URL and SQLAlchemy URLs, the embedded-server warning, another
Oban's tables in the schema, import errors of worker modules."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from oban_py import Config, Oban
from oban_py.db.migrate import current_version, migrate
from oban_py.errors import ConfigError, MigrationError
from oban_py.runner import import_modules, warn_embedded

pytestmark = pytest.mark.anyio


async def test_database_url_with_a_sqlalchemy_scheme_connects(
    monkeypatch: pytest.MonkeyPatch, test_dsn: str, prefix: str
) -> None:
    monkeypatch.delenv("OBAN_DSN", raising=False)
    monkeypatch.setenv("DATABASE_URL", test_dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    async with Oban(prefix=prefix) as oban:
        assert oban.config.dsn == test_dsn
        assert await oban.check_queues() is not None


def test_no_dsn_warns_once_naming_the_data_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "pg"
    with caplog.at_level(logging.WARNING, logger="oban_py.runner"):
        warn_embedded(Config(embedded_dir=str(data)))
    [record] = caplog.records
    assert "no DSN configured" in record.getMessage() and str(data) in record.getMessage()
    assert "\n" not in record.getMessage()


async def _fake_elixir_oban(conn: asyncpg.Connection, schema: str) -> None:
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".oban_jobs (id bigserial PRIMARY KEY, state text NOT NULL, queue text,'
        " worker text, args jsonb, inserted_at timestamp)"
    )
    await conn.execute(f'CREATE TABLE "{schema}".oban_peers (name text PRIMARY KEY, node text)')
    await conn.execute(f"COMMENT ON TABLE \"{schema}\".oban_jobs IS '12'")


async def test_migrate_refuses_a_schema_with_another_obans_tables(
    db: asyncpg.Connection, prefix: str
) -> None:
    schema = f"{prefix}_elixir"
    try:
        await _fake_elixir_oban(db, schema)
        with pytest.raises(MigrationError) as info:
            await migrate(db, schema)
        message = str(info.value)
        assert "another Oban (oban_jobs, oban_peers; oban_jobs is marked as Oban version 12)" in message
        assert "--prefix" in message and "\n" not in message
        assert await current_version(db, schema) == 0  # nothing was written, not even oban_migrations
        assert await db.fetchval(f'SELECT count(*) FROM "{schema}".oban_jobs') == 0

        # An oban_migrations table that is not ours (Ecto's, say) is theirs too.
        await db.execute(f'DROP TABLE "{schema}".oban_jobs, "{schema}".oban_peers')
        await db.execute(f'CREATE TABLE "{schema}".oban_migrations (version bigint, inserted_at timestamp)')
        with pytest.raises(MigrationError, match="oban_migrations table that is not oban_py's"):
            await migrate(db, schema)
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert await migrate(db, prefix) == []  # our own schema: nothing pending, no complaint


async def test_cli_migrate_names_the_conflict(db: asyncpg.Connection, prefix: str, test_dsn: str) -> None:
    schema = f"{prefix}_elixir"
    try:
        await _fake_elixir_oban(db, schema)
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "oban_py", "migrate", "--dsn", test_dsn, "--prefix", schema),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k not in ("OBAN_CONFIG", "DATABASE_URL")},
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    stderr = err.decode()
    assert proc.returncode != 0
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert "another Oban" in line and "--prefix" in line and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("source", "where", "what"),
    [
        ("x = 1\nimport no_such_dependency\n", "app/broken.py:2", "No module named 'no_such_dependency'"),
        ("def f(:\n    pass\n", "app/broken.py:1", "SyntaxError: invalid syntax"),
        ("import json\n\nVALUE = json.loads('nope')\n", "app/broken.py:3", "JSONDecodeError"),
    ],
)
def test_import_errors_name_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, where: str, what: str
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "broken.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError) as info:
        import_modules(["app.broken"], source="oban.toml")
    message = str(info.value)
    assert f"(at {where})" in message and what in message and "\n" not in message
    assert message.startswith("oban.toml: modules='app.broken': could not import module 'app.broken'")


def test_a_missing_module_has_no_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        import_modules(["no_such_module_here"])
    assert str(info.value).endswith("ModuleNotFoundError: No module named 'no_such_module_here'")
