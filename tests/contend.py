"""Child process for the contention test: many unique inserts over a shared set of keys.

Usage: python contend.py DSN PREFIX KEYS INSERTS SEED OUT. Mixes single inserts and insert_all
batches (which may repeat a key within the batch), and writes every answer as JSON:
``{"results": [[key, id, conflicted], ...], "errors": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import traceback
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


if __name__ == "__main__":
    dsn, prefix, keys, inserts, seed, out = sys.argv[1:]
    asyncio.run(main(dsn, prefix, int(keys), int(inserts), int(seed), out))
