"""``oban-py start``: run the configured queues until told to stop.

:func:`start` runs them in this process (``processes = 1``, the default), or runs a
:class:`~oban_py.supervisor.Supervisor` of ``processes`` child processes, each running :func:`run`.

Signals: the first SIGTERM or SIGINT stops fetching and lets running jobs finish for up to
``shutdown_timeout`` seconds, then puts unfinished jobs back in the queue; a second SIGTERM/SIGINT, or
SIGQUIT, exits at once (jobs left executing are rescued by other nodes after ``rescue_after``).

``pidfile`` is written (and locked) before anything else and removed on the way out, also on the
immediate exits (see :mod:`oban_py.supervisor.pidfile`). The ``on_worker_start`` hooks run once the
queues run, ``on_worker_stop`` when a stop is requested, before the queues drain (:mod:`oban_py.hooks`).

Worker modules listed in ``modules`` are imported with the current directory on ``sys.path``, so
``oban-py start`` run from a project root finds the project's packages without ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
from typing import Any

from .config import Config
from .errors import ConfigError
from .hooks import call_hooks, resolve_hooks
from .oban import Oban
from .supervisor import Pidfile, Supervisor

__all__ = ["failure_location", "import_modules", "require_queues", "run", "start", "warn_embedded"]

log = logging.getLogger("oban_py.runner")


def import_modules(modules: list[str], source: str = "modules") -> None:
    """Import worker modules (registering their workers); an error names the module and, in one line,
    the file and line that failed (a traceback through importlib says less and takes forty lines)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            where = failure_location(exc, cwd)
            text = exc.msg if isinstance(exc, SyntaxError) else str(exc)  # its str repeats file and line
            message = " ".join(f"{type(exc).__name__}: {text}".split())  # one line, whatever the text
            raise ConfigError(
                f"could not import module {name!r}: {message}{f' (at {where})' if where else ''}",
                key="modules",
                value=name,
                source=source,
            ) from None


def failure_location(exc: BaseException, root: str) -> str | None:
    """``path:line`` where an import failed: a SyntaxError's own position, else the innermost frame in
    the project (under ``root``), else the innermost one outside importlib's machinery."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{_relative(exc.filename, root)}:{exc.lineno}"
    machinery = (__file__, os.path.dirname(importlib.__file__ or "") + os.sep)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen", *machinery)) and f.filename != __file__
    ]
    if not frames:
        return None  # it failed in the import itself: the module is missing, and the message says so
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(root + os.sep)]
    frame = (ours or frames)[-1]
    return f"{_relative(frame.filename, root)}:{frame.lineno}"


def _relative(path: str, root: str) -> str:
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else full


def warn_embedded(config: Config) -> None:
    """One line saying that no DSN was found, so the embedded server runs (fine on a laptop, a surprise
    in production), and where its data lives."""
    from .embedded.datadir import default_data_dir, resolve

    data_dir = resolve(config.embedded_dir) if config.embedded_dir else default_data_dir()
    log.warning(
        "no DSN configured (dsn, OBAN_DSN or DATABASE_URL): using the embedded PostgreSQL in %s, a "
        "development default",
        data_dir,
    )


def require_queues(config: Config) -> None:
    if not config.queues:
        raise ConfigError("no queues to run: add a [queues] table or pass --queues default:10", key="queues")


def start(config: Config, *, source: str = "modules") -> int:
    """``oban-py start``: the queues in this process, or under a supervisor. Returns the exit code."""
    require_queues(config)
    if not config.dsn:
        warn_embedded(config)  # once, also with a supervisor (its children share the server)
    if config.processes > 1:
        return Supervisor(config).run()
    with Pidfile(config.pidfile) if config.pidfile else contextlib.nullcontext() as pidfile:
        import_modules(config.modules, source=source)
        return asyncio.run(run(config, pidfile=pidfile))


async def run(
    config: Config,
    *,
    ready: Any = None,
    stop: asyncio.Event | None = None,
    pidfile: Pidfile | None = None,
    repeat_exits: bool = True,
) -> int:
    """Start an Oban with ``config`` and run until a signal (or ``stop``) asks it to stop. Returns the
    exit code. ``pidfile`` is released before an immediate exit, which skips every ``finally``.

    ``repeat_exits=False`` (a supervised child) makes a repeated SIGTERM/SIGINT harmless: the
    supervisor escalates with SIGQUIT itself, and a service manager that signals every process of the
    unit (systemd's default ``KillMode``) must not turn its TERM and the supervisor's into "exit now".
    """
    require_queues(config)
    started_hooks = resolve_hooks(config, "on_worker_start")
    stopping_hooks = resolve_hooks(config, "on_worker_stop")
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals_seen = 0

    def exit_now(status: int) -> None:
        if pidfile is not None:
            pidfile.release()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signum == signal.SIGQUIT or (signals_seen > 1 and repeat_exits):
            log.warning("%s received: exiting now", signal.Signals(signum).name)
            exit_now(1)
        if signals_seen > 1:
            return  # already stopping
        log.info(
            "%s received: finishing running jobs (up to %ss); %s",
            signal.Signals(signum).name,
            config.shutdown_timeout,
            "send it again to exit now" if repeat_exits else "SIGQUIT exits now",
        )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    oban = Oban(config=config)
    running = False
    try:
        await oban.start()
        running = True
        await call_hooks(started_hooks, "on_worker_start")
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        if running:
            await call_hooks(stopping_hooks, "on_worker_stop")
        try:
            # Every step of stop() is bounded; this is the backstop that keeps a runner from hanging
            # past what an orchestrator allows (it would SIGKILL it anyway).
            await asyncio.wait_for(oban.stop(), config.shutdown_timeout + 15.0)
        except asyncio.TimeoutError:
            log.error("shutdown did not finish in %ss; exiting", config.shutdown_timeout + 15.0)
            exit_now(1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.remove_signal_handler(sig)
        if oban.stuck_jobs:
            # Bodies that ignore their interrupt cannot be stopped from inside the process (a thread, or
            # a task that swallows CancelledError) and would keep the interpreter from exiting. End the
            # process: the jobs stay claimed by this node and are rescued rescue_after from now.
            log.error(
                "exiting with job(s) %s still running; they are rescued %ss after this process exits",
                ", ".join(map(str, oban.stuck_jobs)),
                config.rescue_after,
            )
            exit_now(0)
    return 0
