"""Child process for the contention tests: many unique inserts over a shared set of keys.

Usage: python contend.py DSN PREFIX KEYS INSERTS SEED OUT. Mixes single inserts and insert_all
batches (which may repeat a key within the batch), and writes every answer as JSON:
``{"results": [[key, id, conflicted], ...], "errors": [...]}``.

``python contend.py mixed DSN PREFIX KEYS OPS SEED OUT`` mixes insert_all batches (with and without
``replace``, small chunks so one call runs several statements), single inserts with ``replace`` and
cancel_jobs over the same keys, and adds ``"ops"`` (the kind of every operation) to the output.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import traceback
from datetime import datetime, timedelta, timezone
from typing import Any

from oban_py import Job, Oban, worker


@worker(name="contend.Unique", queue="contend", unique=True)
class Unique:
    async def process(self, job: Job[Any]) -> None:
        pass


async def main(dsn: str, prefix: str, keys: int, inserts: int, seed: int, out: str) -> None:
    rng = random.Random(seed)
    results: list[list[Any]] = []
    errors: list[str] = []
    async with Oban(dsn, prefix=prefix, pool_size=2) as oban:
        done = 0
        while done < inserts:
            size = 1 if rng.random() < 0.5 else rng.randint(2, 30)
            size = min(size, inserts - done)
            batch = [rng.randrange(keys) for _ in range(size)]
            try:
                if size == 1:
                    jobs = [await oban.insert(Unique.new({"k": batch[0]}))]  # type: ignore[attr-defined]
                else:
                    jobs = await oban.insert_all([Unique.new({"k": k}) for k in batch])  # type: ignore[attr-defined]
                results.extend([k, j.id, j.conflicted] for k, j in zip(batch, jobs, strict=True))
            except Exception:
                errors.append(traceback.format_exc())
            done += size
    with open(out, "w") as fh:
        json.dump({"results": results, "errors": errors}, fh)


@worker(name="contend.Mixed", queue="contend", unique={"keys": ["k"]})
class Mixed:
    async def process(self, job: Job[Any]) -> None:
        pass


REPLACE = {
    "keys": ["k"],
    "replace": {"available": ["args", "priority"], "scheduled": ["args", "scheduled_at"]},
}


def _mixed_job(rng: random.Random, key: int, replace: bool) -> Job[Any]:
    extra: dict[str, Any] = {}
    if rng.random() < 0.3:
        extra["schedule_in"] = rng.choice([30, 60])
    elif rng.random() < 0.2:  # due already, some with their period over
        extra["scheduled_at"] = datetime.now(timezone.utc) - timedelta(seconds=rng.choice([1, 30]))
    unique = dict(REPLACE) if replace else {"keys": ["k"]}
    if rng.random() < 0.3:
        unique["period"] = 10
    return Mixed.new({"k": key, "v": rng.random()}, unique=unique, priority=rng.randrange(4), **extra)  # type: ignore[attr-defined]


async def mixed(dsn: str, prefix: str, keys: int, ops: int, seed: int, out: str) -> None:
    rng = random.Random(seed)
    results: list[list[Any]] = []
    errors: list[str] = []
    kinds: list[str] = []
    seen: list[int] = []
    async with Oban(dsn, prefix=prefix, pool_size=3, insert_chunk_size=4) as oban:
        for _ in range(ops):
            roll = rng.random()
            try:
                if roll < 0.4:
                    kinds.append("insert_all")
                    batch = [rng.randrange(keys) for _ in range(rng.randint(2, 16))]
                    replace = rng.random() < 0.5
                    jobs = await oban.insert_all([_mixed_job(rng, k, replace) for k in batch])
                    results.extend([k, j.id, j.conflicted] for k, j in zip(batch, jobs, strict=True))
                    seen.extend(j.id for j in jobs if j.id is not None)
                elif roll < 0.7:
                    kinds.append("replace")
                    key = rng.randrange(keys)
                    job = await oban.insert(_mixed_job(rng, key, True))
                    results.append([key, job.id, job.conflicted])
                    seen.append(job.id)  # type: ignore[arg-type]
                else:
                    kinds.append("cancel")
                    top = max(seen, default=1) + 20
                    ids = [
                        rng.choice(seen) if seen and rng.random() < 0.5 else rng.randint(1, top)
                        for _ in range(rng.randint(2, 12))
                    ]
                    await oban.cancel_jobs(ids)
            except Exception:
                errors.append(traceback.format_exc())
    with open(out, "w") as fh:
        json.dump({"results": results, "errors": errors, "ops": kinds}, fh)


if __name__ == "__main__":
    if sys.argv[1] == "mixed":
        dsn, prefix, keys, ops, seed, out = sys.argv[2:]
        asyncio.run(mixed(dsn, prefix, int(keys), int(ops), int(seed), out))
    else:
        dsn, prefix, keys, inserts, seed, out = sys.argv[1:]
        asyncio.run(main(dsn, prefix, int(keys), int(inserts), int(seed), out))
