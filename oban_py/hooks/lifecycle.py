"""Process lifecycle hooks: ``on_start``, ``on_stop``, ``on_worker_start``, ``on_worker_stop``.

A hook is a callable taking no arguments, sync or async, given in code or as a dotted path in
oban.toml (``"myapp.hooks:started"`` or ``"myapp.hooks.started"``). The settings only check the
spelling of a path; it is imported at startup (:func:`resolve_hooks`), with the current directory
on ``sys.path`` as for ``modules``, and a path that cannot be imported is a
:class:`~oban_py.errors.ConfigError` naming the key. Importing at startup, not when the config is
read, keeps ``oban-py jobs list`` and friends from importing application code.

When each one runs (Solid Queue's points):

* ``on_start``: once the process is running (``Oban.start`` has started its queues); ``on_stop``: when
  it is asked to stop, before its queues drain. With the supervisor, the supervisor runs them, and each
  child runs with :func:`child_config` so they do not run again there.
* ``on_worker_start`` / ``on_worker_stop``: in each process ``oban-py start`` runs queues in (every
  child of the supervisor, or the single process), through :func:`run_worker_start` and
  :func:`run_worker_stop`.

A hook that raises is logged with its traceback and the others still run; each gets at most
``LIFECYCLE_TIMEOUT`` seconds, so a hook cannot hold a shutdown past the orchestrator's grace period.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError
from .calling import call_contained, describe_callable

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "HOOK_KEYS",
    "LIFECYCLE_TIMEOUT",
    "HookSpec",
    "LifecycleEvent",
    "call_hooks",
    "child_config",
    "normalize_hooks",
    "resolve_hook",
    "resolve_hooks",
    "run_hooks",
    "run_worker_start",
    "run_worker_stop",
]

LifecycleEvent = Literal["on_start", "on_stop", "on_worker_start", "on_worker_stop"]
#: A hook as configured: a callable, or a dotted path to one.
HookSpec = str | Callable[..., Any]
HOOK_KEYS: tuple[str, ...] = ("on_start", "on_stop", "on_worker_start", "on_worker_stop", "on_error")
#: Seconds one lifecycle hook may take: well inside a typical 30 s termination grace period.
LIFECYCLE_TIMEOUT = 10.0

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*(:{_IDENT}(\.{_IDENT})*)?")


def normalize_hooks(value: Any) -> tuple[HookSpec, ...]:
    """A setting's value as a tuple of callables and checked paths (the config's validator).

    Accepts one callable or path, a comma-separated string of paths (``OBAN_ON_START``), or a list.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif callable(value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a callable, a dotted path or a list of them, not {type(value).__name__}")
    out: list[HookSpec] = []
    for item in value:
        if isinstance(item, str):
            path = item.strip()
            if _PATH.fullmatch(path) is None or ("." not in path and ":" not in path):
                raise ValueError(f"{item!r} is not a dotted path such as 'myapp.hooks:started'")
            out.append(path)
        elif callable(item):
            out.append(item)
        else:
            raise ValueError(f"{item!r} is neither a callable nor a dotted path")
    return tuple(out)


def _import(path: str) -> Any:
    """``pkg.mod:attr`` or ``pkg.mod.attr``: the longest importable module prefix, then attributes."""
    module_part, colon, attr_part = path.partition(":")
    if colon:
        candidates = [(module_part, attr_part.split("."))]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    missing: ModuleNotFoundError | None = None
    for module_name, attrs in candidates:
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this very module does not exist" means: try a shorter prefix.
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                missing = missing or exc
                continue
            raise
        for attr in attrs:
            if not hasattr(target, attr):
                raise AttributeError(f"module {module_name!r} has no attribute {'.'.join(attrs)!r}")
            target = getattr(target, attr)
        return target
    assert missing is not None
    raise missing


def resolve_hook(spec: HookSpec, key: str) -> Callable[..., Any]:
    """The callable ``spec`` names (a callable is returned as is); ConfigError naming ``key`` if none."""
    if not isinstance(spec, str):
        return spec
    cwd = os.getcwd()
    if cwd not in sys.path:  # as for ``modules``: the application's own packages are importable
        sys.path.insert(0, cwd)
    try:
        target = _import(spec)
    except Exception as exc:
        raise ConfigError(f"cannot import it: {type(exc).__name__}: {exc}", key=key, value=spec) from None
    if not callable(target):
        raise ConfigError(f"names a {type(target).__name__}, not a callable", key=key, value=spec)
    return target  # type: ignore[no-any-return]


def resolve_hooks(config: Config, key: str) -> tuple[Callable[..., Any], ...]:
    """The callables of setting ``key`` (one of :data:`HOOK_KEYS`), imported now."""
    specs: tuple[HookSpec, ...] = getattr(config, key)
    return tuple(resolve_hook(spec, f"{key}[{i}]" if len(specs) > 1 else key) for i, spec in enumerate(specs))


async def call_hooks(hooks: tuple[Callable[..., Any], ...], event: str) -> None:
    """Run resolved hooks in order; one that raises or hangs is logged and the next one runs."""
    for hook in hooks:
        await call_contained(
            hook,
            (),
            limit=LIFECYCLE_TIMEOUT,
            what=f"{event} hook {describe_callable(hook)}",
            swallow_cancel=False,
        )


async def run_hooks(config: Config, event: LifecycleEvent) -> None:
    """Resolve and run the ``event`` hooks of ``config`` (ConfigError if a path cannot be imported).

    With no event loop running (a supervisor between forks), ``asyncio.run(run_hooks(config, ...))``.
    """
    await call_hooks(resolve_hooks(config, event), event)


async def run_worker_start(config: Config) -> None:
    """Run ``on_worker_start``: in each process that runs queues, after its ``Oban`` has started."""
    await run_hooks(config, "on_worker_start")


async def run_worker_stop(config: Config) -> None:
    """Run ``on_worker_stop``: in each process that runs queues, when it is told to stop, before its
    ``Oban`` stops."""
    await run_hooks(config, "on_worker_stop")


def child_config(config: Config) -> Config:
    """``config`` for a supervised child: ``on_start``/``on_stop`` belong to the supervisor."""
    return config.model_copy(update={"on_start": (), "on_stop": ()})
