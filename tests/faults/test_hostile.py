"""Hostile job bodies (invariant 11: a job cannot harm the engine).

* raising CancelledError, SystemExit (``sys.exit(3)``) or KeyboardInterrupt: recorded as a failed
  attempt (retried with backoff, then discarded), never re-run in a tight loop, and the runner lives;
* a task that swallows cancellation: SIGTERM still ends the runner within shutdown_timeout + grace,
  and the job is not run elsewhere while its body runs;
* an async body calling ``time.sleep`` (the loop is blocked past ``rescue_after``) in a 2-node cluster:
  the well-behaved jobs sharing the node run once, and the log names the job that blocked the loop;
* ``def process`` bodies that outlive their timeout or cancellation keep their slot: a queue of limit
  2 and a keyed limit ``to=1`` never have more bodies running than that, threads included;
* shutdown while a ``def`` body runs: the job is not handed back while its thread runs, and the
  runner exits within shutdown_timeout + grace.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from . import fault_workers as fw
from . import ledger
from .checks import wait_final
from .cluster import Runner
from .common import SHUTDOWN, assert_sigterm_exit
from .scenario import Scenario
from .settings import EXIT_GRACE, SOAK, timeout
from helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BASE_EXCEPTIONS = ("cancelled_error", "sys_exit", "keyboard_interrupt")


@timeout(60)
async def test_base_exceptions_are_recorded_failures(scenario: Scenario) -> None:
    s = scenario
    node = await s.cluster.start("hostile", {"hostile": 5, "work": 5})
    hostile = await s.client.insert_all(
        [fw.Hostile.new({"kind": k}) for k in BASE_EXCEPTIONS for _ in range(2)]
    )
    plain = await s.client.insert_all([fw.Sleep.new({"ms": 50}) for _ in range(30)])
    ids = {j.id: j.args["kind"] for j in hostile}

    async def settled() -> bool:
        starts = Counter(r.job_id for r in s.cluster.runs() if r.job_id in ids)
        looping = {f"{ids[i]} (job {i})": n for i, n in starts.items() if n > 3}
        assert not looping, f"re-run beyond max_attempts=3 (a tight loop?): {looping}\n" + s.context()
        assert node.alive, f"the runner died (exit status {node.returncode})\n" + s.context()
        return all(j["state"] in ("discarded", "completed") for j in await s.db.jobs(list(ids)))

    await wait_for(settled, 30, what="hostile jobs settled")
    for job in await s.db.jobs(list(ids)):
        assert job["state"] == "discarded", f"{ids[job['id']]}: {job['state']}"
        assert job["attempt"] == 3 and job["errors"] != "[]", f"{ids[job['id']]}: {dict(job)}"
    await wait_final(s.db, len(hostile) + len(plain), 20, s.context)
    assert node.alive


@timeout(60)
async def test_task_ignoring_cancellation_does_not_hang_sigterm(scenario: Scenario) -> None:
    s = scenario
    a = await s.cluster.start("stubborn-a", {"hostile": 2})
    b = await s.cluster.start("stubborn-b", {"hostile": 2})
    job = await s.client.insert(fw.Hostile.new({"kind": "ignore_cancel", "s": 40}))
    first = await wait_for(lambda: [r for r in s.cluster.runs() if r.job_id == job.id], 10, what="started")
    holder = a if first[0].pid == a.pid else b
    await assert_sigterm_exit(s, holder, expect_rc=None)
    # The job is not lost (the other node takes it, after the first body is gone) and never ran twice
    # at once.
    await wait_for(lambda: len([r for r in s.cluster.runs() if r.job_id == job.id]) > 1, 15, what="re-run")
    doubles = ledger.concurrent_doubles(s.cluster.runs())
    assert not doubles, ledger.describe(doubles)


@timeout(60)
async def test_blocked_event_loop_in_a_cluster(scenario: Scenario) -> None:
    s = scenario
    block = 45 if SOAK else 8  # longer than rescue_after (3 s)
    a = await s.cluster.start("block-a", {"work": 4, "blocker": 1})
    await s.cluster.start("block-b", {"work": 4})
    polite = await s.client.insert_all([fw.Sleep.new({"ms": 3000, "ticks": True}) for _ in range(8)])
    await wait_for(
        lambda: sum(1 for r in s.cluster.runs() if r.pid == a.pid and r.end_kind == "open") >= 2,
        10,
        what="block-a runs well-behaved jobs",
    )
    blocker = await s.client.insert(
        fw.Hostile.new({"kind": "block_loop", "s": block}, queue="blocker", max_attempts=1)
    )
    await wait_for(lambda: any(r.job_id == blocker.id for r in s.cluster.runs()), 5, what="blocker started")
    await wait_final(s.db, len(polite) + 1, block + 20, s.context)
    runs = s.cluster.runs()
    polite_ids = {j.id for j in polite}
    problems = []
    if doubles := ledger.concurrent_doubles(r for r in runs if r.job_id in polite_ids):
        problems.append(f"well-behaved jobs ran twice at once:\n{ledger.describe(doubles)}")
    twice = {i: n for i, n in Counter(r.job_id for r in runs if r.job_id in polite_ids).items() if n > 1}
    if twice:
        problems.append(f"well-behaved jobs ran more than once (job: runs): {twice}")
    if not await blocker_named(a, blocker.id, 2):
        problems.append(f"no log line with 'blocked' naming job {blocker.id}")
    assert not problems, "\n".join(problems) + "\n" + s.context()


async def blocker_named(runner: Runner, job_id: int | None, seconds: float) -> bool:
    """A log line of ``runner`` says 'blocked' and names the job (its id as a word, not in a time)."""
    own_id = re.compile(rf"(?<![\w.:]){job_id}(?![\w.:])")

    def named() -> bool:
        lines = [line for line in runner.stderr().splitlines() if "blocked" in line.lower()]
        return any("job" in line.lower() and own_id.search(line) for line in lines)

    try:
        await wait_for(named, seconds, what="log line")
    except AssertionError:
        return False
    return True


@timeout(60)
async def test_sync_jobs_past_their_timeout_keep_their_slots(scenario: Scenario) -> None:
    s = scenario
    await s.cluster.start("threads", {"sync": 2})
    timed_out = [fw.SyncSleep.new({"s": 1.2, "timeout": 0.3}, max_attempts=2) for _ in range(4)]
    keyed = [fw.SyncKeyed.new({"k": n % 2, "s": 1.0, "timeout": 0.3}, max_attempts=1) for n in range(6)]
    # Cancelled while running: one with a timeout (its thread is abandoned), one without.
    cancelled = [fw.SyncSleep.new({"s": 1.2, "timeout": 5}), fw.SyncSleep.new({"s": 1.2})]
    inserted = await s.client.insert_all(timed_out + keyed)
    to_cancel = await s.client.insert_all(cancelled)
    for job in to_cancel:
        assert job.id is not None
        await wait_for(lambda j=job: any(r.job_id == j.id for r in s.cluster.runs()), 20, what="started")
        await s.client.cancel_job(job.id)
    await wait_final(s.db, len(inserted) + len(to_cancel), 40, s.context)
    await wait_for(lambda: all(r.end_kind != "open" for r in s.cluster.runs()), 5, what="threads done")
    runs = s.cluster.runs()
    problems = []
    if over := ledger.over_limit(runs, lambda r: r.pid, 2):
        problems.append(f"queue limit 2 exceeded (pid: (peak, at)): {over}")
    if over := ledger.over_limit([r for r in runs if r.key != "-"], lambda r: r.key, 1):
        problems.append(f"keyed limit to=1 exceeded (key: (peak, at)): {over}")
    if doubles := ledger.concurrent_doubles(runs):
        problems.append(f"a job ran twice at once:\n{ledger.describe(doubles)}")
    assert not problems, "\n".join(problems)


@timeout(60)
async def test_shutdown_with_a_running_sync_job(scenario: Scenario) -> None:
    s = scenario
    a = await s.cluster.start("sync-a", {"sync": 2})
    job = await s.client.insert(fw.SyncSleep.new({"s": 0.3, "slow_on": "sync-a", "slow": 15}))
    await wait_for(lambda: any(r.job_id == job.id for r in s.cluster.runs()), 10, what="started on sync-a")
    await s.cluster.start("sync-b", {"sync": 2})
    took = await assert_sigterm_exit(s, a, expect_rc=None)
    await wait_final(s.db, 1, 15, s.context)
    runs = [r for r in s.cluster.runs() if r.job_id == job.id]
    doubles = ledger.concurrent_doubles(runs)
    assert not doubles, f"handed back while its thread ran:\n{ledger.describe(doubles)}"
    assert took <= SHUTDOWN + EXIT_GRACE
