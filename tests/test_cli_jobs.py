"""`oban-py jobs ...`, `oban-py queues ...` and `oban-py health` against a seeded database (real
processes; `--json` parsed here)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

pytestmark = pytest.mark.anyio


async def cli(dsn: str, prefix: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    where = ["--dsn", dsn] + (["--prefix", prefix] if prefix else [])
    command = [sys.executable, "-m", "oban_py", *args, *where]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, env={**os.environ}
    )


async def data(dsn: str, prefix: str, *args: str) -> Any:
    result = await cli(dsn, prefix, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SEED = """
INSERT INTO {t} (queue, worker, state, args, tags, completed_at, discarded_at, attempted_at, errors)
SELECT CASE WHEN i % 2 = 0 THEN 'mail' ELSE 'bulk' END, 'app.Send', s::{p}.oban_job_state,
       jsonb_build_object('user', i % 3), CASE WHEN i % 5 = 0 THEN '{{vip}}'::text[] ELSE '{{}}' END,
       now(), now(), now(), '[{{"attempt": 1, "error": "boom"}}]'
FROM generate_series(1, 30) AS i,
     LATERAL (SELECT CASE WHEN i <= 10 THEN 'discarded' WHEN i <= 20 THEN 'completed'
                          ELSE 'scheduled' END) AS x(s)
