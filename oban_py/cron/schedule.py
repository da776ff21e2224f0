"""A cron expression in a timezone: the one place croniter is called.

Why croniter: it is maintained (pallets-eco), supports Python 3.10 (cronsim needs 3.11), reads 5-field
expressions, 6-field ones with seconds first (``*/5 * * * * *``, like Solid Queue and oban-py) and the
``@hourly``-style aliases, and steps through DST transitions with the timezone's own rules: a local
time skipped by spring-forward runs at the first instant after the gap, and a local time repeated by
fall-back runs at each of its two instants (``30 1 * * *`` runs twice on that night).

Ticks are returned as aware UTC datetimes, so two nodes always name a tick the same way.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from croniter import croniter  # type: ignore[import-untyped]

__all__ = ["Schedule", "parse_timezone"]

#: ``@reboot`` needs a notion of "boot" that a cluster does not have.
_UNSUPPORTED = frozenset({"@reboot"})
_MICROSECOND = timedelta(microseconds=1)


def parse_timezone(name: Any) -> zoneinfo.ZoneInfo:
    """An IANA timezone by name; ``ValueError`` says why not (unknown name, or no tz database)."""
    if not isinstance(name, str) or not name:
        raise ValueError("must be an IANA timezone name such as 'UTC' or 'Europe/Paris'")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        if not zoneinfo.available_timezones():
            raise ValueError(
                f"unknown timezone {name!r}: this machine has no timezone database "
                "(install the system tzdata package, or `pip install tzdata`)"
            ) from None
        raise ValueError(f"unknown IANA timezone {name!r} (e.g. 'UTC', 'America/New_York')") from None


@dataclass(frozen=True)
class Schedule:
    """A validated cron expression evaluated in ``timezone``."""

    expression: str
    timezone: str = "UTC"
    _zone: zoneinfo.ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", parse_timezone(self.timezone))
        expr = self.expression
        if not isinstance(expr, str) or not expr.strip():
            raise ValueError("must be a cron expression such as '0 3 * * *'")
        if expr.strip().lower() in _UNSUPPORTED:
            raise ValueError(f"{expr.strip()} is not supported (a cluster has no single boot)")
        fields = len(expr.split())
        if expr.strip().startswith("@") and fields != 1:
            raise ValueError(f"invalid cron expression {expr!r}: an alias (@hourly) stands alone")
        if not expr.strip().startswith("@") and fields not in (5, 6):
            raise ValueError(
                f"invalid cron expression {expr!r}: give 5 fields (minute hour day month weekday), "
                "6 with seconds first, or an alias such as @hourly"
            )
        if not croniter.is_valid(expr, second_at_beginning=True):
            raise ValueError(f"invalid cron expression {expr!r}")
        # Valid fields can still never match (``0 0 30 2 *``): croniter would fail on every use, so
        # compute one tick now (CroniterBadDateError is a ValueError).
        try:
            self.next_after(datetime.now(timezone.utc))
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"cron expression {expr!r} never matches a date ({exc})") from None

    @property
    def has_seconds(self) -> bool:
        return len(self.expression.split()) == 6

    def _iter(self, start: datetime) -> Any:
        return croniter(self.expression, start.astimezone(self._zone), second_at_beginning=True)

    def next_after(self, when: datetime) -> datetime:
        """The first tick strictly after ``when`` (aware), in UTC."""
        tick: datetime = self._iter(when).get_next(datetime)
        return tick.astimezone(timezone.utc)

    def ticks_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Ticks in ``(after, until]``, the latest ``limit`` of them, oldest first, in UTC."""
        out: list[datetime] = []
        # croniter's get_prev is strictly before its start: start a microsecond late so that a tick
        # exactly at ``until`` counts.
        it = self._iter(until + _MICROSECOND)
        while len(out) < limit:
            tick = it.get_prev(datetime).astimezone(timezone.utc)
            if tick <= after:
                break
            if tick <= until:
                out.append(tick)
        out.reverse()
        return out
