"""Recurring tasks without a database: schedules, DST, config and decorator errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from oban_py import job, worker
from oban_py.config import build_config
from oban_py.cron import Schedule, due_ticks, load_tasks, registered_cron
from oban_py.cron.registry import unregister_cron
from oban_py.errors import ConfigError, ValidationError

UTC = timezone.utc
NY = ZoneInfo("America/New_York")


@worker(name="unit_cron.Nightly")
class Nightly:
    async def process(self, job: object) -> None:
        return None


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_five_six_fields_and_aliases() -> None:
    start = utc(2026, 1, 1, 0, 0, 0)
    assert Schedule("0 3 * * *").next_after(start) == utc(2026, 1, 1, 3, 0)
    assert Schedule("*/2 * * * * *").next_after(start) == utc(2026, 1, 1, 0, 0, 2)
    assert Schedule("@hourly").next_after(start) == utc(2026, 1, 1, 1, 0)
    assert Schedule("0 3 * * *", "Europe/Paris").next_after(start) == utc(2026, 1, 1, 2, 0)


def test_ticks_between_includes_the_end_and_keeps_the_latest() -> None:
    s = Schedule("* * * * * *")
    assert s.ticks_between(utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 3), 10) == [
        utc(2026, 1, 1, 0, 0, 1),
        utc(2026, 1, 1, 0, 0, 2),
        utc(2026, 1, 1, 0, 0, 3),
    ]
    assert s.ticks_between(utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 3), 1) == [utc(2026, 1, 1, 0, 0, 3)]


def test_late_ticks_run_missed_ones_collapse_to_the_latest() -> None:
    s = Schedule("* * * * *")
    last = utc(2026, 1, 1, 0, 0)
    # 3 minutes late, inside a 5-minute grace: all three run.
    assert due_ticks(s, last, utc(2026, 1, 1, 0, 3, 30), grace=300) == [
        utc(2026, 1, 1, 0, m) for m in (1, 2, 3)
    ]
    # Down for two hours: only the latest missed tick.
    assert due_ticks(s, last, utc(2026, 1, 1, 2, 0, 30), grace=10) == [utc(2026, 1, 1, 2, 0)]
    assert due_ticks(s, last, last, grace=60) == []


def _walk(expr: str, start: datetime, n: int) -> list[datetime]:
    s, out, at = Schedule(expr, "America/New_York"), [], start
    for _ in range(n):
        at = s.next_after(at)
        out.append(at)
    return out


def test_dst_spring_forward_new_york() -> None:
    """2026-03-08: 02:00 EST jumps to 03:00 EDT. 02:30 does not exist: that day's tick is 03:00 EDT."""
    start = datetime(2026, 3, 7, 12, 0, tzinfo=NY)
    daily = _walk("30 2 * * *", start, 3)
    assert [t.astimezone(NY).isoformat() for t in daily] == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    hourly = _walk("0 * * * *", datetime(2026, 3, 8, 0, 30, tzinfo=NY), 3)
    assert [t.isoformat() for t in hourly] == [
        "2026-03-08T06:00:00+00:00",  # 01:00 EST
        "2026-03-08T07:00:00+00:00",  # 03:00 EDT: the 02:00 hour does not exist
        "2026-03-08T08:00:00+00:00",
    ]


def test_dst_fall_back_new_york() -> None:
    """2026-11-01: 02:00 EDT falls back to 01:00 EST; the 01:xx hour happens twice, and so do its ticks."""
    hourly = _walk("0 * * * *", datetime(2026, 11, 1, 0, 30, tzinfo=NY), 3)
    assert [t.isoformat() for t in hourly] == [
        "2026-11-01T05:00:00+00:00",  # 01:00 EDT
        "2026-11-01T06:00:00+00:00",  # 01:00 EST
        "2026-11-01T07:00:00+00:00",  # 02:00 EST
    ]
    assert len(set(hourly)) == 3  # distinct instants: distinct unique keys


