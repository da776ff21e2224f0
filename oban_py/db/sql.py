"""Loads the SQL shipped in ``sql/`` and prepares it for asyncpg.

Queries live in ``sql/queries/*.sql``, one file per table or concern, each under a header that names
the query and the shape of its result::

    -- name: job_get :many
    -- Why the query is written the way it is (the comment right below the header).
    SELECT ...

The kind says which :class:`~oban_py.db.driver.Driver` method runs it: ``:many`` (``fetch``, a list of
rows), ``:one`` (``fetchrow``, a row or ``None``), ``:scalar`` (``fetchval``, one value) or ``:exec``
(``execute``, the status string). The driver refuses any other pairing, and
:mod:`oban_py.db.query_names` lists the names of each kind as ``Literal`` types, so a misspelt name or a
``fetch`` of an ``:exec`` query fails mypy (regenerate it with ``python -m oban_py.db.codegen``).

The text is rewritten here, once:

* ``:name`` parameters become ``$1, $2, ...``, so the driver passes keyword arguments and cannot get
  the order wrong;
* ``{{fragment}}`` is replaced by a ``-- fragment: fragment`` block (``_fragments.sql``), written for a
  row aliased ``j``; ``{{fragment(h)}}`` uses alias ``h`` instead. The job row projection is one;
* ``__parked__`` becomes :data:`~oban_py.db.flags.PARKED`, so the flag has one value for SQL and Python;
* ``__prefix__`` stands for the quoted schema; each :class:`Queries` binds one schema.

Everything is read at import, so a missing file, a duplicate name, a header without a known kind, an
unknown fragment or token fails at once, and asking for an unknown query name raises ``KeyError``
instead of sending broken SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from .flags import PARKED

if TYPE_CHECKING:
    from .query_names import QueryName

__all__ = [
    "KINDS",
    "METHODS",
    "Kind",
    "Migration",
    "Queries",
    "Query",
    "QuerySource",
    "migrations",
    "query_kinds",
    "quote_ident",
    "read_queries",
    "sql_dir",
]

Kind = Literal["many", "one", "scalar", "exec"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: The Driver method that runs each kind of query.
METHODS: dict[Kind, str] = {"many": "fetch", "one": "fetchrow", "scalar": "fetchval", "exec": "execute"}
#: Constants written by name in SQL, with the Python value they stand for.
TOKENS: dict[str, str] = {"__parked__": str(PARKED)}

_WORD = re.compile(r"^[a-z_][a-z0-9_]*$")
_HEADER = re.compile(r"^--\s*(name|fragment):(.*)$", re.MULTILINE)
_NAME_KIND = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?::\s*(\S+))?\s*$")
_SPLICE = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*(?:\(\s*([a-z_][a-z0-9_]*)\s*\))?\s*\}\}")
_TOKEN = re.compile(r"__[a-z]+__")
_FRAGMENT_ALIAS = re.compile(r"\bj\.")
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
    """One named statement: its result kind, its ``$n`` text and the parameter names in order."""

    name: str
    kind: Kind
    text: str
    params: tuple[str, ...]

    def args(self, values: dict[str, Any]) -> list[Any]:
        try:
            return [values[p] for p in self.params]
        except KeyError as exc:
            raise KeyError(f"query {self.name} needs parameter {exc.args[0]!r}") from None


@dataclass(frozen=True)
class QuerySource:
    """A query without its comments, fragments and tokens substituted (``__prefix__`` is not)."""

    kind: Kind
    body: str


def _statement(body: str) -> str:
    """The body without its comment lines (the why-comment stays in the file, not on the wire)."""
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
    return "\n".join(lines).strip().rstrip(";").strip()


def _compile(statement: str) -> tuple[str, tuple[str, ...]]:
    order: list[str] = []

    def repl(match: re.Match[str]) -> str:
        param = match.group(1)
        if param not in order:
            order.append(param)
        return f"${order.index(param) + 1}"

    return _PARAM.sub(repl, statement), tuple(order)


def _parse_kind(path: Path, spec: str) -> tuple[str, Kind]:
    match = _NAME_KIND.match(spec)
    if match is None:
        raise RuntimeError(f"{path}: malformed query header {spec.strip()!r}; write `-- name: <name> :many`")
    name, kind = match.group(1), match.group(2)
    for known in KINDS:
        if kind == known:
            return name, known
    hint = "has no result kind" if kind is None else f"has unknown result kind {kind!r}"
    raise RuntimeError(f"{path}: query {name} {hint}; end its header with one of :{', :'.join(KINDS)}")


def _splice(name: str, body: str, fragments: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        fragment, alias = match.group(1), match.group(2)
        if fragment not in fragments:
            raise RuntimeError(f"query {name} uses unknown fragment {fragment!r}; known: {sorted(fragments)}")
        text = fragments[fragment]
        return text if alias is None else _FRAGMENT_ALIAS.sub(f"{alias}.", text)

    def token(match: re.Match[str]) -> str:
        word = match.group(0)
        if word == "__prefix__":
            return word
        if word not in TOKENS:
            raise RuntimeError(
                f"query {name} uses unknown token {word}; known: __prefix__, {', '.join(TOKENS)}"
            )
        return TOKENS[word]

    spliced = _SPLICE.sub(repl, body)
    if "{{" in spliced:
        raise RuntimeError(f"query {name} has a malformed {{{{fragment}}}} reference")
    return _TOKEN.sub(token, spliced)


def read_queries(directory: Path) -> dict[str, QuerySource]:
    """Parse every ``*.sql`` file of ``directory``; raises ``RuntimeError`` naming the first mistake."""
    written: dict[str, tuple[Kind, str]] = {}
    fragments: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        content = path.read_text()
        headers = list(_HEADER.finditer(content))
        for i, header in enumerate(headers):
            end = headers[i + 1].start() if i + 1 < len(headers) else len(content)
            body = content[header.end() : end]
            if header.group(1) == "fragment":
                name = header.group(2).strip()
                if not _WORD.match(name) or name in fragments:
                    raise RuntimeError(f"{path}: malformed or duplicate fragment header {name!r}")
                fragments[name] = _statement(body)
                continue
            name, kind = _parse_kind(path, header.group(2))
            if name in written:
                raise RuntimeError(f"duplicate query name {name!r} in {path}")
            written[name] = (kind, _statement(body))  # comments dropped first: they may name fragments
    return {name: QuerySource(kind, _splice(name, body, fragments)) for name, (kind, body) in written.items()}


@cache
def _sources() -> dict[str, QuerySource]:
    return read_queries(sql_dir() / "queries")


def query_kinds() -> dict[str, Kind]:
    """Every query name with its result kind, sorted by name (the source of ``query_names``)."""
    return {name: source.kind for name, source in sorted(_sources().items())}


class Queries:
    """All named queries compiled for one schema prefix (the shipped ones unless ``sources`` is given)."""

    def __init__(self, prefix: str, sources: Mapping[str, QuerySource] | None = None) -> None:
        self.prefix = prefix
        self._quoted = quote_ident(prefix)
        self._compiled: dict[str, Query] = {}
        for name, source in (_sources() if sources is None else sources).items():
            text, params = _compile(source.body.replace("__prefix__", self._quoted))
            self._compiled[name] = Query(name, source.kind, text, params)

    def __getitem__(self, name: QueryName) -> Query:
        try:
            return self._compiled[name]
        except KeyError:
            raise KeyError(f"no query named {name!r}; known: {sorted(self._compiled)}") from None

    def names(self) -> list[str]:
        return sorted(self._compiled)


@dataclass(frozen=True)
class Migration:
    """One numbered step, ready to run: includes expanded, tokens and the prefix substituted."""

    version: int
    name: str
    up: str
    down: str


# A whole line `-- include: functions/oban_fetch_v1.sql` (a path under sql/) in a migration.
_INCLUDE = re.compile(r"^--[ \t]*include:[ \t]*(\S+)[ \t]*$", re.MULTILINE)


def _migration_text(path: Path, quoted: str) -> str:
    """A migration file with each include line replaced by the file it names (one level deep).

    A versioned function (``sql/functions/oban_fetch_v1.sql``) is written once and created by the
    migration that includes it, so its text is not copied into a migration where nothing tests it.
    """
    root = sql_dir().resolve()

    def include(match: re.Match[str]) -> str:
        target = (root / match.group(1)).resolve()
        if root not in target.parents or not target.is_file():
            raise RuntimeError(f"{path.name}: cannot include {match.group(1)!r}: no such file under {root}")
        return target.read_text()

    text = _INCLUDE.sub(include, path.read_text())
    for token, value in TOKENS.items():
        text = text.replace(token, value)
    return text.replace("__prefix__", quoted)


def migrations(prefix: str) -> list[Migration]:
    """The versioned migrations in order, ready to run against schema ``prefix``."""
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
                up=_migration_text(up, quoted),
                down=_migration_text(down, quoted) if down.exists() else "",
            )
        )
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


# Fail at import if the SQL is missing or malformed.
_sources()
