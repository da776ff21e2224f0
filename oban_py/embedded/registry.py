"""Who is running on a data directory: the server's ``postmaster.pid`` and the list of attached processes.

Attached processes are listed in ``<pgdata>/.handle_pids.json`` (the wheel's own format, a JSON list of
pids); the last one to detach stops the server. Dead pids, and pids reused by a new process (detected
through the process start time recorded in ``.oban_py_handles.json``), are pruned before every attach and
detach. Callers hold :func:`~.datadir.dir_lock` while they read and change these files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datadir import write_atomic

__all__ = ["HANDLES_FILE", "PIDS_FILE", "PidFile", "Registry"]

log = logging.getLogger("oban_py.embedded")

PIDS_FILE = ".handle_pids.json"
HANDLES_FILE = ".oban_py_handles.json"


@dataclass(frozen=True)
class PidFile:
    """The parts of ``postmaster.pid`` we use (the file is written line by line while the server starts)."""

    pid: int
    port: int | None
    socket_dir: str
    listen: str
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> PidFile | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        lines += [""] * (8 - len(lines))
        try:
            pid = int(lines[0].strip())
        except ValueError:
            pid = 0
        port = int(lines[3]) if lines[3].strip().isdigit() else None
        return cls(pid, port, lines[4].strip(), lines[5].strip(), lines[7].strip())


class Registry:
    """The pids attached to a server: the wheel's ``.handle_pids.json`` plus start times to spot pid reuse."""

    def __init__(self, pgdata: Path, psutil: Any) -> None:
        self._pids_path = pgdata / PIDS_FILE
        self._handles_path = pgdata / HANDLES_FILE
        self._psutil = psutil

    def _load(self) -> tuple[list[int], dict[int, float]]:
        pids: list[int] = []
        times: dict[int, float] = {}
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            raw = json.loads(self._pids_path.read_text() or "[]")
            pids = [int(p) for p in raw]
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError, AttributeError):
            times = {int(k): float(v) for k, v in json.loads(self._handles_path.read_text()).items()}
        return pids, times

    def _save(self, pids: list[int], times: dict[int, float]) -> None:
        write_atomic(self._pids_path, json.dumps(pids))
        write_atomic(self._handles_path, json.dumps({str(p): times[p] for p in pids if p in times}))

    def _start_time(self, pid: int) -> float | None:
        """The process's start time, 0.0 if it is alive but unreadable, None if it is gone."""
        psutil = self._psutil
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return float(proc.create_time())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            return 0.0

    def _live(self, pids: list[int], times: dict[int, float]) -> list[int]:
        live = []
        for pid in dict.fromkeys(pids):
            started = self._start_time(pid)
            if started is None:
                log.info("pruning dead pid %d from %s", pid, self._pids_path)
            elif pid in times and started and abs(started - times[pid]) > 1.0:
                log.info("pruning pid %d from %s: it now names another process", pid, self._pids_path)
            else:
                live.append(pid)
        return live

    def prune(self) -> list[int]:
        pids, times = self._load()
        live = self._live(pids, times)
        if live != pids or set(times) - set(live):
            self._save(live, times)
        return live

    def add(self, pid: int) -> None:
        pids, times = self._load()
        live = self._live(pids, times)
        if pid not in live:
            live.append(pid)
        started = self._start_time(pid)
        if started:
            times[pid] = started
        self._save(live, times)

    def remove(self, pid: int) -> list[int]:
        """Detach ``pid``; return the pids still attached."""
        pids, times = self._load()
        live = [p for p in self._live(pids, times) if p != pid]
        self._save(live, times)
        return live
