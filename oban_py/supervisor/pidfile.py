"""The ``pidfile`` of ``oban-py start``: the runner's pid, in a file locked for as long as it runs.

A live holder is recognised by its lock (``flock``), not by the pid written in the file: a pidfile left
by a killed process is unlocked, so it is stale and replaced even when its pid now belongs to another
process (pids are reused, in containers especially: every container's first process is pid 1). The pid
is still written, for ``kill $(cat oban.pid)`` and for health checks. The lock is released by the
kernel when the process dies, however it dies; the file is removed on a normal exit.

Linux and macOS (``flock``); on Windows a pidfile is a :class:`~oban_py.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, ObanError

__all__ = ["Pidfile", "PidfileHeld"]

log = logging.getLogger("oban_py.supervisor")

# A holder may unlink the file between our open() and flock(): we then hold a lock on a file nobody
# sees, and open again. Two rounds suffice unless other starters keep racing us.
_ATTEMPTS = 5


class PidfileHeld(ObanError):
    """Another running process holds the pidfile: refuse to start a second runner on it."""


class Pidfile:
    """``acquire()`` writes and locks the file (or raises :class:`PidfileHeld`); ``release()`` removes
    it. Also a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> Pidfile:
        return self.acquire()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()

    def acquire(self) -> Pidfile:
        if sys.platform == "win32":  # pragma: no cover - no flock on Windows
            raise ConfigError("a pidfile needs Linux or macOS", key="pidfile", value=str(self.path))
        import fcntl

        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(
                    f"cannot open the pidfile: {exc.strerror}", key="pidfile", value=str(self.path)
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise PidfileHeld(
                    f"pidfile {self.path} is held by running process {holder or '(unknown pid)'}: "
                    "another `oban-py start` runs with it; stop it first or choose another --pidfile"
                ) from None
            if _is_linked(fd, self.path):
                break
            os.close(fd)
        else:
            raise PidfileHeld(f"pidfile {self.path} keeps being replaced by other processes")
        stale = _read_pid(fd)
        if stale is not None and stale != os.getpid():
            log.info(
                "replacing stale pidfile %s (left by pid %s, which no longer holds it)", self.path, stale
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _is_linked(fd, self.path):
                self.path.unlink()
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _is_linked(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
