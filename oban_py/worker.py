"""Defining workers: ``@worker`` for classes, ``@job`` for functions.

A worker is registered under a name (default ``module.QualName``) that is stored in each job's
``worker`` column. At execution time that name is looked up in this process's registry, and
only there: nothing is ever imported from a string read from the database. Import your worker modules
at startup (the runner imports the ``modules`` listed in oban.toml).

Options are validated when the decorator runs and again for each override on ``new``, so a bad
queue name, priority or unique option fails at the call site, before anything is written. The spec a
decorator builds, and the registry, live in :mod:`oban_py.worker_spec`; the rules in
:mod:`oban_py.validation`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar, overload

from .cron.registry import register_cron, unregister_cron
from .cron.task import CronTaskConfig, parse_worker_cron
from .errors import ValidationError
from .job import Job
from .validation import (
    MAX_ATTEMPTS_LIMIT,
    MAX_SCHEDULE,
    reject_unknown,
    validate_queue,
    validate_scheduled_at,
    validate_tags,
    validate_worker_name,
)
from .worker_spec import (
    INSERT_OPTIONS,
    WORKER_OPTIONS,
    WorkerSpec,
    build_spec,
    get_worker,
    register,
    registered_workers,
)

# The validation names are re-exported: they were importable from here before oban_py.validation.
__all__ = [
    "MAX_ATTEMPTS_LIMIT",
    "MAX_SCHEDULE",
    "FunctionJob",
    "Worker",
    "WorkerSpec",
    "get_worker",
    "job",
    "registered_workers",
    "spec_for",
    "validate_queue",
    "validate_scheduled_at",
    "validate_tags",
    "validate_worker_name",
    "worker",
]

P = ParamSpec("P")
R = TypeVar("R")
W = TypeVar("W", bound=type)


class Worker:
    """Optional base class for ``@worker`` classes: it gives type checkers ``new`` and ``enqueue``.

    ``@worker`` works on any class with a ``process(self, job)`` method (it attaches these two
    methods); inheriting from ``Worker`` only adds typing. Override ``backoff(job) -> seconds`` or
    ``timeout(job) -> seconds | None`` to compute them per job.
    """

    __oban_worker__: ClassVar[WorkerSpec]

    @classmethod
    def new(cls, args: Any = None, /, **overrides: Any) -> Job[Any]:
        """A validated Job for this worker, not yet inserted."""
        return cls.__oban_worker__.new(args, **overrides)

    @classmethod
    async def enqueue(cls, args: Any = None, /, *, conn: Any = None, **overrides: Any) -> Job[Any]:
        """Insert a job through the default (or the worker's named) Oban instance.

        ``conn``: a connection whose transaction the insert joins, as for ``Oban.insert``.
        """
        return await cls.__oban_worker__.enqueue(args, overrides, conn=conn)


@overload
def worker(cls: W, /) -> W: ...
@overload
def worker(**options: Any) -> Callable[[W], W]: ...
def worker(cls: Any = None, /, **options: Any) -> Any:
    """Register a class as a worker.

    Options: ``queue`` (default "default"), ``max_attempts`` (20), ``priority`` (0, runs first; 0-9),
    ``tags``, ``meta``, ``timeout`` (seconds), ``unique`` (see :mod:`oban_py.unique`), ``args`` (a
    pydantic model that validates args at insert and is what ``process`` receives), ``name`` (the
    stored worker name; default ``module.QualName``), ``oban`` (name of the Oban instance that
    ``enqueue`` inserts through) and ``cron`` (a schedule, or a dict of task options: a recurring task
    named after the worker, see docs/recurring.md).
    """

    def decorate(klass: W) -> W:
        name = validate_worker_name(options.get("name") or f"{klass.__module__}.{klass.__qualname__}", "name")
        reject_unknown(options, WORKER_OPTIONS, "worker option", name)
        process = getattr(klass, "process", None)
        if process is None or not callable(process):
            raise ValidationError(
                "process", klass, "a worker class needs a process(self, job) method", worker=name
            )
        spec = build_spec(name, klass, options, is_async=inspect.iscoroutinefunction(process))
        cron = _cron_option(name, options)
        klass.__oban_worker__ = spec  # type: ignore[attr-defined]
        for method in ("new", "enqueue"):  # Worker's own classmethods, bound to klass when looked up
            if method not in klass.__dict__:
                setattr(klass, method, Worker.__dict__[method])
        register(spec)
        _register_cron(name, cron)
        return klass

    if cls is not None:
        return decorate(cls)
    return decorate


class FunctionJob(Generic[P, R]):
    """A function registered with ``@job``: call it directly, or ``new``/``enqueue`` it as a job.

    ``new(*args, **kwargs)`` binds the arguments to the function's own signature and stores them by
    parameter name, so they come back exactly as given. Defaults are not stored (changing a default
    later affects queued jobs, as a plain call would). Use ``configure(queue=..., schedule_in=...)`` to
    set job options for one insert, and ``configure(conn=...)`` to enqueue inside your transaction
    (the function's own parameters take every other keyword, so ``conn`` cannot go to ``enqueue``).
    """

    def __init__(
        self,
        fn: Callable[P, R],
        spec: WorkerSpec,
        signature: inspect.Signature,
        overrides: dict[str, Any] | None = None,
        conn: Any = None,
    ) -> None:
        self.fn = fn
        self.spec = spec
        self._signature = signature
        self._overrides = overrides or {}
        self._conn = conn
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
        """Insert a job through the default (or the worker's named) instance, in the configured conn."""
        return await self.spec.enqueue(self.bind(*args, **kwargs), self._overrides, conn=self._conn)

    def configure(self, *, conn: Any = None, **overrides: Any) -> FunctionJob[P, R]:
        """The same job with insert options (queue, priority, scheduled_at, schedule_in, unique...).

        ``conn``: a connection whose transaction ``enqueue`` joins, as for ``Oban.insert``.
        """
        reject_unknown(overrides, INSERT_OPTIONS, "job option", self.spec.name)
        return FunctionJob(
            self.fn,
            self.spec,
            self._signature,
            {**self._overrides, **overrides},
            conn if conn is not None else self._conn,
        )


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
        reject_unknown(options, WORKER_OPTIONS, "worker option", name)
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
        spec = build_spec(name, runner, options, is_async=is_async)
        cron = _cron_option(name, options)
        runner.__oban_worker__ = spec
        register(spec)
        _register_cron(name, cron)
        return FunctionJob(func, spec, signature)

    if fn is not None:
        return decorate(fn)
    return decorate


def _cron_option(name: str, options: dict[str, Any]) -> CronTaskConfig | None:
    """The ``cron=`` option checked (before anything is registered), or None."""
    return None if options.get("cron") is None else parse_worker_cron(name, options["cron"])


def _register_cron(name: str, cron: CronTaskConfig | None) -> None:
    """A worker redefined without ``cron=`` loses its task, as it loses its other options."""
    if cron is None:
        unregister_cron(name)
    else:
        register_cron(name, cron)


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
