"""Calling user code from the engine: bounded in time, never raising, never blocking the loop.

Every hook and callback goes through :func:`call_contained`. An ``async def`` is awaited on the event
loop under a timeout; a plain ``def`` runs on a daemon thread of its own (its context copied, so
``current_job()`` answers) and is waited for under the same timeout. Whatever it raises,
``BaseException`` included, is logged with its traceback and returned, never raised. A sync hook that
outlives its timeout cannot be killed: it is left running on its daemon thread and the engine goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio

from ..runtime.execution import uncancel

__all__ = ["call_contained", "describe_callable", "is_async_callable"]

log = logging.getLogger("oban_py.hooks")


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """``async def`` functions and methods, and objects whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own __call__
    return call is not None and inspect.iscoroutinefunction(call)


def describe_callable(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


def _settle(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


async def _on_thread(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    context = contextvars.copy_context()

    def main() -> None:
        try:
            outcome: tuple[bool, Any] = (True, context.run(fn, *args))
        except BaseException as exc:  # contained: delivered to the loop, raised there, logged
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=main, name="oban-hook", daemon=True).start()
    ok, value = await future
    if not ok:
        raise value
    return value


def _cancel_requested() -> bool:
    """True when this task has a cancel request pending (Python 3.10 cannot tell: assume it has)."""
    task: Any = asyncio.current_task()
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)
    return True if cancelling is None else bool(cancelling())


async def call_contained(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    limit: float,
    what: str,
    extra: dict[str, Any] | None = None,
    swallow_cancel: bool = True,
) -> BaseException | None:
    """Call ``fn(*args)`` within ``limit`` seconds; return what it raised (logged), or None.

    A ``CancelledError`` that reaches here (the task was cancelled while the hook ran, or the hook
    raised one) is swallowed too, with the task's cancel request withdrawn: the caller (a job's
    execution) checks its own stop reason afterwards. With ``swallow_cancel=False`` (lifecycle hooks,
    whose caller may be under an outer timeout or cancellation) it propagates instead. ``what`` names
    the hook in the log line.
    """
    scope: anyio.CancelScope | None = None
    try:
        with anyio.fail_after(limit) as scope:
            if is_async_callable(fn):
                await fn(*args)
            else:
                result = await _on_thread(fn, args)
                if inspect.isawaitable(result):  # a plain def that returned a coroutine
                    await result
        return None
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            if not swallow_cancel and _cancel_requested():
                raise  # an outer cancellation (a timeout, a shutdown): not the hook's to swallow
            uncancel()
            log.info("%s was interrupted", what, extra=extra)
        elif isinstance(exc, TimeoutError) and scope is not None and scope.cancel_called:
            log.error("%s did not return within %.1fs; going on without it", what, limit, extra=extra)
        else:
            log.error("%s raised %s; ignored", what, type(exc).__name__, exc_info=exc, extra=extra)
        return exc
