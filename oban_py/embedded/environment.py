"""What the PostgreSQL programs run with: a locale that exists, a clean environment, and a non-root user.

* **Locale**: ``initdb`` takes its locale from the environment and fails on one that is not installed, so
  the programs get ``LC_ALL=C.UTF-8`` (or ``C`` when the C library lacks it) in a copied environment without
  ``PG*`` variables; the caller's ``os.environ`` is never modified.
* **Running as root**: ``initdb`` and ``postgres`` refuse to run as root. The server then runs as the system
  user ``pgserver`` (created by the wheel's helper), which must be able to traverse to the data directory and
  to the wheel's binaries: an ancestor lacking the "others may search" bit gets *only* that bit (``o+x``).
"""

from __future__ import annotations

import ctypes
import locale
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

from ..errors import EmbeddedUnavailable
from .backend import OWN_DB_HINT, Backend

if sys.platform != "win32":
    import pwd

__all__ = ["SYSTEM_USER", "child_env", "is_root", "prepare_root", "server_locale"]

log = logging.getLogger("oban_py.embedded")

SYSTEM_USER = "pgserver"

_LOCALE: str | None = None
_PREPARED_BINS: set[Path] = set()  # wheel installs already opened to SYSTEM_USER by this process


def server_locale() -> str:
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


def child_env() -> dict[str, str]:
    """Environment for initdb/pg_ctl/postgres: the caller's minus PG* and locale variables, plus LC_ALL."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "LC_")) and k not in ("LANG", "LANGUAGE")
    }
    env["LC_ALL"] = env["LANG"] = server_locale()
    return env


def is_root() -> bool:
    return sys.platform != "win32" and os.geteuid() == 0


def prepare_root(backend: Backend, bin_dir: Path, data_dir: Path) -> tuple[int, int]:
    """As root: create ``pgserver``, let it reach the binaries and the data dir, and chown the latter."""
    try:
        backend.utils.ensure_user_exists(SYSTEM_USER)
        entry = pwd.getpwnam(SYSTEM_USER)
    except (OSError, KeyError, subprocess.CalledProcessError) as exc:
        raise EmbeddedUnavailable(
            f"running as root: PostgreSQL refuses to run as root and creating the system user "
            f"{SYSTEM_USER!r} failed ({exc}); create it (useradd {SYSTEM_USER}) or run as a normal "
            f"user, {OWN_DB_HINT}"
        ) from exc
    owner = (entry.pw_uid, entry.pw_gid)
    install = bin_dir.parent
    if install not in _PREPARED_BINS:
        _open_search(install)
        _open_tree(install)
        _PREPARED_BINS.add(install)
    _open_search(data_dir)
    st = data_dir.stat()
    if (st.st_uid, st.st_gid) != owner:
        log.info("chowning %s to %s (the server cannot run as root)", data_dir, SYSTEM_USER)
        for dirpath, dirnames, filenames in os.walk(data_dir):
            os.chown(dirpath, *owner)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)
    return owner


def _open_search(path: Path) -> None:
    """Add o+x (search, never read) to each ancestor of ``path`` lacking it, so ``pgserver`` can reach it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("adding o+x to %s so the %r user can reach %s", parent, SYSTEM_USER, path)
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
