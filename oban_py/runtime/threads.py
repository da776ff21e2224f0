"""Sync job bodies (``def process``) on reusable daemon threads.

A blocking body must never stall the event loop, and a thread cannot be killed: at a timeout, a
cancel or shutdown the body is asked to stop (:func:`~.execution.stop_requested`), an
``interruptible=True`` worker also gets :class:`~.execution.Interrupted` raised in its thread (at most
once, at the next Python bytecode), and the job keeps its claim and limit slot until the thread
really returns. Threads are reused (a thread per job costs ~100 µs) and retire after ``SYNC_IDLE``
seconds idle.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import queue
import threading
from typing import Any

from ..job import Job
from .execution import TIMEOUT, Execution, Interrupted, uncancel

__all__ = ["SYNC_IDLE", "SyncBody", "run_in_thread"]

log = logging.getLogger("oban_py.job")


class SyncBody:
    """One sync job body handed to a :class:`Runner` thread; its outcome comes back on ``future``."""

    __slots__ = ("call", "ctx", "future", "injected", "job", "loop", "requested", "runner")

    def __init__(self, call: Any, job: Job[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.job = job
        self.ctx = contextvars.copy_context()
        self.loop = loop
        self.future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self.injected = False
        self.requested = False  # interrupted before its thread picked it up
        self.runner: Runner | None = None

    def deliver(self, outcome: tuple[bool, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, self.future, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def is_alive(self) -> bool:
        return not self.future.done()

    def interrupt(self) -> None:
        if self.runner is not None:
            self.runner.interrupt(self)


class Runner:
    """A daemon thread that runs sync job bodies one after another (reused: a thread per job costs
    ~100 µs). A thread that had :class:`Interrupted` raised in it retires after that job."""

    def __init__(self, pool: SyncPool) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue[SyncBody | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.current: SyncBody | None = None
        self.retired = False
        self.thread = threading.Thread(target=self._main, name="oban-sync-job", daemon=True)

    def _main(self) -> None:
        while not self.retired:
            try:
                body = self.inbox.get(timeout=SYNC_IDLE)
            except queue.Empty:
                if self.pool.retire_idle(self):
                    return
                continue
            except BaseException:
                return
            if body is None:
                return
            self._run(body)
            if not self.retired:
                self.pool.give_back(self)

    def _run(self, body: SyncBody) -> None:
        outcome: tuple[bool, Any] | None = None
        try:
            try:
                with self.lock:
                    self.current = body
                    if body.requested:
                        raise Interrupted()
                outcome = (True, body.ctx.run(body.call, body.job))
            except BaseException as exc:
                outcome = (False, exc)
            finally:
                with self.lock:
                    self.current = None
        except BaseException as exc:
            if outcome is None:
                outcome = (False, exc)
        for _ in range(3):  # an interrupt is raised at most once, so this delivers
            try:
                body.deliver(outcome if outcome is not None else (False, Interrupted()))
                break
            except BaseException:
                continue

    def interrupt(self, body: SyncBody) -> None:
        """Raise :class:`Interrupted` in ``body`` (once), if this thread is still running it."""
        with self.lock:
            if self.current is not body:
                body.requested = True  # not started yet: it is stopped before it runs
                return
            if body.injected or self.thread.ident is None:
                return
            body.injected = True
            self.retired = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread.ident), ctypes.py_object(Interrupted)
            )


class SyncPool:
    """Idle :class:`Runner` threads, most recent first; a new one starts when none is idle."""

    def __init__(self) -> None:
        self._idle: list[Runner] = []
        self._lock = threading.Lock()

    def submit(self, body: SyncBody) -> None:
        with self._lock:
            runner = self._idle.pop() if self._idle else None
        if runner is None:
            runner = Runner(self)
            runner.thread.start()
        body.runner = runner
        runner.inbox.put(body)

    def give_back(self, runner: Runner) -> None:
        with self._lock:
            self._idle.append(runner)

    def retire_idle(self, runner: Runner) -> bool:
        """An idle thread timed out: retire it unless it was just handed a body."""
        with self._lock:
            if runner in self._idle:
                self._idle.remove(runner)
                return True
            return False


SYNC_IDLE = 60.0
_pool = SyncPool()


def _deliver(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


async def run_in_thread(execution: Execution, call: Any, limit: float | None, interruptible: bool) -> Any:
    """Run ``call(job)`` on a thread; wait for it to really end, even when cancelled or timed out.

    At a timeout or an interrupt the job is asked to stop (``stop_requested()``), and for an
    ``interruptible`` worker :class:`Interrupted` is raised in its thread. Either way its claim and
    slot are held until the thread returns.
    """
    loop = asyncio.get_running_loop()
    body = SyncBody(call, execution.job, loop)
    execution.thread = body
    execution.interruptible = interruptible
    _pool.submit(body)
    deadline = None if limit is None else loop.time() + limit
    while not body.future.done():
        try:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(asyncio.shield(body.future), remaining)
        except asyncio.TimeoutError:
            if execution.reason is None:
                execution.reason = TIMEOUT
                log.warning(
                    "job %s (%s) outlived its timeout of %ss; it keeps its slot until its thread returns",
                    execution.job.id,
                    execution.job.worker,
                    limit,
                    extra={"job_id": execution.job.id, "worker": execution.job.worker},
                )
            if interruptible:
                body.interrupt()
            deadline = None
        except asyncio.CancelledError:
            # The engine stopped the job (interrupt() already asked it to stop). The body may not stop
            # at once: wait for it, so its claim and slot are held until it ends.
            uncancel()
    ok, value = body.future.result()
    if execution.reason == TIMEOUT:
        raise TimeoutError(f"timed out after {limit}s")
    if not ok:
        raise value
    return value
