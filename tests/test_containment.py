"""Fault containment inside one process: nothing a job returns or raises, or how long it blocks, may
wedge a queue, strand a job, or let a limit be exceeded (issue 10; multi-process faults: tests/faults)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
import pytest

from oban_py import Cancel, Job, Oban, Record, Snooze, Worker, stop_requested, worker
from oban_py.runtime import producer as producer_module

from helpers import duty_runs, states, wait_for

pytestmark = pytest.mark.anyio

ledger: list[tuple[str, int, float]] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    ledger.clear()


@worker(queue="poison", max_attempts=1)
class Poison(Worker):
    async def process(self, job: Job[Any]) -> Any:
        kind = job.args["kind"]
        if kind == "nul_error":
            raise ValueError("bad \x00 byte")
        if kind == "surrogate_error":
            raise ValueError("lone \ud800 surrogate")
        if kind == "nul_cancel":
            return Cancel("reason with \x00")
        if kind == "surrogate_cancel":
            return Cancel("\udfff")
        if kind == "inf_snooze":
            return Snooze(float("inf"))
        if kind == "nan_snooze":
            return Snooze(float("nan"))
        if kind == "nan_meta":
            return Snooze(1, meta={"x": float("nan")})
        if kind == "nul_record":
            return Record({"text": "a\x00b"})
        if kind == "nan_record":
            return Record([float("nan")])
        if kind == "bad_str":
            raise _Unprintable()
        return None


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


@worker(queue="poison")
class Fine(Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("fine", job.id or 0, time.monotonic()))


POISONS = [
    "nul_error",
    "surrogate_error",
    "nul_cancel",
    "surrogate_cancel",
    "inf_snooze",
    "nan_snooze",
    "nan_meta",
    "nul_record",
    "nan_record",
    "bad_str",
]


async def test_poison_outcomes_are_recorded_and_the_queue_keeps_moving(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"poison": 5})
    poison = await oban.insert_all([Poison.new({"kind": k}) for k in POISONS])
    fine = await oban.insert_all([Fine.new({"n": i}) for i in range(50)])
    await wait_for(lambda: _done(db, prefix, [j.id for j in poison + fine]), timeout=15)
    got = {j.args["kind"]: j for j in await oban.get_jobs([j.id for j in poison])}  # type: ignore[misc]
    for kind, job_ in got.items():
        assert job_.errors, kind  # every outcome left a readable trace
        assert "\x00" not in str(job_.errors)
    assert got["nul_error"].state.value == "discarded"
    assert "\ufffd" in got["nul_error"].errors[-1]["error"]
    assert got["nul_cancel"].state.value == "cancelled"
    assert got["surrogate_cancel"].state.value == "cancelled"
    for kind in ("inf_snooze", "nan_snooze", "nan_meta", "nul_record", "nan_record"):
        assert got[kind].state.value == "discarded", kind
        assert got[kind].errors[-1]["kind"] == "bad_outcome", kind
    assert "_Unprintable object at" in got["bad_str"].errors[-1]["error"]
    assert (await states(db, prefix)).get("completed") == 50


async def _done(db: asyncpg.Connection, prefix: str, ids: list[Any]) -> bool:
    n = await db.fetchval(
        f'SELECT count(*) FROM "{prefix}".oban_jobs WHERE id = ANY($1) AND state IN '
        "('completed', 'discarded', 'cancelled')",
        ids,
    )
    return bool(n == len(ids))


async def test_a_refused_ack_is_isolated_and_replaced(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an outcome that slips past sanitising (here: forced) cannot wedge the queue."""
    from oban_py.runtime import executor

    real = executor.control_ack

    def corrupt(job: Job[Any], claim: Any, value: Any) -> Any:
        ack = real(job, claim, value)
        ack.error = '{"not json'  # the database refuses this
        return ack

    monkeypatch.setattr(executor, "control_ack", corrupt)
    await make_oban(queues={"poison": 5})
    bad = await oban.insert(Poison.new({"kind": "nul_cancel"}))
    fine = await oban.insert_all([Fine.new({"n": i}) for i in range(20)])
    await wait_for(lambda: _done(db, prefix, [bad.id] + [j.id for j in fine]), timeout=10)
    row = await oban.get_job(bad.id)  # type: ignore[arg-type]
    assert row.state.value == "cancelled" and row.errors[-1]["kind"] == "bad_outcome"


# -- hostile bodies ---------------------------------------------------------------------------------


@worker(queue="hostile", max_attempts=1)
class Hostile(Worker):
    async def process(self, job: Job[Any]) -> None:
        raise _BASE[job.args["kind"]]()


