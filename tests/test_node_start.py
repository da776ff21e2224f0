"""A node whose start is cut short leaves nothing running: no heartbeat thread, no node row."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import asyncpg
import pytest

from oban_py import Oban
from oban_py.db.driver import Driver

from helpers import wait_for

pytestmark = pytest.mark.anyio


async def test_a_start_cancelled_while_listen_is_slow_leaves_nothing_behind(
    test_dsn: str, prefix: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow_listener(self: Driver) -> Any:
        await asyncio.sleep(30)  # LISTEN never answers: start() waits for it (up to 5 s)

    monkeypatch.setattr(Driver, "connect_listener", slow_listener)
    oban = Oban(test_dsn, prefix=prefix, queues={"slow_start": 1}, heartbeat_interval=0.2, rescue_after=2)
    starting = asyncio.create_task(oban.start())

    async def registered() -> bool:
        return bool(await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_nodes'))

    await wait_for(registered, timeout=5, what="the node's first heartbeat")
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting

    assert not await registered()  # deregistered, not left to time out
    await asyncio.sleep(0)
    assert not [t for t in threading.enumerate() if t.name == "oban-lifeline" and t.is_alive()]
    # And nothing heartbeats it back to life afterwards.
    await asyncio.sleep(0.6)
    assert not await registered()
