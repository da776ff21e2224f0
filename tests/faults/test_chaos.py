"""Clean chaos: runner SIGKILLs, a PostgreSQL restart, backend terminations and an exhausted pool
during a mixed load (plain, keyed ``to=2`` and unique jobs). Each must end with 0 lost jobs, 0
concurrent double runs, local and keyed limits held at every instant and one holder per unique key.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from . import fault_workers as fw
from .checks import UniqueSampler
from .common import duplicate_inserts, kill_backends, mixed_load, restart_server, stop_all, verdict
from .scenario import Scenario
from .settings import FAST, SCALE, SEED, SOAK, scaled, soak_only, timeout
from helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

QUEUES = {"work": 5, "keyed": 4}
UNIQUE_KEYS = 20


@timeout(60)
async def test_repeated_sigkill_and_restart_of_runners(scenario: Scenario) -> None:
    s, rng = scenario, random.Random(SEED)
    runners = [s.cluster.runner(f"kill-{i}", QUEUES) for i in range(3)]
    for r in runners:
        await r.ready()
    jobs = mixed_load(rng, scaled(300), scaled(150), UNIQUE_KEYS)
    async with UniqueSampler(s.db) as sampler, duplicate_inserts(s, UNIQUE_KEYS):
        await s.client.insert_all(jobs)
        for _ in range(scaled(3)):
            await asyncio.sleep(rng.uniform(1.0, 2.0))  # the fault cadence
            busy = {r.pid for r in s.cluster.runs() if r.end_kind == "open"}
            live = [r for r in runners if r.alive]
            victim = next((r for r in live if r.pid in busy), rng.choice(live))
            victim.kill()
            runners[runners.index(victim)] = s.cluster.restart(victim)
        runs = await verdict(s, len(jobs), timeout=40, limits=QUEUES, keyed={"keyed": 2}, sampler=sampler)
    # The faults hit work in progress: bodies were cut by a kill, and their jobs were rescued.
    assert any(r.end_kind == "killed" for r in runs)
    assert await s.db.fetchval("SELECT count(*) FROM $p.oban_jobs WHERE meta ? 'rescued'") > 0
    await stop_all(s)


@timeout(60)
async def test_postgres_restart_mid_load(scenario: Scenario) -> None:
    s, rng = scenario, random.Random(SEED)
    runners = [s.cluster.runner(f"pgr-{i}", QUEUES) for i in range(2)]
    for r in runners:
        await r.ready()
    jobs = mixed_load(rng, scaled(200), scaled(100), UNIQUE_KEYS)
    async with UniqueSampler(s.db) as sampler, duplicate_inserts(s, UNIQUE_KEYS):
        await s.client.insert_all(jobs)
        for n in range(scaled(1) + (1 if SOAK else 0)):  # the soak adds a crash-style restart
            await wait_for(lambda n=n: len(s.cluster.runs()) > 30 * (n + 1), 20, what="load under way")
            busy = sum(1 for r in s.cluster.runs() if r.end_kind == "open")
            await restart_server(s, "immediate" if n % 2 else "fast")
            assert busy > 0  # the restart hit jobs in progress
        await verdict(s, len(jobs), timeout=40, limits=QUEUES, keyed={"keyed": 2}, sampler=sampler)
    assert all(r.alive for r in runners), "a database restart must not end a runner\n" + s.context()
    await stop_all(s)


@timeout(60)
async def test_repeated_backend_terminations(scenario: Scenario) -> None:
    s, rng = scenario, random.Random(SEED)
    runners = [s.cluster.runner(f"term-{i}", QUEUES) for i in range(2)]
    for r in runners:
        await r.ready()
    jobs = mixed_load(rng, scaled(200), scaled(100), UNIQUE_KEYS)
    killed = 0
    async with UniqueSampler(s.db) as sampler, duplicate_inserts(s, UNIQUE_KEYS):
        await s.client.insert_all(jobs)
        for _ in range(scaled(8)):
            await asyncio.sleep(rng.uniform(0.3, 0.7))  # the fault cadence
            killed += await kill_backends(s)
        await verdict(s, len(jobs), timeout=40, limits=QUEUES, keyed={"keyed": 2}, sampler=sampler)
    assert killed > 0
    assert all(r.alive for r in runners), "terminated backends must not end a runner\n" + s.context()
    await stop_all(s)


@timeout(60)
async def test_pool_exhaustion(scenario: Scenario) -> None:
    """pool_size = 1 for a queue of 20 whose jobs insert jobs through the runner's own pool."""
    s, rng = scenario, random.Random(SEED)
    runner = await s.cluster.start("pool", {"work": 20, "keyed": 10}, pool_size=1)
    parents = [fw.Spawner.new({"ms": rng.randint(10, 60)}) for _ in range(scaled(100))]
    jobs = parents + mixed_load(rng, scaled(100), scaled(60))
    await s.client.insert_all(jobs)
    await verdict(
        s, len(jobs) + len(parents), timeout=40, limits={"work": 20, "keyed": 10}, keyed={"keyed": 2}
    )
    assert runner.alive
    await stop_all(s)


@soak_only
@timeout(60)
async def test_mixed_faults_under_sustained_load(scenario: Scenario) -> None:
    """Soak: 3 runners, about 2k jobs per scale unit, random faults back to back: SIGKILL + restart,
    backend terminations, a short SIGSTOP (under rescue_after: nobody is rescued), PostgreSQL restarts."""
    s, rng = scenario, random.Random(SEED)
    runners = [s.cluster.runner(f"mix-{i}", QUEUES) for i in range(3)]
    for r in runners:
        await r.ready()
    jobs = mixed_load(rng, scaled(1400), scaled(600), UNIQUE_KEYS)
    pause_limit = float(FAST["rescue_after"]) - 1.5
    faults = []
    async with UniqueSampler(s.db) as sampler, duplicate_inserts(s, UNIQUE_KEYS):
        for start in range(0, len(jobs), 200):  # a sustained load, not one burst
            await s.client.insert_all(jobs[start : start + 200])
            await asyncio.sleep(0.2)  # the load's pace
        for _ in range(scaled(12)):
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # the fault cadence
            live = [r for r in runners if r.alive]
            fault = rng.choice(["kill", "terminate", "pause", "restart"])
            faults.append(fault)
            if fault == "kill":
                victim = rng.choice(live)
                victim.kill()
                runners[runners.index(victim)] = s.cluster.restart(victim)
            elif fault == "terminate":
                await kill_backends(s)
            elif fault == "pause":
                victim = rng.choice(live)
                victim.freeze()
                await asyncio.sleep(rng.uniform(0.2, pause_limit))
                victim.thaw()
            else:
                await restart_server(s, rng.choice(["fast", "immediate"]))
        await verdict(s, len(jobs), timeout=60 * SCALE, limits=QUEUES, keyed={"keyed": 2}, sampler=sampler)
    await stop_all(s)