@worker(queue="hostile", max_attempts=1)
class HostileSync(Worker):
    def process(self, job: Job[Any]) -> None:
        raise _BASE[job.args["kind"]]()


_BASE: dict[str, Any] = {
    "cancelled": asyncio.CancelledError,
    "exit": lambda: SystemExit(3),
    "interrupt": KeyboardInterrupt,
    "generator": GeneratorExit,
}


async def test_base_exceptions_from_jobs_are_failed_attempts(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    runner = await make_oban(queues={"hostile": 4})
    jobs = [await oban.insert(w.new({"kind": k})) for w in (Hostile, HostileSync) for k in _BASE]
    await wait_for(lambda: _done(db, prefix, [j.id for j in jobs]), timeout=10)
    for job_ in await oban.get_jobs([j.id for j in jobs]):  # type: ignore[misc]
        assert job_.state.value == "discarded" and job_.attempt == 1, job_
        assert len(job_.errors) == 1 and job_.errors[0]["kind"] == "error"
    names = {e["error"].split(":")[0] for j in await oban.get_jobs([j.id for j in jobs]) for e in j.errors}  # type: ignore[misc]
    assert {"CancelledError", "SystemExit", "KeyboardInterrupt", "GeneratorExit"} <= names
    # The node is still alive and its producer still works: a job inserted after them runs, and every
    # slot they took is free again.
    after = await oban.insert(Fine.new({"n": 1}, queue="hostile"))
    await wait_for(lambda: _done(db, prefix, [after.id]), timeout=5)
    await wait_for(lambda: runner.queue_states()["hostile"].running == 0, timeout=5)


# -- blocking bodies keep their slot ---------------------------------------------------------------


@worker(queue="slots", timeout=0.2, max_attempts=1)
class Stubborn(Worker):
    """Ignores its timeout interrupt and keeps running for ``for`` seconds."""

    def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        until = time.monotonic() + job.args["for"]
        while time.monotonic() < until:
            try:
                time.sleep(0.02)
            except BaseException:
                pass
        ledger.append(("end", job.id or 0, time.monotonic()))


@worker(queue="slots", timeout=0.2, max_attempts=1, interruptible=True)
class Polite(Worker):
    """Stops at the interrupt (its worker opts in to having Interrupted raised in its thread)."""

    def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        try:
            while True:
                time.sleep(0.02)
        finally:
            ledger.append(("end", job.id or 0, time.monotonic()))


def _max_concurrent() -> int:
    open_, best = 0, 0
    for kind, _, _ in sorted(ledger, key=lambda e: (e[2], e[0] == "start")):
        open_ += 1 if kind == "start" else -1
        best = max(best, open_)
    return best


async def test_a_sync_job_past_its_timeout_keeps_its_slot_until_its_thread_ends(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"slots": 1})
    stubborn = await oban.insert_all([Stubborn.new({"for": 0.6, "n": i}) for i in range(3)])
    await wait_for(lambda: _done(db, prefix, [j.id for j in stubborn]), timeout=15)
    assert len([e for e in ledger if e[0] == "end"]) == 3
    assert _max_concurrent() == 1  # never two bodies in a queue of limit 1
    for job_ in await oban.get_jobs([j.id for j in stubborn]):  # type: ignore[misc]
        assert job_.state.value == "discarded" and job_.errors[-1]["kind"] == "timeout"


async def test_a_sync_job_is_interrupted_at_its_timeout(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"slots": 1})
    job_ = await oban.insert(Polite.new({}))
    await wait_for(lambda: _done(db, prefix, [job_.id]), timeout=5)
    start, end = (e[2] for e in ledger)
    assert end - start < 1.0  # stopped by the interrupt, not left running
    assert (await oban.get_job(job_.id)).errors[-1]["kind"] == "timeout"  # type: ignore[arg-type]


@worker(queue="slots", timeout=0.2, max_attempts=1)
class Cooperative(Worker):
    """Checks stop_requested() between steps (no exception is raised in its thread)."""

    def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        while not stop_requested():
            time.sleep(0.01)
        ledger.append(("end", job.id or 0, time.monotonic()))


async def test_a_sync_job_is_asked_to_stop_at_its_timeout(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"slots": 1})
    job_ = await oban.insert(Cooperative.new({}))
    await wait_for(lambda: _done(db, prefix, [job_.id]), timeout=5)
    start, end = (e[2] for e in ledger)
    assert 0.15 < end - start < 1.0
    assert (await oban.get_job(job_.id)).errors[-1]["kind"] == "timeout"  # type: ignore[arg-type]


