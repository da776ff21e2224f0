"""oban_fetch_v1 part by part: each helper called directly on prepared rows, then the whole against 002's.

The parts are in ``sql/functions/oban_fetch_v1.sql``; each test here prepares the few rows a part reads
and asserts what it returns or writes. The last test runs the same fetches through ``oban_fetch`` (a
schema at migration 003) and ``oban_fetch_v1`` and asserts they claim, skip and park the same jobs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from oban_py.db.migrate import migrate

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
US = chr(31)  # the separator inside lock keys and rate scopes


class Jobs:
    """Rows of one test schema, inserted with the few columns a part reads."""

    def __init__(self, db: asyncpg.Connection, prefix: str) -> None:
        self.db = db
        self.p = f'"{prefix}"'

    async def add(self, queue: str = "q", state: str = "available", **cols: Any) -> int:
        cols = {"queue": queue, "worker": "W", "state": state, **cols}
        names = ", ".join(cols)
        params = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        return int(
            await self.db.fetchval(
                f"INSERT INTO {self.p}.oban_jobs ({names}) VALUES ({params}) RETURNING id", *cols.values()
            )
        )

    async def row(self, job_id: int) -> asyncpg.Record:
        return await self.db.fetchrow(f"SELECT * FROM {self.p}.oban_jobs WHERE id = $1", job_id)

    def cands(self, *items: dict[str, Any]) -> str:
        """An oban_candidate[] literal; each item: id, and maybe key, to, skip, part, priority, at."""
        rows = []
        for c in items:
            at = T0 + timedelta(seconds=c.get("at", 0))
            rows.append(
                f"ROW({c['id']}, {_lit(c.get('key'))}, {_lit(c.get('to'))}::smallint, {bool(c.get('skip'))},"
                f" {_lit(c.get('part'))}, {c.get('priority', 0)}::smallint, '{at.isoformat()}'::timestamptz)"
                f"::{self.p}.oban_candidate"
            )
        return (
            f"ARRAY[{', '.join(rows)}]::{self.p}.oban_candidate[]"
            if rows
            else f"'{{}}'::{self.p}.oban_candidate[]"
        )


def _lit(value: Any) -> str:
    if value is None:
        return "NULL"
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


@pytest.fixture
def jobs(db: asyncpg.Connection, prefix: str) -> Jobs:
    return Jobs(db, prefix)


@pytest.fixture
async def other(test_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A second session, to see locks taken by the first."""
    conn = await asyncpg.connect(test_dsn)
    try:
        yield conn
    finally:
        await conn.close()


# --------------------------------------------------------------------------- ack


async def test_ack_completes_matching_claims_and_returns_the_parked(jobs: Jobs) -> None:
    plain = await jobs.add(state="executing", attempted_at=T0)
    # Group 'completed' but not 'executing': completing re-enters the group, so the row is parked.
    parks = await jobs.add(state="executing", attempted_at=T0, unique_states=16)
    stale = await jobs.add(state="executing", attempted_at=T0 + timedelta(seconds=1))
    waiting = await jobs.add(state="available", attempted_at=T0)
    parked = await jobs.db.fetch(
        f"SELECT * FROM {jobs.p}.oban_fetch_v1_ack($1, $2) AS a(id)",
        [plain, parks, stale, waiting],
        [T0, T0, T0, T0],
    )
    assert [r["id"] for r in parked] == [parks]
    assert [(await jobs.row(i))["state"] for i in (plain, parks, stale, waiting)] == [
        "completed",
        "completed",
        "executing",  # claimed again since: the old claim's ack is a no-op
        "available",
    ]
    assert (await jobs.row(parks))["unique_states"] == 16 | 128


# --------------------------------------------------------------------------- locks and budgets


async def test_lock_is_per_schema_space_and_name(
    db: asyncpg.Connection, other: asyncpg.Connection, prefix: str
) -> None:
    def key(schema: str, space: str, name: str) -> str:
        return f"hashtextextended('\"{schema}\"' || chr(31) || '{space}' || chr(31) || '{name}', 0)"

    async def free(schema: str, space: str, name: str) -> bool:
        return bool(await other.fetchval(f"SELECT pg_try_advisory_xact_lock({key(schema, space, name)})"))

    async with db.transaction():
        await db.execute(f"SELECT \"{prefix}\".oban_fetch_v1_lock('q', 'emails')")
        async with other.transaction():
            assert not await free(prefix, "q", "emails")
            assert await free(prefix, "k", "emails")  # a key named like a queue is another lock
            assert await free(prefix, "q", "other")
            assert await free(prefix + "x", "q", "emails")  # another schema on the same database
    async with other.transaction():
        assert await free(prefix, "q", "emails")  # released at commit


