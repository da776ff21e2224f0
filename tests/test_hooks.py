"""Hooks: job callbacks, lifecycle hooks (code and TOML), and on_error for the engine's own failures."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Cancel, Job, Oban, Snooze, Worker, worker
from oban_py.errors import ConfigError
from oban_py.hooks import ErrorContext, Outcome, child_config, run_worker_start, run_worker_stop
from oban_py.runtime import producer as producer_module
from oban_py.runtime.maintenance.stager import Stager

from helpers import wait_for

pytestmark = pytest.mark.anyio

ledger: list[tuple[Any, ...]] = []
MakeOban = Callable[..., Awaitable[Oban]]


@pytest.fixture(autouse=True)
def _clear() -> None:
    ledger.clear()


class Recorded:
    """Every callback, half sync and half async, writing to the ledger."""

    async def before_process(self, job: Job[Any]) -> None:
        ledger.append(("before", job.args["n"], job.attempt))

    def on_success(self, job: Job[Any]) -> None:
        ledger.append(("success", job.args["n"]))

    async def on_failure(self, job: Job[Any], error: BaseException) -> None:
        ledger.append(("failure", job.args["n"], job.attempt, str(error)))

    def on_discard(self, job: Job[Any], error: BaseException) -> None:
        ledger.append(("discard", job.args["n"], str(error)))

    async def after_process(self, job: Job[Any], outcome: Outcome) -> None:
        error = None if outcome.error is None else str(outcome.error)
        ledger.append(("after", job.args["n"], outcome.state, error))


@worker(queue="hooks")
class Fine(Recorded, Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("process", job.args["n"]))


@worker(queue="hooks", max_attempts=2)
class Flaky(Recorded, Worker):
    def backoff(self, job: Job[Any]) -> float:
        return 0.0

    def process(self, job: Job[Any]) -> None:  # sync: the callbacks still run, in the same order
        ledger.append(("process", job.args["n"]))
        raise ValueError(f"attempt {job.attempt}")


@worker(queue="hooks")
class Controlled(Recorded, Worker):
    async def process(self, job: Job[Any]) -> Any:
        ledger.append(("process", job.args["n"]))
        return Snooze(60) if job.args["n"] == "snooze" else Cancel("not needed")


async def test_success_callbacks_fire_once_in_order(make_oban: MakeOban) -> None:
    oban = await make_oban(queues={"hooks": 2})
    await oban.insert(Fine.new({"n": 1}))
    await wait_for(lambda: len(ledger) >= 4, what="four callbacks")
    await asyncio.sleep(0.1)  # nothing more comes
    assert ledger == [("before", 1, 1), ("process", 1), ("success", 1), ("after", 1, "completed", None)]


async def test_failure_and_discard_callbacks_per_attempt(oban: Oban) -> None:
    await oban.insert(Flaky.new({"n": 2}))
    assert await oban.drain_queue("hooks", with_scheduled=True) == {"retryable": 1, "discarded": 1}
    assert ledger == [
        ("before", 2, 1),
        ("process", 2),
        ("failure", 2, 1, "attempt 1"),
        ("after", 2, "retryable", "attempt 1"),
        ("before", 2, 2),
        ("process", 2),
        ("failure", 2, 2, "attempt 2"),
        ("discard", 2, "attempt 2"),
        ("after", 2, "discarded", "attempt 2"),
    ]


async def test_snoozed_and_cancelled_outcomes(oban: Oban) -> None:
    await oban.insert_all([Controlled.new({"n": "snooze"}), Controlled.new({"n": "cancel"})])
    await oban.drain_queue("hooks")
    after = [entry for entry in ledger if entry[0] == "after"]
    assert after == [("after", "snooze", "snoozed", None), ("after", "cancel", "cancelled", None)]
    assert not [entry for entry in ledger if entry[0] in ("success", "failure", "discard")]


class Raising:
    """Every callback raises, even BaseExceptions; one sync callback hangs past the bound."""

    def before_process(self, job: Job[Any]) -> None:
        raise SystemExit("before")

    async def on_success(self, job: Job[Any]) -> None:
        raise KeyboardInterrupt("success")

    async def on_failure(self, job: Job[Any], error: BaseException) -> None:
        raise asyncio.CancelledError()

    def on_discard(self, job: Job[Any], error: BaseException) -> None:
        time.sleep(2)  # longer than the (patched) bound: the ack does not wait for it

    def after_process(self, job: Job[Any], outcome: Outcome) -> None:
        raise RuntimeError("after")


@worker(queue="raising", max_attempts=1)
class RaisingFails(Raising, Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("process", job.args["n"]))
        raise ValueError("job failed")


@worker(queue="raising")
class RaisingFine(Raising, Worker):
    def process(self, job: Job[Any]) -> None:
        ledger.append(("process", job.args["n"]))


@worker(queue="raising", max_attempts=1)
class PlainFails(Worker):
    async def process(self, job: Job[Any]) -> None:
        raise ValueError("job failed")


async def _row(db: asyncpg.Connection, prefix: str, job_id: int | None) -> dict[str, Any]:
    row = await db.fetchrow(
        f'SELECT state::text AS state, attempt, errors FROM "{prefix}".oban_jobs WHERE id = $1', job_id
    )
    assert row is not None
    raw = row["errors"]
    errors = json.loads(raw) if isinstance(raw, str) else raw
    errors = [json.loads(e) if isinstance(e, str) else e for e in errors]
    return {
        "state": row["state"],
        "attempt": row["attempt"],
        "errors": [(e["kind"], e["error"]) for e in errors],
    }


async def test_raising_callbacks_change_nothing(
    make_oban: MakeOban, db: asyncpg.Connection, prefix: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr("oban_py.hooks.callbacks.CALLBACK_TIMEOUT", 0.3)
    oban = await make_oban(queues={"raising": 3})
    fails, fine, plain = await oban.insert_all(
        [RaisingFails.new({"n": 1}), RaisingFine.new({"n": 2}), PlainFails.new({"n": 3})]
    )
    started = time.monotonic()
    await wait_for(
        lambda: oban.get_job(fails.id or 0), what="started"
    )  # the instance answers: the producer was not killed

    async def settled() -> bool:
        rows = [await _row(db, prefix, j.id) for j in (fails, fine, plain)]
        return all(r["state"] != "available" and r["state"] != "executing" for r in rows)

    await wait_for(settled, what="all three settled")
    assert time.monotonic() - started < 1.8  # the hanging on_discard (2 s) did not hold the ack
    assert sorted(ledger) == [("process", 1), ("process", 2)]  # before_process failing did not skip it
    failed, plain_row = await _row(db, prefix, fails.id), await _row(db, prefix, plain.id)
    assert (
        failed
        == plain_row
        == {"state": "discarded", "attempt": 1, "errors": [("error", "ValueError: job failed")]}
    )
    assert (await _row(db, prefix, fine.id)) == {"state": "completed", "attempt": 1, "errors": []}
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "oban_py.hooks")
    for name in ("before_process", "on_success", "after_process", "on_discard"):
        assert name in logged
    assert any(r.exc_info for r in caplog.records if "after_process" in r.getMessage())
    # The queue still works.
    again = await oban.insert(RaisingFine.new({"n": 4}))
    await wait_for(lambda: ("process", 4) in ledger, what="the next job ran")
    await wait_for(lambda: _row(db, prefix, again.id), what="row")


@worker(queue="plain")
class Plain(Worker):
    async def process(self, job: Job[Any]) -> None:
        ledger.append(("plain", job.args["n"]))


async def test_on_error_once_per_producer_outage(
    make_oban: MakeOban, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[tuple[BaseException, ErrorContext]] = []
    failures = {"left": 6, "calls": 0}
    real = producer_module.claim_jobs

    async def flaky_claim(*args: Any, **kwargs: Any) -> Any:
        failures["calls"] += 1
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("fetch refused")
        return await real(*args, **kwargs)

    async def on_error(error: BaseException, context: ErrorContext) -> None:
        reports.append((error, context))

    oban = await make_oban(queues={"plain": 1}, on_error=on_error)
    monkeypatch.setattr(producer_module, "claim_jobs", flaky_claim)
    await oban.insert(Plain.new({"n": 1}))
    await wait_for(lambda: ("plain", 1) in ledger, what="the job ran after the outage")
    assert failures["left"] == 0
    assert len(reports) == 1  # six failed cycles, one episode
    error, context = reports[0]
    assert str(error) == "fetch refused"
    assert (context.component, context.name, context.node, context.final) == (
        "producer",
        "plain",
        oban.node.name if oban.node else None,
        False,
    )
    # A new episode after the recovery is reported again.
    failures["left"] = 1
    await oban.insert(Plain.new({"n": 2}))
    await wait_for(lambda: len(reports) == 2, what="a second episode")
    await wait_for(lambda: ("plain", 2) in ledger, what="the second job ran")


async def test_on_error_once_per_duty_failure_and_raising_handler_contained(
    make_oban: MakeOban, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reports: list[ErrorContext] = []
    runs = {"n": 0}

    async def broken(self: Stager) -> None:
        runs["n"] += 1
        raise LookupError("stager bug")

    def on_error(error: BaseException, context: ErrorContext) -> None:
        reports.append(context)
        raise RuntimeError("the handler itself fails")

    monkeypatch.setattr(Stager, "run_once", broken)
    oban = await make_oban(queues={"plain": 1}, on_error=[on_error])
    await wait_for(lambda: runs["n"] >= 5, what="five failed stager runs")
    await wait_for(lambda: reports, what="a report")
    assert [(c.component, c.name) for c in reports] == [("duty", "stager")]
    assert any("on_error handler" in r.getMessage() and r.exc_info for r in caplog.records)
    assert any("stager failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert oban.node is not None  # the node goes on
    await oban.insert(Plain.new({"n": 9}))
    await wait_for(lambda: ("plain", 9) in ledger, what="jobs still run")


HOOK_MODULE = """
import asyncio
calls = []

