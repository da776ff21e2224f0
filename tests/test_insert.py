"""Inserting jobs: ids and order, scheduling, transactions, notifications, and bad input."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, job, worker
from oban_py.errors import InstanceNotFound, UnknownWorker, ValidationError

from helpers import wait_for

pytestmark = pytest.mark.anyio


@worker(queue="default")
class Plain(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


@job(queue="fn")
def sync_fn(a: int, b: str = "x") -> None:
    pass


async def count(db: asyncpg.Connection, prefix: str) -> int:
    return int(await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs'))


async def test_insert_returns_the_row(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    job_ = await oban.insert(Plain.new({"n": 1}, tags=["t"], meta={"m": True}))
    assert job_.id is not None and job_.state is JobState.AVAILABLE and not job_.conflicted
    assert job_.inserted_at is not None and job_.scheduled_at is not None
    row = await db.fetchrow(f'SELECT * FROM "{prefix}".oban_jobs WHERE id = $1', job_.id)
    assert row["worker"] == Plain.__oban_worker__.name and row["queue"] == "default"
    assert row["args"] == '{"n": 1}' and row["tags"] == ["t"] and row["meta"] == '{"m": true}'
    fetched = await oban.get_job(job_.id)
    assert fetched.args == {"n": 1} and fetched.meta == {"m": True} and fetched.state is JobState.AVAILABLE


async def test_args_round_trip_exactly(oban: Oban) -> None:
    args = {"s": "é", "i": 2**62, "f": 1.5, "b": False, "n": None, "l": [1, [2, {"x": "y"}]], "d": {"k": {}}}
    job_ = await oban.insert(Plain.new(args))
    assert (await oban.get_job(job_.id)).args == args  # type: ignore[arg-type]


async def test_insert_all_one_statement_ids_in_input_order(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    jobs = [Plain.new({"i": i}, queue=f"q{i % 3}") for i in range(2_500)]
    results = await oban.insert_all(jobs)
    assert len(results) == 2_500 and all(r.id is not None and not r.conflicted for r in results)
    assert len({r.id for r in results}) == 2_500
    rows = await db.fetch(f"SELECT id, args->>'i' AS i FROM \"{prefix}\".oban_jobs")
    by_id = {r["id"]: int(r["i"]) for r in rows}
    assert [by_id[r.id] for r in results] == list(range(2_500))  # type: ignore[index]


async def test_insert_all_chunks_in_one_transaction(
    make_oban: Any, db: asyncpg.Connection, prefix: str
) -> None:
    oban = await make_oban(insert_chunk_size=100)
    results = await oban.insert_all(Plain.new({"i": i}) for i in range(450))
    assert len(results) == 450 and await count(db, prefix) == 450


async def test_scheduled_jobs(oban: Oban) -> None:
    later = await oban.insert(Plain.new({}, schedule_in=3600))
    at = datetime.now(timezone.utc) + timedelta(days=1)
    exact = await oban.insert(Plain.new({}, scheduled_at=at))
    past = await oban.insert(Plain.new({}, scheduled_at=datetime.now(timezone.utc) - timedelta(seconds=5)))
    assert later.state is JobState.SCHEDULED and exact.state is JobState.SCHEDULED
    assert exact.scheduled_at == at
    assert past.state is JobState.AVAILABLE


async def test_enqueue_through_default_instance(oban: Oban) -> None:
    job_ = await Plain.enqueue({"via": "class"})
    assert job_.id is not None
    fn = await sync_fn.enqueue(3, b="y")
    assert (await oban.get_job(fn.id)).args == {"a": 3, "b": "y"}  # type: ignore[arg-type]
    by_name = await oban.enqueue(Plain.__oban_worker__.name, {"k": 1}, priority=4)
    assert by_name.priority == 4
    with pytest.raises(UnknownWorker):
        await oban.enqueue("no.such.Worker", {})


async def test_enqueue_without_instance() -> None:
    assert Oban.get_instance() is None
    with pytest.raises(InstanceNotFound, match="no running Oban"):
        await Plain.enqueue({})


async def test_transactional_insert_rolls_back(
    oban: Oban, test_dsn: str, db: asyncpg.Connection, prefix: str
) -> None:
    conn = await asyncpg.connect(test_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        inside = await oban.insert(Plain.new({"tx": 1}), conn=conn)
        await oban.insert_all([Plain.new({"tx": 2}), Plain.new({"tx": 3})], conn=conn)
        assert inside.id is not None and await count(db, prefix) == 0  # not visible outside yet
        await tx.rollback()
        assert await count(db, prefix) == 0
        async with conn.transaction():
            await oban.insert(Plain.new({"tx": 4}), conn=conn)
        assert await count(db, prefix) == 1
    finally:
        await conn.close()


async def test_every_enqueue_joins_the_callers_transaction(
    oban: Oban, test_dsn: str, db: asyncpg.Connection, prefix: str
) -> None:
    conn = await asyncpg.connect(test_dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        by_function = await sync_fn.configure(conn=conn).enqueue(1)
        by_class = await Plain.enqueue({"tx": 1}, conn=conn)
        by_name = await oban.enqueue(Plain.__oban_worker__.name, {"tx": 2}, conn=conn)
        assert None not in (by_function.id, by_class.id, by_name.id) and await count(db, prefix) == 0
        await tx.rollback()
        assert await count(db, prefix) == 0  # rolled back with the caller's transaction
        async with conn.transaction():
            await sync_fn.configure(conn=conn).enqueue(2)
        assert await count(db, prefix) == 1
    finally:
        await conn.close()


async def test_hand_built_job_tags_follow_the_new_rule(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    """Tags are stripped and deduplicated on insert too, as ``new`` does (docs/inserting.md)."""
    one, many = await oban.insert_all(
        [Job(worker=Plain.__oban_worker__.name, args={}, tags=["a", " a", "b", "a"]), Plain.new({})]
    )
    [alone] = [await oban.insert(Job(worker=Plain.__oban_worker__.name, args={}, tags=["x ", "x"]))]
    assert one.tags == ["a", "b"] and many.tags == [] and alone.tags == ["x"]
    rows = await db.fetch(f'SELECT id, tags FROM "{prefix}".oban_jobs ORDER BY id')
    assert [r["tags"] for r in rows] == [["a", "b"], [], ["x"]]


async def test_sqlalchemy_session_insert(
    oban: Oban, test_dsn: str, db: asyncpg.Connection, prefix: str
) -> None:
    sa = pytest.importorskip("sqlalchemy.ext.asyncio")
    engine = sa.create_async_engine(test_dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with sa.AsyncSession(engine) as session:
            job_ = await oban.insert(Plain.new({"sa": 1}), conn=session)
            assert job_.id is not None
            await session.rollback()
        assert await count(db, prefix) == 0
        async with engine.connect() as sa_conn:
            await oban.insert_all([Plain.new({"sa": 2})], conn=sa_conn)
            await sa_conn.commit()
        assert await count(db, prefix) == 1
    finally:
        await engine.dispose()


async def test_insert_notifies_each_queue_once_per_transaction(
    oban: Oban, test_dsn: str, prefix: str
) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(test_dsn)
    await listener.add_listener(f"{prefix}.oban_insert", lambda *a: received.append(a[3]))
    try:
        await oban.insert_all([Plain.new({"i": i}, queue=q) for i in range(50) for q in ("a", "b")])
        await oban.insert(Plain.new({}, queue="c", schedule_in=60))  # scheduled: no wake-up
        # NOTIFYs arrive in commit order: once the marker's is in, a wake-up for "c" would be too.
        await oban.insert(Plain.new({}, queue="marker"))
        await wait_for(lambda: "marker" in received, timeout=5)
        assert sorted(received) == ["a", "b", "marker"]
    finally:
        await listener.close()


class Unserialisable:
    pass


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"s": {1, 2}}, "args.s"),
        ({"b": b"bytes"}, "args.b"),
        ({"n": math.nan}, "args.n"),
        ({"inf": math.inf}, "args.inf"),
        ({"when": datetime.now(timezone.utc)}, "args.when"),
        ({"d": Decimal("1.5")}, "args.d"),
        ({"deep": [{"x": Unserialisable()}]}, "args.deep[0].x"),
        ({1: "int key"}, "args"),
    ],
)
async def test_bad_args_raise_before_writing(
    oban: Oban, db: asyncpg.Connection, prefix: str, args: Any, field: str
) -> None:
    batch = [Plain.new({"ok": 1}), Plain.new(args), Plain.new({"ok": 2})]
    with pytest.raises(ValidationError) as info:
        await oban.insert_all(batch)
    assert info.value.field == field
    assert await count(db, prefix) == 0


async def test_oversized_args(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await make_oban(max_args_bytes=2048)
    with pytest.raises(ValidationError, match="exceeds the limit of 2048 bytes"):
        await oban.insert(Plain.new({"blob": "x" * 4096}))
    with pytest.raises(ValidationError, match="meta"):
        await oban.insert(Plain.new({}, meta={"blob": "é" * 2000}))
    assert await count(db, prefix) == 0


async def test_raw_job_objects_are_validated(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    with pytest.raises(ValidationError, match="priority"):
        await oban.insert(Job(worker="x.Y", args={}, priority=42))
    with pytest.raises(ValidationError, match="queue"):
        await oban.insert(Job(worker="x.Y", args={}, queue=""))
    with pytest.raises(ValidationError, match="scheduled_at"):
        await oban.insert(Job(worker="x.Y", args={}, scheduled_at=datetime(2030, 1, 1)))
    with pytest.raises(ValidationError, match="jobs\\[0\\]"):
        await oban.insert_all([{"worker": "x"}])  # type: ignore[list-item]
    assert await count(db, prefix) == 0
    # A worker living in another service may be inserted by name.
    other = await oban.insert(Job(worker="billing.Invoice", args={"id": 1}, queue="billing"))
    assert other.id is not None
