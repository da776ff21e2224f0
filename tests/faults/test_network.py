"""Network faults: a black hole between one runner and PostgreSQL (through the suite's TCP proxy), and
a killed LISTEN connection."""

from __future__ import annotations

import asyncio
import time

import pytest

from . import fault_workers as fw
from . import ledger
from .checks import listen_backends, terminate, wait_final
from .cluster import Runner
from .common import assert_sigterm_exit
from .scenario import Scenario
from .settings import SCALE, timeout
from helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def black_hole_load(s: Scenario) -> tuple[Runner, Runner, list[int]]:
    hole = s.cluster.runner("hole-a", {"work": 5, "only_a": 5}, via_proxy=True)
    direct = s.cluster.runner("hole-b", {"work": 5})
    await hole.ready()
    await direct.ready()
    jobs = await s.client.insert_all([fw.Sleep.new({"ms": 200}) for _ in range(150)])
    await wait_for(
        lambda: any(r.pid == hole.pid and r.end_kind == "open" for r in s.cluster.runs()),
        10,
        what="the proxied runner has jobs in hand",
    )
    return hole, direct, [j.id for j in jobs if j.id]


@timeout(60)
async def test_black_hole_then_recovery(scenario: Scenario) -> None:
    """6 s of black hole: the runner's claimed jobs finish or are rescued, new jobs are taken, SIGTERM
    ends it."""
    s = scenario
    hole, _direct, ids = await black_hole_load(s)
    assert s.cluster.proxy is not None
    s.cluster.proxy.black_hole(True)
    await asyncio.sleep(6 * SCALE)  # the fault itself
    s.cluster.proxy.black_hole(False)
    await wait_final(s.db, len(ids), 30, s.context)
    # New work for the proxied runner alone: it must be fetching again.
    later = await s.client.insert_all([fw.Sleep.new({"ms": 20}, queue="only_a") for _ in range(20)])
    await wait_final(s.db, len(ids) + len(later), 20, s.context)
    doubles = ledger.concurrent_doubles(s.cluster.runs())
    assert not doubles, ledger.describe(doubles)
    await assert_sigterm_exit(s, hole)


@timeout(60)
async def test_sigterm_during_black_hole(scenario: Scenario) -> None:
    """A runner cut off from the database still stops within shutdown_timeout + grace of SIGTERM, and
    what it held is rescued by the other node."""
    s = scenario
    hole, _direct, ids = await black_hole_load(s)
    assert s.cluster.proxy is not None
    s.cluster.proxy.black_hole(True)
    await asyncio.sleep(1.0)  # the fault is on
    await assert_sigterm_exit(s, hole, expect_rc=None)
    await wait_final(s.db, len(ids), 30, s.context)
    s.cluster.proxy.black_hole(False)
    doubles = ledger.concurrent_doubles(s.cluster.runs())
    assert not doubles, ledger.describe(doubles)


async def start_latency(s: Scenario, seconds: float) -> float:
    """Insert one job and wait for its body to start; the insert-to-start time in seconds."""
    before = time.monotonic_ns()
    job = await s.client.insert(fw.Sleep.new({"ms": 10}))

    def started() -> int | None:
        return next((r.start for r in s.cluster.runs() if r.job_id == job.id), None)

    at = await wait_for(started, seconds, what=f"job {job.id} started")
    return (at - before) / 1e9


@timeout(60)
async def test_killed_listen_connection(scenario: Scenario) -> None:
    """After its LISTEN backend is terminated, a node reconnects: inserts start at NOTIFY speed again
    (poll_interval is 5 s), cancel_job still interrupts a running job, and SIGTERM exits 0."""
    s = scenario
    node = await s.cluster.start("listen", {"work": 5}, poll_interval=5.0)
    found = await wait_for(lambda: listen_backends(s.db, "listen"), 10, what="a LISTEN backend")
    assert len(found) == 1, f"expected one LISTEN backend, found {found}"
    old = found[0]
    assert await start_latency(s, 8) < 1.0  # the baseline: NOTIFY, not the 5 s poll
    assert await terminate(s.db, [old]) == 1

    async def replaced() -> list[int]:
        return [pid for pid in await listen_backends(s.db, "listen") if pid != old]

    # Within a few seconds of the kill the node listens again, on a new connection.
    await wait_for(replaced, 3.0, what="a new LISTEN backend")
    latencies = [await start_latency(s, 8) for _ in range(3)]
    listening = await listen_backends(s.db, "listen")
    assert max(latencies) < 1.0, (
        f"insert-to-start latencies after the LISTEN kill: {latencies} (poll fallback only?); "
        f"LISTEN backends now: {listening} (killed {old})\n" + s.context()
    )
    long = await s.client.insert(fw.Sleep.new({"ms": 30_000, "ticks": True}))
    await wait_for(lambda: any(r.job_id == long.id for r in s.cluster.runs()), 8, what="long job started")
    assert long.id is not None
    assert await s.client.cancel_job(long.id)

    def interrupted() -> bool:
        return any(r.job_id == long.id and r.finished for r in s.cluster.runs())

    await wait_for(interrupted, 3, what="the cancelled job's body interrupted")
    (run,) = [r for r in s.cluster.runs() if r.job_id == long.id]
    assert run.outcome == "cancelled"
    await assert_sigterm_exit(s, node)
