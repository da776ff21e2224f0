"""Defining workers: ``@worker`` for classes, ``@job`` for functions, and the registry.

A worker is registered under a name (default ``module.QualName``) that is stored in each job's
``worker`` column. At execution time that name is looked up in this process's registry, and
only there: nothing is ever imported from a string read from the database. Import your worker modules
at startup (the runner imports the ``modules`` listed in oban.toml).

Options are validated when the decorator runs and again for each override on ``new``, so a bad
queue name, priority or unique option fails at the call site, before anything is written.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar, overload

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from . import _json
from .errors import InstanceNotFound, UnknownWorker, ValidationError
from .job import Job
from .limits import LimitOptions
from .unique import UniqueOptions

if TYPE_CHECKING:
    from .oban import Oban

__all__ = ["Worker", "WorkerSpec", "get_worker", "job", "registered_workers", "worker"]

P = ParamSpec("P")
R = TypeVar("R")
W = TypeVar("W", bound=type)

# Used with fullmatch: a "$" anchor would also match before a trailing newline.
QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]*")
MAX_QUEUE_LEN = 128
MAX_NAME_LEN = 255
MAX_ATTEMPTS_LIMIT = 10_000
#: How far from now ``scheduled_at`` (and ``schedule_in``) may lie: about 100 years.
MAX_SCHEDULE = timedelta(days=36_525)
_INSERT_OVERRIDES = frozenset(
    {"queue", "priority", "max_attempts", "tags", "meta", "scheduled_at", "schedule_in", "unique"}
)

_REGISTRY: dict[str, WorkerSpec] = {}


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


def _validate_int(value: Any, field: str, low: int, high: int, worker: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, value, f"must be an integer from {low} to {high}", worker=worker)
    if not low <= value <= high:
        raise ValidationError(field, value, f"must be from {low} to {high}", worker=worker)
    return value


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


def _validate_timeout(value: Any, worker: str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValidationError("timeout", value, "must be seconds > 0 or None", worker=worker)
    return float(value)


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


def _validate_interruptible(value: Any, worker: str | None) -> bool:
    if not isinstance(value, bool):
        raise ValidationError("interruptible", value, "must be True or False", worker=worker)
    return value


def _schedule_in(value: Any, worker: str | None) -> datetime:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValidationError("schedule_in", value, "must be seconds >= 0 or a timedelta", worker=worker)
    limit = MAX_SCHEDULE.total_seconds()
    if seconds < 0:
        raise ValidationError("schedule_in", value, "must be seconds >= 0 or a timedelta", worker=worker)
    if not seconds <= limit:  # also true for NaN
        raise ValidationError(
            "schedule_in",
            value,
            f"must be a finite number of seconds, at most {limit:.0f} (about 100 years)",
            worker=worker,
        )
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


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
        unknown = set(overrides) - _INSERT_OVERRIDES
        if unknown:
            name = sorted(unknown)[0]
            raise ValidationError(
                name,
                overrides[name],
                f"unknown job option; options are {sorted(_INSERT_OVERRIDES)}",
                worker=self.name,
            )
        data = self._args(args)
        queue = validate_queue(overrides.get("queue", self.queue), worker=self.name)
        priority = _validate_int(overrides.get("priority", self.priority), "priority", 0, 9, self.name)
        max_attempts = _validate_int(
            overrides.get("max_attempts", self.max_attempts), "max_attempts", 1, MAX_ATTEMPTS_LIMIT, self.name
        )
        tags = validate_tags(overrides["tags"], self.name) if "tags" in overrides else list(self.tags)
        meta = overrides.get("meta")
        if meta is None:
            meta = dict(self.meta)
        elif not isinstance(meta, Mapping):
            raise ValidationError("meta", meta, "must be a dict", worker=self.name)
        else:
            meta = {**self.meta, **meta}
        scheduled_at: datetime | None = None
        if "scheduled_at" in overrides and "schedule_in" in overrides:
            raise ValidationError(
                "schedule_in",
                overrides["schedule_in"],
                "give scheduled_at or schedule_in, not both",
                worker=self.name,
            )
        if overrides.get("scheduled_at") is not None:
            scheduled_at = validate_scheduled_at(overrides["scheduled_at"], self.name)
        elif overrides.get("schedule_in") is not None:
            scheduled_at = _schedule_in(overrides["schedule_in"], self.name)
        unique = self.unique
        if "unique" in overrides:
            unique = UniqueOptions.parse(overrides["unique"], base=self.unique, worker=self.name)
        job: Job[Any] = Job(
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
        return job

    def _args(self, args: Any) -> dict[str, Any]:
        if self.args_model is not None:
            try:
                model = (
                    args if isinstance(args, self.args_model) else self.args_model.model_validate(args or {})
                )
            except PydanticValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ValidationError(
                    f"args.{loc}" if loc else "args", err.get("input"), str(err["msg"]), worker=self.name
                ) from None
            return model.model_dump(mode="json")
        if args is None:
            return {}
        if isinstance(args, BaseModel):
            return args.model_dump(mode="json")
        if not isinstance(args, Mapping):
            raise ValidationError(
                "args", args, "must be a dict (or the worker's args model)", worker=self.name
            )
        return dict(args)

    def load_args(self, data: Any) -> Any:
        """What ``process`` receives as ``job.args``: the model when the worker declares one."""
        if self.args_model is None:
            return data
        return self.args_model.model_validate(data)


def _register(spec: WorkerSpec) -> None:
    _REGISTRY[spec.name] = spec


def get_worker(name: str) -> WorkerSpec:
    """Look a worker up by its stored name; never imports anything."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownWorker(name, list(_REGISTRY)) from None


