"""Renders a migrated schema as canonical text: the check behind ``sql/schema.sql``.

``sql/schema.sql`` is what every schema looks like after all migrations; ``tests/test_schema.py``
migrates a fresh schema and compares. So a migration that changes more (or less) than its author
meant, or a function file edited after it shipped, fails a test with a diff instead of surfacing on
a user's database. Regenerate it after adding a migration::

    python -m oban_py.db.schema_dump postgresql://postgres@127.0.0.1/postgres

The text is read from the catalogs, not from ``pg_dump`` (a fresh machine may not have it, and its
output changes with its version): types, tables with their columns (type, default, nullability) and
storage options, constraints (``pg_get_constraintdef``), indexes (``pg_get_indexdef``), functions
(``pg_get_functiondef``), triggers and comments, each kind sorted by name, with the schema name
written ``__prefix__``. It is read with an empty ``search_path``, so every name comes out qualified.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import asyncpg

from .migrate import migrate
from .sql import quote_ident, sql_dir

__all__ = ["render_schema", "schema_diff", "schema_file", "write_schema"]

#: The schema ``write_schema`` migrates and renders, then drops: a name unlikely to occur in SQL text.
SCRATCH_SCHEMA = "oban_schema_dump"
REGENERATE = "python -m oban_py.db.schema_dump <dsn>"
_DO_NOT_EDIT = f"Do not edit: `{REGENERATE}` rewrites it, and tests/test_schema.py checks it."

# The schema's oid, by its exact name ($1::regnamespace would fold it to lower case, and fail on a
# schema that does not exist: an absent schema renders empty).
_NS = "(SELECT n.oid FROM pg_namespace AS n WHERE n.nspname = $1)"

_TYPES = f"""
SELECT quote_ident(t.typname) AS name, t.typtype::text AS kind,
       (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
        FROM pg_enum AS e WHERE e.enumtypid = t.oid) AS labels,
       (SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                          ORDER BY a.attnum)
        FROM pg_attribute AS a
        WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped) AS fields
FROM pg_type AS t LEFT JOIN pg_class AS c ON c.oid = t.typrelid
WHERE t.typnamespace = {_NS} AND (t.typtype = 'e' OR (t.typtype = 'c' AND c.relkind = 'c'))
ORDER BY t.typname
"""

_TABLES = f"""
SELECT c.oid, quote_ident(c.relname) AS name, c.reloptions AS options,
       obj_description(c.oid, 'pg_class') AS comment
FROM pg_class AS c WHERE c.relnamespace = {_NS} AND c.relkind IN ('r', 'p')
ORDER BY c.relname
"""

_COLUMNS = f"""
SELECT a.attrelid AS table_oid, quote_ident(a.attname) AS name,
       format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
       CASE a.attidentity WHEN 'a' THEN 'ALWAYS' WHEN 'd' THEN 'BY DEFAULT' END AS identity,
       pg_get_expr(d.adbin, d.adrelid) AS default,
       col_description(a.attrelid, a.attnum) AS comment
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = {_NS} AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

# NOT NULL is part of each column (PostgreSQL 18 also lists it here, as contype 'n').
_CONSTRAINTS = f"""
SELECT quote_ident(c.relname) AS table_name, quote_ident(k.conname) AS name,
       pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
WHERE c.relnamespace = {_NS} AND k.contype <> 'n'
ORDER BY c.relname, k.conname
"""

_INDEXES = f"""
SELECT pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
WHERE c.relnamespace = {_NS}
ORDER BY c.relname
"""

_SEQUENCES = f"""
SELECT quote_ident(c.relname) AS name, format_type(s.seqtypid, NULL) AS type
FROM pg_class AS c JOIN pg_sequence AS s ON s.seqrelid = c.oid
WHERE c.relnamespace = {_NS}
ORDER BY c.relname
"""

_FUNCTIONS = f"""
SELECT pg_get_functiondef(p.oid) AS definition
FROM pg_proc AS p
WHERE p.pronamespace = {_NS} AND p.prokind IN ('f', 'p')
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
"""