async def test_global_room_counts_the_queues_executing_rows(jobs: Jobs) -> None:
    for _ in range(2):
        await jobs.add(state="executing")
    await jobs.add(queue="other", state="executing")
    await jobs.add(state="available")
    room = f"SELECT {jobs.p}.oban_fetch_v1_global_room($1, $2)"
    assert await jobs.db.fetchval(room, "q", 5) == 3
    assert await jobs.db.fetchval(room, "q", 1) == -1  # a lowered limit still overshot
    assert await jobs.db.fetchval(room, "empty", 4) == 4


async def test_rate_scope_names_the_window_row(jobs: Jobs) -> None:
    scope = f"SELECT {jobs.p}.oban_fetch_v1_rate_scope($1, $2, $3)"
    assert await jobs.db.fetchval(scope, "q", None, "x") == "q"
    assert await jobs.db.fetchval(scope, "q", "worker", "W") == f"q{US}W"
    assert await jobs.db.fetchval(scope, "q", "args.a", None) == f"q{US}"


async def test_rate_room_counts_starts_inside_the_period(jobs: Jobs) -> None:
    now = T0 + timedelta(hours=1)
    starts = [now - timedelta(seconds=s) for s in (1, 10, 100)]
    await jobs.db.execute(f"INSERT INTO {jobs.p}.oban_rate_windows (scope, starts) VALUES ('q', $1)", starts)
    room = f"SELECT {jobs.p}.oban_fetch_v1_rate_room($1, $2, $3, $4)"
    assert await jobs.db.fetchval(room, "q", 5, 60.0, now) == 3
    assert await jobs.db.fetchval(room, "q", 5, 1000.0, now) == 2
    assert await jobs.db.fetchval(room, "unseen", 5, 60.0, now) == 5


async def test_rate_path_splits_args_and_meta_paths(jobs: Jobs) -> None:
    path = f"SELECT {jobs.p}.oban_fetch_v1_rate_path($1)"
    assert await jobs.db.fetchval(path, "args.account.id") == ["account", "id"]
    assert await jobs.db.fetchval(path, "meta.tenant") == ["tenant"]
    assert await jobs.db.fetchval(path, "worker") is None
    assert await jobs.db.fetchval(path, None) is None


# --------------------------------------------------------------------------- candidates


async def _cands(jobs: Jobs, call: str, *args: Any) -> list[asyncpg.Record]:
    return list(await jobs.db.fetch(f"SELECT (c).* FROM unnest({jobs.p}.{call}) AS c", *args))


async def test_head_is_the_queue_in_priority_order_skipping_locked_rows(
    jobs: Jobs, other: asyncpg.Connection
) -> None:
    late = await jobs.add(priority=1, args=json.dumps({"a": {"b": "late"}}))
    first = await jobs.add(priority=0, scheduled_at=T0, args=json.dumps({"a": {"b": "first"}}))
    second = await jobs.add(priority=0, scheduled_at=T0 + timedelta(seconds=1), limit_key="k", limit_to=2)
    taken = await jobs.add(priority=0)
    await jobs.add(queue="other")
    await jobs.add(state="scheduled")
    head = "oban_fetch_v1_head($1, $2, $3, $4)"
    async with other.transaction():
        await other.execute(f"SELECT 1 FROM {jobs.p}.oban_jobs WHERE id = $1 FOR UPDATE", taken)
        rows = await _cands(jobs, head, "q", 10, "args.a.b", ["a", "b"])
    assert [r["cid"] for r in rows] == [first, second, late]
    assert [r["cpart"] for r in rows] == ["first", None, "late"]
    assert (rows[1]["ckey"], rows[1]["cto"], rows[1]["cskip"]) == ("k", 2, False)
    assert [r["cid"] for r in await _cands(jobs, head, "q", 2, None, None)] == [first, second]


async def test_other_keys_brings_the_best_jobs_of_keys_not_seen_yet(jobs: Jobs) -> None:
    for priority in (0, 1):
        await jobs.add(limit_key="seen", limit_to=1, priority=priority)
    b = [await jobs.add(limit_key="b", limit_to=1, priority=p) for p in (2, 1, 3)]
    c = await jobs.add(limit_key="c", limit_to=1)
    await jobs.add()  # no key: only round 1 sees it
    await jobs.add(queue="other", limit_key="b", limit_to=1)
    more = "oban_fetch_v1_other_keys($1, $2, $3, NULL, NULL)"
    assert sorted(r["cid"] for r in await _cands(jobs, more, "q", 1, ["seen"])) == sorted([b[1], c])
    assert sorted(r["cid"] for r in await _cands(jobs, more, "q", 2, ["seen", "c"])) == sorted([b[1], b[0]])


