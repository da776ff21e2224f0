"""The oban-py command: version, migrate, start, demo, and its error messages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import asyncpg
import pytest

from oban_py import __version__

pytestmark = pytest.mark.anyio


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "oban_py", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version() -> None:
    result = cli("version")
    assert result.returncode == 0 and result.stdout.strip() == f"oban-py {__version__}"


async def test_concurrent_migrate_commands(test_dsn: str, db: asyncpg.Connection) -> None:
    schema = f"cli_{os.getpid()}"
    args = ["-m", "oban_py", "migrate", "--dsn", test_dsn, "--prefix", schema]
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, *args, stdout=PIPE, stderr=PIPE)
        for _ in range(2)
    ]
    outputs = [await p.communicate() for p in procs]
    try:
        assert [p.returncode for p in procs] == [0, 0], outputs
        messages = [o[0].decode() for o in outputs]
        assert sum("applied nothing" in m for m in messages) == 1
        assert sum("applied [1" in m for m in messages) == 1
        assert await db.fetchval(f'SELECT count(*) FROM "{schema}".oban_migrations') >= 1
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_unreachable_dsn_is_one_clear_line() -> None:
    result = cli("migrate", "--dsn", "postgresql://app:s3cret-pw@127.0.0.1:1/nope")
    assert result.returncode == 1
    assert "could not connect to postgresql://app:***@127.0.0.1:1/nope" in result.stderr
    assert "s3cret-pw" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "oban.toml").write_text("[queues]\nmail = -1\n")
    result = cli("start", cwd=tmp_path)
    assert result.returncode == 2 and "oban.toml: queues.mail.limit=-1" in result.stderr
    (tmp_path / "oban.toml").write_text('modules = ["no_such_module"]\n[queues]\nmail = 1\n')
    result = cli("start", cwd=tmp_path)
    assert result.returncode == 2 and "could not import module 'no_such_module'" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("start", "--dsn", "postgresql://x@127.0.0.1:1/x", cwd=tmp_path / "..")
    assert result.returncode == 2 and "no queues to run" in result.stderr


def test_demo_runs_to_completion(test_dsn: str) -> None:
    result = cli("demo", "--dsn", test_dsn, "--jobs", "10", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "insert_all(10 ShipOrder): 5 inserted, 5 duplicates" in result.stdout
    assert "completed" in result.stdout.splitlines()[-2]


async def test_queues_command_shows_blocked_keys(test_dsn: str, prefix: str, db: asyncpg.Connection) -> None:
    table = f'"{prefix}".oban_jobs'
    await db.execute(
        f"INSERT INTO {table} (queue, worker, state, limit_key, limit_to, attempted_at) "
        "VALUES ('imports', 'W', 'executing', 'W:7', 1, now())"
    )
    await db.execute(
        f"INSERT INTO {table} (queue, worker, limit_key, limit_to) "
        "SELECT 'imports', 'W', 'W:7', 1 FROM generate_series(1, 3)"
    )
    result = await asyncio.to_thread(cli, "queues", "--dsn", test_dsn, "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("imports") and line.split()[1:3] == ["3", "1"] for line in lines)
    assert any(
        line.startswith("W:7") and line.split()[1:4] == ["1", "3", "1"] and "blocked" in line
        for line in lines
    )
    assert "3 job(s) waiting on a full limit" in result.stdout
