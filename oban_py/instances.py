"""Started Oban instances by name: how ``Worker.enqueue`` finds the instance to insert through.

``Oban.start`` registers an instance and ``Oban.stop`` unregisters it. Several started instances may
share a name (a second one started beside the first, a restart that overlaps): the latest started
answers until it stops, then the one before it answers again. Asking for no name means ``"default"``,
or the only name started when there is exactly one.

The registry knows instances only through :class:`Instance`, so ``worker.py`` can look them up
without importing ``oban.py`` (which imports the workers: that would be an import cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .job import Job

__all__ = ["Instance", "lookup", "register", "unregister"]


class Instance(Protocol):
    """What enqueueing needs of an Oban instance."""

    @property
    def name(self) -> str: ...

    async def insert(self, job: Job[Any], *, conn: Any = None) -> Job[Any]: ...


# Started instances by name, in start order (the last one answers).
_started: dict[str, list[Instance]] = {}


def register(instance: Instance) -> None:
    _started.setdefault(instance.name, []).append(instance)


def unregister(instance: Instance) -> None:
    """Forget ``instance``; the one of its name started before it answers again. Idempotent."""
    stack = _started.get(instance.name, [])
    if instance in stack:
        stack.remove(instance)
    if not stack:
        _started.pop(instance.name, None)


def lookup(name: str | None = None) -> Instance | None:
    """The latest started instance of ``name``; ``None`` means "default", or the only name started."""
    if name is not None:
        found = _started.get(name)
        return found[-1] if found else None
    if _started.get("default"):
        return _started["default"][-1]
    if len(_started) == 1:
        return next(iter(_started.values()))[-1]
    return None
