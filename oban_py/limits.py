"""Concurrency and rate limit options.

* **Keyed limits** (``@worker(limit={...})``, Solid Queue's ``limits_concurrency``): at most ``to`` jobs
  with the same key run at once, across queues and nodes. The key is a path into args (``"account.id"``;
  ``"meta.tenant"`` reads meta), a list of paths, or a callable (or a ``limit_key`` method on the worker);
  without ``key`` the whole args are the key. ``group`` names a key space shared by several workers
  (default: the worker's name). ``on_conflict="block"`` (default): the job waits, ``available``, until a
  slot frees; ``"skip"``: it is cancelled without running (``meta.skipped``) and the worker's
  ``on_skip(job)`` runs.
* **Solo** (``@worker(solo=True)``, Jobly): a keyed limit of 1 that skips.
* **Rate limits** (queue option ``rate_limit={"allowed": 20, "period": 2}``): at most ``allowed`` starts
  per sliding ``period`` seconds, for the whole queue or per ``by`` partition (``"worker"``,
  ``"args.<path>"``, ``"meta.<path>"``), across nodes.
* **Global limits** (queue option ``global_limit``): running jobs of the queue across all nodes.

All of them are enforced when jobs are claimed, in the claiming transaction, under an advisory lock:
see ``docs/concurrency.md``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from . import _json
from ._paths import MISSING, lookup, worker_hook
from .errors import LimitOptionsError
from .job import Job
from .validation import first_problem

__all__ = ["KeyedLimit", "LimitOptions", "RateLimit", "resolve_limit"]

MAX_KEY_TEXT = 200
_PATH = re.compile(r"^[^.]+(\.[^.]+)*$")


class LimitOptions(BaseModel):
    """A keyed concurrency limit on a worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    key: str | tuple[str, ...] | Callable[[Job[Any]], Any] | None = None
    to: int = Field(default=1, ge=1, le=10_000)
    group: str | None = None
    on_conflict: Literal["block", "skip"] = "block"

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: Any) -> Any:
        if value is None or callable(value):
            return value
        paths = [value] if isinstance(value, str) else list(value)
        if not paths:
            raise ValueError("give a path, a list of paths or a callable")
        for path in paths:
            if not isinstance(path, str) or not _PATH.match(path):
                raise ValueError(f"invalid key path {path!r}")
        return value if isinstance(value, str) else tuple(paths)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value) > 100):
            raise ValueError("must be a non-empty name of at most 100 characters")
        return value

    @classmethod
    def parse(cls, value: Any, *, worker: str | None = None, field: str = "limit") -> LimitOptions | None:
        if value is None or value is False:
            return None
        if isinstance(value, LimitOptions):
            return value
        if not isinstance(value, Mapping):
            raise LimitOptionsError(
                field, value, "must be a dict of options (key, to, group, on_conflict)", worker=worker
            )
        data = dict(value)
        try:
            return cls.model_validate(data)
        except PydanticValidationError as exc:
            problem = first_problem(exc, data)
            raise LimitOptionsError(
                problem.field(field, indexes=False), problem.value, problem.reason, worker=worker
            ) from None

    @classmethod
    def parse_solo(cls, value: Any, *, worker: str | None = None) -> LimitOptions | None:
        """``solo=True`` or ``solo={"key": ..., "group": ...}``: a limit of 1 that skips."""
        if value is None or value is False:
            return None
        if value is True:
            return cls(to=1, on_conflict="skip")
        if not isinstance(value, Mapping):
            raise LimitOptionsError(
                "solo", value, "must be True or a dict with key and/or group", worker=worker
            )
        unknown = set(value) - {"key", "group"}
        if unknown:
            bad = sorted(unknown)[0]
            raise LimitOptionsError(
                f"solo.{bad}", value[bad], "unknown option; solo takes key and group", worker=worker
            )
        return cls.parse({**value, "to": 1, "on_conflict": "skip"}, worker=worker, field="solo")


@dataclass(frozen=True)
class KeyedLimit:
    """What a limited job stores: its key, its limit, and whether it skips."""

    key: str
    to: int
    skip: bool


def resolve_limit(
    options: LimitOptions, job: Job[Any], args: Mapping[str, Any], *, worker_cls: type | None = None
) -> KeyedLimit:
    """The key for ``job`` under ``options``: ``group:<canonical value>`` (hashed when long)."""
    key = options.key
    custom = key if callable(key) else worker_hook(worker_cls, "limit_key") if key is None else None
    if custom is not None:
        value = custom(job)
        _json.encode(value, "limit.key", worker=job.worker)
    elif key is None or callable(key):
        value = args
    else:
        paths = [key] if isinstance(key, str) else list(key)
        found = []
        for path in paths:
            source, sub = (job.meta, path[5:]) if path.startswith("meta.") else (args, path)
            item = lookup(source, sub)
            if item is MISSING:
                where = "meta" if path.startswith("meta.") else "args"
                raise LimitOptionsError(
                    "limit.key", path, f"key path not found in the job's {where}", worker=job.worker
                )
            found.append(item)
        value = found[0] if len(found) == 1 else found
    group = options.group or job.worker
    text = f"{group}:{_json.canonical(value)}"
    if len(text) > MAX_KEY_TEXT:
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        text = f"{group}:#{digest}"
    return KeyedLimit(key=text, to=options.to, skip=options.on_conflict == "skip")


class RateLimit(BaseModel):
    """At most ``allowed`` job starts per sliding ``period`` seconds (per ``by`` partition if given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed: int = Field(ge=1, le=1_000_000)
    period: float
    by: str | None = None

    @field_validator("period")
    @classmethod
    def _period(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a number of seconds greater than 0")
        return value

    @field_validator("by")
    @classmethod
    def _by(cls, value: str | None) -> str | None:
        if value is None or value == "worker":
            return value
        if value.startswith(("args.", "meta.")) and _PATH.match(value):
            return value
        raise ValueError("must be 'worker', 'args.<path>' or 'meta.<path>'")
