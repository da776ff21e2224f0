"""Limits across real runner processes: never exceeded, even when a runner is killed with SIGKILL."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, worker

from helpers import states, wait_for
from project import Project, wait_process_ready

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


# The inserting process computes a job's limit key from the worker registered in it, so the workers of
# the runners' project are registered here too, with the same names and options.
@worker(queue="keyed", name="project.Keyed", limit={"key": "k", "to": 2})
class Keyed:
    async def process(self, job: Job[Any]) -> None: ...


def keyed(key: int, seconds: float) -> Job[Any]:
    return Keyed.new({"k": key, "sleep": seconds})  # type: ignore[attr-defined, no-any-return]


def limited(n: int, seconds: float) -> Job[Any]:
    return Job(worker="project.Limited", args={"n": n, "sleep": seconds}, queue="limited")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
    )
    now = best = 0
    for _, delta in points:
        now += delta
        best = max(best, now)
    return best


def intervals(proj: Project, killed: dict[int, float] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Body intervals per key; a body cut short by a SIGKILL ends at the kill."""
    starts: dict[tuple[int, int], tuple[float, str]] = {}
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for kind, job_id, pid, at, key in proj.timed_events():
        if kind == "start":
            starts[(job_id, pid)] = (at, key)
        else:
            begun, key = starts.pop((job_id, pid))
            out[key].append((begun, at))
    for (_, pid), (begun, key) in starts.items():
        end = (killed or {}).get(pid)
        assert end is not None, f"a body in live process {pid} never finished"
        out[key].append((begun, end))
    return out


async def completed(db: asyncpg.Connection, prefix: str, n: int) -> bool:
    return (await states(db, prefix)).get("completed", 0) == n


async def start_runners(proj: Project, count: int) -> None:
    for i in range(count):
        proj.start(node=f"runner-{i}")
    for i in range(count):
        await wait_process_ready(proj, i)


async def test_keyed_limit_across_three_runners(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban,
                                                db: asyncpg.Connection) -> None:  # fmt: skip
    proj = Project(tmp_path, test_dsn, prefix, queues={"keyed": 10})
    try:
        await start_runners(proj, 3)
        await oban.insert_all([keyed(n % 20, 0.1) for n in range(300)])
        await wait_for(lambda: completed(db, prefix, 300), timeout=60)
        per_key = intervals(proj)
        assert len(per_key) == 20
        overlaps = {key: max_overlap(spans) for key, spans in per_key.items()}
        assert max(overlaps.values()) == 2, overlaps  # reached, never exceeded
        assert len({pid for _, _, pid, _, _ in proj.timed_events()}) == 3  # all three runners worked
    finally:
        proj.stop_all()


async def test_keyed_limit_survives_a_killed_runner(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban,
                                                    db: asyncpg.Connection) -> None:  # fmt: skip
    proj = Project(tmp_path, test_dsn, prefix, queues={"keyed": 10}, rescue_after=1.0)
    try:
        await start_runners(proj, 3)
        await oban.insert_all([keyed(n % 20, 0.3) for n in range(200)])
        await proj.wait_events("end", 40)
        busy = {pid for kind, _, pid in proj.events() if kind == "start"}
        victim = next(p for p in proj.procs if p.pid in busy)  # a runner with jobs in hand
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = {victim.pid: time.time()}
        proj.start(node="runner-0-again")
        await wait_for(lambda: completed(db, prefix, 200), timeout=90)
        per_key = intervals(proj, killed)
        overlaps = {key: max_overlap(spans) for key, spans in per_key.items()}
        assert max(overlaps.values()) <= 2, overlaps
        rescued = await db.fetchval(f"SELECT count(*) FROM \"{prefix}\".oban_jobs WHERE meta ? 'rescued'")
        assert rescued > 0  # the victim was running jobs, and they were rescued, not lost
    finally:
        proj.stop_all()


