"""``oban-py demo``: a two-minute tour on a throwaway schema.

Inserts a mix of jobs (unique ones with duplicates, a scheduled one, one that fails then succeeds, one
that snoozes, a sync job in a thread) into the ``oban_demo`` schema and runs them, printing a live
count per state. With no DSN it uses the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from typing import Any

from .job import Job, Snooze
from .oban import Oban
from .worker import Worker, job, worker

QUEUES = {"demo": 5, "reports": 2}
_failed_once: set[Any] = set()


@worker(queue="demo", unique={"keys": ["order"], "period": 300})
class ShipOrder(Worker):
    """A unique job: one shipment per order number."""

    async def process(self, job: Job[Any]) -> None:
        await asyncio.sleep(random.uniform(0.05, 0.3))


@worker(queue="demo", max_attempts=3)
class FlakyWebhook(Worker):
    """Fails its first attempt, then succeeds (a short custom backoff keeps the demo quick)."""

    def backoff(self, job: Job[Any]) -> float:
        return 1.0

    async def process(self, job: Job[Any]) -> None:
        if job.attempt == 1:
            raise ConnectionError("endpoint returned 503")


@worker(queue="demo")
class WaitForStock(Worker):
    """Snoozes once (not counted as an attempt), then completes."""

    async def process(self, job: Job[Any]) -> Snooze | None:
        if not job.meta.get("snoozed"):
            return Snooze(1)
        return None


@job(queue="reports")
def render_report(name: str, pages: int = 1) -> None:
    """A plain (sync) function: it runs in a worker thread, never blocking the event loop."""
    time.sleep(0.2 * pages)


STATES = ("scheduled", "available", "executing", "retryable", "completed", "cancelled", "discarded")


async def _counts(oban: Oban) -> dict[str, int]:
    async with oban.driver.connection() as conn:
        rows = await conn.fetch(
            "SELECT state::text AS state, count(*) AS n FROM oban_demo.oban_jobs GROUP BY state"
        )
    return {r["state"]: r["n"] for r in rows}


async def run_demo(*, dsn: str | None = None, jobs: int = 40, out: Any = None) -> int:
    out = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    logging.getLogger("oban_py").setLevel(logging.ERROR)  # the flaky job's failure is expected
    async with Oban(dsn, prefix="oban_demo", migrate=True) as admin:  # start from an empty schema
        await admin.rollback(0)
        await admin.migrate()
    async with Oban(dsn, queues=QUEUES, prefix="oban_demo", stage_interval=0.2) as oban:
        say(f"oban_py demo: queues {QUEUES} in schema oban_demo")
        orders = [ShipOrder.new({"order": n % max(1, jobs // 2), "rush": n % 3 == 0}) for n in range(jobs)]
        results = await oban.insert_all(orders)
        fresh = sum(not j.conflicted for j in results)
        say(
            f"insert_all({len(orders)} ShipOrder): {fresh} inserted, {len(orders) - fresh} duplicates "
            f"returned as conflicted=True with the holder's id"
        )
        await oban.insert(FlakyWebhook.new({"url": "https://example.com/hook"}))
        await oban.insert(WaitForStock.new({"sku": "ABC-1"}))
        await oban.insert(ShipOrder.new({"order": "late"}, schedule_in=2))
        await render_report.configure(priority=1).enqueue("weekly", pages=3)
        say("plus a flaky webhook (fails once), a snoozing job, a job scheduled in 2s and a sync report\n")
        say("  " + " ".join(f"{s:>10}" for s in STATES))
        started = time.monotonic()
        while True:
            counts = await _counts(oban)
            say("  " + " ".join(f"{counts.get(s, 0):>10}" for s in STATES))
            unfinished = sum(counts.get(s, 0) for s in STATES[:4])
            if not unfinished or time.monotonic() - started > 60:
                break
            await asyncio.sleep(0.5)
        say(
            f"\ndone in {time.monotonic() - started:.1f}s: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
        )
        say("inspect the rows: SELECT id, state, worker, args, attempt FROM oban_demo.oban_jobs;")
    return 0 if not unfinished else 1
