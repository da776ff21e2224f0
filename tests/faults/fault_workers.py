"""Workers the fault suite's runners import (``modules = ["fault_workers"]``).

Every body appends to the ledger file named by ``FAULT_LEDGER`` (one file shared by all runner
processes, opened with O_APPEND; each line is one ``write``, so lines never interleave)::

    start <run> <job_id> <attempt> <pid> <monotonic_ns> <queue> <key> -
    tick  <run> ...                                                  -      (long bodies, each step)
    end   <run> ...                                                  <outcome>

``run`` is ``<pid>.<n>``, unique per body execution; ``outcome`` is ``ok``, ``cancelled`` (the task was
cancelled: timeout, cancel_job, shutdown) or ``raised:<Type>``. CLOCK_MONOTONIC is system-wide, so the
test process compares these times with its own ``time.monotonic_ns()`` (kills, SIGSTOP, inserts).

The test process imports this module too: the inserting process computes keyed-limit keys from the
registered worker, so names and options must be the same on both sides (they are: same module).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from typing import Any

from oban_py import Cancel, Job, Record, Snooze, Worker, worker

_fd: int | None = None
_lock = threading.Lock()
_runs = itertools.count(1)


def note(kind: str, run: str, job: Job[Any], extra: str = "-") -> None:
    global _fd
    if _fd is None:
        with _lock:
            if _fd is None:
                _fd = os.open(os.environ["FAULT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    args = job.args if isinstance(job.args, dict) else {}
    key = str(args.get("k", "-")).replace(" ", "_")
    line = (
        f"{kind} {run} {job.id} {job.attempt} {os.getpid()} {time.monotonic_ns()} {job.queue} {key} {extra}\n"
    )
    os.write(_fd, line.encode())


def new_run() -> str:
    return f"{os.getpid()}.{next(_runs)}"


async def sleep_body(job: Job[Any], seconds: float, *, ticks: bool = False, step: float = 0.1) -> None:
    """An async body sleeping ``seconds`` (in steps, writing a tick after each when ``ticks``)."""
    run = new_run()
    note("start", run, job)
    outcome = "ok"
    try:
        if not ticks:
            await asyncio.sleep(seconds)
        else:
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(step, left))
                note("tick", run, job)
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except BaseException as exc:
        outcome = f"raised:{type(exc).__name__}"
        raise
    finally:
        note("end", run, job, outcome)


class Fast(Worker):
    """Retries come back quickly, so a scenario sees the whole life of a failing job."""

    def backoff(self, job: Job[Any]) -> float:
        return 0.3


@worker(name="fault.Sleep", queue="work")
class Sleep(Fast):
    async def process(self, job: Job[Any]) -> None:
        await sleep_body(job, job.args.get("ms", 50) / 1000, ticks=job.args.get("ticks", False))


@worker(name="fault.Keyed", queue="keyed", limit={"key": "k", "to": 2})
class Keyed(Fast):
    async def process(self, job: Job[Any]) -> None:
        await sleep_body(job, job.args.get("ms", 50) / 1000)


@worker(name="fault.Unique", queue="work", unique={"keys": ["u"]})
class Unique(Fast):
    async def process(self, job: Job[Any]) -> None:
        await sleep_body(job, job.args.get("ms", 50) / 1000)


@worker(name="fault.Spawner", queue="work")
class Spawner(Fast):
    """Inserts a child job through the runner's own Oban instance (its pool), then sleeps."""

    async def process(self, job: Job[Any]) -> None:
        run = new_run()
        note("start", run, job)
        try:
            await Sleep.enqueue({"ms": job.args.get("ms", 20), "child_of": job.id}, queue=job.queue)
            await asyncio.sleep(job.args.get("ms", 20) / 1000)
        finally:
            note("end", run, job, "ok")


class _Evil(Exception):
    def __str__(self) -> str:
        raise ValueError("__str__ of this exception raises")


POISON_KINDS = (
    "error_nul",
    "error_surrogate",
    "error_str_raises",
    "cancel_nul",
    "cancel_surrogate",
    "record_nul",
    "record_surrogate",
    "record_nan",
    "snooze_inf",
    "snooze_nan_meta",
    "snooze_huge",
)


@worker(name="fault.Poison", queue="poison", max_attempts=1)
class Poison(Fast):
    """Outcomes PostgreSQL (or JSON) rejects: the engine must record something, not wedge."""

    async def process(self, job: Job[Any]) -> Any:
        run = new_run()
        note("start", run, job)
        kind = job.args["kind"]
        note("end", run, job, "ok")
        if kind == "error_nul":
            raise RuntimeError("a NUL \x00 in the message")
        if kind == "error_surrogate":
            raise RuntimeError("a lone surrogate \ud800 in the message")
        if kind == "error_str_raises":
            raise _Evil()
        if kind == "cancel_nul":
            return Cancel("reason with NUL \x00")
        if kind == "cancel_surrogate":
            return Cancel("reason with \udfff")
        if kind == "record_nul":
            return Record({"value": "a\x00b"})
        if kind == "record_surrogate":
            return Record("x\ud800y")
        if kind == "record_nan":
            return Record(float("nan"))
        if kind == "snooze_inf":
            return Snooze(float("inf"))
        if kind == "snooze_nan_meta":
            return Snooze(1, meta={"x": float("nan")})
        if kind == "snooze_huge":
            return Snooze(1e300)
        raise AssertionError(kind)


@worker(name="fault.Hostile", queue="hostile", max_attempts=3)
class Hostile(Fast):
    """Bodies that attack the engine: BaseExceptions, a blocked loop, ignored cancellation."""

    async def process(self, job: Job[Any]) -> None:
        kind = job.args["kind"]
        run = new_run()
        note("start", run, job)
        if kind == "ignore_cancel":
            end = time.monotonic() + job.args.get("s", 40)
            cancels = 0
            while time.monotonic() < end:
                try:
                    await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    cancels += 1  # swallowed: this task does not stop when asked
            note("end", run, job, f"ok:ignored_{cancels}_cancels")
            return
        if kind == "block_loop":
            time.sleep(job.args.get("s", 45))  # blocks the event loop of the whole node
            note("end", run, job, "ok")
            return
        note("end", run, job, f"raised:{kind}")
        if kind == "cancelled_error":
            raise asyncio.CancelledError()
        if kind == "sys_exit":
            sys.exit(3)
        if kind == "keyboard_interrupt":
            raise KeyboardInterrupt
        raise AssertionError(kind)


def _sync_body(job: Job[Any]) -> None:
    run = new_run()
    note("start", run, job)
    seconds = job.args.get("s", 1.0)
    if job.args.get("slow_on") and job.args["slow_on"] == job.attempted_by:
        seconds = job.args["slow"]  # slow on one node only (its re-run elsewhere is quick)
    try:
        time.sleep(seconds)  # ignores any timeout: a thread cannot be interrupted
    finally:
        note("end", run, job, "ok")


class SyncTimeout(Fast):
    def timeout(self, job: Job[Any]) -> float | None:
        value = job.args.get("timeout")
        return None if value is None else float(value)


@worker(name="fault.SyncSleep", queue="sync", max_attempts=3)
class SyncSleep(SyncTimeout):
    def process(self, job: Job[Any]) -> None:
        _sync_body(job)


@worker(name="fault.SyncKeyed", queue="sync", max_attempts=3, limit={"key": "k", "to": 1})
class SyncKeyed(SyncTimeout):
    def process(self, job: Job[Any]) -> None:
        _sync_body(job)