@worker(queue="keyed_sync", max_attempts=3, limit={"key": "k", "to": 1})
class KeyedSync(Worker):
    """Ignores stop requests for ``for`` seconds, then fails (a cancel must still win)."""

    def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        time.sleep(job.args["for"])
        ledger.append(("end", job.id or 0, time.monotonic()))
        raise RuntimeError("failed after the cancel")


async def test_cancelling_a_running_sync_job_keeps_its_keyed_slot_until_its_body_ends(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"keyed_sync": 4})
    first = await oban.insert(KeyedSync.new({"k": "a", "for": 0.8}))
    await wait_for(lambda: ledger, timeout=5)
    second = await oban.insert(KeyedSync.new({"k": "a", "for": 0.0}))
    assert await oban.cancel_job(first.id) is True  # type: ignore[arg-type]
    # The body still runs: the row keeps its slot, so the second job of the key waits.
    assert (await oban.get_job(first.id)).state.value == "executing"  # type: ignore[arg-type]
    await wait_for(lambda: _state(oban, first.id, "cancelled"), timeout=5)
    await wait_for(lambda: len([e for e in ledger if e[1] == second.id]) == 2, timeout=5)
    assert _max_concurrent() == 1
    # The failure after the request did not turn into a retry; a manual retry starts afresh.
    cancelled = await oban.get_job(first.id)  # type: ignore[arg-type]
    assert cancelled.attempt == 1 and "cancel_requested" in cancelled.meta
    assert await oban.retry_job(first.id) is True  # type: ignore[arg-type]
    await wait_for(lambda: _state(oban, first.id, "retryable"), timeout=5)
    assert "cancel_requested" not in (await oban.get_job(first.id)).meta  # type: ignore[arg-type]


