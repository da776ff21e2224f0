"""Shared helpers and the phase runner for the per-system benchmark scripts.

One process is one run of one phase for one system.  A system script subclasses
:class:`Adapter` (how to connect, install, insert, start a worker, and which SQL
counts its rows) and calls :func:`main`; every phase is implemented once, in
``phases.py``, so the definitions are identical for every system.  See
``benchmarks/README.md`` for the command-line contract and the phase definitions.

Also usable as a tiny admin tool (the orchestrator uses it to reset databases):

    python common.py reset-db --dsn postgresql://root@127.0.0.1:5432/oban_bench_x
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

PHASES = (
    "single_insert",
    "single_unique_insert",
    "bulk_insert",
    "bulk_unique_half_dup",
    "dup_contention",
    "process",
    "process_keyed",
    "process_global",
    "latency",
    "retained_unique",
    "rss",
)

# Options each phase reports under "params" (everything else is noise).
PHASE_PARAMS: dict[str, tuple[str, ...]] = {
    "single_insert": ("n",),
    "single_unique_insert": ("n",),
    "bulk_insert": ("n",),
    "bulk_unique_half_dup": ("n",),
    "dup_contention": ("n", "keys", "procs", "seed"),
    "process": ("n", "concurrency", "body_ms"),
    "process_keyed": ("n", "concurrency", "keys", "key_limit", "body_ms"),
    "process_global": ("n", "concurrency", "body_ms"),
    "latency": ("n", "concurrency", "pace_ms", "warmup_s"),
    "retained_unique": ("n", "retained"),
    "rss": ("n", "concurrency", "hold_s"),
}


class Unsupported(Exception):
    """Raised by an adapter (or a phase) when the system cannot do the phase."""


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--dsn", required=True, help="database to use; the orchestrator hands over an empty one")
    p.add_argument("--n", type=int, default=1000, help="jobs (or calls per process for dup_contention)")
    p.add_argument(
        "--keys", type=int, default=1000, help="dup_contention: distinct keys; process_keyed: partition keys"
    )
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--procs", type=int, default=8, help="dup_contention: OS processes")
    p.add_argument("--key-limit", type=int, default=2, help="process_keyed: max running jobs per key")
    p.add_argument("--body-ms", type=float, default=0.0, help="job body sleeps this long (0 = no-op)")
    p.add_argument("--pace-ms", type=float, default=5.0, help="latency: one insert every pace-ms")
    p.add_argument("--warmup-s", type=float, default=1.0, help="latency: idle worker time before inserting")
    p.add_argument("--retained", type=int, default=1_000_000, help="retained_unique: completed rows retained")
    p.add_argument("--hold-s", type=float, default=5.0, help="rss: seconds the worker runs before sampling")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=600.0, help="max seconds to wait for jobs to finish")
    p.add_argument("--json-out", help="write the result object here (it is always printed too)")
    p.add_argument("--child-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- DB helpers


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def scalar(dsn: str, sql: str, *args: Any) -> Any:
    conn = await connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def execute(dsn: str, *statements: str, replica: bool = False) -> None:
    """Run statements on one autocommit connection.

    ``replica=True`` sets ``session_replication_role = replica`` first, which skips
    ordinary triggers (used for the untimed bulk fills so that e.g. procrastinate's
    per-row NOTIFY / event triggers do not fire a million times).
    """
    conn = await connect(dsn)
    try:
        if replica:
            await conn.execute("SET session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def checkpoint(dsn: str) -> None:
    await execute(dsn, "CHECKPOINT")


async def wait_count(dsn: str, sql: str, target: int, timeout: float, interval: float = 0.01) -> float:
    """Poll ``sql`` (a count) every ``interval`` s until it reaches ``target``.

    Returns ``time.perf_counter()`` of the first poll that saw ``target``.
    """
    conn = await connect(dsn)
    try:
        deadline = time.perf_counter() + timeout
        while True:
            n = await conn.fetchval(sql)
            if n >= target:
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {n}/{target} rows reached the done state within {timeout:.0f}s")
            await asyncio.sleep(interval)
    finally:
        await conn.close()


def _with_db(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + db, parts.query, parts.fragment))


async def reset_database(dsn: str, create: bool = True) -> None:
    """DROP (with FORCE) and CREATE the database named in ``dsn``."""
    db = urlsplit(dsn).path.lstrip("/")
    if not db or db in ("postgres", "template0", "template1"):
        raise SystemExit(f"refusing to reset database {db!r}")
    conn = await connect(_with_db(dsn, "postgres"))
    try:
        ident = '"' + db.replace('"', '""') + '"'
        await conn.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
        if create:
            await conn.execute(f"CREATE DATABASE {ident}")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- small utils


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS from /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("nan")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def quiet_logging() -> None:
    """Root logger at WARNING, no per-job INFO lines from any library."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


