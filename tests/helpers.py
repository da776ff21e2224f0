"""Helpers shared by tests: wait on a signal or a state instead of sleeping a fixed time.

* :func:`wait_for`: poll a condition (sync or async) until it holds.
* :class:`EventLog`: record an instance's events (``oban.events``), from before it starts if attached
  then (``make_oban(before_start=log.attach)``), and wait for the n-th one.
* :func:`duty_runs`: wait until a maintenance duty has run n more times. A test that shows that
  something did *not* happen waits for this positive signal (the engine had its chance), then asserts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from oban_py import Oban
from oban_py.runtime.events import Event


async def wait_for(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, *, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy (returned); fail after
    ``timeout`` s with an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


class EventLog:
    """Every event of the instances it is attached to, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def attach(self, oban: Oban) -> Callable[[], None]:
        """Record ``oban``'s events from now on; returns a function that stops recording them."""
        return oban.events.subscribe(self.events.append)

    def count(self, name: str, **data: Any) -> int:
        """How many ``name`` events so far whose data has these values."""
        return sum(
            1 for e in self.events if e.name == name and all(e.data.get(k) == v for k, v in data.items())
        )

    async def wait(self, name: str, n: int = 1, timeout: float = 5.0, **data: Any) -> None:
        """Until ``n`` such events have been recorded (counting those seen already)."""
        await wait_for(lambda: self.count(name, **data) >= n, timeout, what=f"{n} {name} event(s) {data}")


async def duty_runs(oban: Oban, duty: str, n: int = 2, timeout: float = 10.0) -> None:
    """Wait until ``duty`` (``"poller"``, ``"stager"``, ``"controls"``...) has completed ``n`` more runs
    on ``oban``'s node. Two runs after an action mean one whole run began after it."""
    log = EventLog()
    unsubscribe = log.attach(oban)
    try:
        await log.wait("duty.ran", n, timeout, duty=duty)
    finally:
        unsubscribe()


async def states(db: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await db.fetch(f'SELECT state::text AS s, count(*) AS n FROM "{prefix}".oban_jobs GROUP BY 1')
    return {r["s"]: r["n"] for r in rows}
