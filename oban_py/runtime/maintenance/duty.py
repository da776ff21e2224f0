"""What every periodic maintenance duty shares: a context, a frozen config, and :class:`Periodic`.

A duty is a small class with a validated, frozen ``config``, a public :meth:`Duty.run_once` (one pass,
callable alone: from a test, an operator's script, or a ``kick``), and the shared lifecycle
(``start``/``stop``/``kick``). Leader-only duties set ``leader_only`` and run on the node holding the
leader lease alone. See ``docs/architecture.md`` for how to add one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError
from ...hooks.reporting import ErrorReporter
from ..events import Events
from .periodic import Periodic

if TYPE_CHECKING:
    from ...db.driver import Driver

__all__ = ["Duty", "DutyConfig", "DutyContext"]


@dataclass
class DutyContext:
    """What a duty may use of its node."""

    driver: Driver
    node: str
    instance: str
    events: Events = field(default_factory=Events)
    #: Tell the node these queues may have new available jobs (wakes their producers).
    wake: Callable[[Iterable[str]], None] = lambda _queues: None
    is_leader: Callable[[], bool] = lambda: True
    #: Where a failing run is reported (``on_error``).
    reporter: ErrorReporter = field(default_factory=ErrorReporter)


class DutyConfig(BaseModel):
    """Base of the duty configs: frozen, no unknown keys, bad values raise :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Seconds between runs (each subclass sets its default).
    interval: float = Field(default=1.0, gt=0, le=86_400)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            raise ConfigError(
                error["msg"], key=f"{type(self).__name__}.{key}", value=error.get("input")
            ) from None


C = TypeVar("C", bound=DutyConfig)


class Duty(abc.ABC, Generic[C]):
    """One maintenance duty of a node. Subclasses set ``name`` and implement :meth:`run_once`."""

    name: ClassVar[str]
    leader_only: ClassVar[bool] = False
    #: Run right at start (False: wait one interval first).
    run_at_start: ClassVar[bool] = True
    #: A run taking longer is abandoned (its statement is cancelled, its connection discarded).
    deadline: ClassVar[float] = 30.0

    def __init__(self, ctx: DutyContext, config: C) -> None:
        self.ctx = ctx
        self.config = config
        self.periodic = Periodic(
            self.name,
            config.interval,
            self._run,
            leader_only=self.leader_only,
            is_leader=ctx.is_leader,
            run_at_start=self.run_at_start,
            deadline=self.deadline,
            reporter=ctx.reporter,
        )

    @abc.abstractmethod
    async def run_once(self) -> None:
        """One pass of the duty (whatever the leadership: the periodic loop checks that)."""

    async def _run(self) -> None:
        await self.run_once()
        self.ctx.events.emit("duty.ran", duty=self.name)

    def start(self) -> None:
        self.periodic.start()

    def kick(self) -> None:
        """Run as soon as possible instead of waiting for the next tick."""
        self.periodic.kick()

    async def stop(self) -> None:
        await self.periodic.stop()