# --------------------------------------------------------------------------- job body


class Runner:
    """What a job body does, plus the in-process bookkeeping of the phases.

    Every system's job handler calls ``await common.job_body(args)`` with the job's
    args dict (``{"i": int}``, plus ``"pk"`` for process_keyed).
    """

    def __init__(self, target: int | None = None, body_ms: float = 0.0, block: bool = False) -> None:
        self.target = target
        self.body_s = body_ms / 1000.0
        self.block = block
        self.started = 0
        self.finished = 0
        self.inflight = 0
        self.max_inflight = 0
        self.key_inflight: Counter[str] = Counter()
        self.max_key_overlap = 0
        self.start_times: dict[int, float] = {}
        self.t_last_body: float | None = None
        self.done = asyncio.Event()
        self._forever = asyncio.Event()

    async def body(self, args: dict[str, Any]) -> None:
        now = time.perf_counter()
        i = args.get("i")
        if i is not None:
            self.start_times.setdefault(int(i), now)
        pk = args.get("pk")
        self.started += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        if pk is not None:
            self.key_inflight[pk] += 1
            self.max_key_overlap = max(self.max_key_overlap, self.key_inflight[pk])
        try:
            if self.block:
                await self._forever.wait()
            elif self.body_s > 0:
                await asyncio.sleep(self.body_s)
        finally:
            self.inflight -= 1
            if pk is not None:
                self.key_inflight[pk] -= 1
        self.finished += 1
        if self.target is not None and self.finished >= self.target:
            self.t_last_body = time.perf_counter()
            self.done.set()


_RUNNER: Runner | None = None


def set_runner(runner: Runner) -> Runner:
    """Make ``runner`` the one ``job_body`` reports to (one per phase)."""
    global _RUNNER
    _RUNNER = runner
    return runner


async def job_body(args: dict[str, Any] | None) -> None:
    """The job body every system runs (module-level so any engine can import it)."""
    if _RUNNER is not None:
        await _RUNNER.body(args or {})


@dataclass
class WorkerSpec:
    concurrency: int
    key_limit: int | None = None  # per-partition-key running limit (process_keyed only)
    partition_keys: list[str] = field(default_factory=list)
    global_limit: int | None = None  # running jobs across all workers (process_global only)


# --------------------------------------------------------------------------- adapter


