"""Running one job and deciding its outcome.

The worker is looked up in this process's registry by the name stored in the row; an unknown name
fails the attempt with :class:`~oban_py.errors.UnknownWorker` (nothing is imported from it). Async
``process`` runs on the event loop; a plain ``def process`` runs on a thread of its own, so a
blocking job never stalls the loop or other queues.

Containment (``docs/guarantees.md``): whatever the body raises, ``BaseException`` included
(``SystemExit``, ``KeyboardInterrupt``, a ``CancelledError`` the engine did not cause), becomes a
recorded failed attempt; whatever it returns becomes an outcome that PostgreSQL accepts (text is
scrubbed of NUL bytes and lone surrogates, a ``Snooze`` must be finite, a ``Record`` must be strict
JSON, else the attempt fails with an error saying so). A thread cannot be killed: when a sync job
outlives its timeout, or is cancelled, the engine asks it to stop (:func:`stop_requested`), raises
:class:`Interrupted` inside it if its worker is ``interruptible=True`` (seen at the next Python
bytecode, not inside a blocking C call; opt-in, because an exception raised at an arbitrary bytecode
can leave a lock the body holds, a logging handler's say, taken for good), and keeps the job's claim
and limit slot until the thread really returns.

The outcome becomes an :class:`Ack`, written in batches by the producer.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import json
import logging
import math
import queue
import random
import threading
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio

from .. import _json
from ..errors import UnknownWorker
from ..job import Cancel, Job, JobControl, Record, Snooze
from ..worker import WorkerSpec, get_worker

__all__ = [
    "Ack",
    "Execution",
    "Interrupted",
    "current_job",
    "default_backoff",
    "execute",
    "failure",
    "stop_requested",
]

log = logging.getLogger("oban_py.job")

_current: contextvars.ContextVar[Job[Any] | None] = contextvars.ContextVar(
    "oban_py_current_job", default=None
)
_execution: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "oban_py_execution", default=None
)
MAX_TRACEBACK = 16_000
MAX_MESSAGE = 4_000
MAX_RESULT_BYTES = 8 * 1024 * 1024
# The longest snooze that is still a plan rather than a mistake (and far inside timestamptz's range).
MAX_SNOOZE = 10 * 365 * 86_400.0

# Why the engine stopped a running job (Execution.reason).
SHUTDOWN = "shutdown"  # the node is stopping: back to the queue, attempt not counted
REVOKED = "revoked"  # the node lost (or may have lost) its claim: back to the queue if still ours
CANCELLED = "cancelled"  # cancel_job
DELETED = "deleted"  # delete_job: the row is gone
TIMEOUT = "timeout"  # a sync job's thread outlived its timeout


def current_job() -> Job[Any] | None:
    """The job being executed in this task or thread (None outside a job)."""
    return _current.get()


def stop_requested() -> bool:
    """True once the engine asked the running job to stop (its timeout passed, ``cancel_job``,
    shutdown, a lost claim). A long ``def process`` should check it and return: a thread cannot be
    killed, and the job holds its slot until it returns."""
    execution = _execution.get()
    return execution is not None and execution.reason is not None


class Interrupted(BaseException):
    """Raised inside a sync job's thread when the engine stops it (timeout, cancel, shutdown).

    A ``BaseException``, so ``except Exception`` in job code does not swallow it.
    """


@dataclass(slots=True)
class Ack:
    """The state a job should be left in after an attempt."""

    id: int
    claim: datetime
    state: str
    delay: float | None = None
    error: str | None = None
    result: str | None = None
    meta: str | None = None
    attempt_delta: int = 0

    @property
    def simple(self) -> bool:
        """A plain completion, which the lean ack statement can write."""
        return self.state == "completed" and self.result is None and self.meta is None


class Execution:
    """One attempt of one job on this node: its task, its thread (sync jobs) and why the engine
    stopped it, if it did. ``interrupt`` is the only way the engine stops a job."""

    __slots__ = (
        "cancelled",
        "claim",
        "interruptible",
        "job",
        "reason",
        "running",
        "started",
        "task",
        "thread",
    )

    def __init__(self, job: Job[Any], claim: datetime) -> None:
        self.job = job
        self.claim = claim
        self.reason: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self.thread: _Body | None = None
        self.interruptible = False
        self.running = False  # the task has taken its first step (before that, cancel() would skip it)
        self.cancelled = False
        self.started = 0.0

    def interrupt(self, reason: str) -> None:
        if self.reason is None or self.reason == TIMEOUT:
            self.reason = reason
        if self.thread is not None and self.interruptible:
            self.thread.interrupt()
        # A task that has not started yet sees ``reason`` at its first step (cancelling it before then
        # would skip the code that releases its slot).
        if self.task is not None and self.running and not self.cancelled and not self.task.done():
            self.cancelled = True  # once: a second cancel would cut short the job's own cleanup
            self.task.cancel()

    def interrupted(self) -> bool:
        """The engine stopped this job (a timeout is the job's own outcome, not an interrupt)."""
        return self.reason is not None and self.reason != TIMEOUT

    @property
    def body_alive(self) -> bool:
        """True while the job's code may still run (its task, or its thread, has not ended)."""
        if self.thread is not None and self.thread.is_alive():
            return True
        return self.task is not None and not self.task.done()


def default_backoff(attempt: int, max_attempts: int = 20) -> float:
    """Exponential backoff with jitter: about 17 s, 19 s, 23 s, 31 s, 47 s, ... capped at 24 h.

    ``15 + 2**attempt`` seconds (Oban's curve), with attempts rescaled to 0..20 when ``max_attempts``
    is larger, then +/-10% jitter so retries of a failed batch spread out.
    """
    step = attempt if max_attempts <= 20 else math.ceil(attempt * 20 / max_attempts)
    base = min(15 + 2 ** min(step, 20), 86_400)
    return float(base * random.uniform(0.9, 1.1))


# -- text that PostgreSQL always accepts -----------------------------------------------------------


def scrub(text: str, limit: int | None = None) -> str:
    """``text`` without what jsonb and text columns reject: NUL becomes U+FFFD, lone surrogates '?'."""
    if limit is not None and len(text) > limit:
        text = text[: limit // 2] + "\n...\n" + text[-limit // 2 :]
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _describe(value: object) -> str:
    """``str(value)``, even when its ``__str__`` raises or returns something odd."""
    try:
        text = str(value)
        if not isinstance(text, str):  # pragma: no cover - str() guarantees it, but a C type may not
            raise TypeError
    except BaseException:
        try:
            text = object.__repr__(value)
        except BaseException:  # pragma: no cover
            text = "<unprintable>"
    return text


def _entry(job: Job[Any], kind: str, error: str, trace: str | None = None) -> str:
    entry: dict[str, Any] = {
        "attempt": job.attempt,
        "at": datetime.now(timezone.utc).isoformat(),
        "kind": kind,
        "error": scrub(error, MAX_MESSAGE),
    }
    if trace is not None:
        entry["traceback"] = scrub(trace, MAX_TRACEBACK)
    return json.dumps(entry, ensure_ascii=False)


def _error_entry(job: Job[Any], exc: BaseException, kind: str = "error") -> str:
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        trace = "<traceback unavailable>"
    return _entry(job, kind, f"{type(exc).__name__}: {_describe(exc)}", trace)


def failure(job: Job[Any], claim: datetime, exc: BaseException, instance: Any, kind: str = "error") -> Ack:
    """A failed attempt: retryable after the worker's backoff, or discarded on the last attempt."""
    error = _error_entry(job, exc, kind)
    if job.attempt >= job.max_attempts:
        return Ack(job.id or 0, claim, "discarded", error=error)
    delay = default_backoff(job.attempt, job.max_attempts)
    backoff = getattr(instance, "backoff", None) if instance is not None else None
    if callable(backoff):
        try:
            custom = float(backoff(job))
            if not math.isfinite(custom):
                raise ValueError(f"backoff() returned {custom!r}")
            delay = min(custom, MAX_SNOOZE)
        except Exception:  # a broken backoff must not lose the job
            log.exception("backoff() of %s failed; using the default", job.worker)
    return Ack(job.id or 0, claim, "retryable", delay=max(0.0, delay), error=error)


class BadOutcome(Exception):
    """A job returned an outcome that cannot be stored (recorded as the attempt's error)."""


def _control(job: Job[Any], claim: datetime, value: JobControl) -> Ack:
    jid = job.id or 0
    if isinstance(value, Snooze):
        seconds = value.seconds
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 <= seconds <= MAX_SNOOZE):
            raise BadOutcome(f"Snooze seconds must be finite, from 0 to {MAX_SNOOZE:.0f}, got {seconds!r}")
        meta = {**value.meta, "snoozed": int(job.meta.get("snoozed", 0)) + 1}
        try:
            encoded = _json.encode(meta, "Snooze.meta", worker=job.worker)
        except Exception as exc:
            raise BadOutcome(_describe(exc)) from None
        return Ack(jid, claim, "scheduled", delay=float(seconds), meta=encoded, attempt_delta=-1)
    if isinstance(value, Cancel):
        return Ack(jid, claim, "cancelled", error=_entry(job, "cancelled", _describe(value.reason)))
    if isinstance(value, Record):
        try:
            text = _json.encode(value.value, "result", limit=MAX_RESULT_BYTES, worker=job.worker)
        except Exception as exc:
            raise BadOutcome(_describe(exc)) from None
        return Ack(jid, claim, "completed", result=text)
    raise BadOutcome(f"unknown job control {type(value).__name__}")  # pragma: no cover


def _timeout_for(spec: WorkerSpec, instance: Any, job: Job[Any]) -> float | None:
    method = getattr(instance, "timeout", None)
    if callable(method):
        value = method(job)
        if value is None:
            return None
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise BadOutcome(f"timeout() must return seconds > 0 or None, got {value!r}")
        return seconds
    return spec.timeout


def interrupted_ack(execution: Execution) -> Ack | None:
    """The ack for a job the engine stopped (``None``: the row already says what happened)."""
    job, reason = execution.job, execution.reason
    if reason in (SHUTDOWN, REVOKED):
        why = "shutdown" if reason == SHUTDOWN else "a lost claim (missed heartbeats)"
        entry = _entry(
            job, "interrupted", f"interrupted by {why} of node {job.attempted_by}; returned to the queue"
        )
        return Ack(job.id or 0, execution.claim, "available", delay=0.0, error=entry, attempt_delta=-1)
    if reason == CANCELLED:
        return Ack(job.id or 0, execution.claim, "cancelled")
    return None  # deleted


async def execute(execution: Execution) -> Ack | None:
    """Run the job once and return its ack. Never raises: an engine interrupt (see
    :meth:`Execution.interrupt`) becomes the ack that reason calls for."""
    job, claim = execution.job, execution.claim
    execution.running = True
    if execution.interrupted():  # interrupted before it started
        return interrupted_ack(execution)
    try:
        spec = get_worker(job.worker)
    except UnknownWorker as exc:
        log.warning("job %s: %s", job.id, exc, extra={"job_id": job.id, "worker": job.worker})
        return failure(job, claim, exc, None, "unknown_worker")
    instance: Any = None
    token = _current.set(job)
    execution_token = _execution.set(execution)
    try:
        instance = spec.cls()
        job.args = spec.load_args(job.args)
        timeout = _timeout_for(spec, instance, job)
        if spec.is_async:
            if timeout is None:
                outcome = await instance.process(job)
            else:
                with anyio.fail_after(timeout):
                    outcome = await instance.process(job)
        else:
            outcome = await _in_thread(execution, instance.process, timeout, spec.interruptible)
        if execution.interrupted():
            return interrupted_ack(execution)
        if isinstance(outcome, JobControl):
            return _control(job, claim, outcome)
        return Ack(job.id or 0, claim, "completed")
    except BaseException as exc:
        return _outcome_of(execution, exc, instance)
    finally:
        _execution.reset(execution_token)
        _current.reset(token)


def _outcome_of(execution: Execution, exc: BaseException, instance: Any) -> Ack | None:
    job, claim = execution.job, execution.claim
    if execution.reason not in (None, TIMEOUT):
        _uncancel()
        return interrupted_ack(execution)
    if isinstance(exc, JobControl):
        try:
            return _control(job, claim, exc)
        except BadOutcome as bad:
            exc = bad
    extra = {"job_id": job.id, "worker": job.worker, "attempt": job.attempt, "queue": job.queue}
    if isinstance(exc, TimeoutError) or execution.reason == TIMEOUT:
        log.warning("job %s (%s) timed out", job.id, job.worker, extra=extra)
        return failure(job, claim, exc, instance, "timeout")
    if isinstance(exc, BadOutcome):
        log.warning(
            "job %s (%s) returned an outcome that cannot be stored: %s", job.id, job.worker, exc, extra=extra
        )
        return failure(job, claim, exc, instance, "bad_outcome")
    if not isinstance(exc, Exception):
        # SystemExit, KeyboardInterrupt, a CancelledError the engine did not ask for, ...: the job's
        # own doing. Contained here, so it never reaches the event loop (which it would stop).
        _uncancel()
        log.error(
            "job %s (%s) raised %s; recorded as a failed attempt",
            job.id,
            job.worker,
            type(exc).__name__,
            extra=extra,
        )
        return failure(job, claim, exc, instance)
    log.warning(
        "job %s (%s) attempt %s/%s failed: %s: %s",
        job.id,
        job.worker,
        job.attempt,
        job.max_attempts,
        type(exc).__name__,
        scrub(_describe(exc), 500),
        extra=extra,
    )
    return failure(job, claim, exc, instance)


def _uncancel() -> None:
    """Forget a swallowed cancellation request (3.11+), so later awaits in this task behave."""
    task: Any = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        while task.cancelling():
            task.uncancel()


# -- sync bodies -------------------------------------------------------------------------------------


class _Body:
    """One sync job body handed to a :class:`_Runner` thread; its outcome comes back on ``future``."""

    __slots__ = ("call", "ctx", "future", "injected", "job", "loop", "requested", "runner")

    def __init__(self, call: Any, job: Job[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.job = job
        self.ctx = contextvars.copy_context()
        self.loop = loop
        self.future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self.injected = False
        self.requested = False  # interrupted before its thread picked it up
        self.runner: _Runner | None = None

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


class _Runner:
    """A daemon thread that runs sync job bodies one after another (reused: a thread per job costs
    ~100 µs). A thread that had :class:`Interrupted` raised in it retires after that job."""

    def __init__(self, pool: _SyncPool) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue[_Body | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.current: _Body | None = None
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

    def _run(self, body: _Body) -> None:
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

    def interrupt(self, body: _Body) -> None:
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


class _SyncPool:
    """Idle :class:`_Runner` threads, most recent first; a new one starts when none is idle."""

    def __init__(self) -> None:
        self._idle: list[_Runner] = []
        self._lock = threading.Lock()

    def submit(self, body: _Body) -> None:
        with self._lock:
            runner = self._idle.pop() if self._idle else None
        if runner is None:
            runner = _Runner(self)
            runner.thread.start()
        body.runner = runner
        runner.inbox.put(body)

    def give_back(self, runner: _Runner) -> None:
        with self._lock:
            self._idle.append(runner)

    def retire_idle(self, runner: _Runner) -> bool:
        """An idle thread timed out: retire it unless it was just handed a body."""
        with self._lock:
            if runner in self._idle:
                self._idle.remove(runner)
                return True
            return False


SYNC_IDLE = 60.0
_pool = _SyncPool()


def _deliver(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


async def _in_thread(execution: Execution, call: Any, limit: float | None, interruptible: bool) -> Any:
    """Run ``call(job)`` on a thread; wait for it to really end, even when cancelled or timed out.

    At a timeout or an interrupt the job is asked to stop (``stop_requested()``), and for an
    ``interruptible`` worker :class:`Interrupted` is raised in its thread. Either way its claim and
    slot are held until the thread returns.
    """
    loop = asyncio.get_running_loop()
    body = _Body(call, execution.job, loop)
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
            _uncancel()
    ok, value = body.future.result()
    if execution.reason == TIMEOUT:
        raise TimeoutError(f"timed out after {limit}s")
    if not ok:
        raise value
    return value