async def test_global_limit_across_three_runners(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban,
                                                 db: asyncpg.Connection) -> None:  # fmt: skip
    proj = Project(tmp_path, test_dsn, prefix, queues={"limited": {"limit": 4, "global_limit": 5}})
    try:
        await start_runners(proj, 3)
        await oban.insert_all([limited(n, 0.1) for n in range(80)])
        await wait_for(lambda: completed(db, prefix, 80), timeout=60)
        spans = [span for key_spans in intervals(proj).values() for span in key_spans]
        assert max_overlap(spans) == 5
    finally:
        proj.stop_all()


async def test_rate_limit_across_runners(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban,
                                         db: asyncpg.Connection) -> None:  # fmt: skip
    rate = {"allowed": 20, "period": 2}
    proj = Project(tmp_path, test_dsn, prefix, queues={"limited": {"limit": 10, "rate_limit": rate}})
    try:
        await start_runners(proj, 2)
        await oban.insert_all([limited(n, 0.01) for n in range(70)])
        await wait_for(lambda: completed(db, prefix, 70), timeout=60)
        starts = sorted(
            r["attempted_at"].timestamp()
            for r in await db.fetch(f'SELECT attempted_at FROM "{prefix}".oban_jobs')
        )
        busiest = max(sum(1 for t in starts if s <= t < s + 2.0) for s in starts)
        assert busiest <= 20
        assert starts[-1] - starts[0] >= 6.0  # 70 starts at 20 per 2 s take at least three windows
    finally:
        proj.stop_all()


async def test_pause_resume_scale_reach_another_node(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban,
                                                     db: asyncpg.Connection) -> None:  # fmt: skip
    proj = Project(tmp_path, test_dsn, prefix, queues={"limited": 2, "work": 1})
    try:
        await start_runners(proj, 1)  # ready means listening: the controls below reach it by NOTIFY
        await oban.pause_queue("limited")
        await wait_for(lambda: _node_queue_is(oban, "runner-0", paused=True), timeout=5)
        job = await oban.insert(limited(1, 0.01))
        await _runner_had_its_chance(oban)
        assert await _state_is(oban, job.id, "available")
        started = time.monotonic()
        await oban.resume_queue("limited")
        await wait_for(lambda: _state_is(oban, job.id, "completed"), timeout=5)
        assert time.monotonic() - started < 1.5  # by NOTIFY, not by the controls duty's 1 s fallback
        await oban.scale_queue("limited", limit=7, node="runner-0")
        await wait_for(lambda: _node_queue_is(oban, "runner-0", limit=7), timeout=3)
        # The pause is stored: a restarted node comes back paused.
        await oban.pause_queue("limited")
        proj.stop_all()
        proj.start(node="runner-0")
        await wait_process_ready(proj, 1)
        held = await oban.insert(limited(2, 0.01))
        await _runner_had_its_chance(oban)
        assert await _state_is(oban, held.id, "available")
    finally:
        proj.stop_all()


async def _runner_had_its_chance(oban: Oban) -> None:
    """A job inserted now in the runner's unpaused queue ran for two poll intervals (0.2 s): the runner
    heard the inserts before it, and polled meanwhile."""
    marker = await oban.insert(Job(worker="project.Sleepy", args={"sleep": 0.4}, queue="work"))
    await wait_for(lambda: _state_is(oban, marker.id, "completed"), timeout=10)


async def _state_is(oban: Oban, job_id: int | None, state: str) -> bool:
    return (await oban.get_job(job_id)).state.value == state  # type: ignore[arg-type]


async def _node_queue_is(oban: Oban, node: str, **expected: Any) -> bool:
    """The node's last heartbeat (sent every 0.2 s) shows the ``limited`` queue so."""
    queue = (await oban.check_queues()).queue("limited")
    return queue is not None and any(
        n.node == node and all(getattr(n, k) == v for k, v in expected.items()) for n in queue.nodes
    )
