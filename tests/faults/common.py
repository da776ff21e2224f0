"""Shared pieces of the scenarios: a mixed load, a duplicate inserter, and the clean-run verdict."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from oban_py import Job

from . import fault_workers as fw
from . import ledger
from .checks import FINAL, UniqueSampler, terminate_backends, wait_final
from .cluster import Runner
from .scenario import Scenario
from .settings import EXIT_GRACE, FAST

SHUTDOWN = float(FAST["shutdown_timeout"])
#: How much longer a failed SIGTERM check waits, to report how late the exit was.
LATE = 12.0


def mixed_load(rng: random.Random, work: int, keyed: int, unique_keys: int = 0) -> list[Job[Any]]:
    """Plain jobs in ``work``, keyed ones (``to=2`` over 10 keys) in ``keyed``, unique ones in ``work``."""
    jobs: list[Job[Any]] = [fw.Sleep.new({"ms": rng.randint(100, 400)}) for _ in range(work)]
    jobs += [fw.Keyed.new({"k": rng.randrange(10), "ms": rng.randint(50, 200)}) for _ in range(keyed)]
    jobs += [fw.Unique.new({"u": u, "ms": 100}) for u in range(unique_keys)]
    rng.shuffle(jobs)
    return jobs


@contextlib.asynccontextmanager
async def duplicate_inserts(s: Scenario, unique_keys: int) -> AsyncIterator[list[int]]:
    """Keep inserting duplicates of the unique jobs while the scenario runs; yields the conflict count."""
    conflicts = [0]
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                batch = [fw.Unique.new({"u": u, "ms": 100}) for u in range(unique_keys)]
                done = await s.client.insert_all(batch)
                conflicts[0] += sum(1 for j in done if j.conflicted)
            except Exception:  # an outage the scenario made
                pass
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield conflicts
    finally:
        stop.set()
        await task


async def verdict(
    s: Scenario,
    total: int,
    *,
    timeout: float,
    limits: dict[str, int] | None = None,
    keyed: dict[str, int] | None = None,
    sampler: UniqueSampler | None = None,
) -> list[ledger.Run]:
    """0 lost, 0 concurrent doubles, local limits per (node process, queue), keyed limits per key."""
    counts = await wait_final(s.db, total, timeout, s.context)
    runs = s.cluster.runs()
    problems = []
    doubles = ledger.concurrent_doubles(runs)
    if doubles:
        a, b = doubles[0]
        problems.append(
            f"{len(doubles)} concurrent double run(s):\n{ledger.describe(doubles)}\n"
            f"faults around the first one:\n{s.cluster.events_near(a.start, min(a.end, b.end))}"
        )
    for queue, limit in (limits or {}).items():
        over = ledger.over_limit([r for r in runs if r.queue == queue], lambda r: r.pid, limit)
        if over:
            problems.append(f"queue {queue} limit {limit} exceeded (pid: (peak, at)): {over}")
    for queue, to in (keyed or {}).items():
        over = ledger.over_limit([r for r in runs if r.queue == queue], lambda r: r.key, to)
        if over:
            problems.append(f"queue {queue} keyed limit to={to} exceeded (key: (peak, at)): {over}")
    if sampler is not None and sampler.violations:
        problems.append(f"unique keys with several holders: {sampler.violations[:5]}")
    completed = {j["id"] for j in await s.db.jobs() if j["state"] == "completed"}
    ran_ok = {r.job_id for r in runs if r.outcome == "ok"}
    if completed - ran_ok:
        problems.append(f"completed without a finished body: {sorted(completed - ran_ok)[:10]}")
    assert not problems, "\n".join(problems) + f"\nstates: {counts}\n" + s.context()
    assert set(counts) <= set(FINAL)
    return runs


async def stop_all(s: Scenario) -> None:
    """SIGTERM every live runner at once; each must exit 0 within shutdown_timeout + grace."""
    live = [r for r in s.cluster.runners if r.alive]
    for r in live:
        r.terminate()
    limit = SHUTDOWN + EXIT_GRACE
    results = await asyncio.gather(*(r.exited(limit + 1) for r in live))
    slow = [f"{r.name}: rc {rc} after {took:.1f}s" for r, (rc, took) in zip(live, results, strict=True)
            if rc != 0 or took > limit]  # fmt: skip
    assert not slow, f"runners not stopping cleanly on SIGTERM: {slow}\n" + s.context()


async def assert_sigterm_exit(s: Scenario, runner: Runner, *, expect_rc: int | None = 0) -> float:
    """SIGTERM ``runner``: it must exit within shutdown_timeout + grace (with ``expect_rc``, if given).

    On failure it waits a little longer, to say how late the exit was (or that it never came).
    """
    limit = SHUTDOWN + EXIT_GRACE
    runner.terminate()
    rc, took = await runner.exited(limit)
    if rc is None or took > limit:
        rc, took = await runner.exited(limit + LATE)
        late = f"exited after {took:.1f}s (rc {rc})" if rc is not None else f"still running after {took:.1f}s"
        raise AssertionError(
            f"{runner.name} did not exit within {limit:.0f}s of SIGTERM (shutdown_timeout {SHUTDOWN}s + "
            f"{EXIT_GRACE}s): {late}\n" + s.context()
        )
    if expect_rc is not None:
        assert rc == expect_rc, f"{runner.name} exited with {rc} after SIGTERM\n" + s.context()
    return took


async def kill_backends(s: Scenario, nodes: list[str] | None = None) -> int:
    """pg_terminate_backend on every connection of the runners (or of ``nodes``), recorded as a fault."""
    at = time.monotonic_ns()
    n = await terminate_backends(s.db, nodes or s.cluster.names())
    s.cluster.event(f"terminated {n} backend(s)", at)
    return n


async def restart_server(s: Scenario, mode: str = "fast") -> None:
    """Stop and start PostgreSQL (``immediate``: crash-style), recorded as a fault."""
    s.cluster.event(f"PostgreSQL restart ({mode}) begins")
    await asyncio.to_thread(s.server.restart, mode)
    s.cluster.event("PostgreSQL restart done")
