"""A throwaway project with a worker module and oban.toml, run by real `oban-py start` processes.

Jobs log ``start <id> <pid>`` / ``end <id> <pid>`` lines to a file, so a test can count how many times
each job body ran, in which process. :func:`render_toml` and :func:`wait_ready` are shared with the
fault suite's runners (``tests/faults/cluster.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: What a runner logs once ``Oban.start()`` has returned: its queues run and its notifier has made its
#: first LISTEN attempt (``Node.start``), so a control or an insert NOTIFY sent from now on is heard.
READY = "started: queues"

WORKERS = """
import asyncio
import os
import time

from oban_py import worker

LOG = os.environ["OBAN_TEST_LOG"]


def log(kind, job):
    with open(LOG, "a") as fh:
        fh.write(f"{kind} {job.id} {os.getpid()} {time.time():.6f} {job.args.get('k', '-')}\\n")


class Body:
    async def process(self, job):
        log("start", job)
        await asyncio.sleep(job.args.get("sleep", 0.05))
        log("end", job)


@worker(queue="work", name="project.Sleepy")
class Sleepy(Body):
    pass


@worker(queue="keyed", name="project.Keyed", limit={"key": "k", "to": 2})
class Keyed(Body):
    pass


@worker(queue="limited", name="project.Limited")
class Limited(Body):
    pass
"""


class Project:
    def __init__(self, root: Path, dsn: str, prefix: str, **settings: Any) -> None:
        self.root = root
        self.dsn = dsn
        self.prefix = prefix
        self.log = root / "jobs.log"
        self.log.touch()
        (root / "project_workers.py").write_text(WORKERS)
        values = {
            "prefix": prefix,
            "modules": ["project_workers"],
            "heartbeat_interval": 0.2,
            "rescue_after": 1.5,
            "poll_interval": 0.2,
            "stage_interval": 0.2,
            "shutdown_timeout": 1.0,
            "log_level": "info",
            **settings,
        }
        queues = values.pop("queues", {"work": 5})
        (root / "oban.toml").write_text(render_toml(values, queues))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, node: str | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OBAN_DSN": self.dsn, "OBAN_TEST_LOG": str(self.log)}
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "oban_py", "start", *args]
        if node:
            cmd += ["--node", node]
        with open(self.root / f"runner-{len(self.procs)}.log", "wb") as out:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def output(self, index: int = 0) -> str:
        return (self.root / f"runner-{index}.log").read_text()

    def events(self) -> list[tuple[str, int, int]]:
        return [(kind, job_id, pid) for kind, job_id, pid, _, _ in self.timed_events()]

    def timed_events(self) -> list[tuple[str, int, int, float, str]]:
        """(kind, job id, pid, unix time, args["k"]) per logged start/end."""
        out = []
        for line in self.log.read_text().splitlines():
            kind, job_id, pid, at, key = line.split()
            out.append((kind, int(job_id), int(pid), float(at), key))
        return out

    def counts(self, kind: str) -> Counter[int]:
        return Counter(job_id for k, job_id, _ in self.events() if k == kind)

    async def wait_events(self, kind: str, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.counts(kind).values()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {sum(self.counts(kind).values())}/{n} {kind} events; "
                    f"runner output:\n{self.output(len(self.procs) - 1)[-3000:]}"
                )
            await asyncio.sleep(0.05)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else _toml(key)


def render_toml(settings: dict[str, Any], queues: dict[str, Any]) -> str:
    """An oban.toml: top-level settings, then ``[queues]`` (``name = limit``, or a ``[queues.<name>]``
    table for a dict)."""
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items()]
    lines += ["", "[queues]"]
    lines += [f"{_toml_key(q)} = {n}" for q, n in queues.items() if isinstance(n, int)]
    for name, table in queues.items():
        if isinstance(table, dict):
            lines += ["", f"[queues.{_toml_key(name)}]"]
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


async def wait_ready(
    output: Callable[[], str], proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0
) -> None:
    """Until the runner's ``output`` shows :data:`READY`; fail at once if it exits first."""
    deadline = time.monotonic() + timeout
    while READY not in output():
        if proc.poll() is not None:
            raise AssertionError(f"runner {name} exited before it was ready:\n{output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"runner {name} not ready after {timeout}s:\n{output()[-3000:]}")
        await asyncio.sleep(0.05)


async def wait_process_ready(proj: Project, index: int, timeout: float = 20.0) -> None:
    await wait_ready(lambda: proj.output(index), proj.procs[index], f"#{index}", timeout)
