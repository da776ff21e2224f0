"""In-process events: what the engine just did, for tests, hooks and (later) telemetry.

Every :class:`~oban_py.Oban` instance has an :class:`Events` hub (``oban.events``). The engine emits on
its event loop; handlers run synchronously there and must be quick (an exception in one is logged and
never reaches the engine). A test waits on an event instead of sleeping::

    applied = oban.events.next("controls.applied", lambda e: "mail" in e.data["changed"])
    await oban.pause_queue("mail")
    await asyncio.wait_for(applied, 5)

Events emitted today (``data`` keys in parentheses):

* ``node.started`` / ``node.stopped`` (``node``): a node's queues run / are drained and deregistered.
* ``notifier.listening`` (``reconnects``): the LISTEN connection is up (again).
* ``controls.applied`` (``changed``: queue names whose paused/limit/global limit changed): stored queue
  controls were read and applied on this node.
* ``leader.changed`` (``leader``: bool): this node took or lost the leader lease.
* ``duty.ran`` (``duty``): a maintenance duty completed one run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Events", "Handler"]

log = logging.getLogger("oban_py.events")


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


Handler = Callable[[Event], None]


class Events:
    """Subscribers by registration order; :meth:`next` for a one-shot future."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler(event)`` for every event; returns a function that unsubscribes it."""
        self._handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    def next(self, name: str, where: Callable[[Event], bool] | None = None) -> asyncio.Future[Event]:
        """A future for the next ``name`` event (matching ``where``). Create it *before* causing the
        event, then await it (with a timeout): an event emitted earlier is not replayed."""
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

        def handler(event: Event) -> None:
            if event.name == name and not future.done() and (where is None or where(event)):
                future.set_result(event)

        unsubscribe = self.subscribe(handler)
        future.add_done_callback(lambda _f: unsubscribe())
        return future

    def emit(self, name: str, **data: Any) -> None:
        if not self._handlers:
            return
        event = Event(name, data)
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.exception("event handler failed for %s", name)
