"""One rule per job field, and one translator of pydantic errors into ours.

Every path that takes a job option calls the same rule: the ``@worker``/``@job`` decorators (worker
defaults), ``new`` (per-job overrides) and insert (a hand-built or since-mutated ``Job``), so a value
is refused, or normalised, the same way wherever it comes in. The job rules are plain functions, not
pydantic models: insert runs them for every job (``insert_all`` of 10,000 jobs is a benchmark), and
building a model per job would cost more than the checks themselves.

Options with many keys (config, unique, limits, an args model) are pydantic models; their errors go
through :func:`first_problem`, so each names the same field and value whatever the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from . import _json
from .errors import LimitOptionsError, ValidationError

__all__ = [
    "MAX_ATTEMPTS_LIMIT",
    "MAX_GLOBAL_LIMIT",
    "MAX_LOCAL_LIMIT",
    "MAX_NAME_LEN",
    "MAX_QUEUE_LEN",
    "MAX_SCHEDULE",
    "Problem",
    "first_problem",
    "reject_unknown",
    "validate_args",
    "validate_int",
    "validate_interruptible",
    "validate_max_attempts",
    "validate_meta",
    "validate_priority",
    "validate_queue",
    "validate_queue_limits",
    "validate_queue_pattern",
    "validate_schedule_in",
    "validate_scheduled_at",
    "validate_tags",
    "validate_timeout",
    "validate_worker_name",
]

# Used with fullmatch: a "$" anchor would also match before a trailing newline.
QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]*")
MAX_QUEUE_LEN = 128
MAX_NAME_LEN = 255
MAX_ATTEMPTS_LIMIT = 10_000
#: Jobs one node runs at once from one queue, and running jobs of one queue across the cluster.
MAX_LOCAL_LIMIT = 10_000
MAX_GLOBAL_LIMIT = 100_000
#: How far from now ``scheduled_at`` (and ``schedule_in``) may lie: about 100 years.
MAX_SCHEDULE = timedelta(days=36_525)


def reject_unknown(given: Mapping[str, Any], known: frozenset[str], what: str, worker: str | None) -> None:
    """Refuse the first (sorted) key of ``given`` that is not in ``known``, listing the known ones."""
    unknown = set(given) - known
    if unknown:
        bad = sorted(unknown)[0]
        raise ValidationError(bad, given[bad], f"unknown {what}; options are {sorted(known)}", worker=worker)


def validate_queue(value: Any, field: str = "queue", worker: str | None = None) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, value, "must be a string", worker=worker)
    if not value:
        raise ValidationError(field, value, "must not be empty", worker=worker)
    if len(value) > MAX_QUEUE_LEN:
        raise ValidationError(field, value, f"must be at most {MAX_QUEUE_LEN} characters", worker=worker)
    if QUEUE_RE.fullmatch(value) is None:
        raise ValidationError(
            field,
            value,
            "may contain letters, digits and _ . : / - (and not start with . : / -)",
            worker=worker,
        )
    return value


def validate_queue_pattern(value: Any, field: str = "queue") -> str:
    """A queue name, ``*`` (every queue), or a prefix pattern ``name*`` (every queue starting so)."""
    if isinstance(value, str) and value.endswith("*"):
        if value != "*":
            validate_queue(value[:-1], field=field)
        return value
    return validate_queue(value, field=field)


def validate_queue_limits(limit: Any, global_limit: Any) -> None:
    """A node's ``limit`` and the cluster's ``global_limit`` of a queue (each optional)."""
    if limit is not None:
        validate_int(limit, "limit", 1, MAX_LOCAL_LIMIT, error=LimitOptionsError)
    if global_limit is not None:
        validate_int(global_limit, "global_limit", 1, MAX_GLOBAL_LIMIT, error=LimitOptionsError)
    if limit is not None and global_limit is not None and limit > global_limit:
        raise LimitOptionsError("limit", limit, f"is above global_limit ({global_limit})")


def validate_worker_name(value: Any, field: str = "worker") -> str:
    """A stored worker name: a non-empty string PostgreSQL can store (no NUL, no surrogates)."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise ValidationError(
            field, value, f"must be a non-empty string of at most {MAX_NAME_LEN} characters"
        )
    problem = _json.text_problem(value)
    if problem is not None:
        raise ValidationError(field, value, problem)
    return value


