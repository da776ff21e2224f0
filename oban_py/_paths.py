"""Reading dotted paths out of args/meta, and optional per-worker hooks (shared by unique and limits)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MISSING", "lookup", "worker_hook"]

MISSING = object()


def lookup(data: Mapping[str, Any], path: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``, or ``MISSING`` when any step is absent."""
    current: Any = data
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return MISSING
        current = current[part]
    return current


@functools.lru_cache(maxsize=1024)
def worker_hook(worker_cls: type | None, name: str) -> Callable[[Any], Any] | None:
    """The worker's ``name`` hook as a one-argument callable (looked up once per class).

    A ``staticmethod``/``classmethod`` is called as is; a plain method is called on a fresh instance.
    """
    if worker_cls is None:
        return None
    attr = inspect.getattr_static(worker_cls, name, None)
    if attr is None:
        return None
    if isinstance(attr, (staticmethod, classmethod)):
        fn: Callable[[Any], Any] = getattr(worker_cls, name)
        return fn
    if callable(attr):
        return lambda job: attr(worker_cls(), job)
    return None
