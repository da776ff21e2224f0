"""Unique job options and the key they produce.

A unique job carries three things into its row: a key (a 128-bit BLAKE2b hash of a canonical
encoding of the chosen fields), a bitmask of the states in which the row holds that key, and an
expiry (``scheduled_at + period``). A partial unique index over "key, where the row's state is in its
mask" does the enforcing, so concurrent inserters can never both win; see ``docs/unique.md``.

Options (``@worker(unique=...)`` or per insert):

* ``True``: fields ``worker``, ``queue``, ``args``; no period; group ``successful``.
* ``period``: seconds (int, float or timedelta) or ``None``/``"infinity"``. Counted from the holder's
  ``scheduled_at``: a job scheduled in 1 h with period 600 blocks duplicates for 70 minutes.
* ``fields``: subset of ``args``, ``queue``, ``worker``, ``meta``.
* ``keys``: only these args/meta keys count; dotted paths reach nested values (``"user.id"``). Every
  path must exist in at least one of the chosen maps (a missing path is an error, not ``null``).
* ``group``: ``all``, ``incomplete``, ``scheduled``, ``successful`` or an explicit list of states: the
  states checked for duplicates. A job inserted in a state outside its group (an immediate job of the
  ``scheduled`` group) holds nothing, but is still a duplicate of a job that holds the key.
* ``until``: ``"success"`` releases the key when the job completes; ``"start"`` releases it for good
  when the job starts (Sidekiq's ``unique_until``).
* ``key``: a callable ``(job) -> JSON value`` that replaces the fields (or define ``unique_key`` on the
  worker); the value is hashed as is, so two workers returning the same value share a key.
* ``replace``: ``{state: [fields]}``: on a conflict with a holder in that state, overwrite those fields
  of the holder (``scheduled_at`` for debounce).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from . import _json
from ._paths import MISSING, lookup, worker_hook
from .db.flags import PARKED as PARKED  # the row flag above the state bits; SQL writes it __parked__
from .errors import UniqueOptionsError, short_repr
from .job import Job, JobState
from .validation import first_problem

__all__ = ["GROUPS", "UniqueOptions", "UniqueSpec", "resolve_unique"]

STATE_BITS: dict[str, int] = {
    "scheduled": 1,
    "available": 2,
    "executing": 4,
    "retryable": 8,
    "completed": 16,
    "discarded": 32,
    "cancelled": 64,
}
UNTIL_START = 256
#: Longest unique period in seconds (about 100 years): beyond it, ``scheduled_at + period`` overflows
#: PostgreSQL's interval and timestamp types. ``None`` means no expiry.
MAX_PERIOD = 36_525 * 86_400.0

GROUPS: dict[str, frozenset[str]] = {
    "all": frozenset(STATE_BITS),
    "incomplete": frozenset({"scheduled", "available", "executing", "retryable"}),
    "scheduled": frozenset({"scheduled"}),
    "successful": frozenset({"scheduled", "available", "executing", "retryable", "completed"}),
}
_INCOMPLETE = GROUPS["incomplete"]
_BEFORE_START = frozenset({"scheduled", "available"})

Field = Literal["args", "queue", "worker", "meta"]
ReplaceField = Literal["args", "meta", "priority", "queue", "scheduled_at", "tags", "max_attempts"]


def _as_tuple(value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(value)
    raise ValueError(f"must be {what}, not {short_repr(value)}")


def _state_name(state: Any) -> str:
    if isinstance(state, JobState):
        return state.value
    if not isinstance(state, str):
        raise ValueError(f"states are strings or JobState members, not {short_repr(state)}")
    return state


class UniqueOptions(BaseModel):
    """Validated unique options. Build from ``True`` or a dict with :func:`UniqueOptions.parse`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    period: float | None = None
    fields: tuple[Field, ...] = ("worker", "queue", "args")
    keys: tuple[str, ...] | None = None
    group: str | tuple[str, ...] = "successful"
    until: Literal["start", "success"] | None = None
    key: Callable[[Job[Any]], Any] | None = None
    replace: dict[str, tuple[ReplaceField, ...]] | None = None

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, value: Any) -> Any:
        if value is None or value == "infinity":
            return None
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be seconds (int, float or timedelta) or None")
        if value > MAX_PERIOD or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(
                f"must be at most {MAX_PERIOD:.0f} seconds (about 100 years; use None for no expiry)"
            )
        if value <= 0:
            raise ValueError("must be greater than 0 (use None for no period)")
        return float(value)

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("must be a list of field names, not a string")
        value = _as_tuple(value, "a list of field names")
        if not value:
            raise ValueError("must name at least one of args, queue, worker, meta")
        for name in value:
            if not isinstance(name, str):
                raise ValueError(f"field names are strings, not {short_repr(name)}")
        if len(set(value)) != len(value):
            raise ValueError("lists a field twice")
        return value

    @field_validator("keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            raise ValueError("must be a list of key paths, not a string")
        value = _as_tuple(value, "a list of key paths")
        for path in value:
            if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
                raise ValueError(f"invalid key path {short_repr(path)}")
        return value

    @field_validator("group", mode="before")
    @classmethod
    def _group(cls, value: Any) -> Any:
        if isinstance(value, JobState):
            value = [value]
        if isinstance(value, str):
            if value not in GROUPS:
                raise ValueError(f"unknown group {value!r}; use one of {sorted(GROUPS)} or a list of states")
            return value
        states = tuple(_state_name(s) for s in _as_tuple(value, "a group name or a list of states"))
        unknown = [s for s in states if s not in STATE_BITS]
        if unknown:
            raise ValueError(f"unknown state(s) {unknown}; states are {list(STATE_BITS)}")
        if not states:
            raise ValueError("must list at least one state")
        return tuple(sorted(set(states), key=list(STATE_BITS).index))

    @field_validator("replace", mode="before")
    @classmethod
    def _replace(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(
                "must map a state to the fields to replace, e.g. {'scheduled': ['scheduled_at']}"
            )
        out: dict[str, Any] = {}
        for state, fields in value.items():
            name = _state_name(state)
            if name not in STATE_BITS:
                raise ValueError(f"unknown state {name!r}")
            if isinstance(fields, str):
                raise ValueError(f"fields for {name!r} must be a list")
            out[name] = _as_tuple(fields, f"a list of fields for {name!r}")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> UniqueOptions:
        if self.keys is not None and not ({"args", "meta"} & set(self.fields)):
            raise ValueError("keys needs 'args' or 'meta' in fields")
        if not (self.states & _BEFORE_START):
            raise ValueError(
                "group must include 'scheduled' or 'available' (the states a job is inserted in), "
                "otherwise no insert is ever checked"
            )
        return self

    @property
    def states(self) -> frozenset[str]:
        """States in which a job holds its key, after applying ``until``."""
        base = GROUPS[self.group] if isinstance(self.group, str) else frozenset(self.group)
        if self.until == "success":
            return base & _INCOMPLETE
        if self.until == "start":
            return base & _BEFORE_START
        return base

    @property
    def mask(self) -> int:
        """The bitmask stored in ``unique_states``."""
        return _plan(self).mask

    @property
    def replace_json(self) -> str | None:
        return _plan(self).replace_json

    @classmethod
    def parse(
        cls, value: Any, *, base: UniqueOptions | None = None, worker: str | None = None
    ) -> UniqueOptions | None:
        """``True``/dict/UniqueOptions -> options; ``False``/``None`` -> no uniqueness.

        A dict is merged over ``base`` (the worker's options) when there is one, so an insert can
        change just the period of a worker that already declares its fields and keys.
        """
        if value is None or value is False:
            return None
        if isinstance(value, UniqueOptions):
            return value
        if value is True:
            return base or cls()
        if not isinstance(value, Mapping):
            raise UniqueOptionsError(
                "unique", value, "must be True, False or a dict of options", worker=worker
            )
        # Inserts often pass the same literal dict: validate it once per (dict text, worker options).
        try:
            cache_key = repr(value)
        except (ValueError, RecursionError):  # an int too long for str(), a value nested too deep
            return cls._parse_dict(value, base=base, worker=worker)
        cached = _PARSED.get(cache_key)
        if cached is not None and cached[0] is base:
            return cached[1]
        parsed = cls._parse_dict(value, base=base, worker=worker)
        if len(_PARSED) >= 4096:
            _PARSED.clear()
        _PARSED[cache_key] = (base, parsed)
        return parsed

    @classmethod
    def _parse_dict(
        cls, value: Mapping[str, Any], *, base: UniqueOptions | None, worker: str | None
    ) -> UniqueOptions:
        data = dict(base.model_dump(exclude_unset=True)) if base else {}
        data.update(value)
        try:
            return cls.model_validate(data)
        except PydanticValidationError as exc:
            problem = first_problem(
                exc, data, unknown=f"unknown unique option; options are {sorted(cls.model_fields)}"
            )
            reason = problem.reason
            if problem.kind == "literal_error" and problem.loc[0] == "fields":
                reason = "unknown field; fields are args, queue, worker, meta"
            elif problem.kind == "literal_error" and problem.loc[0] == "replace":
                reason = "unknown field; replaceable fields are " + ", ".join(get_args(ReplaceField))
            field = problem.field("unique", indexes=False)
            raise UniqueOptionsError(field, problem.value, reason, worker=worker) from None


@dataclass(frozen=True, slots=True)
class UniqueSpec:
    """What a unique job sends to the database."""

    options: UniqueOptions
    key: bytes
    mask: int
    period: float | None

    @property
    def replace_json(self) -> str | None:
        return self.options.replace_json


_PARSED: dict[str, tuple[UniqueOptions | None, UniqueOptions]] = {}


@dataclass(frozen=True, slots=True)
class _Plan:
    """What resolving a key needs from options, computed once per options object."""

    mask: int
    fields: tuple[str, ...]  # sorted: args < meta < queue < worker is the canonical key order
    replace_json: str | None


_PLANS: dict[int, tuple[UniqueOptions, _Plan]] = {}


def _plan(options: UniqueOptions) -> _Plan:
    found = _PLANS.get(id(options))
    if found is not None and found[0] is options:
        return found[1]
    mask = sum(STATE_BITS[s] for s in options.states)
    plan = _Plan(
        mask=mask | UNTIL_START if options.until == "start" else mask,
        fields=tuple(sorted(options.fields)),
        replace_json=(
            _json.canonical({s: list(f) for s, f in options.replace.items()}) if options.replace else None
        ),
    )
    if len(_PLANS) >= 8192:
        _PLANS.clear()
    _PLANS[id(options)] = (options, plan)
    return plan


def resolve_unique(
    options: UniqueOptions,
    job: Job[Any],
    args: Mapping[str, Any],
    *,
    worker_cls: type | None = None,
    args_text: str | None = None,
) -> UniqueSpec:
    """Compute the key for ``job`` under ``options`` (args already validated as JSON).

    ``args_text``: the canonical JSON of ``args`` when the caller has it, to avoid encoding twice.
    """
    plan = _plan(options)
    custom = options.key or worker_hook(worker_cls, "unique_key")
    if custom is not None:
        value = custom(job)
        _json.encode(value, "unique.key", worker=job.worker)
        text = '{"custom":' + _json.canonical(value) + "}"
    else:
        pieces: list[str] = []
        found: list[Mapping[str, Any]] = []
        for name in plan.fields:
            if name == "worker" or name == "queue":
                pieces.append(f'"{name}":' + _json.canonical(job.worker if name == "worker" else job.queue))
                continue
            source = args if name == "args" else job.meta
            if options.keys is None:
                piece = args_text if (name == "args" and args_text is not None) else _json.canonical(source)
            else:
                subset = {p: v for p in options.keys if (v := lookup(source, p)) is not MISSING}
                found.append(subset)
                piece = _json.canonical(subset)
            pieces.append(f'"{name}":' + piece)
        if options.keys is not None:
            for path in options.keys:
                if not any(path in m for m in found):
                    where = " or ".join(n for n in ("args", "meta") if n in options.fields)
                    raise UniqueOptionsError(
                        "unique.keys", path, f"key path not found in the job's {where}", worker=job.worker
                    )
        text = "{" + ",".join(pieces) + "}"
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return UniqueSpec(options=options, key=digest, mask=plan.mask, period=options.period)
