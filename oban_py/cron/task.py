"""A recurring task: what to enqueue (a worker, args, job options) and when (a :class:`Schedule`).

Tasks come from two places: ``[cron.<name>]`` tables in oban.toml (:class:`CronTaskConfig`, checked
with the rest of the config, so a bad schedule or timezone names ``cron.<name>.schedule``), and the
``cron=`` option of ``@worker``/``@job`` (a task named after the worker). Whether the worker exists
can only be checked once the worker modules are imported, so :func:`build_task` does it, when a node
starts or the facade first needs the tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import ValidationError as PydanticValidationError

from ..errors import ConfigError, UnknownWorker, ValidationError
from ..validation import MAX_NAME_LEN, first_problem, validate_queue, validate_tags, validate_worker_name
from .schedule import Schedule, parse_timezone

__all__ = ["CronTask", "CronTaskConfig", "TaskName", "build_task", "parse_worker_cron", "validate_task_name"]


class CronTaskConfig(BaseModel):
    """One ``[cron.<name>]`` table (or the dict form of ``@worker(cron={...})``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A registered worker name (``module.QualName``, or the worker's ``name=``).
    worker: str
    #: IANA timezone the schedule is read in (default UTC). Before ``schedule``: its check uses it.
    timezone: str = "UTC"
    #: 5-field cron, 6-field with seconds first, or an alias (``@hourly``, ``@daily``...).
    schedule: str
    args: dict[str, Any] = Field(default_factory=dict)
    #: Job options; unset ones come from the worker.
    queue: str | None = None
    priority: int | None = Field(default=None, ge=0, le=9)
    meta: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] | None = None
    #: False: listed, never enqueued by the scheduler (``run`` still works).
    enabled: bool = True

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        parse_timezone(value)
        return value

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        return None if value is None else _plain(validate_queue, value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _plain(validate_tags, value)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str, info: ValidationInfo) -> str:
        Schedule(value, info.data.get("timezone", "UTC"))  # a bad timezone is reported on its own key
        return value


def _plain(rule: Any, value: Any) -> Any:
    """Run one of our validation rules, its error as the plain ValueError pydantic reports."""
    try:
        return rule(value)
    except ValidationError as exc:
        raise ValueError(exc.reason) from None


@dataclass(frozen=True)
class CronTask:
    """A recurring task ready to schedule: its worker is registered, its schedule parsed."""

    name: str
    worker: str
    schedule: Schedule
    args: Mapping[str, Any] = field(default_factory=dict)
    #: Job options given to the worker's ``new`` (queue, priority, meta, tags): only the given ones.
    options: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True


def build_task(name: str, config: CronTaskConfig) -> CronTask:
    """The task ``name`` from its config; an unknown worker is a :class:`ConfigError` on its key."""
    from ..worker_spec import get_worker  # the registry; worker.py imports this package at definition

    try:
        spec = get_worker(config.worker)
    except UnknownWorker as exc:
        raise ConfigError(str(exc), key=f"cron.{name}.worker", value=config.worker) from None
    options: dict[str, Any] = {"meta": dict(config.meta)} if config.meta else {}
    for key in ("queue", "priority", "tags"):
        if getattr(config, key) is not None:
            options[key] = getattr(config, key)
    try:  # args the worker's model refuses would fail every pass: refuse them once, here
        spec.new(dict(config.args), **options)
    except ValidationError as exc:
        raise ConfigError(exc.reason, key=f"cron.{name}.{exc.field}", value=exc.value) from None
    return CronTask(
        name=name,
        worker=config.worker,
        schedule=Schedule(config.schedule, config.timezone),
        args=dict(config.args),
        options=options,
        enabled=config.enabled,
    )


def validate_task_name(name: str) -> str:
    """A task name: the key of its state row and part of each tick's unique key."""
    if not name.strip() or len(name) > MAX_NAME_LEN or not name.isprintable():
        raise ValueError(f"a task name is a printable string of 1 to {MAX_NAME_LEN} characters")
    return name


#: The key of a ``[cron.<name>]`` table.
TaskName = Annotated[str, AfterValidator(validate_task_name)]


def parse_worker_cron(worker: str, value: Any) -> CronTaskConfig:
    """The ``cron=`` option of ``@worker``/``@job``: an expression, or a dict of task options."""
    validate_worker_name(worker)
    data = {"schedule": value} if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        raise ValidationError(
            "cron",
            value,
            "give a cron expression or a dict with a schedule (and args, timezone...)",
            worker=worker,
        )
    if "worker" in data:
        raise ValidationError(
            "cron.worker", data["worker"], "a worker's cron task runs that worker", worker=worker
        )
    try:
        return CronTaskConfig.model_validate({**data, "worker": worker})
    except PydanticValidationError as exc:
        problem = first_problem(exc, data)
        raise ValidationError(problem.field("cron"), problem.value, problem.reason, worker=worker) from None
