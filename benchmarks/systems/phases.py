"""The phases, implemented once for every system (see benchmarks/README.md).

Each ``phase_*`` coroutine gets a :class:`Ctx` (adapter, options, dsn) and returns
``{"metrics": {...}, "details": {...}}``; ``common._run`` wraps that into the
result object.  Timings use ``time.perf_counter()``; "done" means durable in the DB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import common
from common import (
    Adapter,
    Runner,
    Unsupported,
    WorkerSpec,
    checkpoint,
    execute,
    percentile,
    rate,
    rss_mb,
    scalar,
    wait_count,
)


@dataclass
class Ctx:
    a: Adapter
    o: argparse.Namespace
    dsn: str
    finish: Callable[[dict[str, Any]], None]  # emit a result now and exit (rss)


async def wait_event(event: asyncio.Event, timeout: float, a: Adapter) -> None:
    """Wait for ``event``; fail fast if the adapter's background worker task died."""
    deadline = time.perf_counter() + timeout
    while not event.is_set():
        task = getattr(a, "worker_task", None)
        if task is not None and task.done():
            task.result()  # re-raise the worker's exception
            raise RuntimeError("worker stopped before all jobs ran")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"jobs did not finish within {timeout:.0f}s")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), 0.5)


def _classify(exc: BaseException, a: Adapter) -> str:
    return "dup_signal" if isinstance(exc, a.dup_exceptions) else "error"


async def _timed_unique(
    a: Adapter, keys: list[str], ids: set[str] | None = None
) -> tuple[float, Counter[str]]:
    outcome: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        try:
            res = await a.insert_unique(key, {"i": i})
            outcome["none" if res is None else "id"] += 1
            if ids is not None and res is not None:
                ids.add(str(res))
        except Unsupported:
            raise
        except Exception as exc:
            outcome[f"{_classify(exc, a)}:{type(exc).__name__}"] += 1
    return time.perf_counter() - t0, outcome


async def phase_single_insert(c: Ctx) -> dict[str, Any]:
    n = c.o.n
    await checkpoint(c.dsn)
    t0 = time.perf_counter()
    for i in range(n):
        await c.a.insert_one({"i": i})
    dt = time.perf_counter() - t0
    rows = await scalar(c.dsn, c.a.sql_count_jobs())
    return {"metrics": {"jobs_per_s": rate(n, dt), "seconds": round(dt, 3), "rows_landed": rows}}


async def phase_single_unique_insert(c: Ctx) -> dict[str, Any]:
    n = c.o.n
    await c.a.insert_unique("probe", {"i": -1})  # raises Unsupported before timing if needed
    await checkpoint(c.dsn)
    dt, outcome = await _timed_unique(c.a, [f"u{i}" for i in range(n)])
    rows = await scalar(c.dsn, c.a.sql_count_jobs()) - 1
    return {
        "metrics": {"jobs_per_s": rate(n, dt), "seconds": round(dt, 3), "rows_landed": rows},
        "details": {"outcomes": dict(outcome)},
    }


async def phase_bulk_insert(c: Ctx) -> dict[str, Any]:
    n = c.o.n
    args = [{"i": i} for i in range(n)]
    await checkpoint(c.dsn)
    t0 = time.perf_counter()
    ids = await c.a.insert_bulk(args)
    dt = time.perf_counter() - t0
    rows = await scalar(c.dsn, c.a.sql_count_jobs())
    return {
        "metrics": {"jobs_per_s": rate(n, dt), "seconds": round(dt, 3), "rows_landed": rows},
        "details": {"returned": len(ids)},
    }


async def phase_bulk_unique_half_dup(c: Ctx) -> dict[str, Any]:
    n = c.o.n
    half = n // 2
    existing = [f"h{i}" for i in range(half)]
    pre = await c.a.insert_bulk_unique(existing)  # untimed; Unsupported propagates
    pre_ids = dict(zip(existing, pre, strict=True)) if len(pre) == half else {}
    # interleave: existing key, fresh key, existing key, ...
    keys = [k for i in range(half) for k in (existing[i], f"f{i}")]
    before = await scalar(c.dsn, c.a.sql_count_jobs())
    await checkpoint(c.dsn)
    exc_name = None
    res: list[Any] = []
    t0 = time.perf_counter()
    try:
        res = await c.a.insert_bulk_unique(keys)
    except Unsupported:
        raise
    except Exception as exc:
        exc_name = f"{type(exc).__module__}.{type(exc).__name__}"
    dt = time.perf_counter() - t0
    landed = await scalar(c.dsn, c.a.sql_count_jobs()) - before
    details: dict[str, Any] = {"expected_new_rows": half}
    if exc_name:
        how = f"raises {exc_name}; {landed} of the call's rows landed"
    elif len(res) == len(keys):
        none_n = sum(r is None for r in res)
        same = sum(
            1 for k, r in zip(keys, res, strict=True) if k in pre_ids and r is not None and r == pre_ids[k]
        )
        details.update({"none_returned": none_n, "existing_id_returned": same})
        if none_n:
            how = f"None at {none_n} duplicate positions (one result per input)"
        elif same:
            how = f"existing job's id returned at {same} positions, no flag"
        else:
            how = "one new id per input (duplicates not detected)"
    else:
        how = f"returns {len(res)} results for {len(keys)} inputs (duplicates dropped silently)"
    details["dup_reported"] = how
    metrics: dict[str, Any] = {
        "seconds": round(dt, 3),
        "rows_landed": landed,
        "raised": int(exc_name is not None),
    }
    if exc_name is None:  # a call that raised has no meaningful items/s
        metrics["items_per_s"] = rate(len(keys), dt)
    return {"metrics": metrics, "details": details}


