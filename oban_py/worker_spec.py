"""What the engine knows about a worker (:class:`WorkerSpec`), and this process's registry of them.

A spec is built once, when ``@worker``/``@job`` runs, from options checked by the rules of
:mod:`oban_py.validation`; ``new`` checks each per-job override with the same rules, and insert checks
the finished ``Job`` once more (it may have been built by hand, or changed since). ``enqueue`` is
written once, here: ``Oban.enqueue``, ``Worker.enqueue`` and a ``@job`` function's ``enqueue`` all call
:meth:`WorkerSpec.enqueue`.

The registry maps a stored worker name to its spec. It is filled by the decorators and only read
afterwards: nothing is ever imported from a name read from the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from . import _json, instances
from .errors import InstanceNotFound, UnknownWorker, ValidationError
from .job import Job
from .limits import LimitOptions
from .unique import UniqueOptions
from .validation import (
    first_problem,
    reject_unknown,
    validate_args,
    validate_interruptible,
    validate_max_attempts,
    validate_meta,
    validate_priority,
    validate_queue,
    validate_schedule_in,
    validate_scheduled_at,
    validate_tags,
    validate_timeout,
)

__all__ = [
    "INSERT_OPTIONS",
    "WORKER_OPTIONS",
    "WorkerSpec",
    "build_spec",
    "get_worker",
    "register",
    "registered_workers",
]

#: What ``new`` (and ``enqueue``, ``configure``) may override per job.
INSERT_OPTIONS = frozenset(
    {"queue", "priority", "max_attempts", "tags", "meta", "scheduled_at", "schedule_in", "unique"}
)
#: What ``@worker``/``@job`` accept.
WORKER_OPTIONS = frozenset(
    {
        "queue",
        "max_attempts",
        "priority",
        "tags",
        "meta",
        "timeout",
        "unique",
        "limit",
        "solo",
        "args",
        "name",
        "interruptible",
        "oban",
        "cron",
    }
)

_REGISTRY: dict[str, WorkerSpec] = {}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the engine needs to know about a registered worker."""

    name: str
    cls: type
    queue: str = "default"
    max_attempts: int = 20
    priority: int = 0
    tags: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    unique: UniqueOptions | None = None
    limit: LimitOptions | None = None
    args_model: type[BaseModel] | None = None
    oban: str | None = None
    is_async: bool = True
    #: A sync job may be stopped by raising ``Interrupted`` in its thread (see docs/guarantees.md).
    interruptible: bool = False

    def new(self, args: Any = None, /, **overrides: Any) -> Job[Any]:
        """Build a validated Job for this worker (not inserted)."""
        reject_unknown(overrides, INSERT_OPTIONS, "job option", self.name)
        data = self._args(args)
        queue = validate_queue(overrides.get("queue", self.queue), worker=self.name)
        priority = validate_priority(overrides.get("priority", self.priority), self.name)
        max_attempts = validate_max_attempts(overrides.get("max_attempts", self.max_attempts), self.name)
        tags = validate_tags(overrides["tags"], self.name) if "tags" in overrides else list(self.tags)
        meta = overrides.get("meta")
        meta = dict(self.meta) if meta is None else {**self.meta, **validate_meta(meta, self.name)}
        scheduled_at = self._scheduled_at(overrides)
        unique = self.unique
        if "unique" in overrides:
            unique = UniqueOptions.parse(overrides["unique"], base=self.unique, worker=self.name)
        return Job(
            worker=self.name,
            args=data,
            queue=queue,
            meta=meta,
            tags=tags,
            priority=priority,
            max_attempts=max_attempts,
            scheduled_at=scheduled_at,
            unique=unique,
            limit=self.limit,
        )

    async def enqueue(
        self,
        args: Any,
        overrides: Mapping[str, Any],
        *,
        conn: Any = None,
        oban: instances.Instance | None = None,
    ) -> Job[Any]:
        """Build and insert one job, through ``oban`` or else the started instance this worker names.

        ``overrides`` is a mapping, not ``**kwargs``, so that a job option can never be mistaken for
        ``conn`` or ``oban``. The job is built first: bad input is reported even with no instance.
        """
        job = self.new(args, **overrides)
        instance = oban if oban is not None else self.instance()
        return await instance.insert(job, conn=conn)

    def instance(self) -> instances.Instance:
        """The started Oban instance that ``enqueue`` inserts through (the worker's ``oban=`` name)."""
        found = instances.lookup(self.oban)
        if found is None:
            which = f"named {self.oban!r}" if self.oban else "(the default)"
            raise InstanceNotFound(
                f"no running Oban instance {which} to enqueue {self.name} through; use `async with "
                f"Oban(...)` or `await oban.start()` first, or insert with `await oban.insert(job)`"
            )
        return found

    def load_args(self, data: Any) -> Any:
        """What ``process`` receives as ``job.args``: the model when the worker declares one."""
        if self.args_model is None:
            return data
        return self.args_model.model_validate(data)

    def _args(self, args: Any) -> dict[str, Any]:
        if self.args_model is None:
            return {} if args is None else dict(validate_args(args, self.name))
        if isinstance(args, self.args_model):
            return args.model_dump(mode="json")
        try:
            model = self.args_model.model_validate(args or {})
        except PydanticValidationError as exc:
            problem = first_problem(exc, args or {})
            raise ValidationError(
                problem.field("args"), problem.value, problem.reason, worker=self.name
            ) from None
        return model.model_dump(mode="json")

    def _scheduled_at(self, overrides: Mapping[str, Any]) -> datetime | None:
        if "scheduled_at" in overrides and "schedule_in" in overrides:
            raise ValidationError(
                "schedule_in",
                overrides["schedule_in"],
                "give scheduled_at or schedule_in, not both",
                worker=self.name,
            )
        if overrides.get("scheduled_at") is not None:
            return validate_scheduled_at(overrides["scheduled_at"], self.name)
        if overrides.get("schedule_in") is not None:
            return validate_schedule_in(overrides["schedule_in"], self.name)
        return None