def registered_workers() -> dict[str, WorkerSpec]:
    return dict(_REGISTRY)


def _spec_options(name: str, cls: type, opts: dict[str, Any], is_async: bool) -> WorkerSpec:
    queue = validate_queue(opts.get("queue", "default"), worker=name)
    max_attempts = _validate_int(opts.get("max_attempts", 20), "max_attempts", 1, MAX_ATTEMPTS_LIMIT, name)
    priority = _validate_int(opts.get("priority", 0), "priority", 0, 9, name)
    tags = tuple(validate_tags(opts.get("tags") or [], name))
    meta = opts.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise ValidationError("meta", meta, "must be a dict", worker=name)
    _json.encode(meta, "meta", worker=name)  # what inserts would refuse, refused at definition time
    args_model = opts.get("args")
    if args_model is not None and not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        raise ValidationError("args", args_model, "must be a pydantic BaseModel subclass", worker=name)
    oban_name = opts.get("oban")
    if oban_name is not None and not isinstance(oban_name, str):
        raise ValidationError("oban", oban_name, "must be the name of an Oban instance", worker=name)
    if opts.get("limit") is not None and opts.get("solo") not in (None, False):
        raise ValidationError("solo", opts["solo"], "give limit or solo, not both", worker=name)
    limit = LimitOptions.parse(opts.get("limit"), worker=name) or LimitOptions.parse_solo(
        opts.get("solo"), worker=name
    )
    return WorkerSpec(
        name=name,
        cls=cls,
        queue=queue,
        max_attempts=max_attempts,
        priority=priority,
        tags=tags,
        meta=dict(meta),
        timeout=_validate_timeout(opts.get("timeout"), name),
        unique=UniqueOptions.parse(opts.get("unique"), worker=name),
        limit=limit,
        args_model=args_model,
        oban=oban_name,
        is_async=is_async,
        interruptible=_validate_interruptible(opts.get("interruptible", False), name),
    )


_WORKER_OPTIONS = frozenset(
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
    }
    | {"oban"}
)


def _check_options(opts: dict[str, Any], name: str) -> None:
    unknown = set(opts) - _WORKER_OPTIONS
    if unknown:
        bad = sorted(unknown)[0]
        raise ValidationError(
            bad, opts[bad], f"unknown worker option; options are {sorted(_WORKER_OPTIONS)}", worker=name
        )