async def phase_dup_contention(c: Ctx) -> dict[str, Any]:
    o = c.o
    await c.a.insert_unique("probe", {"i": -1})
    base = await scalar(c.dsn, c.a.sql_count_jobs())
    await checkpoint(c.dsn)
    procs = []
    for idx in range(o.procs):
        cmd = [
            sys.executable,
            sys.argv[0],
            "--phase",
            "dup_contention",
            "--dsn",
            c.dsn,
            "--n",
            str(o.n),
            "--keys",
            str(o.keys),
            "--seed",
            str(o.seed),
            "--child-index",
            str(idx),
        ]
        procs.append(
            await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        )
    try:
        for p in procs:  # barrier: every child connected and ready
            line = await asyncio.wait_for(p.stdout.readline(), 120)  # type: ignore[union-attr]
            if line.strip() != b"READY":
                raise RuntimeError(f"child did not start: {line!r}")
        for p in procs:
            p.stdin.write(b"GO\n")  # type: ignore[union-attr]
            await p.stdin.drain()  # type: ignore[union-attr]
        results = []
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), o.timeout)  # type: ignore[union-attr]
            results.append(json.loads(line.decode().removeprefix("RESULT ")))
            await p.wait()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    outcome: Counter[str] = Counter()
    distinct: set[str] = set()
    for r in results:
        outcome.update(r["outcome"])
        distinct.update(r["ids"])
    calls = o.procs * o.n
    landed = await scalar(c.dsn, c.a.sql_count_jobs()) - base
    dup_signals = sum(v for k, v in outcome.items() if k.startswith("dup_signal:"))
    errors = sum(v for k, v in outcome.items() if k.startswith("error:"))
    return {
        "n": calls,
        "metrics": {
            "calls_per_s": rate(calls, wall),
            "seconds": round(wall, 3),
            "rows_landed": landed,
            "expected_rows": o.keys,
            "dup_signals": dup_signals,
            "unexpected_errors": errors,
            "none_returned": outcome.get("none", 0),
            "ids_returned": outcome.get("id", 0),
            "distinct_ids_returned": len(distinct),
        },
        "details": {"outcomes": dict(outcome)},
    }


async def dup_contention_child(a: Adapter, o: argparse.Namespace) -> None:
    rnd = random.Random(o.seed + o.child_index)
    keys = [f"c{k % o.keys}" for k in range(o.n)]
    rnd.shuffle(keys)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("READY", flush=True)
    await reader.readline()
    ids: set[str] = set()
    t0 = time.time()
    _, outcome = await _timed_unique(a, keys, ids)
    t1 = time.time()
    print(
        "RESULT " + json.dumps({"t0": t0, "t1": t1, "outcome": dict(outcome), "ids": sorted(ids)}), flush=True
    )


async def _process(c: Ctx, keyed: bool, global_limit: bool = False) -> dict[str, Any]:
    o = c.o
    n = o.n
    if global_limit and not c.a.supports_global_limit:
        raise common.Unsupported("no limit on running jobs across workers/nodes")
    if keyed:
        pkeys = [f"k{j}" for j in range(o.keys)]
        args = [{"i": i, "pk": pkeys[i % o.keys]} for i in range(n)]
        spec = WorkerSpec(o.concurrency, key_limit=o.key_limit, partition_keys=pkeys)
    else:
        args = [{"i": i} for i in range(n)]
        spec = WorkerSpec(o.concurrency, global_limit=o.concurrency if global_limit else None)
    for start in range(0, n, 10_000):  # untimed
        await c.a.insert_bulk(args[start : start + 10_000])
    await checkpoint(c.dsn)
    runner = common.set_runner(Runner(target=n, body_ms=o.body_ms))
    t0 = time.perf_counter()
    async with c.a.worker(spec):
        await wait_event(runner.done, o.timeout, c.a)
        t_db = await wait_count(c.dsn, c.a.sql_count_done(), n, o.timeout)
    dt = t_db - t0
    metrics = {
        "jobs_per_s": rate(n, dt),
        "seconds": round(dt, 3),
        "last_body_s": round((runner.t_last_body or t_db) - t0, 3),
        "max_in_flight": runner.max_inflight,
        "bodies": runner.finished,
    }
    if keyed:
        metrics["max_key_overlap"] = runner.max_key_overlap
    return {"metrics": metrics}