# --------------------------------------------------------------------------- keyed slots and rate partitions


async def test_key_slots_locks_new_keys_and_counts_their_running_jobs(
    jobs: Jobs, other: asyncpg.Connection
) -> None:
    for queue in ("q", "elsewhere"):  # a key's slots are shared across queues
        await jobs.add(queue=queue, state="executing", limit_key="a", limit_to=3)
    await jobs.add(state="available", limit_key="b", limit_to=3)
    slots = f"SELECT s.locked, s.running FROM {jobs.p}.oban_fetch_v1_key_slots({{}}, $1, $2::jsonb) AS s"
    cands = jobs.cands({"id": 1, "key": "b"}, {"id": 2, "key": "a"}, {"id": 3}, {"id": 4, "key": "a"})
    async with jobs.db.transaction():
        row = await jobs.db.fetchrow(slots.format(cands), [], "{}")
        assert row["locked"] == ["a", "b"]
        assert json.loads(row["running"]) == {"a": 2}
        lock_b = f"hashtextextended('\"{jobs.p[1:-1]}\"' || chr(31) || 'k' || chr(31) || 'b', 0)"
        async with other.transaction():
            assert not await other.fetchval(f"SELECT pg_try_advisory_xact_lock({lock_b})")
        # A second round adds only the keys it has not seen, and keeps the counts it has.
        again = await jobs.db.fetchrow(
            slots.format(jobs.cands({"id": 5, "key": "a"}, {"id": 6, "key": "c"})), ["a", "b"], '{"a": 2}'
        )
        assert again["locked"] == ["a", "b", "c"]
        assert json.loads(again["running"]) == {"a": 2}
    none = await jobs.db.fetchrow(slots.format(jobs.cands({"id": 7})), [], "{}")
    assert (none["locked"], json.loads(none["running"])) == ([], {})


async def test_rate_parts_counts_recent_starts_of_partitions_not_counted_yet(jobs: Jobs) -> None:
    now = T0 + timedelta(hours=1)
    recent, old = now - timedelta(seconds=5), now - timedelta(seconds=500)
    for scope, starts in ((f"q{US}A", [recent, recent, old]), (f"q{US}B", [recent]), (f"q{US}", [recent])):
        await jobs.db.execute(
            f"INSERT INTO {jobs.p}.oban_rate_windows (scope, starts) VALUES ($1, $2)", scope, starts
        )
    parts = f"SELECT {jobs.p}.oban_fetch_v1_rate_parts('q', 'worker', {{}}, $1::jsonb, 60, $2)"
    cands = jobs.cands({"id": 1, "part": "A"}, {"id": 2, "part": "B"}, {"id": 3, "part": "C"}, {"id": 4})
    assert json.loads(await jobs.db.fetchval(parts.format(cands), "{}", now)) == {"A": 2, "B": 1, "": 1}
    assert json.loads(await jobs.db.fetchval(parts.format(cands), '{"A": 9}', now)) == {"A": 9, "B": 1, "": 1}


# --------------------------------------------------------------------------- decide


async def _decide(
    jobs: Jobs,
    cands: str,
    cap: int = 10,
    by: str | None = None,
    allowed: int | None = None,
    running: dict[str, int] | None = None,
    parts: dict[str, int] | None = None,
) -> dict[str, Any]:
    row = await jobs.db.fetchrow(
        f"SELECT d.* FROM {jobs.p}.oban_fetch_v1_decide({cands}, $1, 'q', $2, $3, '{{}}', '{{}}', $4::jsonb,"
        " $5::jsonb, '{}') AS d",
        cap,
        by,
        allowed,
        json.dumps(running or {}),
        json.dumps(parts or {}),
    )
    return {
        "taken": row["taken"],
        "skipped": row["skipped"],
        "running": json.loads(row["running"]),
        "parts": json.loads(row["parts"]),
        "started": json.loads(row["started"]),
    }


