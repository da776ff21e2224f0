"""@worker / @job definitions, option validation and argument binding (no database needed)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from oban_py import Job, JobState, Worker, job, worker
from oban_py.errors import ObanError, UniqueOptionsError, UnknownWorker, ValidationError
from oban_py.worker import get_worker


@worker(queue="mail", max_attempts=5, priority=2, tags=["email"], timeout=3)
class Mailer(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


def test_worker_defaults_and_overrides() -> None:
    job_ = Mailer.new({"to": "a@example.com"})
    assert (job_.worker, job_.queue, job_.max_attempts, job_.priority, job_.tags) == (
        f"{__name__}.Mailer",
        "mail",
        5,
        2,
        ["email"],
    )
    assert job_.args == {"to": "a@example.com"} and job_.id is None and job_.state is JobState.AVAILABLE
    other = Mailer.new({}, queue="bulk", priority=9, max_attempts=1, tags=["a", "a", "b"], meta={"k": 1})
    assert (other.queue, other.priority, other.max_attempts, other.tags, other.meta) == (
        "bulk",
        9,
        1,
        ["a", "b"],
        {"k": 1},
    )


def test_worker_registered_by_name() -> None:
    spec = get_worker(f"{__name__}.Mailer")
    assert spec.cls is Mailer and spec.timeout == 3.0 and spec.is_async


def test_schedule_in_and_scheduled_at() -> None:
    job_ = Mailer.new({}, schedule_in=60)
    assert job_.scheduled_at is not None
    assert timedelta(seconds=59) < job_.scheduled_at - datetime.now(timezone.utc) < timedelta(seconds=61)
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert Mailer.new({}, scheduled_at=when).scheduled_at == when
    assert Mailer.new({}, schedule_in=timedelta(minutes=1)).scheduled_at is not None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"queue": ""}, "queue"),
        ({"queue": "x" * 129}, "queue"),
        ({"queue": "has space"}, "queue"),
        ({"queue": 5}, "queue"),
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 10_001}, "max_attempts"),
        ({"tags": "one"}, "tags"),
        ({"tags": [1]}, "tags"),
        ({"meta": []}, "meta"),
        ({"scheduled_at": datetime(2030, 1, 1)}, "scheduled_at"),
        ({"schedule_in": -1}, "schedule_in"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_job_options_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Mailer.new({}, **overrides)
    assert info.value.field == field
    assert field in str(info.value) and Mailer.__oban_worker__.name in str(info.value)
    assert isinstance(info.value, ObanError) and isinstance(info.value, ValueError)


def test_bad_worker_options_fail_at_decoration() -> None:
    with pytest.raises(ValidationError, match="priority"):

        @worker(priority=12)
        class Bad1:
            async def process(self, job: Job[Any]) -> None: ...

    with pytest.raises(ValidationError, match="queue"):

        @worker(queue="")
        class Bad2:
            async def process(self, job: Job[Any]) -> None: ...

    with pytest.raises(ValidationError, match="unknown worker option"):

        @worker(retries=3)
        class Bad3:
            async def process(self, job: Job[Any]) -> None: ...

    with pytest.raises(ValidationError, match="process"):

        @worker()
        class Bad4:
            pass

    with pytest.raises(UniqueOptionsError, match=r"unique\.fields"):

        @worker(unique={"fields": ["args", "nope"]})
        class Bad5:
            async def process(self, job: Job[Any]) -> None: ...


# -- @job functions -----------------------------------------------------------------------------


@job(queue="fn")
async def no_args() -> str:
    return "ok"


@job
def one(x: int) -> int:
    return x


@job(queue="fn", priority=3)
def two(a: int, b: str = "default", *, flag: bool = False) -> tuple[int, str, bool]:
    return a, b, flag


@job
def kw(first: str, **rest: Any) -> dict[str, Any]:
    return {"first": first, **rest}


def test_function_jobs_bind_their_signature_exactly() -> None:
    assert no_args.new().args == {}
    assert one.new(5).args == {"x": 5}
    assert one.new(x=5).args == {"x": 5}
    assert two.new(1).args == {"a": 1}  # defaults are not stored
    assert two.new(1, "b", flag=True).args == {"a": 1, "b": "b", "flag": True}
    assert kw.new("f", extra=[1, 2]).args == {"first": "f", "extra": [1, 2]}
    assert two.new(1).queue == "fn" and two.new(1).priority == 3
    assert two.configure(queue="other", priority=0).new(1).queue == "other"


def test_function_jobs_still_callable() -> None:
    assert one(4) == 4 and two(1, flag=True) == (1, "default", True)


def test_function_job_bad_arguments() -> None:
    with pytest.raises(ValidationError, match="missing a required argument"):
        two.new()
    with pytest.raises(ValidationError, match="too many positional"):
        one.new(1, 2)
    with pytest.raises(ValidationError, match="positional-only"):

        @job
        def bad(a: int, /) -> None: ...

    with pytest.raises(ValidationError, match=r"\*args"):

        @job
        def bad2(*a: int) -> None: ...

    with pytest.raises(ValidationError, match="unknown job option"):
        one.configure(retries=1)


# -- pydantic args --------------------------------------------------------------------------------


class EmailArgs(BaseModel):
    to: str
    count: int = 1


@worker(args=EmailArgs)
class Typed(Worker):
    async def process(self, job: Job[EmailArgs]) -> None:
        pass


def test_args_model_validated_on_new() -> None:
    assert Typed.new({"to": "x"}).args == {"to": "x", "count": 1}
    assert Typed.new(EmailArgs(to="y", count=2)).args == {"to": "y", "count": 2}
    with pytest.raises(ValidationError) as info:
        Typed.new({"to": "x", "count": "many"})
    assert info.value.field == "args.count"
    with pytest.raises(ValidationError, match=r"args\.to"):
        Typed.new({})
    assert get_worker(Typed.__oban_worker__.name).load_args({"to": "z"}) == EmailArgs(to="z")


def test_unknown_worker_error_lists_known_names() -> None:
    with pytest.raises(UnknownWorker) as info:
        get_worker("nope.Missing")
    assert "nope.Missing" in str(info.value) and "not registered" in str(info.value)
