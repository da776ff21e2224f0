"""The SQL loader and the typed query seam, without a database."""

from __future__ import annotations

import re
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from oban_py.db.codegen import TYPE_NAMES, names_path, render_names
from oban_py.db.driver import Driver
from oban_py.db.flags import PARKED
from oban_py.db.rows import job_from_record
from oban_py.db.sql import KINDS, Queries, query_kinds, read_queries, sql_dir
from oban_py.unique import PARKED as UNIQUE_PARKED

QUERIES = sql_dir() / "queries"


def _write(directory: Path, text: str, name: str = "q.sql") -> Path:
    (directory / name).write_text(text)
    return directory


def test_query_names_module_is_up_to_date() -> None:
    assert names_path().read_text() == render_names(), (
        "oban_py/db/query_names.py is out of date with sql/queries: run `python -m oban_py.db.codegen`"
    )


def test_literal_types_list_every_query_once_under_its_kind() -> None:
    from oban_py.db import query_names

    listed: dict[str, str] = {}
    for kind in KINDS:
        for name in typing.get_args(getattr(query_names, TYPE_NAMES[kind])):
            assert name not in listed, name
            listed[name] = kind
    assert listed == query_kinds()


def test_every_shipped_file_starts_with_a_comment_and_is_sorted() -> None:
    for path in sorted(QUERIES.glob("*.sql")):
        text = path.read_text()
        assert text.startswith("-- "), f"{path.name}: first line should say what the file holds"
        names = re.findall(r"^-- (?:name|fragment): ([a-z_0-9]+)", text, re.MULTILINE)
        if path.name != "_fragments.sql":
            assert names == sorted(names), f"{path.name}: queries out of order"


def test_parked_flag_is_written_by_name_in_sql() -> None:
    assert UNIQUE_PARKED is PARKED == 128
    for path in QUERIES.glob("*.sql"):
        assert not re.search(r"\b128\b", path.read_text()), f"{path.name}: write __parked__, not 128"
    assert "& 128 <> 0" in Queries("s")["job_parked"].text  # the parked index's predicate, verbatim


def test_job_columns_are_exactly_what_job_from_record_reads() -> None:
    text = Queries("s")["job_get"].text
    projection = text[len("SELECT ") : text.index("\nFROM")]
    names = [re.split(r"\s+AS\s+|\.", col.strip())[-1] for col in projection.split(",")]
    values: dict[str, Any] = {name: None for name in names}
    now = datetime.now(timezone.utc)
    values |= {"id": 1, "state": "available", "queue": "q", "worker": "W", "args": "{}", "meta": "{}"}
    values |= {"tags": [], "attempt": 0, "max_attempts": 20, "priority": 0}
    values |= {"inserted_at": now, "scheduled_at": now}

    class Row(dict[str, Any]):
        read: typing.ClassVar[set[str]] = set()

        def __getitem__(self, key: str) -> Any:
            self.read.add(key)
            return super().__getitem__(key)

        def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
            self.read.add(key)
            return super().get(key, default)

    job = job_from_record(Row(values))
    assert job.id == 1 and job.args == {}
    assert Row.read == set(names), "the job_columns fragment and rows.job_from_record disagree"


def test_params_become_positional_in_first_use_order(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "-- name: q :many\n-- :not_a_param in a comment\n"
        "SELECT :b::int, :a, :b, 'x'::text, __prefix__.t\nFROM t WHERE c = :a;\n",
    )
    query = Queries("my_schema", read_queries(tmp_path))["q"]
    assert query.kind == "many"
    assert query.params == ("b", "a")
    assert query.text == "SELECT $1::int, $2, $1, 'x'::text, \"my_schema\".t\nFROM t WHERE c = $2"
    assert query.args({"a": 1, "b": 2, "unused": 3}) == [2, 1]
    with pytest.raises(KeyError, match="query q needs parameter 'a'"):
        query.args({"b": 2})


def test_fragments_tokens_and_aliases_are_spliced(tmp_path: Path) -> None:
    _write(tmp_path, "-- fragment: cols\n-- why\nj.id, j.state::text AS state\n", "_fragments.sql")
    _write(
        tmp_path,
        "-- name: a :one\n-- uses {{cols}} (a comment: not spliced)\nSELECT {{cols}} FROM t AS j\n\n"
        "-- name: b :scalar\nSELECT {{ cols(h) }} FROM t AS h WHERE h.f & __parked__ <> 0\n",
    )
    sources = read_queries(tmp_path)
    assert sources["a"].body == "SELECT j.id, j.state::text AS state FROM t AS j"
    assert sources["b"].body == "SELECT h.id, h.state::text AS state FROM t AS h WHERE h.f & 128 <> 0"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("-- name: q\nSELECT 1\n", "query q has no result kind; end its header with one of :many"),
        ("-- name: q :rows\nSELECT 1\n", "query q has unknown result kind 'rows'"),
        ("-- name: Bad Name :many\nSELECT 1\n", "malformed query header"),
        ("-- name: q :many\nSELECT 1\n-- name: q :one\nSELECT 2\n", "duplicate query name 'q'"),
        ("-- name: q :many\nSELECT {{nope}}\n", "query q uses unknown fragment 'nope'"),
        ("-- name: q :many\nSELECT {{bad-ref}}\n", "query q has a malformed {{fragment}} reference"),
        ("-- name: q :many\nSELECT __nope__\n", "query q uses unknown token __nope__"),
        ("-- fragment: f :many\nx\n", "malformed or duplicate fragment header"),
    ],
)
def test_malformed_sql_fails_at_load(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(error)):
        read_queries(_write(tmp_path, text))


def test_unknown_query_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="no query named 'job_gte'"):
        Queries("s")["job_gte"]


class _Pool:
    def get_max_size(self) -> int:
        return 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "query", "error"),
    [
        ("fetch", "job_prune", "query job_prune is :exec: run it with Driver.execute(), not Driver.fetch()"),
        ("fetchrow", "job_get", "query job_get is :many: run it with Driver.fetch(), not Driver.fetchrow()"),
        ("fetchval", "jobs_dead_tuples", "is :one: run it with Driver.fetchrow(), not Driver.fetchval()"),
        ("execute", "node_heartbeat", "is :scalar: run it with Driver.fetchval(), not Driver.execute()"),
    ],
)
async def test_driver_refuses_a_query_of_another_kind(method: str, query: str, error: str) -> None:
    driver = Driver(_Pool(), "s")  # type: ignore[arg-type]
    conn = object()  # never used: the kind is checked before any connection is touched
    with pytest.raises(TypeError, match=re.escape(error)):
        await getattr(driver, method)(query, conn)


def test_mypy_rejects_an_unknown_name_or_the_wrong_method(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from oban_py.db.driver import Driver\n\n\n"
        "async def probe(driver: Driver) -> None:\n"
        '    await driver.fetch("job_gte")\n'
        '    await driver.fetch("job_prune")\n'
        '    await driver.execute("job_prune")\n'
        '    await driver.fetchrow("job_unpark", id=1)\n'
    )
    out, _, _ = api.run(["--strict", "--follow-imports=silent", "--no-error-summary", str(probe)])
    lines = sorted(int(m) for m in re.findall(r"probe\.py:(\d+): error", out))
    assert lines == [5, 6], out
