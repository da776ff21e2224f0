"""Supervisor: keeps ``processes`` worker processes running, restarts crashed ones, stops them on a signal.

Usage: ``oban-py start --processes 4`` (or ``processes = 4`` in oban.toml) runs
``Supervisor(config).run()`` in the foreground process; ``processes = 1`` runs no supervisor.

Children are fresh interpreters (``python -m oban_py.supervisor.child``), not forks: forking a process
that has imported user code (which may have started threads, or on macOS touched system frameworks) is
unsafe, and a fresh interpreter cannot inherit a pool, a loop or a lock from its parent. It costs each
child its own start-up (about 0.3 s) and no copy-on-write sharing. The supervisor itself imports no
worker module and opens no database connection, so nothing a job or the database does can take it down.

Each child reads its :class:`Config` (pickled, length-prefixed) from its stdin, which then stays open: the
child treats end-of-file as "the supervisor is gone" and stops gracefully, so killing the supervisor
with SIGKILL leaves no orphan running for longer than ``shutdown_timeout``. Children run in their own
session, so a terminal's Ctrl-C reaches only the supervisor, which forwards it once.

Signals (as Solid Queue's supervisor):

* TERM, INT: graceful. Children get TERM and drain for up to ``shutdown_timeout``; those still running
  ``STOP_GRACE`` seconds later (plus ``LIFECYCLE_TIMEOUT`` per ``on_worker_stop`` hook, which a child
  runs before it drains) get QUIT. The supervisor's own ``on_stop`` runs after the children are told.
  Exit status 0 when every child exited 0.
* QUIT, or a second TERM/INT: immediate. Children get QUIT (they exit at once and their running jobs are
  rescued by other nodes after ``rescue_after``); those still running ``QUIT_GRACE`` seconds later are
  killed. Exit status 1.

Restarts: a child that exits on its own is restarted, after a crash (non-zero status or a signal) with a
backoff of 0.5 s doubling per consecutive crash of that child (at most 30 s; reset once it has run for a
minute). ``MAX_CRASHES`` crashes within ``CRASH_WINDOW`` seconds, across children, mean something is
wrong that restarting will not fix (a module that fails to import, a database that refuses us): the
supervisor stops the others and exits 1 (2 when the last crash was a configuration error).

Hooks (:mod:`oban_py.hooks`): the supervisor runs ``on_start`` before it starts the children and
``on_stop`` when it starts stopping them; each child runs ``on_worker_start``/``on_worker_stop`` (and
not ``on_start``/``on_stop`` again).

Logs (logger ``oban_py.supervisor``): one line per child start, exit and restart, with ``slot``, ``pid``
and ``status`` fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ObanError
from ..hooks import call_hooks, child_config, resolve_hooks
from ..hooks.lifecycle import LIFECYCLE_TIMEOUT
from .pidfile import Pidfile

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["CHILD_COMMAND", "CrashBudget", "Supervisor", "backoff", "describe_status", "frame"]

log = logging.getLogger("oban_py.supervisor")

#: How a child is started: a fresh interpreter (see the module docstring for why not a fork).
CHILD_COMMAND = (sys.executable, "-m", "oban_py.supervisor.child")
#: Crashes across all children within ``CRASH_WINDOW`` seconds after which the supervisor gives up.
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
#: The first restart delay after a crash, doubled per consecutive crash of the same child.
BASE_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: Beyond ``shutdown_timeout``: time for a child to put unfinished jobs back and deregister before QUIT.
STOP_GRACE = 10.0
#: After QUIT, time for a child to exit before it is killed.
QUIT_GRACE = 5.0
#: The size header of the config a child reads from its stdin.
HEADER = struct.Struct(">Q")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def backoff(crashes: int) -> float:
    """Seconds before restarting a child that crashed ``crashes`` times in a row (1 = the first)."""
    return float(min(MAX_BACKOFF, BASE_BACKOFF * 2 ** max(0, crashes - 1)))


def describe_status(returncode: int) -> str:
    """``exit 1`` or ``signal SIGKILL``: a child's exit as the logs show it."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


def frame(config: Config) -> bytes:
    """What a child reads from its stdin: the config's size, then the pickled config."""
    payload = pickle.dumps(config)
    return HEADER.pack(len(payload)) + payload