async def test_shutdown_never_hands_back_a_body_that_still_runs(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    runner = await make_oban(queues={"slots": 1}, shutdown_timeout=0.1)
    job_ = await oban.insert(Stubborn.new({"for": 4.0}))
    await wait_for(lambda: ledger, timeout=5)
    await runner.stop(shutdown_timeout=0.1)
    assert runner.stuck_jobs == [job_.id]
    # Still claimed, and its node still heartbeats for it while the thread runs.
    assert (await oban.get_job(job_.id)).state.value == "executing"  # type: ignore[arg-type]
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_nodes') == 1
    await wait_for(lambda: any(e[0] == "end" for e in ledger), timeout=10)
    # Once the body has ended the node deregisters; the job is then an orphan for any node to rescue.
    await wait_for(
        lambda: _count(db, f'SELECT count(*) = 0 FROM "{prefix}".oban_nodes'),
        timeout=5,
    )


async def _count(db: asyncpg.Connection, sql: str) -> bool:
    return bool(await db.fetchval(sql))


# -- a blocked loop, a lost lease, a node presumed dead --------------------------------------------


@worker(queue="loop")
class Blocker(Worker):
    async def process(self, job: Job[Any]) -> None:
        time.sleep(job.args["for"])


@worker(queue="loop")
class Sleeper(Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        try:
            await asyncio.sleep(job.args["for"])
        except asyncio.CancelledError:
            ledger.append(("cancelled", job.id or 0, time.monotonic()))
            raise
        ledger.append(("end", job.id or 0, time.monotonic()))


async def test_a_blocked_loop_keeps_heartbeating_and_names_the_job(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oban_py")
    await make_oban(queues={"loop": 5}, node="a", name="a")
    await make_oban(queues={"other": 1}, node="b", name="b")  # a rescuer
    good = await oban.insert_all([Sleeper.new({"for": 0.5, "n": i}) for i in range(3)])
    await wait_for(lambda: len(ledger) == 3, timeout=5)
    blocker = await oban.insert(Blocker.new({"for": 2.5}))  # rescue_after is 1.0 in tests
    await wait_for(lambda: _done(db, prefix, [j.id for j in good] + [blocker.id]), timeout=15)
    for job_ in await oban.get_jobs([j.id for j in good]):  # type: ignore[misc]
        assert job_.state.value == "completed" and job_.attempt == 1 and "rescued" not in job_.meta
    assert [e[0] for e in ledger].count("start") == 3  # nothing ran twice
    blocked = [r for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert blocked and f"by job {blocker.id} " in blocked[0].getMessage()
    assert "time.sleep" in blocked[0].getMessage() or "in process" in blocked[0].getMessage()


async def test_a_node_presumed_dead_stops_what_it_no_longer_owns(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oban_py")
    runner = await make_oban(queues={"loop": 2}, node="a", name="a")
    job_ = await oban.insert(Sleeper.new({"for": 30}))
    await wait_for(lambda: ledger, timeout=5)
    # Another node declares "a" dead and rescues its job (as after a freeze or a partition).
    await db.execute(f'DELETE FROM "{prefix}".oban_nodes')
    await db.execute(
        f"UPDATE \"{prefix}\".oban_jobs SET state = 'available', claimed_by = NULL WHERE id = $1", job_.id
    )
    await wait_for(lambda: any(e[0] == "cancelled" for e in ledger), timeout=5)
    assert any("presumed dead" in r.getMessage() for r in caplog.records)
    assert "loop" in runner.queue_states()  # stopped its job, not itself


async def test_a_node_whose_heartbeats_fail_stops_its_jobs_and_takes_no_more(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = await make_oban(queues={"loop": 2}, node="a", name="a")
    assert runner.node is not None
    lifeline = runner.node.lifeline  # internal on purpose: this test fakes the lifeline's heartbeat
    first = await oban.insert(Sleeper.new({"for": 30}))
    await wait_for(lambda: ledger, timeout=5)

    async def unreachable() -> None:  # the database cannot be reached from this node
        lifeline.healthy_since = None

    monkeypatch.setattr(lifeline, "_beat", unreachable)
    await wait_for(lambda: any(e[0] == "cancelled" for e in ledger), timeout=5)
    # Back in the queue, the attempt not counted; and no new claim while the lease is gone.
    await wait_for(lambda: _state(oban, first.id, "available"), timeout=5)
    await duty_runs(runner, "poller")  # the producer was woken for it, twice
    assert (await oban.get_job(first.id)).state.value == "available"  # type: ignore[arg-type]
    monkeypatch.undo()
    await wait_for(lambda: _state(oban, first.id, "executing"), timeout=5)


async def _state(oban: Oban, job_id: Any, state: str) -> bool:
    return (await oban.get_job(job_id)).state.value == state


# -- overlapping producers and lost fetch replies ---------------------------------------------------


@worker(queue="shared")
class Counted(Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("start", job.id or 0, time.monotonic()))
        await asyncio.sleep(0.05)
        ledger.append(("end", job.id or 0, time.monotonic()))


async def test_overlapping_producers_never_run_a_job_twice_when_a_fetch_reply_is_lost(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = producer_module.claim_jobs
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        rows = await real(*args, **kwargs)  # the claim commits...
        calls += 1
        if calls % 3 == 0:  # ...but every third reply is lost on the way back
            from oban_py.errors import DatabaseUnavailable

            raise DatabaseUnavailable("reply lost (test)")
        return rows

    monkeypatch.setattr(producer_module, "claim_jobs", flaky)
    await make_oban(queues={"shared": 3, "sel": {"queues": ["shared"], "limit": 3}})
    jobs = await oban.insert_all([Counted.new({"n": i}) for i in range(60)])
    await wait_for(lambda: _done(db, prefix, [j.id for j in jobs]), timeout=30)
    starts: dict[int, list[float]] = {}
    for kind, jid, _ in ledger:
        if kind == "start":
            starts.setdefault(jid, []).append(0)
    assert all(len(v) == 1 for v in starts.values()), {k: v for k, v in starts.items() if len(v) > 1}
    assert len(starts) == 60


# -- idle cost --------------------------------------------------------------------------------------


async def test_idle_cost_does_not_grow_with_the_number_of_queues(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    queues = {f"q{i}": 1 for i in range(2000)}
    runner = await make_oban(queues=queues, poll_interval=0.2)
    name = await db.fetchval("SELECT current_database()")

    async def commits() -> int:
        await db.execute("SELECT pg_stat_clear_snapshot()")
        return int(await db.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", name))

    await duty_runs(runner, "poller")  # past start-up
    before = await commits()
    await duty_runs(runner, "poller", 10)  # about 2 s
    spent = await commits() - before
    # 2,000 queues polled at each of 10 polls would be 20,000 commits; the node's own services are a
    # few dozen.
    assert spent < 400, spent
    # An available job that no NOTIFY announced is still found by the poller.
    await db.execute(
        f'INSERT INTO "{prefix}".oban_jobs (state, queue, worker, args) '
        "VALUES ('available', 'q1999', $1, '{}')",
        "test_containment.Fine",
    )
    await wait_for(
        lambda: _count(db, f"SELECT count(*) = 1 FROM \"{prefix}\".oban_jobs WHERE state = 'completed'")
    )
