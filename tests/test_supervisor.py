"""The supervisor of ``oban-py start --processes N`` and the pidfile: real processes, a real database.

The policy pieces (backoff, crash budget, pidfile locking, child configs) are checked in-process first;
then real supervisors: three children, one killed and replaced with its jobs rescued, a graceful stop
that leaves nothing behind; a child that cannot import its modules; a supervisor killed outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Job, Oban
from oban_py.config import Config, build_config
from oban_py.errors import ConfigError
from oban_py.supervisor import Pidfile, PidfileHeld, Supervisor
from oban_py.supervisor.supervisor import CrashBudget, backoff, describe_status

from helpers import wait_for
from project import Project, wait_process_ready

# -- policy, in-process -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(20) == 30.0


def test_crash_budget_counts_within_the_window() -> None:
    budget = CrashBudget(max_crashes=3, window=60.0)
    assert not budget.record(0.0)
    assert not budget.record(10.0)
    assert not budget.record(61.0)  # the first one has left the window
    assert budget.record(62.0)


def test_exit_statuses_read_as_in_the_logs() -> None:
    assert describe_status(0) == "exit 0"
    assert describe_status(2) == "exit 2"
    assert describe_status(-signal.SIGKILL) == "signal SIGKILL"


def test_pidfile_is_locked_while_held_and_removed_after(tmp_path: Path) -> None:
    path = tmp_path / "oban.pid"
    with Pidfile(path):
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(PidfileHeld, match=f"held by running process {os.getpid()}"):
            Pidfile(path).acquire()  # a second open file: flock conflicts even in one process
    assert not path.exists()


def test_a_stale_pidfile_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "oban.pid"
    path.write_text("999999999\n")  # above any pid_max: nobody holds it
    pidfile = Pidfile(path).acquire()
    try:
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        pidfile.release()
        pidfile.release()  # idempotent
    assert not path.exists()


def test_a_pidfile_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pidfile"):
        Pidfile(tmp_path / "missing" / "oban.pid").acquire()


def test_more_than_one_process_is_refused_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(ConfigError, match="processes") as info:
        build_config([("arguments", {"processes": 2})])
    assert "Linux and macOS" in str(info.value)
    assert build_config([("arguments", {"processes": 1})]).processes == 1


def test_children_are_single_processes_with_slot_names() -> None:
    config = Config(queues={"work": 2}, processes=3, pidfile="/tmp/x.pid", node="web", on_stop=("a.b:c",))
    child = Supervisor(config).child_config(2)
    assert (child.processes, child.pidfile, child.node, child.on_stop) == (1, None, "web.2", ())
    assert Supervisor(config.model_copy(update={"node": None})).child_config(1).node is None


# -- real processes -----------------------------------------------------------------------------------


HOOKS = """
import os


def _log(event):
    with open("hooks.log", "a") as fh:
        fh.write(f"{event} {os.getpid()}\\n")


def on_start():
    _log("on_start")


def on_stop():
    _log("on_stop")


def on_worker_start():
    _log("on_worker_start")


def on_worker_stop():
    _log("on_worker_stop")