_TRIGGERS = f"""
SELECT pg_get_triggerdef(t.oid) AS definition
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE c.relnamespace = {_NS} AND NOT t.tgisinternal
ORDER BY c.relname, t.tgname
"""


def schema_file() -> Path:
    """The canonical rendering, ``sql/schema.sql``."""
    return sql_dir() / "schema.sql"


async def render_schema(conn: Any, prefix: str) -> str:
    """The schema ``prefix`` as canonical text (see the module docstring); only the header if it is absent."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('search_path', '', true)")
        parts = [
            f"-- The oban_py schema after every migration, by oban_py.db.schema_dump.\n-- {_DO_NOT_EDIT}"
        ]
        parts += [_type(r) for r in await conn.fetch(_TYPES, prefix)]
        columns: dict[int, list[Any]] = {}
        for column in await conn.fetch(_COLUMNS, prefix):
            columns.setdefault(column["table_oid"], []).append(column)
        parts += [_table(r, columns.get(r["oid"], [])) for r in await conn.fetch(_TABLES, prefix)]
        parts += [
            f"CREATE SEQUENCE __prefix__.{r['name']} AS {r['type']};"
            for r in await conn.fetch(_SEQUENCES, prefix)
        ]
        parts += [
            f"ALTER TABLE __prefix__.{r['table_name']} ADD CONSTRAINT {r['name']} {r['definition']};"
            for r in await conn.fetch(_CONSTRAINTS, prefix)
        ]
        for query in (_INDEXES, _TRIGGERS):
            parts += [r["definition"] + ";" for r in await conn.fetch(query, prefix)]
        parts += [r["definition"].rstrip() + ";" for r in await conn.fetch(_FUNCTIONS, prefix)]
    return _normalise("\n\n".join(parts) + "\n", prefix)


def _type(row: Any) -> str:
    if row["kind"] == "e":
        return f"CREATE TYPE __prefix__.{row['name']} AS ENUM ({row['labels']});"
    return f"CREATE TYPE __prefix__.{row['name']} AS ({row['fields']});"


def _table(row: Any, columns: list[Any]) -> str:
    lines = []
    for c in columns:
        line = f"    {c['name']} {c['type']}"
        if c["identity"]:
            line += f" GENERATED {c['identity']} AS IDENTITY"
        if c["default"] is not None:
            line += f" DEFAULT {c['default']}"
        if c["not_null"]:
            line += " NOT NULL"
        lines.append(line)
    name = f"__prefix__.{row['name']}"
    text = f"CREATE TABLE {name} (\n" + ",\n".join(lines) + "\n)"
    if row["options"]:
        text += f" WITH ({', '.join(row['options'])})"
    text += ";"
    if row["comment"] is not None:
        text += f"\nCOMMENT ON TABLE {name} IS {_literal(row['comment'])};"
    for c in columns:
        if c["comment"] is not None:
            text += f"\nCOMMENT ON COLUMN {name}.{c['name']} IS {_literal(c['comment'])};"
    return text


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _normalise(text: str, prefix: str) -> str:
    """Writes the schema as ``__prefix__``: quoted (as migrations substitute it) or as a qualifier."""
    name = re.escape(prefix)
    return re.sub(rf'"{name}"|(?<![\w$"]){name}(?=\.)', "__prefix__", text)


def schema_diff(actual: str, expected: str) -> str:
    """A unified diff from ``sql/schema.sql`` to ``actual``; empty when they match."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile="sql/schema.sql",
            tofile="migrated schema",
        )
    )


async def write_schema(dsn: str) -> Path:
    """Migrates a scratch schema on ``dsn``, writes its rendering to ``sql/schema.sql``, drops it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(SCRATCH_SCHEMA)} CASCADE")
        try:
            await migrate(conn, SCRATCH_SCHEMA)
            text = await render_schema(conn, SCRATCH_SCHEMA)
        finally:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(SCRATCH_SCHEMA)} CASCADE")
    finally:
        await conn.close()
    path = schema_file()
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(f"usage: {REGENERATE}\n(migrates and drops schema {SCRATCH_SCHEMA!r} there)", file=sys.stderr)
        return 2
    print(f"wrote {asyncio.run(write_schema(args[0]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
