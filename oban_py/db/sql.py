"""Loads the SQL shipped in ``sql/`` and prepares it for asyncpg.

Queries live in ``sql/queries/*.sql`` under ``-- name: <query_name>`` headers (the text right below a
header, up to the first statement line, is its why-comment). Parameters are written ``:name`` and
rewritten to ``$1, $2, ...`` here once, so the driver passes keyword arguments and cannot get the
order wrong. ``__prefix__`` stands for the quoted schema; each :class:`Queries` binds one schema.

Everything is read at import, so a missing file or a duplicate name fails at once, and asking for
an unknown query name raises ``KeyError`` instead of sending broken SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
# ``:name`` not preceded by another colon or a word character (skips ``::type`` casts and ``a:b``).
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def sql_dir() -> Path:
    """Where the SQL files are: inside the package when installed, at the repo root in a checkout."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "sql"
    return packaged if packaged.is_dir() else here.parent / "sql"


def quote_ident(name: str) -> str:
    """Quote a schema name; only plain identifiers are accepted (validated at configuration)."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid schema name {name!r}")
    return '"' + name + '"'


@dataclass(frozen=True)
class Query:
    """One named statement: its ``$n`` text and the parameter names in positional order."""

    name: str
    text: str
    params: tuple[str, ...]

    def args(self, values: dict[str, Any]) -> list[Any]:
        try:
            return [values[p] for p in self.params]
        except KeyError as exc:
            raise KeyError(f"query {self.name} needs parameter {exc.args[0]!r}") from None


def _compile(name: str, body: str) -> tuple[str, tuple[str, ...]]:
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
    text = "\n".join(lines).strip().rstrip(";").strip()
    order: list[str] = []

    def repl(match: re.Match[str]) -> str:
        param = match.group(1)
        if param not in order:
            order.append(param)
        return f"${order.index(param) + 1}"

    return _PARAM.sub(repl, text), tuple(order)


@cache
def _raw_queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        content = path.read_text()
        headers = list(_HEADER.finditer(content))
        for i, header in enumerate(headers):
            end = headers[i + 1].start() if i + 1 < len(headers) else len(content)
            name = header.group(1)
            if name in found:
                raise RuntimeError(f"duplicate query name {name!r} in {path}")
            found[name] = content[header.end() : end]
    return found


class Queries:
    """All named queries compiled for one schema prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._quoted = quote_ident(prefix)
        self._compiled: dict[str, Query] = {}
        for name, body in _raw_queries().items():
            text, params = _compile(name, body.replace("__prefix__", self._quoted))
            self._compiled[name] = Query(name, text, params)

    def __getitem__(self, name: str) -> Query:
        try:
            return self._compiled[name]
        except KeyError:
            raise KeyError(f"no query named {name!r}; known: {sorted(self._compiled)}") from None

    def names(self) -> list[str]:
        return sorted(self._compiled)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str


def migrations(prefix: str) -> list[Migration]:
    """The versioned migrations in order, with the prefix substituted."""
    quoted = quote_ident(prefix)
    found: list[Migration] = []
    for up in sorted((sql_dir() / "migrations").glob("*.up.sql")):
        stem = up.name[: -len(".up.sql")]
        version_text, _, name = stem.partition("_")
        down = up.with_name(f"{stem}.down.sql")
        found.append(
            Migration(
                version=int(version_text),
                name=name,
                up=up.read_text().replace("__prefix__", quoted),
                down=down.read_text().replace("__prefix__", quoted) if down.exists() else "",
            )
        )
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


# Fail at import if the SQL is missing or malformed.
_raw_queries()
