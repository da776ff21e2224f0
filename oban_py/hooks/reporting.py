"""``on_error``: one place to hear about the engine's own failures (Solid Queue's ``on_thread_error``).

Errors inside jobs are the job's outcome (its ``errors`` column, and the worker's callbacks). This is
for the rest: a producer cycle, the notifier, a maintenance duty, the lifeline's heartbeats. Each
component reports to the node's :class:`ErrorReporter` where it already logs, and says when it has
recovered. A handler is called once per failure *episode* of a component: the first failure of an
outage, not each of its retries (a DSN pointing at a dead server would otherwise call Sentry every
second, and an outage's errors change type as it goes: refused, timed out, reset), and again only
after the component recovered, or when it gives up (``final``).

Handlers take ``(error, context)``, sync or async. They run on the event loop's side of things, as
every hook does (:func:`~.calling.call_contained`): async ones on the loop, sync ones on a thread of
their own, each within ``HANDLER_TIMEOUT`` seconds, and one that raises is logged and ignored. A report
from the lifeline's thread is handed to the loop first. Reporting never blocks the component.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .calling import call_contained, describe_callable

__all__ = ["HANDLER_TIMEOUT", "Component", "ErrorContext", "ErrorReporter"]

Component = Literal["producer", "notifier", "duty", "lifeline", "node"]
#: Seconds an on_error handler may take (a report to a slow error tracker must not pile up tasks).
HANDLER_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ErrorContext:
    """Where an engine error happened."""

    #: ``"producer"``, ``"notifier"``, ``"duty"``, ``"lifeline"`` or ``"node"``.
    component: Component
    #: The queue (producer), the duty (``"rescuer"``, ``"pruner"``...), or what failed otherwise.
    name: str | None
    #: The node's name.
    node: str | None
    #: True when the component gave up (it stopped, or dropped work), not just a failure it retries.
    final: bool = False

    def as_dict(self) -> dict[str, Any]:
        """For an error tracker's context (``sentry_sdk.set_context("oban", ctx.as_dict())``)."""
        return {"component": self.component, "name": self.name, "node": self.node, "final": self.final}


class ErrorReporter:
    """Calls ``on_error`` handlers once per failure episode of each (component, name)."""

    def __init__(self, handlers: Sequence[Callable[..., Any]] = (), *, node: str | None = None) -> None:
        self.handlers = tuple(handlers)
        self.node = node
        self._open: set[tuple[str, str | None]] = set()
        self._lock = threading.Lock()  # reports come from the loop and from the lifeline's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def bind(self) -> None:
        """Deliver reports on the running loop (the node's): call from it, at start."""
        self._loop = asyncio.get_running_loop()

    def report(
        self, error: BaseException, component: Component, name: str | None = None, *, final: bool = False
    ) -> None:
        """A failure of ``component``; handlers are called unless it is the same episode."""
        if not self.handlers:
            return
        key = (component, name)
        with self._lock:
            if key in self._open and not final:
                return
            self._open.add(key)
        context = ErrorContext(component, name, self.node, final)
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None:
            loop = running
        if loop is None or loop.is_closed():
            return
        if running is loop:
            self._dispatch(error, context)
        else:
            try:
                loop.call_soon_threadsafe(self._dispatch, error, context)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def recovered(self, component: Component, name: str | None = None) -> None:
        """``component`` works again: its next failure starts a new episode."""
        if self._open:
            with self._lock:
                self._open.discard((component, name))

    def _dispatch(self, error: BaseException, context: ErrorContext) -> None:
        for handler in self.handlers:
            what = f"on_error handler {describe_callable(handler)}"
            task = asyncio.get_running_loop().create_task(
                call_contained(handler, (error, context), limit=HANDLER_TIMEOUT, what=what)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) for handlers still running: a stopping node lets them finish."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
