"""The ledger the job bodies write (see fault_workers.py), read back as runs, and the checks on it.

A *run* is one execution of a body: from its ``start`` line to its ``end`` line. A run without an
``end`` ended when its process died (the cluster records SIGKILL and exit times) or is still going.
Checks:

* :func:`concurrent_doubles`: two runs of the same job whose intervals overlap (in one process or
  two). Sequential re-runs after a crash are fine (at-least-once); overlapping ones are not.
* :func:`peak`: the most runs open at one instant within a group (per node and queue for local
  limits, per key for keyed limits), with the instant, so a limit can be asserted at every instant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

OPEN = math.inf


@dataclass
class Run:
    run: str
    job_id: int
    attempt: int
    pid: int
    queue: str
    key: str
    start: int
    end: float = OPEN  # ns; OPEN while the body still runs (or nobody knows when it stopped)
    end_kind: str = "open"  # ledger | killed | exited | open
    outcome: str = ""
    ticks: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.end_kind == "ledger"

    def __str__(self) -> str:
        end = "open" if self.end == OPEN else f"{self.end / 1e9:.3f}"
        return (
            f"job {self.job_id} attempt {self.attempt} pid {self.pid} [{self.start / 1e9:.3f}, {end}] "
            f"{self.end_kind} {self.outcome}"
        )


def read(path: Path, deaths: dict[int, tuple[int, str]] | None = None) -> list[Run]:
    """Runs in start order. ``deaths``: pid -> (monotonic ns, "killed"/"exited") closes open runs."""
    runs: dict[str, Run] = {}
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if len(parts) != 9:
            continue  # a line cut by a kill mid-write cannot happen with one write(), but be lenient
        kind, run, job_id, attempt, pid, at, queue, key, extra = parts
        if kind == "start":
            runs[run] = Run(run, int(job_id), int(attempt), int(pid), queue, key, int(at))
        elif run in runs:
            if kind == "tick":
                runs[run].ticks.append(int(at))
            elif kind == "end":
                runs[run].end = int(at)
                runs[run].end_kind = "ledger"
                runs[run].outcome = extra
    for r in runs.values():
        if r.end_kind == "open" and deaths and r.pid in deaths:
            r.end, r.end_kind = deaths[r.pid]
    return sorted(runs.values(), key=lambda r: r.start)


def by_job(runs: Iterable[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.job_id].append(r)
    return out


def concurrent_doubles(runs: Iterable[Run], *, slack_ns: int = 0) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job whose intervals overlap by more than ``slack_ns``."""
    found = []
    for job_runs in by_job(runs).values():
        job_runs.sort(key=lambda r: r.start)
        for i, a in enumerate(job_runs):
            for b in job_runs[i + 1 :]:
                if b.start + slack_ns < a.end:
                    found.append((a, b))
    return found


def peak(runs: Iterable[Run], group: Callable[[Run], Hashable]) -> dict[Hashable, tuple[int, float]]:
    """Per group: the most runs open at once and when (seconds). Ends sort before starts at one instant."""
    events: dict[Hashable, list[tuple[float, int]]] = defaultdict(list)
    for r in runs:
        g = group(r)
        events[g].append((r.start, 1))
        events[g].append((r.end, -1))
    out: dict[Hashable, tuple[int, float]] = {}
    for g, points in events.items():
        points.sort()
        now = best = 0
        when = 0.0
        for at, delta in points:
            now += delta
            if now > best:
                best, when = now, at / 1e9
        out[g] = (best, when)
    return out


def over_limit(
    runs: Iterable[Run], group: Callable[[Run], Hashable], limit: int
) -> dict[Hashable, tuple[int, float]]:
    """Groups whose peak exceeds ``limit``."""
    return {g: p for g, p in peak(runs, group).items() if p[0] > limit}


def describe(pairs: list[tuple[Run, Run]], limit: int = 5) -> str:
    return "\n".join(f"  {a}\n  {b}" for a, b in pairs[:limit])
