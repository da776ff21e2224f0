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

The outcome becomes an :class:`~.outcome.Ack`, written in batches by the producer.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio

from ..errors import UnknownWorker
from ..hooks.callbacks import WorkerCallbacks, callbacks_for
from ..job import Job, JobControl
from ..worker_spec import WorkerSpec, get_worker
from .execution import TIMEOUT, Execution, current, running, uncancel
from .outcome import Ack, BadOutcome, control_ack, describe, failure, interrupted_ack, scrub
from .threads import run_in_thread

__all__ = ["execute"]

log = logging.getLogger("oban_py.job")


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


async def execute(execution: Execution) -> Ack | None:
    """Run the job once and return its ack. Never raises: an engine interrupt (see
    :meth:`Execution.interrupt`) becomes the ack that reason calls for. The worker's callbacks, if it
    has any (:mod:`oban_py.hooks.callbacks`), run around the attempt and never change its ack."""
    job = execution.job
    execution.running = True
    if execution.interrupted():  # interrupted before it started
        return interrupted_ack(execution)
    try:
        spec = get_worker(job.worker)
    except UnknownWorker as exc:
        log.warning("job %s: %s", job.id, exc, extra={"job_id": job.id, "worker": job.worker})
        return failure(job, execution.claim, exc, None, "unknown_worker")
    token = current.set(job)
    execution_token = running.set(execution)
    try:
        callbacks = callbacks_for(spec.cls)
        ack, instance, error = await _attempt(execution, spec, callbacks)
        if callbacks is not None and instance is not None:
            await callbacks.after(instance, execution, ack, error)
        return ack
    finally:
        running.reset(execution_token)
        current.reset(token)


async def _attempt(
    execution: Execution, spec: WorkerSpec, callbacks: WorkerCallbacks | None
) -> tuple[Ack | None, Any, BaseException | None]:
    """The attempt itself: (its ack, the worker instance if one was made, what ``process`` raised)."""
    job, claim = execution.job, execution.claim
    instance: Any = None
    try:
        instance = spec.cls()
        if callbacks is not None:
            await callbacks.before(instance, execution)
            if execution.interrupted():  # stopped while before_process ran
                return interrupted_ack(execution), instance, None
        job.args = spec.load_args(job.args)
        timeout = _timeout_for(spec, instance, job)
        if spec.is_async:
            if timeout is None:
                outcome = await instance.process(job)
            else:
                with anyio.fail_after(timeout):
                    outcome = await instance.process(job)
        else:
            outcome = await run_in_thread(execution, instance.process, timeout, spec.interruptible)
        if execution.interrupted():
            return interrupted_ack(execution), instance, None
        if isinstance(outcome, JobControl):
            return control_ack(job, claim, outcome), instance, None
        return Ack(job.id or 0, claim, "completed"), instance, None
    except BaseException as exc:
        return _outcome_of(execution, exc, instance), instance, exc


def _outcome_of(execution: Execution, exc: BaseException, instance: Any) -> Ack | None:
    job, claim = execution.job, execution.claim
    if execution.reason not in (None, TIMEOUT):
        uncancel()
        return interrupted_ack(execution)
    if isinstance(exc, JobControl):
        try:
            return control_ack(job, claim, exc)
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
        uncancel()
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
        scrub(describe(exc), 500),
        extra=extra,
    )
    return failure(job, claim, exc, instance)
