"""A supervised worker process: ``python -m oban_py.supervisor.child``, started by the supervisor.

It reads its :class:`~oban_py.config.Config` from stdin (see :func:`.supervisor.frame`), then runs the
queues as a single ``oban-py start`` does (:func:`oban_py.runner.run`): TERM/INT drain, QUIT exits at
once, and a repeated TERM/INT changes nothing (the supervisor escalates with QUIT itself). Stdin, the
supervisor's pipe, is moved off fd 0 (jobs see ``/dev/null``) and watched on a thread: end-of-file
means the supervisor died without stopping us, and the child then stops as if it had been sent TERM,
so it never runs on as an orphan.

Exit status as for the CLI: 0 after a graceful stop, 1 for a runtime problem, 2 for a configuration
problem (a module that fails to import): the supervisor tells them apart in its logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from .._logging import setup_logging
from .._secrets import mask_secrets
from ..config import Config
from ..errors import ConfigError, ObanError
from ..runner import import_modules, run
from .supervisor import HEADER

__all__ = ["main", "read_config"]

log = logging.getLogger("oban_py.supervisor")


def read_config(fd: int) -> Config:
    """The config the supervisor wrote to ``fd`` (its size, then the pickled config)."""
    size = HEADER.unpack(_read_exactly(fd, HEADER.size))[0]
    config = pickle.loads(_read_exactly(fd, size))
    if not isinstance(config, Config):
        raise ConfigError(f"the supervisor sent a {type(config).__name__}, not a Config")
    return config


def _read_exactly(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise ConfigError("the supervisor closed the pipe before sending the configuration")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _watch_supervisor(fd: int, on_gone: Callable[[], None]) -> None:
    """Block on the supervisor's pipe (it never writes again) until it closes: then ``on_gone``."""
    with contextlib.suppress(OSError):
        while os.read(fd, 512):
            pass
    log.warning("the supervisor is gone: stopping", extra={"pid": os.getpid()})
    on_gone()


async def _run(config: Config, fd: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stop_soon() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping anyway
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(
        target=_watch_supervisor, args=(fd, stop_soon), name="oban-supervisor-watch", daemon=True
    ).start()
    return await run(config, stop=stop, repeat_exits=False)


def _exit_now(signum: int, _frame: object) -> NoReturn:
    # Until the runner's own handlers are installed, nothing runs yet: a stop request is a clean exit.
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        config = read_config(fd)
        setup_logging(config.log_level, config.log_format)
        import_modules(config.modules)
        return asyncio.run(_run(config, fd))
    except ConfigError as exc:
        print(f"oban-py: configuration error: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2
    except ObanError as exc:
        print(f"oban-py: {mask_secrets(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
