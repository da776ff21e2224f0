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
outlives its timeout, or is cancelled, the engine raises :class:`Interrupted` inside it (seen at the
next Python bytecode, not inside a blocking C call) and keeps the job's claim and limit slot until
the thread really returns.

The outcome becomes an :class:`Ack`, written in batches by the producer.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import json
import logging
import math
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

__all__ = ["Ack", "Execution", "Interrupted", "current_job", "default_backoff", "execute", "failure"]

log = logging.getLogger("oban_py.job")

_current: contextvars.ContextVar[Job[Any] | None] = contextvars.ContextVar(
    "oban_py_current_job", default=None
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

    __slots__ = ("claim", "job", "reason", "started", "task", "thread")

    def __init__(self, job: Job[Any], claim: datetime) -> None:
        self.job = job
        self.claim = claim
        self.reason: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self.thread: _BodyThread | None = None
        self.started = 0.0

    def interrupt(self, reason: str) -> None:
        if self.reason is None or self.reason == TIMEOUT:
            self.reason = reason
        if self.thread is not None:
            self.thread.interrupt()
        if self.task is not None and not self.task.done():
            self.task.cancel()

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
    try:
        spec = get_worker(job.worker)
    except UnknownWorker as exc:
        log.warning("job %s: %s", job.id, exc, extra={"job_id": job.id, "worker": job.worker})
        return failure(job, claim, exc, None, "unknown_worker")
    instance: Any = None
    token = _current.set(job)
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
            outcome = await _in_thread(execution, instance.process, timeout)
        if execution.reason is not None:
            return interrupted_ack(execution)
        if isinstance(outcome, JobControl):
            return _control(job, claim, outcome)
        return Ack(job.id or 0, claim, "completed")
    except BaseException as exc:
        return _outcome_of(execution, exc, instance)
    finally:
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


class _BodyThread(threading.Thread):
    """A sync job body on a daemon thread of its own, so it can be interrupted (and never shares a
    thread with a later job that an interrupt could hit by mistake)."""

    def __init__(self, call: Any, job: Job[Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name=f"oban-job-{job.id}", daemon=True)
        self._call = call
        self._job = job
        self._ctx = contextvars.copy_context()
        self._loop = loop
        self.future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self._lock = threading.Lock()
        self._in_body = False
        self._interrupted = False

    def run(self) -> None:
        outcome: tuple[bool, Any] | None = None
        try:
            try:
                with self._lock:
                    self._in_body = True
                outcome = (True, self._ctx.run(self._call, self._job))
            except BaseException as exc:
                outcome = (False, exc)
            finally:
                with self._lock:
                    self._in_body = False
        except BaseException as exc:
            if outcome is None:
                outcome = (False, exc)
        try:
            self._loop.call_soon_threadsafe(_deliver, self.future, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def interrupt(self) -> None:
        """Raise :class:`Interrupted` in the body (once), if it is still running."""
        with self._lock:
            if not self._in_body or self._interrupted or self.ident is None:
                return
            self._interrupted = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.ident), ctypes.py_object(Interrupted)
            )


def _deliver(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any] | None) -> None:
    if not future.done():
        future.set_result(outcome if outcome is not None else (False, Interrupted()))


async def _in_thread(execution: Execution, call: Any, limit: float | None) -> Any:
    """Run ``call(job)`` on its own thread; wait for it to really end, even when cancelled."""
    thread = _BodyThread(call, execution.job, asyncio.get_running_loop())
    execution.thread = thread
    thread.start()
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    while not thread.future.done():
        try:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(asyncio.shield(thread.future), remaining)
        except asyncio.TimeoutError:
            if execution.reason is None:
                execution.reason = TIMEOUT
                log.warning(
                    "job %s (%s) outlived its timeout of %ss; interrupting its thread, which keeps the job's "
                    "slot until it returns",
                    execution.job.id,
                    execution.job.worker,
                    limit,
                    extra={"job_id": execution.job.id, "worker": execution.job.worker},
                )
            thread.interrupt()
            deadline = None
        except asyncio.CancelledError:
            # The engine stopped the job (interrupt() already raised Interrupted in the thread). The
            # body may not stop at once: wait for it, so its claim and slot are held until it ends.
            _uncancel()
            thread.interrupt()
    ok, value = thread.future.result()
    if execution.reason == TIMEOUT:
        raise TimeoutError(f"timed out after {limit}s")
    if not ok:
        raise value
    return value