async def phase_process(c: Ctx) -> dict[str, Any]:
    return await _process(c, keyed=False)


async def phase_process_keyed(c: Ctx) -> dict[str, Any]:
    return await _process(c, keyed=True)


async def phase_process_global(c: Ctx) -> dict[str, Any]:
    """Like process, with a global (cross-worker) limit equal to the concurrency: its cost."""
    return await _process(c, keyed=False, global_limit=True)


async def phase_latency(c: Ctx) -> dict[str, Any]:
    o = c.o
    n = o.n
    runner = common.set_runner(Runner(target=n))
    committed: dict[int, float] = {}
    pace = o.pace_ms / 1000.0
    await checkpoint(c.dsn)
    async with c.a.worker(WorkerSpec(o.concurrency)):
        await asyncio.sleep(o.warmup_s)  # worker idle, listening
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i * pace - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await c.a.insert_one({"i": i})
            committed[i] = time.perf_counter()
        await wait_event(runner.done, o.timeout, c.a)
    lat = [(runner.start_times[i] - committed[i]) * 1000.0 for i in range(n)]
    return {
        "metrics": {
            "p50_ms": round(percentile(lat, 50), 2),
            "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "max_ms": round(max(lat), 2),
            "min_ms": round(min(lat), 2),
            "negative": sum(x < 0 for x in lat),
        },
        "details": {"clock": "perf_counter in one process: insert call returned -> body started"},
    }


async def _fill(c: Ctx, n: int, state: str) -> float:
    stmts = c.a.sql_fill(n, state)
    t0 = time.perf_counter()
    await execute(c.dsn, *stmts, replica=True)
    dt = time.perf_counter() - t0
    await execute(c.dsn, *(f"VACUUM ANALYZE {t}" for t in c.a.fill_tables()))
    return dt


async def phase_retained_unique(c: Ctx) -> dict[str, Any]:
    o = c.o
    await c.a.insert_unique("probe", {"i": -1})
    c.a.sql_fill(1, "done")  # Unsupported before any timing
    await checkpoint(c.dsn)
    dt_empty, out_empty = await _timed_unique(c.a, [f"e{i}" for i in range(o.n)])
    fill_s = await _fill(c, o.retained, "done")
    await checkpoint(c.dsn)
    dt_ret, out_ret = await _timed_unique(c.a, [f"x{i}" for i in range(o.n)])
    empty, ret = rate(o.n, dt_empty), rate(o.n, dt_ret)
    return {
        "metrics": {
            "empty_jobs_per_s": empty,
            "retained_jobs_per_s": ret,
            "ratio": round(ret / empty, 3),
            "retained": o.retained,
            "fill_s": round(fill_s, 1),
        },
        "details": {"outcomes_empty": dict(out_empty), "outcomes_retained": dict(out_ret)},
    }


async def phase_rss(c: Ctx) -> dict[str, Any]:
    o = c.o
    fill_s = await _fill(c, o.n, "queued")
    await checkpoint(c.dsn)
    runner = common.set_runner(Runner(block=True))
    before = rss_mb()
    async with c.a.worker(WorkerSpec(o.concurrency)):
        await asyncio.sleep(o.hold_s)
        c.finish(
            {
                "metrics": {
                    "rss_mb": rss_mb(),
                    "rss_before_worker_mb": before,
                    "bodies_started": runner.started,
                    "queued": o.n,
                    "fill_s": round(fill_s, 1),
                },
                "details": {
                    "note": "VmRSS of the one process running producer pools + worker; "
                    "bodies block forever; sampled after hold_s, then os._exit"
                },
            }
        )
    raise AssertionError("unreachable")


PHASE_FUNCS = {
    "single_insert": phase_single_insert,
    "single_unique_insert": phase_single_unique_insert,
    "bulk_insert": phase_bulk_insert,
    "bulk_unique_half_dup": phase_bulk_unique_half_dup,
    "dup_contention": phase_dup_contention,
    "process": phase_process,
    "process_keyed": phase_process_keyed,
    "process_global": phase_process_global,
    "latency": phase_latency,
    "retained_unique": phase_retained_unique,
    "rss": phase_rss,
}