async def test_decide_takes_in_priority_order_up_to_the_cap(jobs: Jobs) -> None:
    cands = jobs.cands({"id": 3, "priority": 1}, {"id": 2, "at": 5}, {"id": 1, "at": 5}, {"id": 4, "at": 1})
    assert (await _decide(jobs, cands))["taken"] == [4, 1, 2, 3]
    assert (await _decide(jobs, cands, cap=2))["taken"] == [4, 1]


async def test_decide_fills_a_keys_free_slots_then_waits_or_skips(jobs: Jobs) -> None:
    cands = jobs.cands(
        {"id": 1, "key": "a", "to": 2},
        {"id": 2, "key": "a", "to": 2, "at": 1},
        {"id": 3, "key": "a", "to": 2, "at": 2, "skip": True},
        {"id": 4, "key": "a", "to": 2, "at": 3},
        {"id": 5, "key": "b", "to": 1, "at": 4},
        {"id": 6, "at": 5},
    )
    d = await _decide(jobs, cands, running={"b": 1})
    assert d["taken"] == [1, 2, 6]  # 4 waits for a slot of "a"; "b" is full
    assert d["skipped"] == [3]
    assert d["running"] == {"a": 2, "b": 1}
    assert d["started"] == {}  # no rate limit: nothing to record
    assert (await _decide(jobs, cands, running={"a": 1}))["taken"] == [1, 5, 6]


async def test_decide_counts_rate_starts_per_queue_or_partition(jobs: Jobs) -> None:
    cands = jobs.cands(
        {"id": 1, "part": "A"}, {"id": 2, "part": "A", "at": 1}, {"id": 3, "part": "B", "at": 2}
    )
    whole = await _decide(jobs, cands, cap=2, allowed=5)
    assert (whole["taken"], whole["started"]) == ([1, 2], {"q": 2})
    split = await _decide(jobs, cands, by="worker", allowed=1)
    assert split["taken"] == [1, 3]  # A has room for one start
    assert split["parts"] == {"A": 1, "B": 1}
    assert split["started"] == {f"q{US}A": 1, f"q{US}B": 1}
    assert (await _decide(jobs, cands, by="worker", allowed=1, parts={"A": 1}))["taken"] == [3]


# --------------------------------------------------------------------------- writes


async def test_claim_marks_jobs_executing_for_the_instance(jobs: Jobs) -> None:
    ids = [await jobs.add(), await jobs.add(attempt=2, unique_states=2 | 4)]
    untouched = await jobs.add()
    instance = uuid.uuid4()
    rows = await jobs.db.fetch(
        f"SELECT * FROM {jobs.p}.oban_fetch_v1_claim($1, $2, 'node-1', $3) ORDER BY id", ids, T0, instance
    )
    assert [(r["id"], r["state"], r["attempt"]) for r in rows] == [
        (ids[0], "executing", 1),
        (ids[1], "executing", 3),
    ]
    assert {(r["attempted_at"], r["attempted_by"], r["claimed_by"]) for r in rows} == {
        (T0, "node-1", instance)
    }
    assert rows[1]["unique_states"] == 2 | 4
    assert (await jobs.row(untouched))["state"] == "available"


async def test_skip_cancels_and_says_why(jobs: Jobs) -> None:
    job = await jobs.add(limit_key="solo", limit_to=1, limit_skip=True, meta=json.dumps({"m": 1}))
    rows = await jobs.db.fetch(f"SELECT * FROM {jobs.p}.oban_fetch_v1_skip($1, $2)", [job], T0)
    assert [(r["id"], r["state"]) for r in rows] == [(job, "cancelled")]
    assert rows[0]["cancelled_at"] is not None
    meta = json.loads(rows[0]["meta"])
    assert meta["m"] == 1
    assert meta["skipped"]["reason"] == "limit" and meta["skipped"]["key"] == "solo"
    assert datetime.fromisoformat(meta["skipped"]["at"]) == T0


async def test_record_starts_keeps_the_newest_allowed_inside_the_period(jobs: Jobs) -> None:
    now = T0 + timedelta(hours=1)
    kept, expired = now - timedelta(seconds=5), now - timedelta(seconds=100)
    await jobs.db.execute(
        f"INSERT INTO {jobs.p}.oban_rate_windows (scope, starts) VALUES ('q', $1)", [kept, expired]
    )
    record = f"SELECT {jobs.p}.oban_fetch_v1_record_starts($1::jsonb, $2, 60, $3)"
    await jobs.db.execute(record, json.dumps({"q": 1, f"q{US}A": 2}), now, 3)
    windows = f"SELECT scope, starts FROM {jobs.p}.oban_rate_windows ORDER BY scope"
    assert [(r["scope"], r["starts"]) for r in await jobs.db.fetch(windows)] == [
        ("q", [now, kept]),
        (f"q{US}A", [now, now]),
    ]
    await jobs.db.execute(record, json.dumps({"q": 3}), now + timedelta(seconds=1), 3)
    assert (await jobs.db.fetchval(f"SELECT starts FROM {jobs.p}.oban_rate_windows WHERE scope = 'q'")) == [
        now + timedelta(seconds=1)
    ] * 3


