"""Runner processes (``python -m oban_py start -c <toml>``) and the faults done to them.

Each runner gets its own TOML file (queues and settings may differ per node), writes stdout and
stderr to files in the scenario directory, and shares the ledger file. Every signal sent is recorded
with its CLOCK_MONOTONIC time (the ledger's clock), and a watcher thread records when each process
exits, so runs cut short by a death get an end time. :meth:`Cluster.close` kills whatever is still
running (thawing stopped processes first); a session-wide safety net does the same.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import ledger
from .proxy import BlackHoleProxy
from .settings import FAST
from project import render_toml, wait_ready

HERE = Path(__file__).resolve().parent
_live: weakref.WeakSet[Cluster] = weakref.WeakSet()


def now_ns() -> int:
    return time.monotonic_ns()


class Runner:
    def __init__(self, cluster: Cluster, name: str, toml: Path) -> None:
        self.cluster = cluster
        self.name = name
        self.toml = toml
        self.out = cluster.root / f"{name}.out"
        self.err = cluster.root / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ns = 0
        self.term_ns: int | None = None
        self._offset = 0  # where this process's stderr starts (a restarted runner appends)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def spawn(self) -> Runner:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OBAN_")}
        env["FAULT_LEDGER"] = str(self.cluster.ledger)
        # The engine the test process imports (a checkout, or a snapshot on PYTHONPATH) runs the nodes too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "oban_py", "start", "-c", str(self.toml)]
        self._offset = self.err.stat().st_size if self.err.exists() else 0
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.cluster.root, env=env, stdout=out, stderr=err)
        self.started_ns = now_ns()
        self.cluster.event(f"started {self.name} (pid {self.proc.pid})", self.started_ns)
        self.cluster.watch(self)
        return self

    def stderr(self) -> str:
        """What this process (not an earlier one of the same name) wrote to stderr."""
        if not self.err.exists():
            return ""
        with open(self.err, "rb") as fh:
            fh.seek(self._offset)
            return fh.read().decode(errors="replace")

    def output(self) -> str:
        out = self.out.read_text(errors="replace") if self.out.exists() else ""
        return self.stderr() + out

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (pid {self.proc.pid if self.proc else '-'}) ---\n{self.output()[-chars:]}"

    async def ready(self, timeout: float = 30.0) -> Runner:
        """Once it is running and listening (see :data:`project.READY`)."""
        assert self.proc is not None
        await wait_ready(self.stderr, self.proc, self.name, timeout)
        return self

    # -- faults ------------------------------------------------------------------------------------

    def kill(self) -> int:
        """SIGKILL now; the time is the end of the runs it had open."""
        assert self.proc is not None
        self._thaw_if_frozen()
        at = now_ns()
        if self.alive:
            self.cluster.deaths[self.pid] = (at, "killed")
            self.cluster.event(f"SIGKILL {self.name} (pid {self.pid})", at)
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return at

    def freeze(self) -> int:
        at = now_ns()
        os.kill(self.pid, signal.SIGSTOP)
        self.cluster.freezes[self.pid].append([at, None])
        self.cluster.event(f"SIGSTOP {self.name} (pid {self.pid})", at)
        return at

    def thaw(self) -> int:
        os.kill(self.pid, signal.SIGCONT)
        at = now_ns()
        self.cluster.event(f"SIGCONT {self.name} (pid {self.pid})", at)
        windows = self.cluster.freezes[self.pid]
        if windows and windows[-1][1] is None:
            windows[-1][1] = at
        return at

    def _thaw_if_frozen(self) -> None:
        windows = self.cluster.freezes.get(self.pid) if self.proc else None
        if windows and windows[-1][1] is None and self.alive:
            self.thaw()

    def terminate(self) -> int:
        """SIGTERM (a graceful stop); returns when it was sent."""
        self.term_ns = now_ns()
        self.cluster.event(f"SIGTERM {self.name} (pid {self.pid})", self.term_ns)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.term_ns

    async def exited(self, timeout: float) -> tuple[int | None, float]:
        """Wait up to ``timeout`` s for the process to exit: (return code or None, seconds since SIGTERM)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        rc = self.proc.poll()
        since = self.term_ns or self.started_ns
        end = self.cluster.deaths.get(self.pid, (now_ns(), ""))[0] if rc is not None else now_ns()
        return rc, (end - since) / 1e9


