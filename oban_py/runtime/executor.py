"""Running one job and deciding its outcome.

The worker is looked up in this process's registry by the name stored in the row; an unknown name
fails the attempt with :class:`~oban_py.errors.UnknownWorker` (nothing is imported from it). Async
``process`` runs on the event loop; a plain ``def process`` runs in a worker thread (anyio), so a
blocking job never stalls the loop or other queues. ``timeout`` applies to both; a thread cannot be
interrupted, so a timed-out sync job is abandoned (its thread finishes in the background) and the
attempt counts as failed.

The outcome becomes an :class:`Ack`, written in batches by the producer.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import random
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.to_thread

from .. import _json
from ..errors import UnknownWorker
from ..job import Cancel, Job, JobControl, Record, Snooze
from ..worker import WorkerSpec, get_worker

__all__ = ["Ack", "current_job", "default_backoff", "execute"]

log = logging.getLogger("oban_py.job")

_current: contextvars.ContextVar[Job[Any] | None] = contextvars.ContextVar(
    "oban_py_current_job", default=None
)
MAX_TRACEBACK = 16_000
MAX_RESULT_BYTES = 8 * 1024 * 1024


def current_job() -> Job[Any] | None:
    """The job being executed in this task or thread (None outside a job)."""
    return _current.get()


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


def default_backoff(attempt: int, max_attempts: int = 20) -> float:
    """Exponential backoff with jitter: about 17 s, 19 s, 23 s, 31 s, 47 s, ... capped at 24 h.

    ``15 + 2**attempt`` seconds (Oban's curve), with attempts rescaled to 0..20 when ``max_attempts``
    is larger, then +/-10% jitter so retries of a failed batch spread out.
    """
    step = attempt if max_attempts <= 20 else math.ceil(attempt * 20 / max_attempts)
    base = min(15 + 2 ** min(step, 20), 86_400)
    return float(base * random.uniform(0.9, 1.1))


def _error_entry(job: Job[Any], exc: BaseException, kind: str = "error") -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK:
        text = text[: MAX_TRACEBACK // 2] + "\n...\n" + text[-MAX_TRACEBACK // 2 :]
    entry = {
        "attempt": job.attempt,
        "at": datetime.now(timezone.utc).isoformat(),
        "kind": kind,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": text,
    }
    return json.dumps(entry)


def _failure(job: Job[Any], claim: datetime, exc: BaseException, instance: Any, kind: str = "error") -> Ack:
    error = _error_entry(job, exc, kind)
    if job.attempt >= job.max_attempts:
        return Ack(job.id or 0, claim, "discarded", error=error)
    delay: float
    backoff = getattr(instance, "backoff", None) if instance is not None else None
    if callable(backoff):
        try:
            delay = float(backoff(job))
        except Exception:  # a broken backoff must not lose the job
            log.exception("backoff() of %s failed; using the default", job.worker)
            delay = default_backoff(job.attempt, job.max_attempts)
    else:
        delay = default_backoff(job.attempt, job.max_attempts)
    return Ack(job.id or 0, claim, "retryable", delay=max(0.0, delay), error=error)


def _control(job: Job[Any], claim: datetime, value: JobControl) -> Ack:
    jid = job.id or 0
    if isinstance(value, Snooze):
        meta = {**value.meta, "snoozed": int(job.meta.get("snoozed", 0)) + 1}
        return Ack(jid, claim, "scheduled", delay=value.seconds, meta=json.dumps(meta), attempt_delta=-1)
    if isinstance(value, Cancel):
        entry = json.dumps(
            {
                "attempt": job.attempt,
                "at": datetime.now(timezone.utc).isoformat(),
                "kind": "cancelled",
                "error": value.reason,
            }
        )
        return Ack(jid, claim, "cancelled", error=entry)
    if isinstance(value, Record):
        text = _json.encode(value.value, "result", limit=MAX_RESULT_BYTES, worker=job.worker)
        return Ack(jid, claim, "completed", result=text)
    raise TypeError(f"unknown job control {value!r}")  # pragma: no cover


def _timeout_for(spec: WorkerSpec, instance: Any, job: Job[Any]) -> float | None:
    method = getattr(instance, "timeout", None)
    if callable(method):
        value = method(job)
        return None if value is None else float(value)
    return spec.timeout


async def execute(job: Job[Any], claim: datetime, *, limiter: anyio.CapacityLimiter | None = None) -> Ack:
    """Run ``job`` once and return its ack. Cancellation (shutdown, cancel_job) propagates."""
    try:
        spec = get_worker(job.worker)
    except UnknownWorker as exc:
        log.warning("job %s: %s", job.id, exc, extra={"job_id": job.id, "worker": job.worker})
        return _failure(job, claim, exc, None, "unknown_worker")
    instance: Any = None
    token = _current.set(job)
    try:
        instance = spec.cls()
        raw_args = job.args
        job.args = spec.load_args(raw_args)
        timeout = _timeout_for(spec, instance, job)
        if spec.is_async:
            if timeout is None:
                outcome = await instance.process(job)
            else:
                with anyio.fail_after(timeout):
                    outcome = await instance.process(job)
        else:
            ctx = contextvars.copy_context()
            call = instance.process
            if timeout is None:
                outcome = await anyio.to_thread.run_sync(ctx.run, call, job, limiter=limiter)
            else:
                with anyio.fail_after(timeout):
                    outcome = await anyio.to_thread.run_sync(
                        ctx.run, call, job, limiter=limiter, abandon_on_cancel=True
                    )
        if isinstance(outcome, JobControl):
            return _control(job, claim, outcome)
        return Ack(job.id or 0, claim, "completed")
    except JobControl as control:
        return _control(job, claim, control)
    except TimeoutError as exc:
        log.warning(
            "job %s (%s) timed out", job.id, job.worker, extra={"job_id": job.id, "worker": job.worker}
        )
        return _failure(job, claim, exc, instance, "timeout")
    except Exception as exc:
        log.warning(
            "job %s (%s) attempt %s/%s failed: %s: %s",
            job.id,
            job.worker,
            job.attempt,
            job.max_attempts,
            type(exc).__name__,
            exc,
            extra={"job_id": job.id, "worker": job.worker, "attempt": job.attempt},
        )
        return _failure(job, claim, exc, instance)
    finally:
        _current.reset(token)