class Adapter:
    """Per-system glue.  Override what the system supports; leave the rest.

    Return values: insert calls return the job id (any JSON-able or comparable
    value), or ``None`` when the system signals a duplicate by returning nothing.
    Exceptions listed in ``dup_exceptions`` are the system's documented duplicate
    signal; any other exception is counted as an error.
    """

    system = "?"
    version = "?"
    notes = ""  # settings that hold for every phase (polling, batch sizes, log level...)
    dup_exceptions: tuple[type[BaseException], ...] = ()
    # phase -> reason, for phases the system cannot do (checked before any setup)
    unsupported: dict[str, str] = {}
    # True if worker() enforces spec.global_limit across workers (process_global runs only then)
    supports_global_limit = False

    def __init__(self, dsn: str, opts: argparse.Namespace) -> None:
        self.dsn = dsn
        self.opts = opts

    async def open(self) -> None:
        """Connect (pools, apps).  Called in every process, parent and children."""

    async def close(self) -> None:
        """Disconnect."""

    async def install(self) -> None:
        """Create the system's schema in the empty database (parent only)."""
        raise NotImplementedError

    # -- inserts
    async def insert_one(self, args: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def insert_unique(self, key: str, args: dict[str, Any]) -> Any:
        raise Unsupported("no unique/dedupe option")

    async def insert_bulk(self, args_list: list[dict[str, Any]]) -> list[Any]:
        """One bulk call.  For process_keyed the args carry ``"pk"``: map it to the
        system's partition/limit key."""
        raise NotImplementedError

    async def insert_bulk_unique(self, keys: list[str]) -> list[Any]:
        """One bulk call, job i carrying unique key keys[i]; one result per input
        where the system gives one (id, or None for a skipped duplicate)."""
        raise Unsupported("no bulk insert with per-job unique keys")

    # -- worker
    def worker(self, spec: WorkerSpec) -> contextlib.AbstractAsyncContextManager[None]:
        """Async context manager: a worker running ``job_body`` at spec.concurrency
        (and spec.key_limit per ``args["pk"]`` if given) until the block exits."""
        raise NotImplementedError

    # -- SQL the harness uses (run on its own asyncpg connection)
    def sql_count_jobs(self) -> str:
        """Count of every job row the inserts created (any state)."""
        raise NotImplementedError

    def sql_count_done(self) -> str:
        """Count of jobs whose completion is durable."""
        raise NotImplementedError

    def sql_fill(self, n: int, state: str) -> list[str]:
        """Statements inserting n rows straight into the system's tables.
        state "done": completed/succeeded jobs, key 'r<g>' where the system has a
        key column.  state "queued": runnable jobs for the worker's queue."""
        raise Unsupported("no SQL fill defined")

    def fill_tables(self) -> list[str]:
        """Tables to VACUUM ANALYZE after a fill."""
        return []


# --------------------------------------------------------------------------- output and main


def write_result(result: dict[str, Any], json_out: str | None) -> None:
    text = json.dumps(result, default=str)
    if json_out:
        with open(json_out, "w") as fh:
            fh.write(text + "\n")
    print(text, flush=True)


def base_result(a: Adapter, o: argparse.Namespace) -> dict[str, Any]:
    return {
        "system": a.system,
        "version": a.version,
        "phase": o.phase,
        "n": o.n,
        "params": {k: getattr(o, k) for k in PHASE_PARAMS[o.phase]},
        "metrics": {},
        "notes": a.notes,
        "python": platform.python_version(),
    }


async def _run(adapter_cls: type[Adapter], o: argparse.Namespace) -> None:
    from phases import PHASE_FUNCS, Ctx, dup_contention_child  # phases imports this module

    a = adapter_cls(o.dsn, o)
    if o.child_index is not None:
        await a.open()
        try:
            await dup_contention_child(a, o)
        finally:
            await a.close()
        return
    result = base_result(a, o)
    if o.phase in a.unsupported:
        result["unsupported"] = a.unsupported[o.phase]
        write_result(result, o.json_out)
        return

    def finish(out: dict[str, Any]) -> None:
        result.update(out)
        write_result(result, o.json_out)
        sys.stdout.flush()
        os._exit(0)  # a worker whose bodies block forever may never shut down cleanly

    result["postgres"] = await scalar(o.dsn, "SHOW server_version")
    await a.open()
    try:
        await a.install()
        out = await PHASE_FUNCS[o.phase](Ctx(a, o, o.dsn, finish))
        result.update(out)
    except Unsupported as exc:
        result["metrics"] = {}
        result["unsupported"] = str(exc)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(a.close(), 30)
    write_result(result, o.json_out)


def main(adapter_cls: type[Adapter], argv: list[str] | None = None) -> None:
    quiet_logging()
    o = build_parser().parse_args(argv)
    asyncio.run(_run(adapter_cls, o))


@contextlib.asynccontextmanager
async def background(
    coro_factory: Callable[[], Any], stop: Callable[[], Any] | None = None, grace: float = 30.0
) -> AsyncIterator[asyncio.Task[Any]]:
    """Run a worker coroutine as a task for the duration of the block.

    On exit call ``stop()`` (if given) and wait up to ``grace`` s, then cancel.
    A worker that died early re-raises its exception here.
    """
    task = asyncio.create_task(coro_factory())
    await asyncio.sleep(0)
    try:
        yield task
        if task.done():
            task.result()
    finally:
        if stop is not None and not task.done():
            res = stop()
            if asyncio.iscoroutine(res):
                await res
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), grace)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _admin(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="common.py")
    p.add_argument("command", choices=["reset-db", "drop-db"])
    p.add_argument("--dsn", required=True)
    o = p.parse_args(argv)
    asyncio.run(reset_database(o.dsn, create=o.command == "reset-db"))


if __name__ == "__main__":
    _admin(sys.argv[1:])