"""


def sleepy(seconds: float, **extra: Any) -> Job[Any]:
    return Job(worker="project.Sleepy", args={"sleep": seconds, **extra}, queue="work")


async def _nodes(db: asyncpg.Connection, prefix: str) -> dict[str, int]:
    """Registered nodes: instance -> pid."""
    rows = await db.fetch(
        f"SELECT instance::text AS i, (meta->>'pid')::int AS pid FROM \"{prefix}\".oban_nodes"
    )
    return {r["i"]: r["pid"] for r in rows}


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper that is not its parent does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


@pytest.mark.anyio
@pytest.mark.slow
async def test_three_processes_restart_rescue_and_stop(
    tmp_path: Path, test_dsn: str, prefix: str, oban: Oban, db: asyncpg.Connection
) -> None:
    pidfile = tmp_path / "oban.pid"
    pidfile.write_text("999999999\n")  # stale: replaced
    (tmp_path / "sup_hooks.py").write_text(HOOKS)
    hooks = {key: f"sup_hooks:{key}" for key in ("on_start", "on_stop", "on_worker_start", "on_worker_stop")}
    proj = Project(tmp_path, test_dsn, prefix, processes=3, pidfile=str(pidfile), queues={"work": 2}, **hooks)
    supervisor = proj.start()
    try:
        nodes = await wait_for(lambda: _at_least(db, prefix, 3), timeout=60, what="3 nodes")
        assert int(pidfile.read_text()) == supervisor.pid
        children = set(nodes.values())
        assert len(children) == 3 and supervisor.pid not in children

        jobs = await oban.insert_all([sleepy(60, n=i) for i in range(3)])
        await proj.wait_events("start", 3)
        claims = {
            r["id"]: str(r["claimed_by"])
            for r in await db.fetch(f'SELECT id, claimed_by FROM "{prefix}".oban_jobs')
        }
        victim = claims[jobs[0].id]
        victim_jobs = {job_id for job_id, instance in claims.items() if instance == victim}
        os.kill(nodes[victim], signal.SIGKILL)

        async def replaced() -> dict[str, int] | None:
            now = await _nodes(db, prefix)
            fresh = {i: p for i, p in now.items() if i not in nodes}
            return fresh or None

        fresh = await wait_for(replaced, timeout=60, what="a replacement node")
        assert not set(fresh.values()) & children

        async def rescued() -> bool:
            rows = await db.fetch(
                f'SELECT claimed_by::text AS c, attempt FROM "{prefix}".oban_jobs WHERE id = ANY($1)',
                list(victim_jobs),
            )
            return all(r["c"] not in (None, victim) and r["attempt"] == 2 for r in rows)

        await wait_for(rescued, timeout=30, what="the killed child's jobs rescued")

        second = proj.start()  # the same oban.toml, so the same pidfile
        assert second.wait(timeout=30) == 1
        assert f"held by running process {supervisor.pid}" in proj.output(1)
        assert supervisor.poll() is None

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, proj.output(0)
        assert not pidfile.exists()
        for pid in children | set(fresh.values()):
            assert not _running(pid), pid
        assert await _nodes(db, prefix) == {}  # each stopped child deregistered (the killed one was rescued)
        log = proj.output(0)
        assert "child started" in log and "status=signal SIGKILL" in log and "restarting in" in log

        # The supervisor ran on_start before any child started, and on_stop once it had told the
        # children to stop (a slow on_stop must not eat into their drain); each child ran
        # on_worker_start, and on_worker_stop unless it was killed.
        calls = [tuple(line.split()) for line in (tmp_path / "hooks.log").read_text().splitlines()]
        assert [c for c in calls if c[0] in ("on_start", "on_stop")] == [
            ("on_start", str(supervisor.pid)),
            ("on_stop", str(supervisor.pid)),
        ]
        assert calls[0][0] == "on_start" and calls.index(("on_stop", str(supervisor.pid))) > max(
            i for i, c in enumerate(calls) if c[0] == "on_worker_start"
        )
        started = sorted(int(pid) for event, pid in calls if event == "on_worker_start")
        stopped = sorted(int(pid) for event, pid in calls if event == "on_worker_stop")
        assert started == sorted(children | set(fresh.values()))
        assert stopped == sorted((children - {nodes[victim]}) | set(fresh.values()))
    finally:
        proj.stop_all()


async def _at_least(db: asyncpg.Connection, prefix: str, n: int) -> dict[str, int] | None:
    nodes = await _nodes(db, prefix)
    return nodes if len(nodes) >= n else None


@pytest.mark.anyio
@pytest.mark.slow
async def test_one_process_writes_and_refuses_the_pidfile(tmp_path: Path, test_dsn: str, prefix: str) -> None:
    pidfile = tmp_path / "run" / "oban.pid"
    pidfile.parent.mkdir()
    proj = Project(tmp_path, test_dsn, prefix, pidfile=str(pidfile))
    first = proj.start()
    try:
        await wait_process_ready(proj, 0)
        assert int(pidfile.read_text()) == first.pid  # no supervisor: this very process
        second = proj.start()
        assert second.wait(timeout=30) == 1
        assert f"held by running process {first.pid}" in proj.output(1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert not pidfile.exists()
    finally:
        proj.stop_all()


@pytest.mark.anyio
@pytest.mark.slow
async def test_children_that_keep_crashing_stop_the_supervisor(
    tmp_path: Path, test_dsn: str, prefix: str
) -> None:
    (tmp_path / "broken_workers.py").write_text("raise RuntimeError('boom at import')\n")
    proj = Project(tmp_path, test_dsn, prefix, processes=2, modules=["broken_workers"])
    supervisor = proj.start()
    try:
        status = supervisor.wait(timeout=90)
    finally:
        proj.stop_all()
    log = proj.output(0)
    assert status == 2, log  # the last crash was a configuration error (the import)
    assert log.count("boom at import") >= 5
    assert "children keep crashing" in log


@pytest.mark.anyio
@pytest.mark.slow
async def test_children_of_a_killed_supervisor_stop(
    tmp_path: Path, test_dsn: str, prefix: str, db: asyncpg.Connection
) -> None:
    proj = Project(tmp_path, test_dsn, prefix, processes=2)
    supervisor = proj.start()
    nodes: dict[str, int] = {}
    try:
        nodes = await wait_for(lambda: _at_least(db, prefix, 2), timeout=60, what="2 nodes")
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        # Each child sees its pipe close, stops gracefully and deregisters.
        await wait_for(lambda: _none_left(db, prefix), timeout=30, what="children deregistered")
        await wait_for(lambda: not any(_running(p) for p in nodes.values()), timeout=10, what="no orphan")
    finally:
        for pid in filter(_running, nodes.values()):  # an orphan must not outlive the test
            os.kill(pid, signal.SIGKILL)
        proj.stop_all()


async def _none_left(db: asyncpg.Connection, prefix: str) -> bool:
    return not await _nodes(db, prefix)


def test_start_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "oban_py", "start", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--processes" in out and "--pidfile" in out