def validate_int(
    value: Any,
    field: str,
    low: int,
    high: int,
    worker: str | None = None,
    *,
    error: type[ValidationError] = ValidationError,
) -> int:
    """An int (not a bool) from ``low`` to ``high``; ``error`` picks the subclass raised."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(field, value, f"must be an integer from {low} to {high}", worker=worker)
    return value


def validate_priority(value: Any, worker: str | None = None) -> int:
    """0 runs first, 9 last, within a queue."""
    return validate_int(value, "priority", 0, 9, worker)


def validate_max_attempts(value: Any, worker: str | None = None) -> int:
    return validate_int(value, "max_attempts", 1, MAX_ATTEMPTS_LIMIT, worker)


def validate_tags(value: Any, worker: str | None = None) -> list[str]:
    """Tags as stored: a list of non-empty strings (stripped, deduplicated, in order)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValidationError("tags", value, "must be a list of strings", worker=worker)
    seen: dict[str, None] = {}
    for i, tag in enumerate(value):
        if not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_NAME_LEN:
            raise ValidationError(
                "tags",
                tag,
                f"each tag must be a non-empty string of at most {MAX_NAME_LEN} characters",
                worker=worker,
            )
        problem = _json.text_problem(tag)
        if problem is not None:
            raise ValidationError(f"tags[{i}]", tag, problem, worker=worker)
        seen.setdefault(tag.strip(), None)
    return list(seen)


def validate_meta(value: Any, worker: str | None = None) -> Mapping[str, Any]:
    """A mapping (its content is checked when it is encoded, against ``max_args_bytes``)."""
    if not isinstance(value, Mapping):
        raise ValidationError("meta", value, "must be a dict", worker=worker)
    return value


def validate_args(value: Any, worker: str | None = None) -> Mapping[str, Any]:
    """Plain args: a mapping, or a pydantic model dumped to JSON types (content checked on encode)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if not isinstance(value, Mapping):
        raise ValidationError("args", value, "must be a dict (or a pydantic model)", worker=worker)
    return value


def validate_timeout(value: Any, worker: str | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValidationError("timeout", value, "must be seconds > 0 or None", worker=worker)
    return float(value)


def validate_interruptible(value: Any, worker: str | None = None) -> bool:
    if not isinstance(value, bool):
        raise ValidationError("interruptible", value, "must be True or False", worker=worker)
    return value


def validate_scheduled_at(value: Any, worker: str | None = None) -> datetime:
    """A timezone-aware datetime within :data:`MAX_SCHEDULE` of now (past or future)."""
    if not isinstance(value, datetime):
        raise ValidationError("scheduled_at", value, "must be a datetime", worker=worker)
    try:
        aware = value.tzinfo is not None and value.utcoffset() is not None
        distance = abs(value - datetime.now(timezone.utc)) if aware else timedelta(0)
    except (ArithmeticError, ValueError, TypeError) as exc:  # a tzinfo whose utcoffset() fails
        raise ValidationError(
            "scheduled_at", value, f"has an unusable timezone: {exc}", worker=worker
        ) from None
    if not aware:
        raise ValidationError(
            "scheduled_at", value, "must be timezone-aware (e.g. datetime.now(timezone.utc))", worker=worker
        )
    if distance > MAX_SCHEDULE:
        raise ValidationError(
            "scheduled_at", value, f"must be within {MAX_SCHEDULE.days // 365} years of now", worker=worker
        )
    return value


def validate_schedule_in(value: Any, worker: str | None = None) -> datetime:
    """Seconds (or a timedelta) from 0 to :data:`MAX_SCHEDULE`; returns the datetime they point at."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise ValidationError("schedule_in", value, "must be seconds >= 0 or a timedelta", worker=worker)
    limit = MAX_SCHEDULE.total_seconds()
    if not seconds <= limit:  # also true for NaN
        raise ValidationError(
            "schedule_in",
            value,
            f"must be a finite number of seconds, at most {limit:.0f} (about 100 years)",
            worker=worker,
        )
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


# -- pydantic errors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first error of a pydantic validation, in our terms: where, what was given, and why."""

    #: Pydantic's location: keys and list indexes, from the top of the validated data.
    loc: tuple[str | int, ...]
    #: The value found at ``loc`` in the data as given (the whole data for a cross-field error).
    value: Any
    reason: str
    #: Pydantic's error type (``"extra_forbidden"``, ``"literal_error"``...).
    kind: str

    def field(self, prefix: str = "", *, indexes: bool = True) -> str:
        """The dotted field name under ``prefix``; ``indexes=False`` names an option list as a whole."""
        parts = [str(p) for p in self.loc if indexes or not isinstance(p, int)]
        return ".".join([prefix, *parts] if prefix else parts)


def first_problem(exc: PydanticValidationError, data: Any, *, unknown: str = "unknown option") -> Problem:
    """The first error of ``exc``, raised validating ``data``; ``unknown`` is the reason for extra keys.

    The value is looked up in ``data`` rather than taken from pydantic: a ``before`` validator may have
    rewritten the input, and the user should see what they wrote. The lookup follows the path as far as
    ``data`` has it (a missing key shows the mapping it is missing from).
    """
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    value = data
    for part in loc:
        if not _holds(value, part):
            break
        value = value[part]
    reason = unknown if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
    return Problem(loc=loc, value=value, reason=reason, kind=err["type"])


def _holds(container: Any, part: str | int) -> bool:
    """True when ``container[part]`` is a key of a mapping or an index of a list/tuple."""
    if isinstance(container, Mapping):
        return part in container
    return (
        isinstance(part, int)
        and isinstance(container, (list, tuple))
        and -len(container) <= part < len(container)
    )
