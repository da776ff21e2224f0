"""Outcomes: the :class:`Ack` an attempt leaves, always one PostgreSQL accepts.

Text is scrubbed of NUL bytes and lone surrogates and capped in length; a ``Snooze`` must be finite
and at most ten years; ``Record`` values and ``Snooze`` meta must be strict JSON; anything else fails
the attempt with an error of kind ``bad_outcome``. A hostile ``__str__`` is survived
(:func:`describe`). Acks are written in batches by the producer (:mod:`.acks`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import _json
from ..job import Cancel, Job, JobControl, Record, Snooze
from .execution import CANCELLED, REVOKED, SHUTDOWN, Execution

__all__ = [
    "Ack",
    "BadOutcome",
    "control_ack",
    "default_backoff",
    "describe",
    "failure",
    "interrupted_ack",
    "scrub",
]

log = logging.getLogger("oban_py.job")

MAX_TRACEBACK = 16_000
MAX_MESSAGE = 4_000
MAX_RESULT_BYTES = 8 * 1024 * 1024
# The longest snooze that is still a plan rather than a mistake (and far inside timestamptz's range).
MAX_SNOOZE = 10 * 365 * 86_400.0


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


def describe(value: object) -> str:
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


def entry(job: Job[Any], kind: str, error: str, trace: str | None = None) -> str:
    """One entry of a job's ``errors`` list, as JSON text."""
    item: dict[str, Any] = {
        "attempt": job.attempt,
        "at": datetime.now(timezone.utc).isoformat(),
        "kind": kind,
        "error": scrub(error, MAX_MESSAGE),
    }
    if trace is not None:
        item["traceback"] = scrub(trace, MAX_TRACEBACK)
    return json.dumps(item, ensure_ascii=False)


def error_entry(job: Job[Any], exc: BaseException, kind: str = "error") -> str:
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        trace = "<traceback unavailable>"
    return entry(job, kind, f"{type(exc).__name__}: {describe(exc)}", trace)


def failure(job: Job[Any], claim: datetime, exc: BaseException, instance: Any, kind: str = "error") -> Ack:
    """A failed attempt: retryable after the worker's backoff, or discarded on the last attempt."""
    error = error_entry(job, exc, kind)
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


def control_ack(job: Job[Any], claim: datetime, value: JobControl) -> Ack:
    jid = job.id or 0
    if isinstance(value, Snooze):
        seconds = value.seconds
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 <= seconds <= MAX_SNOOZE):
            raise BadOutcome(f"Snooze seconds must be finite, from 0 to {MAX_SNOOZE:.0f}, got {seconds!r}")
        meta = {**value.meta, "snoozed": int(job.meta.get("snoozed", 0)) + 1}
        try:
            encoded = _json.encode(meta, "Snooze.meta", worker=job.worker)
        except Exception as exc:
            raise BadOutcome(describe(exc)) from None
        return Ack(jid, claim, "scheduled", delay=float(seconds), meta=encoded, attempt_delta=-1)
    if isinstance(value, Cancel):
        return Ack(jid, claim, "cancelled", error=entry(job, "cancelled", describe(value.reason)))
    if isinstance(value, Record):
        try:
            text = _json.encode(value.value, "result", limit=MAX_RESULT_BYTES, worker=job.worker)
        except Exception as exc:
            raise BadOutcome(describe(exc)) from None
        return Ack(jid, claim, "completed", result=text)
    raise BadOutcome(f"unknown job control {type(value).__name__}")  # pragma: no cover


def interrupted_ack(execution: Execution) -> Ack | None:
    """The ack for a job the engine stopped (``None``: the row already says what happened)."""
    job, reason = execution.job, execution.reason
    if reason in (SHUTDOWN, REVOKED):
        why = "shutdown" if reason == SHUTDOWN else "a lost claim (missed heartbeats)"
        text = entry(
            job, "interrupted", f"interrupted by {why} of node {job.attempted_by}; returned to the queue"
        )
        return Ack(job.id or 0, execution.claim, "available", delay=0.0, error=text, attempt_delta=-1)
    if reason == CANCELLED:
        return Ack(job.id or 0, execution.claim, "cancelled")
    return None  # deleted