def _instance_for(spec: WorkerSpec) -> Oban:
    from .oban import Oban

    instance = Oban.get_instance(spec.oban)
    if instance is None:
        which = f"named {spec.oban!r}" if spec.oban else "(the default)"
        raise InstanceNotFound(
            f"no running Oban instance {which} to enqueue {spec.name} through; use `async with Oban(...)` "
            f"or `await oban.start()` first, or insert with `await oban.insert(job)`"
        )
    return instance


class Worker:
    """Optional base class for ``@worker`` classes: it gives type checkers ``new`` and ``enqueue``.

    ``@worker`` works on any class with a ``process(self, job)`` method; inheriting from ``Worker`` only
    adds typing. Override ``backoff(job) -> seconds`` or ``timeout(job) -> seconds | None`` to compute
    them per job.
    """

    __oban_worker__: ClassVar[WorkerSpec]

    @classmethod
    def new(cls, args: Any = None, /, **overrides: Any) -> Job[Any]:
        """A validated Job for this worker, not yet inserted."""
        return cls.__oban_worker__.new(args, **overrides)

    @classmethod
    async def enqueue(cls, args: Any = None, /, *, conn: Any = None, **overrides: Any) -> Job[Any]:
        """Insert a job through the default (or the worker's named) Oban instance."""
        spec = cls.__oban_worker__
        return await _instance_for(spec).insert(spec.new(args, **overrides), conn=conn)


def _enqueue_classmethod(cls: type) -> Any:
    async def enqueue(klass: type, args: Any = None, /, *, conn: Any = None, **overrides: Any) -> Job[Any]:
        spec: WorkerSpec = klass.__oban_worker__  # type: ignore[attr-defined]
        return await _instance_for(spec).insert(spec.new(args, **overrides), conn=conn)

    return classmethod(enqueue)


def _new_classmethod() -> Any:
    def new(klass: type, args: Any = None, /, **overrides: Any) -> Job[Any]:
        return klass.__oban_worker__.new(args, **overrides)  # type: ignore[attr-defined, no-any-return]

    return classmethod(new)


@overload
def worker(cls: W, /) -> W: ...
@overload
def worker(**options: Any) -> Callable[[W], W]: ...
def worker(cls: Any = None, /, **options: Any) -> Any:
    """Register a class as a worker.

    Options: ``queue`` (default "default"), ``max_attempts`` (20), ``priority`` (0, runs first; 0-9),
    ``tags``, ``meta``, ``timeout`` (seconds), ``unique`` (see :mod:`oban_py.unique`), ``args`` (a
    pydantic model that validates args at insert and is what ``process`` receives), ``name`` (the
    stored worker name; default ``module.QualName``) and ``oban`` (name of the Oban instance that
    ``enqueue`` inserts through).
    """

    def decorate(klass: W) -> W:
        name = validate_worker_name(options.get("name") or f"{klass.__module__}.{klass.__qualname__}", "name")
        _check_options(options, name)
        process = getattr(klass, "process", None)
        if process is None or not callable(process):
            raise ValidationError(
                "process", klass, "a worker class needs a process(self, job) method", worker=name
            )
        spec = _spec_options(name, klass, options, inspect.iscoroutinefunction(process))
        klass.__oban_worker__ = spec  # type: ignore[attr-defined]
        if "new" not in klass.__dict__:
            klass.new = _new_classmethod()  # type: ignore[attr-defined]
        if "enqueue" not in klass.__dict__:
            klass.enqueue = _enqueue_classmethod(klass)  # type: ignore[attr-defined]
        _register(spec)
        return klass

    if cls is not None:
        return decorate(cls)
    return decorate


