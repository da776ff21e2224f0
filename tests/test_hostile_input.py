"""Hostile input gets a typed error that names the field, raised before anything is written.

NUL characters and surrogates (which PostgreSQL's text and jsonb reject), integers too long for Python's
int-to-text conversion, nesting deeper than ``json`` can recurse, cyclic containers (which used to hang
``insert()``), out-of-range schedules and periods, and queue names with a trailing newline: each raises
a subclass of ``ObanError`` naming the field and the value, and a batch holding one of them writes
nothing. The documented limits themselves (``MAX_DEPTH``, ``MAX_INT_DIGITS``) round-trip exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban, Worker, _json, job, worker
from oban_py.config import load_config
from oban_py.errors import ConfigError, ObanError, UniqueOptionsError, ValidationError
from oban_py.unique import UniqueOptions
from oban_py.validation import validate_queue

pytestmark = pytest.mark.anyio


@worker(queue="default")
class Hostile(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


def _nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists around ``leaf``, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _cyclic_dict() -> dict[str, Any]:
    d: dict[str, Any] = {"a": 1}
    d["self"] = d
    return d


def _cyclic_list() -> dict[str, Any]:
    items: list[Any] = [1]
    items.append({"back": items})
    return {"items": items}


HOSTILE_ARGS: list[tuple[str, Callable[[], Any], str]] = [
    ("nul-in-value", lambda: {"s": "a\x00b"}, "args.s"),
    ("nul-in-key", lambda: {"k\x00": 1}, "args['k\\x00']"),
    ("nul-nested", lambda: {"l": [{"x": "\x00"}]}, "args.l[0].x"),
    ("lone-surrogate", lambda: {"s": "\ud800"}, "args.s"),
    ("surrogate-key", lambda: {"\udfff": 1}, "args['\\udfff']"),
    ("surrogate-pair-as-two-code-points", lambda: {"s": "\ud83d\ude00"}, "args.s"),
    ("int-5000-digits", lambda: {"n": 10**5000}, "args.n"),
    ("int-just-too-long", lambda: {"n": -(10**_json.MAX_INT_DIGITS)}, "args.n"),
    ("nested-10k", lambda: {"deep": _nested(10_000)}, "args.deep"),
    ("nested-just-too-deep", lambda: {"deep": _nested(_json.MAX_DEPTH)}, "args.deep"),
    ("cyclic-dict", _cyclic_dict, "args.self"),
    ("cyclic-list", _cyclic_list, "args.items[1].back"),
]


HOSTILE = pytest.mark.parametrize(
    ("make", "field"), [(m, f) for _, m, f in HOSTILE_ARGS], ids=[i for i, _, _ in HOSTILE_ARGS]
)


@pytest.mark.timeout(30)  # a cyclic value used to spin forever in the JSON check
@HOSTILE
async def test_hostile_args_raise_a_typed_error_and_write_nothing(
    oban: Oban, db: asyncpg.Connection, prefix: str, make: Callable[[], Any], field: str
) -> None:
    batch = [Hostile.new({"ok": 1}), Hostile.new(make()), Hostile.new({"ok": 2})]
    with pytest.raises(ValidationError) as info:
        await oban.insert_all(batch)
    assert info.value.field.startswith(field)
    message = str(info.value)
    assert message.startswith(field[:40]) and len(message) < 600  # the value is shown, but cut short
    with pytest.raises(ValidationError):
        await oban.insert(Hostile.new(make()))
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0


@pytest.mark.timeout(30)
@HOSTILE
async def test_hostile_meta_raises_a_typed_error(
    oban: Oban, db: asyncpg.Connection, prefix: str, make: Callable[[], Any], field: str
) -> None:
    meta_field = "meta" + field.removeprefix("args")
    with pytest.raises(ValidationError) as info:
        await oban.insert_all([Hostile.new({"ok": 1}), Hostile.new({}, meta=make())])
    assert info.value.field.startswith(meta_field)
    # A hand-built Job skips Worker.new: insert validates it all the same.
    with pytest.raises(ValidationError):
        await oban.insert(Job(worker="elsewhere.Worker", args={}, meta=make()))
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0


@pytest.mark.timeout(30)
@HOSTILE
def test_encode_raises_validation_error_for_every_hostile_value(make: Callable[[], Any], field: str) -> None:
    value = make()
    for limit in (None, 1024 * 1024):
        with pytest.raises(ValidationError) as info:
            _json.encode(value, "args", limit=limit)
        assert info.value.field.startswith(field)


@pytest.mark.timeout(30)
def test_encode_bounds_values_that_expand() -> None:
    # 2**60 paths to the same few lists: rejected by size while walking, not by trying to encode it.
    shared: Any = [1]
    for _ in range(60):
        shared = [shared, shared]
    with pytest.raises(ValidationError, match="exceeds the limit of 1048576 bytes"):
        _json.encode({"a": shared}, "args", limit=1024 * 1024)
    with pytest.raises(ValidationError, match="exceeds the limit"):
        _json.encode({"a": shared}, "result")
    # Shared (acyclic) values are fine: JSON simply repeats them.
    twice = [1, 2]
    assert _json.encode({"a": twice, "b": twice}, "args") == '{"a":[1,2],"b":[1,2]}'


async def test_the_documented_limits_round_trip(oban: Oban) -> None:
    args = {
        "deep": _nested(_json.MAX_DEPTH - 1, "leaf"),  # the args dict itself is level 1
        "big": 10**_json.MAX_INT_DIGITS - 1,
        "neg": -(10**_json.MAX_INT_DIGITS - 1),
        "text": "tab\there, é, \U0001f600, \\u0000 written out",
    }
    inserted = await oban.insert(Hostile.new(args))
    assert (await oban.get_job(inserted.id)).args == args  # type: ignore[arg-type]


def test_scrub_text_makes_any_string_storable() -> None:
    assert _json.scrub_text("a\x00b") == "a\ufffdb"
    assert _json.scrub_text("x\ud800y\udfff") == "x\ufffdy\ufffd"
    assert _json.scrub_text("\ud83d\ude00") == "\U0001f600"  # a valid pair is joined, not replaced
    assert _json.scrub_text("plain é") == "plain é"
    for hostile in ("\x00", "\ud800", "a\x00\udc00b"):
        _json.encode({"s": _json.scrub_text(hostile)}, "args")  # storable after scrubbing


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"tags": ["ok", "bad\x00"]}, "tags[1]"),
        ({"tags": ["\ud800"]}, "tags[0]"),
        ({"queue": "mail\n"}, "queue"),
        ({"queue": "mail\x00"}, "queue"),
        ({"schedule_in": math.inf}, "schedule_in"),
        ({"schedule_in": -math.inf}, "schedule_in"),
        ({"schedule_in": math.nan}, "schedule_in"),
        ({"schedule_in": 1e12}, "schedule_in"),
        ({"schedule_in": 10**400}, "schedule_in"),
        ({"schedule_in": timedelta.max}, "schedule_in"),
        ({"scheduled_at": datetime(9999, 12, 31, tzinfo=timezone.utc)}, "scheduled_at"),
        ({"scheduled_at": datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))}, "scheduled_at"),
        ({"scheduled_at": datetime.max.replace(tzinfo=timezone(timedelta(hours=-1)))}, "scheduled_at"),
        ({"unique": {"period": 1e308}}, "unique.period"),
        ({"unique": {"period": timedelta.max}}, "unique.period"),
        ({"unique": {"period": 10**5000}}, "unique.period"),
        ({"unique": {"period": math.nan}}, "unique.period"),
        ({"unique": {"keys": [_nested(10_000)]}}, "unique.keys"),
        ({"unique": {"fields": [["args"]]}}, "unique.fields"),
        ({"unique": {"group": 7}}, "unique.group"),
    ],
)
def test_hostile_job_options_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Hostile.new({}, **overrides)
    assert info.value.field == field
    assert isinstance(info.value, ObanError) and len(str(info.value)) < 600


async def test_hostile_hand_built_jobs_write_nothing(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    far = datetime.now(timezone.utc) + timedelta(days=365 * 200)
    for bad, field in [
        (Job(worker="billing.Invoice\x00", args={}), "worker"),
        (Job(worker="billing.\ud800", args={}), "worker"),
        (Job(worker="billing.Invoice", args={}, queue="billing\n"), "queue"),
        (Job(worker="billing.Invoice", args={}, tags=["a\x00"]), "tags[0]"),
        (Job(worker="billing.Invoice", args={}, scheduled_at=far), "scheduled_at"),
    ]:
        with pytest.raises(ValidationError) as info:
            await oban.insert_all([Job(worker="billing.Invoice", args={"ok": 1}), bad])
        assert info.value.field == field
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0
    # The bounds themselves are accepted: a job 99 years out, a period of (about) 100 years.
    near = datetime.now(timezone.utc) + timedelta(days=365 * 99)
    held = await oban.insert(Hostile.new({}, scheduled_at=near, unique={"period": timedelta(days=36_525)}))
    assert held.id is not None


def test_worker_and_queue_names() -> None:
    with pytest.raises(ValidationError, match="name"):
        worker(name="bad\x00name")(type("W", (), {"process": lambda self, job: None}))
    with pytest.raises(ValidationError, match="name"):

        @job(name="bad\ud800")
        def fn() -> None:
            pass

    for name in ("mail\n", "mail\r\n", "\nmail", "ma\til", "mail\x00", "mail\u2028"):
        with pytest.raises(ValidationError):
            validate_queue(name)
    assert validate_queue("mail.high:1/2-x_y") == "mail.high:1/2-x_y"
    with pytest.raises(ConfigError, match="queues"):
        load_config(None, env={}, overrides={"queues": {"mail\n": 1}})
    with pytest.raises(ConfigError, match="prefix"):
        load_config(None, env={}, overrides={"prefix": "public\n"})
    with pytest.raises(ConfigError, match="node"):
        load_config(None, env={}, overrides={"node": "n\x00"})


def test_unique_period_bounds() -> None:
    too_long = 36_525 * 86_400 + 1  # just over about 100 years
    for period in (1e308, timedelta.max, 10**5000, math.inf, math.nan, too_long):
        with pytest.raises(UniqueOptionsError, match=r"unique\.period"):
            UniqueOptions.parse({"period": period})
    options = UniqueOptions.parse({"period": timedelta(days=36_525)})
    assert options is not None and options.period == 36_525 * 86_400