def started():
    calls.append("started")

async def stopped():
    await asyncio.sleep(0)
    calls.append("stopped")

def worker_started():
    calls.append("worker_started")

def worker_stopped():
    calls.append("worker_stopped")
"""


async def test_lifecycle_hooks_from_toml_dotted_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_dsn: str, prefix: str
) -> None:
    (tmp_path / "hookmod_toml.py").write_text(HOOK_MODULE)
    (tmp_path / "oban.toml").write_text(
        'on_start = "hookmod_toml:started"\n'
        'on_stop = ["hookmod_toml.stopped"]\n'
        'on_worker_start = "hookmod_toml:worker_started"\n'
        'on_worker_stop = "hookmod_toml.worker_stopped"\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "hookmod_toml", raising=False)
    oban = Oban.from_toml(tmp_path / "oban.toml", dsn=test_dsn, prefix=prefix, queues={"plain": 1})
    await oban.start()
    import hookmod_toml  # type: ignore[import-not-found]

    assert hookmod_toml.calls == ["started"]
    await oban.start()  # already started: not again
    await run_worker_start(oban.config)
    await run_worker_stop(oban.config)
    await oban.stop()
    await oban.stop()  # idempotent: not again
    assert hookmod_toml.calls == ["started", "worker_started", "worker_stopped", "stopped"]
    child = child_config(oban.config)
    assert child.on_start == child.on_stop == () and child.on_worker_start == ("hookmod_toml:worker_started",)


async def test_a_path_that_cannot_be_imported_fails_the_start_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_dsn: str, prefix: str
) -> None:
    monkeypatch.chdir(tmp_path)
    oban = Oban(test_dsn, prefix=prefix, on_stop=["os:getcwd", "no_such_module.hooks:stopped"])
    with pytest.raises(ConfigError) as caught:
        await oban.start()
    assert "on_stop[1]" in str(caught.value) and "no_such_module" in str(caught.value)
    with pytest.raises(ConfigError, match="on_error"):
        await Oban(test_dsn, prefix=prefix, on_error="os.path:not_there").start()
    with pytest.raises(ConfigError, match="on_start"):
        Oban(test_dsn, prefix=prefix, on_start=42)


async def test_lifecycle_hooks_in_code_raising_is_contained(make_oban: MakeOban) -> None:
    def boom() -> None:
        ledger.append(("boom",))
        raise RuntimeError("on_start failed")

    async def second() -> None:
        ledger.append(("second",))

    oban = await make_oban(on_start=[boom, second], on_stop=second)
    assert ledger == [("boom",), ("second",)]
    await oban.stop()
    assert ledger == [("boom",), ("second",), ("second",)]
