"""``oban-py start``: run the configured queues until told to stop.

Signals: the first SIGTERM or SIGINT stops fetching and lets running jobs finish for up to
``shutdown_timeout`` seconds, then puts unfinished jobs back in the queue; a second SIGTERM/SIGINT, or
SIGQUIT, exits at once (jobs left executing are rescued by other nodes after ``rescue_after``).

Worker modules listed in ``modules`` are imported with the current directory on ``sys.path``, so
``oban-py start`` run from a project root finds the project's packages without ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Any

from .config import Config
from .errors import ConfigError
from .oban import Oban

__all__ = ["import_modules", "run"]

log = logging.getLogger("oban_py.runner")


def import_modules(modules: list[str], source: str = "modules") -> None:
    """Import worker modules (registering their workers); errors name the module."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(
                f"could not import module {name!r}: {type(exc).__name__}: {exc}",
                key="modules",
                value=name,
                source=source,
            ) from None


async def run(config: Config, *, ready: Any = None) -> int:
    """Start an Oban with ``config`` and run until a signal asks it to stop. Returns the exit code."""
    if not config.queues:
        raise ConfigError("no queues to run: add a [queues] table or pass --queues default:10", key="queues")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signum == signal.SIGQUIT or signals_seen > 1:
            log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        log.info(
            "%s received: finishing running jobs (up to %ss); send it again to exit now",
            signal.Signals(signum).name,
            config.shutdown_timeout,
        )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    oban = Oban(config=config)
    try:
        await oban.start()
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        try:
            # Every step of stop() is bounded; this is the backstop that keeps a runner from hanging
            # past what an orchestrator allows (it would SIGKILL it anyway).
            await asyncio.wait_for(oban.stop(), config.shutdown_timeout + 15.0)
        except asyncio.TimeoutError:
            log.error("shutdown did not finish in %ss; exiting", config.shutdown_timeout + 15.0)
            logging.shutdown()
            os._exit(1)
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
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0