def build_spec(name: str, cls: type, options: Mapping[str, Any], *, is_async: bool) -> WorkerSpec:
    """The spec of a decorated worker, every option checked (unknown ones already refused)."""
    queue = validate_queue(options.get("queue", "default"), worker=name)
    max_attempts = validate_max_attempts(options.get("max_attempts", 20), name)
    priority = validate_priority(options.get("priority", 0), name)
    # None is "not given" (the default); any other value goes through the rule, as on ``new``.
    tags = () if options.get("tags") is None else tuple(validate_tags(options["tags"], name))
    meta = {} if options.get("meta") is None else validate_meta(options["meta"], name)
    _json.encode(meta, "meta", worker=name)  # what inserts would refuse, refused at definition time
    args_model = options.get("args")
    if args_model is not None and not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        raise ValidationError("args", args_model, "must be a pydantic BaseModel subclass", worker=name)
    oban_name = options.get("oban")
    if oban_name is not None and not isinstance(oban_name, str):
        raise ValidationError("oban", oban_name, "must be the name of an Oban instance", worker=name)
    if options.get("limit") is not None and options.get("solo") not in (None, False):
        raise ValidationError("solo", options["solo"], "give limit or solo, not both", worker=name)
    limit = LimitOptions.parse(options.get("limit"), worker=name) or LimitOptions.parse_solo(
        options.get("solo"), worker=name
    )
    return WorkerSpec(
        name=name,
        cls=cls,
        queue=queue,
        max_attempts=max_attempts,
        priority=priority,
        tags=tags,
        meta=dict(meta),
        timeout=validate_timeout(options.get("timeout"), name),
        unique=UniqueOptions.parse(options.get("unique"), worker=name),
        limit=limit,
        args_model=args_model,
        oban=oban_name,
        is_async=is_async,
        interruptible=validate_interruptible(options.get("interruptible", False), name),
    )


def register(spec: WorkerSpec) -> None:
    """Make ``spec`` the worker of its name (a later definition of the same name replaces it)."""
    _REGISTRY[spec.name] = spec


def get_worker(name: str) -> WorkerSpec:
    """Look a worker up by its stored name; never imports anything."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownWorker(name, list(_REGISTRY)) from None


def registered_workers() -> dict[str, WorkerSpec]:
    return dict(_REGISTRY)