class FunctionJob(Generic[P, R]):
    """A function registered with ``@job``: call it directly, or ``new``/``enqueue`` it as a job.

    ``new(*args, **kwargs)`` binds the arguments to the function's own signature and stores them by
    parameter name, so they come back exactly as given. Defaults are not stored (changing a default
    later affects queued jobs, as a plain call would). Use ``configure(queue=..., schedule_in=...)`` to
    set job options for one insert.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        spec: WorkerSpec,
        signature: inspect.Signature,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.spec = spec
        self._signature = signature
        self._overrides = overrides or {}
        self.__name__ = getattr(fn, "__name__", spec.name)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValidationError(
                "args", {"args": args, "kwargs": kwargs}, str(exc), worker=self.spec.name
            ) from None
        data: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            param = self._signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                data.update(value)
            else:
                data[name] = value
        return data

    def new(self, *args: P.args, **kwargs: P.kwargs) -> Job[Any]:
        return self.spec.new(self.bind(*args, **kwargs), **self._overrides)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[Any]:
        job = self.new(*args, **kwargs)
        return await _instance_for(self.spec).insert(job)

    def configure(self, **overrides: Any) -> FunctionJob[P, R]:
        """The same job with insert options (queue, priority, scheduled_at, schedule_in, unique...)."""
        unknown = set(overrides) - _INSERT_OVERRIDES
        if unknown:
            bad = sorted(unknown)[0]
            raise ValidationError(
                bad,
                overrides[bad],
                f"unknown job option; options are {sorted(_INSERT_OVERRIDES)}",
                worker=self.spec.name,
            )
        return FunctionJob(self.fn, self.spec, self._signature, {**self._overrides, **overrides})


class _FunctionRunner:
    """The worker class behind a ``@job`` function: calls it with the stored args as keywords."""

    fn: ClassVar[Callable[..., Any]]

    def process(self, job: Job[Any]) -> Any:
        return type(self).fn(**job.args)


@overload
def job(fn: Callable[P, Awaitable[R]], /) -> FunctionJob[P, Awaitable[R]]: ...
@overload
def job(fn: Callable[P, R], /) -> FunctionJob[P, R]: ...
@overload
def job(**options: Any) -> Callable[[Callable[P, R]], FunctionJob[P, R]]: ...
def job(fn: Any = None, /, **options: Any) -> Any:
    """Register a function as a worker; same options as :func:`worker` (except ``args``)."""

    def decorate(func: Callable[P, R]) -> FunctionJob[P, R]:
        name = validate_worker_name(options.get("name") or f"{func.__module__}.{func.__qualname__}", "name")
        _check_options(options, name)
        if "args" in options:
            raise ValidationError(
                "args", options["args"], "@job functions take their args from their signature", worker=name
            )
        signature = inspect.signature(func)
        for param in signature.parameters.values():
            if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
                raise ValidationError(
                    f"args.{param.name}",
                    str(param),
                    "@job functions cannot take positional-only or *args parameters "
                    "(args are stored by name)",
                    worker=name,
                )
        is_async = inspect.iscoroutinefunction(func)
        runner: type[Any]
        if is_async:

            async def process(self: Any, job: Job[Any]) -> Any:
                return await type(self).fn(**job.args)

            runner = type(
                f"{getattr(func, '__name__', 'job')}_worker",
                (),
                {"fn": staticmethod(func), "process": process},
            )
        else:
            runner = type(
                f"{getattr(func, '__name__', 'job')}_worker", (_FunctionRunner,), {"fn": staticmethod(func)}
            )
        spec = _spec_options(name, runner, options, is_async)
        runner.__oban_worker__ = spec
        _register(spec)
        return FunctionJob(func, spec, signature)

    if fn is not None:
        return decorate(fn)
    return decorate


def spec_for(target: Any) -> WorkerSpec:
    """The WorkerSpec of a worker class, @job function, or registered name."""
    if isinstance(target, FunctionJob):
        return target.spec
    if isinstance(target, str):
        return get_worker(target)
    spec = getattr(target, "__oban_worker__", None)
    if not isinstance(spec, WorkerSpec):
        raise ValidationError("worker", target, "is not a @worker class or @job function")
    return spec