class Cluster:
    """The runners of one scenario, on one schema, sharing one ledger."""

    def __init__(self, root: Path, dsn: str, prefix: str, socket_path: str) -> None:
        self.root = root
        self.dsn = dsn
        self.prefix = prefix
        self.socket_path = socket_path
        self.ledger = root / "ledger"
        self.ledger.touch()
        self.runners: list[Runner] = []
        self.deaths: dict[int, tuple[int, str]] = {}
        self.freezes: dict[int, list[list[Any]]] = defaultdict(list)
        #: Every fault done, with its CLOCK_MONOTONIC time (ns): shown next to a broken invariant.
        self.events: list[tuple[int, str]] = []
        self.proxy: BlackHoleProxy | None = None
        self._watched: list[Runner] = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_loop, name="fault-watcher", daemon=True)
        self._watcher.start()
        _live.add(self)

    # -- processes -----------------------------------------------------------------------------------

    def runner(
        self, name: str, queues: dict[str, Any], *, via_proxy: bool = False, **settings: Any
    ) -> Runner:
        """Write ``<name>.toml`` and start the runner (not waiting for it to be ready)."""
        dsn = self.dsn
        if via_proxy:
            dsn = self.proxy_dsn()
        values = {
            "dsn": dsn,
            "prefix": self.prefix,
            "node": name,
            "modules": ["fault_workers"],
            **FAST,
            **settings,
        }
        toml = self.root / f"{name}.toml"
        toml.write_text(render_toml(values, queues))
        runner = Runner(self, name, toml)
        self.runners.append(runner)
        return runner.spawn()

    async def start(self, name: str, queues: dict[str, Any], **kwargs: Any) -> Runner:
        return await self.runner(name, queues, **kwargs).ready()

    def restart(self, old: Runner) -> Runner:
        """A new process for a runner's config (same node name), e.g. after a SIGKILL."""
        runner = Runner(self, old.name, old.toml)
        self.runners.append(runner)
        return runner.spawn()

    def event(self, text: str, at: int | None = None) -> None:
        self.events.append((now_ns() if at is None else at, text))

    def events_near(self, start_ns: float, end_ns: float, margin_s: float = 5.0) -> str:
        low, high = start_ns - margin_s * 1e9, end_ns + 1e9
        return "\n".join(f"  {at / 1e9:.3f} {text}" for at, text in self.events if low <= at <= high)

    def names(self) -> list[str]:
        return sorted({r.name for r in self.runners})

    def watch(self, runner: Runner) -> None:
        self._watched.append(runner)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            for runner in list(self._watched):
                if runner.proc is not None and runner.proc.poll() is not None:
                    if runner.proc.pid not in self.deaths:
                        self.deaths[runner.proc.pid] = (now_ns(), "exited")
                        self.event(f"{runner.name} (pid {runner.proc.pid}) exited {runner.proc.returncode}")
                    self._watched.remove(runner)
            self._stop.wait(0.005)

    # -- network -------------------------------------------------------------------------------------

    def proxy_dsn(self) -> str:
        if self.proxy is None:
            self.proxy = BlackHoleProxy(self.socket_path)
            self.proxy.start()
        database = self.dsn.split("?")[0].rsplit("/", 1)[1]
        return f"postgresql://postgres@127.0.0.1:{self.proxy.port}/{database}"

    # -- what happened -------------------------------------------------------------------------------

    def runs(self) -> list[ledger.Run]:
        return ledger.read(self.ledger, self.deaths)

    def pid_names(self) -> dict[int, str]:
        return {r.pid: r.name for r in self.runners if r.proc is not None}

    def tails(self, chars: int = 2000) -> str:
        return "\n".join(r.tail(chars) for r in self.runners) + f"\n(scenario dir: {self.root})"

    def close(self) -> None:
        for runner in self.runners:
            if runner.proc is None:
                continue
            if runner.alive:
                runner._thaw_if_frozen()
                self.deaths.setdefault(runner.pid, (now_ns(), "killed"))
                runner.proc.kill()
            runner.proc.wait()
        self._stop.set()
        self._watcher.join(5)
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        _live.discard(self)


def kill_everything() -> None:
    """Session safety net: no runner outlives the suite."""
    for cluster in list(_live):
        cluster.close()