def test_bad_schedule_timezone_and_worker_name_their_key() -> None:
    base = {"worker": "unit_cron.Nightly", "schedule": "0 3 * * *"}
    with pytest.raises(ConfigError, match=r"cron\.nightly\.schedule") as exc:
        build_config([("oban.toml", {"cron": {"nightly": {**base, "schedule": "61 * * * *"}}})])
    assert "oban.toml" in str(exc.value)
    with pytest.raises(ConfigError, match=r"cron\.nightly\.schedule.*7 fields|cron\.nightly\.schedule"):
        build_config([("t", {"cron": {"nightly": {**base, "schedule": "* * * * * * *"}}})])
    with pytest.raises(ConfigError, match=r"cron\.nightly\.timezone.*Mars/Olympus"):
        build_config([("t", {"cron": {"nightly": {**base, "timezone": "Mars/Olympus"}}})])
    with pytest.raises(ConfigError, match=r"cron\.nightly\.colour"):
        build_config([("t", {"cron": {"nightly": {**base, "colour": "red"}}})])
    config = build_config([("t", {"cron": {"nightly": {**base, "worker": "nope.Missing"}}})])
    with pytest.raises(ConfigError, match=r"cron\.nightly\.worker"):
        load_tasks(config)


@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "0 0 31 4 *", "0 0 0 31 11 *"])
def test_a_schedule_that_never_matches_is_a_config_error(schedule: str) -> None:
    # croniter.is_valid accepts these; croniter then fails on every use, so the next tick is
    # computed once, when the schedule is read.
    base = {"worker": "unit_cron.Nightly", "schedule": schedule}
    with pytest.raises(ConfigError, match=r"cron\.feb\.schedule.*never matches"):
        build_config([("t", {"cron": {"feb": base}})])
    with pytest.raises(ValueError, match="never matches"):
        Schedule(schedule)
    assert Schedule("0 0 29 2 *").next_after(utc(2026, 1, 1)) == utc(2028, 2, 29)  # rare is fine


@pytest.fixture
def forget_cron() -> Iterator[None]:
    """Decorator tasks are process-wide: a node started by a later test would schedule them."""
    before = set(registered_cron())
    yield
    for name in set(registered_cron()) - before:
        unregister_cron(name)


@pytest.mark.usefixtures("forget_cron")
def test_worker_and_job_cron_option() -> None:
    @worker(name="unit_cron.Every", cron="*/5 * * * * *")
    class Every:
        async def process(self, job: object) -> None:
            return None

    @job(
        name="unit_cron.report",
        cron={"schedule": "0 6 * * 1", "args": {"team": "ops"}, "timezone": "Europe/Paris"},
    )
    def report(team: str) -> None:
        return None

    crons = registered_cron()
    assert crons["unit_cron.Every"].schedule == "*/5 * * * * *"
    assert crons["unit_cron.report"].args == {"team": "ops"}
    tasks = load_tasks(build_config([]))
    assert tasks["unit_cron.report"].schedule.timezone == "Europe/Paris"

    with pytest.raises(ValidationError, match=r"cron\.schedule") as exc:
        worker(name="unit_cron.Bad", cron="every day")(Every)
    assert exc.value.worker == "unit_cron.Bad"
    with pytest.raises(ValidationError, match=r"cron\.timezone"):
        worker(name="unit_cron.Bad", cron={"schedule": "@daily", "timezone": "Nowhere/City"})(Every)

    @worker(name="unit_cron.Every")  # redefined without cron=: the task goes with it
    class Again:
        async def process(self, job: object) -> None:
            return None

    assert "unit_cron.Every" not in registered_cron()


def test_reboot_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        Schedule("@reboot")
    assert Schedule("@daily").next_after(utc(2026, 1, 1, 1)) == utc(2026, 1, 2)


def test_args_the_worker_refuses_are_a_config_error() -> None:
    from pydantic import BaseModel

    class Args(BaseModel):
        days: int

    @worker(name="unit_cron.Typed", args=Args)
    class Typed:
        async def process(self, job: object) -> None:
            return None

    bad = {"worker": "unit_cron.Typed", "schedule": "@daily", "args": {"days": "many"}}
    with pytest.raises(ConfigError, match=r"cron\.typed\.args\.days"):
        load_tasks(build_config([("t", {"cron": {"typed": bad}})]))
