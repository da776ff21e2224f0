"""sql/schema.sql is the schema every migration path ends at (procrastinate's check).

A freshly migrated schema must render exactly to the file, so a migration that changes more or less
than meant, or a function file edited after it shipped, fails here with a diff. The rendering is
read from the catalogs (oban_py.db.schema_dump), with the schema name written ``__prefix__``.
"""

from __future__ import annotations

import asyncpg
import pytest

from oban_py.db.migrate import migrate, rollback
from oban_py.db.schema_dump import REGENERATE, render_schema, schema_diff, schema_file

pytestmark = pytest.mark.anyio


async def test_migrated_schema_matches_schema_sql(db: asyncpg.Connection, prefix: str) -> None:
    diff = schema_diff(await render_schema(db, prefix), schema_file().read_text())
    assert not diff, (
        "the migrated schema differs from sql/schema.sql; if the change is meant, regenerate it with\n"
        f"    {REGENERATE}\nand commit it with the migration.\n{diff}"
    )


async def test_rollback_to_zero_then_migrate_gives_the_same_schema(
    db: asyncpg.Connection, prefix: str
) -> None:
    migrated = await render_schema(db, prefix)
    await rollback(db, prefix, target=0)
    emptied = await render_schema(db, prefix)
    assert [ln for ln in emptied.splitlines() if ln and not ln.startswith("--")] == []
    await migrate(db, prefix)
    assert not schema_diff(await render_schema(db, prefix), migrated)
