"""Server settings: ``EmbeddedPostgres(settings={"fsync": "off"})`` written to ``<pgdata>/oban_py.conf``.

The file is included at the end of ``postgresql.conf`` (so ``ALTER SYSTEM`` still wins). When settings change
on a running server it is reloaded, or restarted if a changed setting has ``postmaster`` context (as read from
``postgres --describe-config``), which drops every attached process's connections. A given ``settings``
replaces the whole file; ``settings=None`` leaves whatever an earlier run wrote in place. Unknown names are
refused, and a value the server rejects is rolled back (:func:`restore_settings`) so the directory keeps
working.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import TypeAlias

from ..errors import ValidationError
from .backend import Backend
from .cluster import Cluster
from .datadir import write_atomic
from .registry import PidFile

__all__ = [
    "SettingValue",
    "apply_changed",
    "format_settings",
    "fsync_off",
    "restore_settings",
    "write_settings",
]

log = logging.getLogger("oban_py.embedded")

SettingValue: TypeAlias = str | int | float | bool

_SETTINGS_FILE = "oban_py.conf"
_INCLUDE_LINE = f"include_if_exists = '{_SETTINGS_FILE}'"
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def format_settings(settings: Mapping[str, SettingValue]) -> dict[str, str]:
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


def fsync_off(settings: Mapping[str, str] | None) -> bool:
    """Whether formatted ``settings`` turn fsync off (then initdb need not fsync the files it writes)."""
    return settings is not None and settings.get("fsync") in ("off", "'off'", "false", "'false'")


def write_settings(cluster: Cluster, settings: dict[str, str] | None) -> tuple[set[str], str | None]:
    """Write ``settings`` to the data dir; return the names whose value changed and the previous file."""
    if settings is None:
        return set(), None
    path = cluster.data_dir / _SETTINGS_FILE
    try:
        previous: str | None = path.read_text()
    except FileNotFoundError:
        previous = None
    old = _parse_settings_file(previous or "")
    new = settings
    _ensure_include(cluster)
    if old == new:
        return set(), previous
    described = cluster.describe_config()
    for name in new:
        context = described.get(name)
        if context is None and "." not in name:
            raise ValidationError(f"settings.{name}", name, "unknown PostgreSQL setting")
        if context == "internal":
            raise ValidationError(f"settings.{name}", name, "a read-only PostgreSQL setting")
    write_atomic(path, _render_settings_file(new), cluster.run_as)
    changed = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
    log.info("embedded PostgreSQL settings changed: %s", ", ".join(sorted(changed)))
    return changed, previous


def restore_settings(cluster: Cluster, previous: str | None) -> None:
    """Undo a settings change that kept the server from starting."""
    path = cluster.data_dir / _SETTINGS_FILE
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, previous, cluster.run_as)


def _ensure_include(cluster: Cluster) -> None:
    conf = cluster.data_dir / "postgresql.conf"
    text = conf.read_text()
    if _INCLUDE_LINE not in text.splitlines():
        with conf.open("a") as fh:
            fh.write(f"\n# Added by oban_py.embedded (server settings it manages)\n{_INCLUDE_LINE}\n")


def apply_changed(
    cluster: Cluster, backend: Backend, changed: set[str], info: PidFile, others: list[int]
) -> PidFile:
    """Make changed settings take effect on the running server: reload, or restart if one needs it."""
    described = cluster.describe_config()
    needs_restart = sorted(n for n in changed if described.get(n, "postmaster") == "postmaster")
    if needs_restart:
        log.info(
            "restarting embedded PostgreSQL for %s%s",
            ", ".join(needs_restart),
            f" (drops connections of attached pids {others})" if others else "",
        )
        cluster.stop_server(backend, info.pid, "fast")
        cluster.clear_stale(backend)
        return cluster.start_server(backend)
    cluster.reload()
    return info
