"""One rule per job field, and one pydantic-error translator (no database needed)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from oban_py import Job, Worker, worker
from oban_py.config import load_config
from oban_py.errors import ConfigError, LimitOptionsError, UniqueOptionsError, ValidationError
from oban_py.limits import LimitOptions
from oban_py.unique import UniqueOptions
from oban_py.validation import (
    first_problem,
    validate_args,
    validate_queue_limits,
    validate_queue_pattern,
    validate_schedule_in,
    validate_tags,
)


@worker(queue="unit")
class Unit(Worker):
    async def process(self, job: Job[Any]) -> None: ...


def test_tags_are_stripped_and_deduplicated_in_order() -> None:
    assert validate_tags([" a", "b", "a ", "c", "b"]) == ["a", "b", "c"]
    assert Unit.new({}, tags=["x", " x", "y"]).tags == ["x", "y"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": True}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"queue": "bad queue"}, "queue"),
        ({"tags": "one"}, "tags"),
        ({"meta": []}, "meta"),
        ({"schedule_in": -1}, "schedule_in"),
        ({"scheduled_at": datetime(2030, 1, 1)}, "scheduled_at"),
    ],
)
def test_new_and_the_decorator_share_one_rule_per_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as per_job:
        Unit.new({}, **overrides)
    options = {k: v for k, v in overrides.items() if k not in ("schedule_in", "scheduled_at")}
    if not options:
        return
    with pytest.raises(ValidationError) as definition:

        @worker(**options)
        class Bad:
            async def process(self, job: Job[Any]) -> None: ...

    assert per_job.value.field == definition.value.field == field
    assert per_job.value.reason == definition.value.reason


def test_range_messages_are_the_same_for_type_and_range() -> None:
    for bad in (10, "1", None):
        with pytest.raises(ValidationError, match="must be an integer from 0 to 9"):
            Unit.new({}, priority=bad)


def test_args_rule() -> None:
    class Args(BaseModel):
        n: int

    assert validate_args(Args(n=1)) == {"n": 1}
    assert validate_args({"n": 1}) == {"n": 1}
    with pytest.raises(ValidationError, match="must be a dict") as info:
        validate_args([1], worker="w")
    assert info.value.field == "args" and info.value.worker == "w"


def test_schedule_in_points_at_now_plus_seconds() -> None:
    at = validate_schedule_in(timedelta(minutes=1))
    assert timedelta(seconds=59) < at - datetime.now(timezone.utc) <= timedelta(seconds=60)
    for bad in (float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValidationError):
            validate_schedule_in(bad)


def test_queue_patterns_and_limits() -> None:
    assert validate_queue_pattern("*") == "*" and validate_queue_pattern("mail*") == "mail*"
    with pytest.raises(ValidationError):
        validate_queue_pattern("bad name*")
    with pytest.raises(ValidationError):
        validate_queue_pattern(7)
    validate_queue_limits(5, 10)
    for limit, global_limit, field in ((0, None, "limit"), (None, 100_001, "global_limit"), (6, 5, "limit")):
        with pytest.raises(LimitOptionsError) as info:
            validate_queue_limits(limit, global_limit)
        assert info.value.field == field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=0)
    items: list[int] = []
    nested: dict[str, int] = {}


@pytest.mark.parametrize(
    ("data", "loc", "value", "reason"),
    [
        ({"count": -1}, ("count",), -1, "greater than or equal to 0"),
        ({"count": 1, "items": [1, "x"]}, ("items", 1), "x", "valid integer"),
        ({"count": 1, "nested": {"a": "x"}}, ("nested", "a"), "x", "valid integer"),
        ({"count": 1, "extra": 3}, ("extra",), 3, "nope"),
        ({}, ("count",), {}, "Field required"),
    ],
)
def test_first_problem_names_the_path_and_the_given_value(
    data: dict[str, Any], loc: tuple[Any, ...], value: Any, reason: str
) -> None:
    with pytest.raises(PydanticValidationError) as info:
        _Model.model_validate(data)
    problem = first_problem(info.value, data, unknown="nope")
    assert problem.loc == loc and problem.value == value and reason in problem.reason
    assert problem.field("args") == ".".join(["args", *map(str, loc)])
    assert problem.field("opt", indexes=False) == ".".join(
        ["opt", *(str(p) for p in loc if isinstance(p, str))]
    )


def test_every_options_model_reports_through_the_translator() -> None:
    with pytest.raises(UniqueOptionsError) as unique:
        UniqueOptions.parse({"fields": ["args", "kind"]})
    assert unique.value.field == "unique.fields" and unique.value.value == "kind"
    assert "fields are args, queue, worker, meta" in unique.value.reason
    with pytest.raises(LimitOptionsError) as limit:
        LimitOptions.parse({"to": 0})
    assert limit.value.field == "limit.to" and limit.value.value == 0
    with pytest.raises(LimitOptionsError, match="unknown option"):
        LimitOptions.parse({"per": 1})
    with pytest.raises(ConfigError) as config:
        load_config(env={}, overrides={"queues": {"mail": {"limit": 0}}})
    assert config.value.key == "queues.mail.limit" and config.value.value == 0
    with pytest.raises(ConfigError) as cross:
        load_config(env={}, overrides={"rescue_after": 2, "heartbeat_interval": 5})
    assert cross.value.key == "config" and cross.value.value is None


def test_args_model_errors_name_the_args_path() -> None:
    class Args(BaseModel):
        items: list[int]

    @worker(args=Args)
    class Typed:
        async def process(self, job: Job[Any]) -> None: ...

    with pytest.raises(ValidationError) as info:
        Typed.new({"items": [1, "x"]})  # type: ignore[attr-defined]
    assert info.value.field == "args.items.1" and info.value.value == "x"
