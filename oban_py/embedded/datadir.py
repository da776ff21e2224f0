"""The data directory: where it is by default, which paths can hold it, its lock, and atomic writes in it.

The path must be short enough for ``<dir>/.s.PGSQL.<port>`` to fit in a unix socket address (about 92 bytes
on Linux) and may only contain letters, digits, ``_``, ``.``, ``-`` and ``/``, because it is passed through
``pg_ctl``'s shell command and the DSN's query string; anything else is refused before anything is written.
The default location is ``$OBAN_EMBEDDED_DIR``, else ``~/.cache/oban_py/pg<major>``, else
``/tmp/oban_py-<uid>/pg<major>`` (see :func:`default_data_dir`).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import EmbeddedUnavailable
from .backend import major_version
from .environment import is_root

if sys.platform != "win32":
    import fcntl

__all__ = ["DIR_HINT", "check_path", "default_data_dir", "dir_lock", "resolve", "write_atomic"]

DIR_HINT = "set OBAN_EMBEDDED_DIR (or pass data_dir=) to a short path without spaces, like /tmp/oban_py/pg"
_LOCK_TIMEOUT = 180.0
_SAFE_PATH = re.compile(r"[\w./-]+")
# The longest socket file name postgres creates in the data directory: ".s.PGSQL.65535".
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")


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


def check_path(path: Path) -> None:
    problem = _path_problem(path)
    if problem is not None:
        raise EmbeddedUnavailable(f"embedded PostgreSQL data directory {str(path)!r} {problem}; {DIR_HINT}")


def resolve(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir).expanduser().resolve()


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
    root = is_root()
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
    root = is_root()
    try:
        parent.mkdir(mode=0o711 if root else 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise EmbeddedUnavailable(f"cannot create {parent} ({exc}); {DIR_HINT}") from exc
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or (sys.platform != "win32" and st.st_uid != uid):
        raise EmbeddedUnavailable(
            f"{parent} exists but is not a directory owned by you (a symlink or another user's file); "
            f"remove it, or {DIR_HINT}"
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
        path = resolve(override)
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o711 if is_root() else 0o700, parents=True, exist_ok=True)
        return path
    name = f"pg{major_version()}"
    return _cache_location(name) or _temp_location(name)


def write_atomic(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` by a rename, so another process reads the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


@contextlib.contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on the data directory: serialises start/stop/restart across processes and threads."""
    if sys.platform == "win32":  # pragma: no cover - refused earlier
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise EmbeddedUnavailable(f"cannot open the data directory {path} ({exc}); {DIR_HINT}") from exc
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