"""


@pytest.fixture
async def seeded(db: asyncpg.Connection, prefix: str) -> str:
    await db.execute(SEED.format(t=f'"{prefix}".oban_jobs', p=f'"{prefix}"'))
    await db.execute(f'UPDATE "{prefix}".oban_jobs SET scheduled_at = now() + interval \'1 hour\' '
                     "WHERE state = 'scheduled'")  # fmt: skip
    return prefix


async def test_jobs_list_filters_and_pages(test_dsn: str, seeded: str) -> None:
    everything = await data(test_dsn, seeded, "jobs", "list", "--limit", "100")
    assert len(everything["jobs"]) == 30 and everything["next_before_id"] is None
    first = await data(test_dsn, seeded, "jobs", "list", "--limit", "12")
    second = await data(
        test_dsn, seeded, "jobs", "list", "--limit", "12", "--before", str(first["next_before_id"])
    )
    third = await data(
        test_dsn, seeded, "jobs", "list", "--limit", "12", "--before", str(second["next_before_id"])
    )
    ids = [j["id"] for page in (first, second, third) for j in page["jobs"]]
    assert ids == [j["id"] for j in everything["jobs"]] and third["next_before_id"] is None

    mail_discarded = await data(test_dsn, seeded, "jobs", "list", "--state", "discarded", "--queue", "mail")
    assert len(mail_discarded["jobs"]) == 5
    assert {(j["state"], j["queue"]) for j in mail_discarded["jobs"]} == {("discarded", "mail")}
    vip = await data(test_dsn, seeded, "jobs", "list", "--tag", "vip", "--args", '{"user": 0}')
    assert sorted(j["args"]["user"] for j in vip["jobs"]) == [0, 0]  # i = 15, 30
    two_states = await data(test_dsn, seeded, "jobs", "list", "--state", "completed", "--state", "scheduled",
                            "--worker", "app.Send")  # fmt: skip
    assert len(two_states["jobs"]) == 20

    text = await cli(test_dsn, seeded, "jobs", "list", "--limit", "5")
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:4] == [
        "id",
        "state",
        "queue",
        "worker",
    ]
    assert f"more: add --before {first['jobs'][4]['id']}" in text.stdout


async def test_jobs_show_retry_cancel_delete_update(test_dsn: str, seeded: str) -> None:
    listed = await data(test_dsn, seeded, "jobs", "list", "--state", "discarded", "--limit", "1")
    job_id = listed["jobs"][0]["id"]
    shown = await data(test_dsn, seeded, "jobs", "show", str(job_id))
    assert shown["id"] == job_id and shown["errors"][0]["error"] == "boom"
    text = await cli(test_dsn, seeded, "jobs", "show", str(job_id))
    assert text.returncode == 0 and any(
        line.split()[:2] == ["state", "discarded"] for line in text.stdout.splitlines()
    )

    assert await data(test_dsn, seeded, "jobs", "retry", "--state", "discarded", "--queue", "mail") == {
        "retried": 5
    }
    assert await data(test_dsn, seeded, "jobs", "update", "--state", "available", "--set-priority", "4",
                      "--set-queue", "mail2", "--merge-meta", '{"by": "ops"}') == {"updated": 5}  # fmt: skip
    moved = await data(test_dsn, seeded, "jobs", "list", "--queue", "mail2")
    assert {(j["priority"], j["meta"]["by"]) for j in moved["jobs"]} == {(4, "ops")}
    assert await data(test_dsn, seeded, "jobs", "cancel", "--state", "scheduled", "--reason", "x") == {
        "cancelled": 10
    }
    assert await data(test_dsn, seeded, "jobs", "delete", str(job_id)) == {"deleted": 1}

    refused = await cli(test_dsn, seeded, "jobs", "delete")
    assert refused.returncode == 1 and "give job ids or at least one filter" in refused.stderr
    total = len((await data(test_dsn, seeded, "jobs", "list", "--limit", "100"))["jobs"])
    for command, field in [
        (["delete", "--args", "{}"], "args_contains"),  # `@> '{}'` would match every job
        (["cancel", "--args", "{}"], "args_contains"),
        (["retry", "--args", "{}"], "args_contains"),
        (["update", "--args", "{}", "--set-priority", "1"], "args_contains"),
        (["delete", "--queue", ""], "queue"),
        (["delete", "--worker", ""], "worker"),
    ]:
        empty = await cli(test_dsn, seeded, "jobs", *command)
        assert empty.returncode == 1 and f"{field}=" in empty.stderr, (command, empty.stderr)
    assert len((await data(test_dsn, seeded, "jobs", "list", "--limit", "100"))["jobs"]) == total
    bad = await cli(test_dsn, seeded, "jobs", "update", str(moved["jobs"][0]["id"]), "--set-priority", "12")
    assert bad.returncode == 1 and "priority=12" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = await cli(test_dsn, seeded, "jobs", "show", "999999")
    assert missing.returncode == 1 and "job 999999 does not exist" in missing.stderr


async def test_queues_counts_and_controls(test_dsn: str, seeded: str, db: asyncpg.Connection) -> None:
    view = await data(test_dsn, seeded, "queues")
    mail = next(q for q in view["queues"] if q["name"] == "mail")
    assert (mail["discarded"], mail["completed"], mail["scheduled"], mail["cancelled"]) == (5, 5, 5, 0)
    text = await cli(test_dsn, seeded, "queues")
    header = text.stdout.splitlines()[0].split()
    states = ["available", "executing", "scheduled", "retryable", "completed", "discarded", "cancelled"]
    assert header[:8] == ["queue", *states] and "paused" in header

    assert (
        await cli(test_dsn, seeded, "queues", "pause", "mail")
    ).stdout.strip() == "paused queue 'mail' on every node"
    assert await data(test_dsn, seeded, "queues", "scale", "mail", "--limit", "3", "--node", "n1") == {
        "queue": "mail", "action": "scale", "node": "n1",
    }  # fmt: skip
    rows = await db.fetch(f'SELECT node, paused, local_limit FROM "{seeded}".oban_queues ORDER BY node')
    assert [tuple(r) for r in rows] == [("", True, None), ("n1", None, 3)]
    assert (await cli(test_dsn, seeded, "queues", "resume", "mail")).returncode == 0
    assert await db.fetchval(f"SELECT paused FROM \"{seeded}\".oban_queues WHERE node = ''") is False
    no_name = await cli(test_dsn, seeded, "queues", "pause")
    assert no_name.returncode == 1 and "needs a queue name" in no_name.stderr


async def test_health_exit_codes(test_dsn: str, prefix: str, db: asyncpg.Connection) -> None:
    ok = await cli(test_dsn, prefix, "health")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: schema"), ok.stderr
    await db.execute(
        f'INSERT INTO "{prefix}".oban_nodes (instance, node, heartbeat_at) VALUES '
        "(gen_random_uuid(), 'fresh', now()), (gen_random_uuid(), 'stale', now() - interval '1 hour')"
    )
    fresh = await cli(test_dsn, prefix, "health", "--node", "fresh", "--json")
    assert fresh.returncode == 0 and json.loads(fresh.stdout)["node"]["name"] == "fresh"
    stale = await cli(test_dsn, prefix, "health", "--node", "stale")
    assert stale.returncode == 1 and "node 'stale' last heartbeat" in stale.stderr
    assert len(stale.stderr.strip().splitlines()) == 1
    absent = await cli(test_dsn, prefix, "health", "--node", "ghost")
    assert absent.returncode == 1 and "node 'ghost' has no heartbeat" in absent.stderr

    schemaless = await cli(test_dsn, f"{prefix}_none", "health")
    assert schemaless.returncode == 1 and "is at version 0" in schemaless.stderr
    await db.execute(
        f'DELETE FROM "{prefix}".oban_migrations WHERE version = '
        f'(SELECT max(version) FROM "{prefix}".oban_migrations)'
    )
    behind = await cli(test_dsn, prefix, "health", "--json")
    assert behind.returncode == 1 and "run `oban-py migrate`" in json.loads(behind.stdout)["error"]

    unreachable = await cli("postgresql://app:s3cret@127.0.0.1:1/app", None, "health")
    assert unreachable.returncode == 1 and "could not connect" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1