# --------------------------------------------------------------------------- the whole, against 002's


@pytest.fixture
async def old_prefix(test_dsn: str, prefix: str) -> AsyncIterator[str]:
    """A schema at migration 003, where oban_fetch (002) is the fetch."""
    name = prefix + "_old"
    conn = await asyncpg.connect(test_dsn)
    try:
        await migrate(conn, name, target=3)
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


async def _scenario(db: asyncpg.Connection, schema: str) -> None:
    """The same rows in either schema: keyed (waiting and skipping), global, rate-limited, partitioned."""
    p = f'"{schema}"'
    await db.execute(
        f"""INSERT INTO {p}.oban_jobs (queue, worker, priority, scheduled_at, args, limit_key, limit_to,
                                      limit_skip, unique_states)
            SELECT CASE WHEN i % 4 = 0 THEN 'keyed' WHEN i % 4 = 1 THEN 'global'
                        WHEN i % 4 = 2 THEN 'rated' ELSE 'split' END,
                   'W' || (i % 3), i % 3, '2026-01-01'::timestamptz + i * interval '1 s',
                   jsonb_build_object('account', i % 5),
                   CASE WHEN i % 4 = 0 THEN 'k' || (i % 7) END, CASE WHEN i % 4 = 0 THEN 1 + i % 2 END,
                   i % 8 = 0, CASE WHEN i % 6 = 0 THEN 16 | 2 END
            FROM generate_series(1, 240) AS i"""
    )


async def _fetch(
    db: asyncpg.Connection, schema: str, fn: str, acks: list[tuple[int, Any]]
) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        f"""SELECT * FROM "{schema}".{fn}(
                ARRAY['keyed', 'global', 'rated', 'split'], ARRAY[NULL, 3, NULL, NULL]::integer[],
                ARRAY[NULL, NULL, 4, 2]::integer[], ARRAY[NULL, NULL, 3600, 3600]::float8[],
                ARRAY[NULL, NULL, NULL, 'args.account']::text[], 12, 'n', $1, 6, $2, $3)""",
        uuid.UUID(int=1),
        [a[0] for a in acks],
        [a[1] for a in acks],
    )
    return [(r["kind"], r["id"], r["state"], r["queue"], r["attempt"], r["parked"]) for r in rows]


async def test_v1_fetches_exactly_what_oban_fetch_did(
    db: asyncpg.Connection, prefix: str, old_prefix: str
) -> None:
    for schema in (prefix, old_prefix):
        await _scenario(db, schema)
    acks: dict[str, list[tuple[int, Any]]] = {prefix: [], old_prefix: []}
    kinds: set[str] = set()
    for cycle in range(8):
        results = {}
        for schema, fn in ((prefix, "oban_fetch_v1"), (old_prefix, "oban_fetch")):
            results[schema] = sorted(await _fetch(db, schema, fn, acks[schema]))
            claimed = await db.fetch(
                f"SELECT id, attempted_at FROM \"{schema}\".oban_jobs WHERE state = 'executing' ORDER BY id"
            )
            # Ack every other running job, so keys and the global limit free some slots each cycle.
            acks[schema] = [(r["id"], r["attempted_at"]) for r in claimed if (r["id"] + cycle) % 2 == 0]
        assert results[prefix] == results[old_prefix], f"cycle {cycle}"
        kinds |= {kind for kind, *_ in results[prefix]}
    assert kinds == {"job", "skipped", "parked"}  # the scenario exercises every kind of result

    final = (
        "SELECT id, state::text, attempt, unique_states, meta - 'skipped' AS meta,"
        " meta ? 'skipped' AS skipped FROM \"{}\".oban_jobs ORDER BY id"
    )
    windows = 'SELECT scope, cardinality(starts) AS n FROM "{}".oban_rate_windows ORDER BY scope'
    for query in (final, windows):
        assert [tuple(r) for r in await db.fetch(query.format(prefix))] == [
            tuple(r) for r in await db.fetch(query.format(old_prefix))
        ]
