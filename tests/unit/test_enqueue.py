"""The started-instance registry, and the one enqueue behind three entry points (no database needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from oban_py import Job, Oban, Worker, job, worker
from oban_py import instances as registry
from oban_py.errors import InstanceNotFound, ValidationError

pytestmark = pytest.mark.anyio


class FakeInstance:
    """Stands in for a started Oban: records what it was asked to insert, and in which conn."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.inserted: list[tuple[Job[Any], Any]] = []

    async def insert(self, job: Job[Any], *, conn: Any = None) -> Job[Any]:
        self.inserted.append((job, conn))
        return job


@pytest.fixture
def started() -> Iterator[list[FakeInstance]]:
    """Fake instances registered by the test, unregistered afterwards."""
    made: list[FakeInstance] = []
    yield made
    for instance in made:
        registry.unregister(instance)


def start(started: list[FakeInstance], name: str = "default") -> FakeInstance:
    instance = FakeInstance(name)
    registry.register(instance)
    started.append(instance)
    return instance


@worker(queue="unit")
class Greeter(Worker):
    async def process(self, job: Job[Any]) -> None: ...


@worker(oban="reports")
class Report:
    async def process(self, job: Job[Any]) -> None: ...


@job(queue="unit")
async def greet(name: str, loud: bool = False) -> None: ...


def test_latest_started_of_a_name_answers(started: list[FakeInstance]) -> None:
    assert registry.lookup() is None and registry.lookup("default") is None
    first = start(started, "reports")
    assert registry.lookup() is first  # the only name started
    second = start(started, "reports")
    assert registry.lookup("reports") is second
    registry.unregister(second)
    registry.unregister(second)  # idempotent
    assert registry.lookup("reports") is first
    other = start(started, "other")
    assert registry.lookup() is None  # two names, none of them "default"
    default = start(started)
    assert registry.lookup() is default and registry.lookup("other") is other


def test_oban_get_instance_answers_only_oban_instances(started: list[FakeInstance]) -> None:
    start(started)
    assert registry.lookup() is not None and Oban.get_instance() is None


async def test_the_three_entry_points_share_one_enqueue(started: list[FakeInstance]) -> None:
    default, reports = start(started), start(started, "reports")
    conn = object()
    await Greeter.enqueue({"n": 1}, conn=conn, priority=3)
    await greet.configure(conn=conn, priority=4).enqueue("ada", loud=True)
    await Report.enqueue({}, conn=conn)  # type: ignore[attr-defined]
    [(by_class, c1), (by_function, c2)] = default.inserted
    [(by_name, c3)] = reports.inserted
    assert c1 is c2 is c3 is conn
    assert (by_class.args, by_class.priority, by_class.queue) == ({"n": 1}, 3, "unit")
    assert (by_function.args, by_function.priority) == ({"name": "ada", "loud": True}, 4)
    assert by_name.worker == Report.__oban_worker__.name  # type: ignore[attr-defined]


async def test_configured_conn_is_kept_by_later_configure(started: list[FakeInstance]) -> None:
    default = start(started)
    conn = object()
    await greet.configure(conn=conn).configure(priority=1).enqueue("bob")
    await greet.enqueue("eve")
    assert [c for _, c in default.inserted] == [conn, None]


async def test_bad_input_is_reported_before_looking_for_an_instance() -> None:
    with pytest.raises(ValidationError, match="priority"):
        await Greeter.enqueue({}, priority=99)
    with pytest.raises(InstanceNotFound, match="named 'reports'"):
        await Report.enqueue({})  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="unknown job option"):
        await Greeter.enqueue({}, oban="reports")
    with pytest.raises(ValidationError, match="unknown job option"):
        greet.configure(connection=object())