class CrashBudget:
    """At most ``max_crashes`` crashes within ``window`` seconds, counted across all children."""

    def __init__(self, max_crashes: int = MAX_CRASHES, window: float = CRASH_WINDOW) -> None:
        self.max_crashes = max_crashes
        self.window = window
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Count a crash at ``now`` (monotonic seconds); True when the budget is spent."""
        self._times.append(now)
        while self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times) >= self.max_crashes


@dataclass
class Child:
    """One slot of the supervisor: the process in it (None while it waits for a restart)."""

    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: Consecutive crashes, for the backoff.
    crashes: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``config.processes`` children until a signal stops them; :meth:`run` returns the exit status."""

    def __init__(self, config: Config, *, command: Sequence[str] = CHILD_COMMAND) -> None:
        self.config = config
        self.command = list(command)
        self.children = [Child(slot) for slot in range(1, config.processes + 1)]
        self.budget = CrashBudget()
        self._stopping: Literal["graceful", "immediate"] | None = None
        self._deadline = float("inf")
        self._status = 0
        self._wakeup = -1
        self._started = False  # the on_start hooks ran, so on_stop is due
        self._on_start: tuple[Callable[..., Any], ...] = ()
        self._on_stop: tuple[Callable[..., Any], ...] = ()

    def run(self) -> int:
        pidfile = Pidfile(self.config.pidfile).acquire() if self.config.pidfile else None
        try:
            self._on_start = resolve_hooks(self.config, "on_start")
            self._on_stop = resolve_hooks(self.config, "on_stop")
            with self._signals():
                log.info("supervisor started: %d processes", len(self.children), extra={"pid": os.getpid()})
                asyncio.run(call_hooks(self._on_start, "on_start"))
                self._started = True
                for child in self.children:
                    self._spawn(child)
                while self._stopping is None or any(c.proc is not None for c in self.children):
                    self._wait(self._timeout())
                    for signum in self._received():
                        self._on_signal(signum)
                    self._reap()
                    self._tick()
        finally:
            self._kill_all()
            self._run_on_stop()
            if pidfile is not None:
                pidfile.release()
        log.info("supervisor stopped", extra={"status": self._status})
        return self._status

    # -- children ---------------------------------------------------------------------------------

    def child_config(self, slot: int) -> Config:
        """A child runs the queues itself (``processes = 1``), without the pidfile, as node ``<node>.<slot>``
        when a node name is configured (else its own ``hostname.pid``)."""
        update: dict[str, Any] = {"processes": 1, "pidfile": None}
        if self.config.node:
            update["node"] = f"{self.config.node}.{slot}"
        return child_config(self.config).model_copy(update=update)

    def _spawn(self, child: Child) -> None:
        data = frame(self.child_config(child.slot))
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ObanError(f"cannot start a worker process ({self.command[0]}): {exc}") from None
        child.proc, child.started_at, child.restart_at = proc, time.monotonic(), None
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # it died already: reaped as a crash
            proc.stdin.write(data)
            proc.stdin.flush()
        log.info("child started", extra={"slot": child.slot, "pid": proc.pid})

    def _reap(self) -> None:
        for child in self.children:
            if child.proc is not None and (status := child.proc.poll()) is not None:
                self._exited(child, status)

    def _exited(self, child: Child, status: int) -> None:
        assert child.proc is not None
        proc, child.proc = child.proc, None
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        now = time.monotonic()
        uptime = now - child.started_at
        extra = {"slot": child.slot, "pid": proc.pid, "status": describe_status(status)}
        if self._stopping is not None:
            log.info("child exited", extra=extra)
            if status != 0:
                self._status = max(self._status, 1)
            return
        if status == 0:
            child.crashes, delay = 0, 0.0  # asked to stop by someone else: replace it
        else:
            child.crashes = 1 if uptime >= CRASH_WINDOW else child.crashes + 1
            if self.budget.record(now):
                log.error(
                    "children keep crashing (%d crashes within %.0fs): stopping",
                    self.budget.max_crashes,
                    self.budget.window,
                    extra=extra,
                )
                self._status = 2 if status == 2 else 1
                self._stop(immediate=False)
                return
            delay = backoff(child.crashes)
        child.restart_at = now + delay
        log.warning("child exited; restarting in %.1fs", delay, extra=extra)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._stopping is None:
            for child in self.children:
                if child.proc is None and child.restart_at is not None and child.restart_at <= now:
                    self._spawn(child)
        elif now >= self._deadline:
            if self._stopping == "graceful":
                log.warning("children still running after the shutdown timeout: sending QUIT")
                self._stop(immediate=True)
            else:
                self._kill_all()

    def _kill_all(self) -> None:
        for child in self.children:
            if child.proc is not None:
                log.warning("killing child", extra={"slot": child.slot, "pid": child.proc.pid})
                with contextlib.suppress(OSError):
                    child.proc.kill()
                self._status = max(self._status, 1)
                self._exited(child, child.proc.wait())

    # -- signals ----------------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum not in _FORWARDED:
            return  # SIGCHLD: only a wake-up
        name = signal.Signals(signum).name
        if signum == signal.SIGQUIT or self._stopping is not None:
            if self._stopping != "immediate":
                log.info("%s received: stopping children now", name)
                self._stop(immediate=True)
        else:
            log.info(
                "%s received: stopping children gracefully (up to %ss); send it again to stop them now",
                name,
                self.config.shutdown_timeout,
            )
            self._stop(immediate=False)

    def _run_on_stop(self) -> None:
        """The ``on_stop`` hooks, once, when the supervisor starts stopping (its children are already
        told to stop: a slow hook must not eat into their drain)."""
        if self._started:
            self._started = False
            asyncio.run(call_hooks(self._on_stop, "on_stop"))

    def _stop(self, *, immediate: bool) -> None:
        self._stopping = "immediate" if immediate else "graceful"
        if immediate:
            self._status = max(self._status, 1)
        for child in self.children:
            child.restart_at = None
            if child.proc is not None:
                with contextlib.suppress(OSError):
                    child.proc.send_signal(signal.SIGQUIT if immediate else signal.SIGTERM)
        self._run_on_stop()
        # A child runs its on_worker_stop hooks (each bounded by LIFECYCLE_TIMEOUT) before it drains.
        hooks = len(self.config.on_worker_stop) * LIFECYCLE_TIMEOUT
        grace = QUIT_GRACE if immediate else self.config.shutdown_timeout + STOP_GRACE + hooks
        self._deadline = time.monotonic() + grace

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Signals wake the loop through a pipe (``set_wakeup_fd`` writes their numbers into it)."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        caught = (*_FORWARDED, signal.SIGCHLD)
        previous = {s: signal.signal(s, _ignore) for s in caught}
        old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = read
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(read)
            os.close(write)

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [c.restart_at for c in self.children if c.restart_at is not None]
        if self._stopping is not None:
            due.append(self._deadline)
        return max(0.0, min([1.0, *(t - now for t in due)]))

    def _wait(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup], [], [], timeout)

    def _received(self) -> list[int]:
        try:
            return list(os.read(self._wakeup, 512))
        except BlockingIOError:
            return []


def _ignore(signum: int, _frame: object) -> None:
    """The Python-level handler: the signal's number in the wake-up pipe is what the loop reads."""
