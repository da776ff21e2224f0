"""The suite's own PostgreSQL: the embedded server on a private data directory.

The shared server at 127.0.0.1:5432 (``OBAN_TEST_DSN``) is never used: this suite restarts its server
and terminates its backends, which must not disturb anyone else. The data directory is a fresh short
path under /tmp (a unix socket lives inside it), removed at the end of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from oban_py.db.migrate import migrate

# fsync off is safe here: the faults kill PostgreSQL processes, never the machine, so what reached the
# OS survives. synchronous_commit must stay on: with it off, a crash-style restart forgets transactions
# that had already returned COMMIT (a claim, an ack), which no engine can survive, and the suite would
# report double runs that a production server (synchronous_commit on) never produces.
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": 300,
}
DATABASE = "oban_faults"


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class FaultServer:
    """The embedded server, a database of the suite in it, and per-scenario schemas."""

    def __init__(self) -> None:
        from oban_py.embedded import EmbeddedPostgres

        self.data_dir = Path(tempfile.mkdtemp(prefix="obf", dir="/tmp"))
        self.pg = EmbeddedPostgres(self.data_dir, settings=SETTINGS)
        self.admin_dsn = ""
        self.dsn = ""

    def start(self) -> None:
        self.admin_dsn = self.pg.start()
        self.dsn = with_database(self.admin_dsn, DATABASE)
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{DATABASE}"', f'CREATE DATABASE "{DATABASE}"'))

    def stop(self) -> None:
        try:
            self.pg.stop()
        finally:
            _kill_leftovers(self.data_dir)
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def socket_path(self) -> str:
        """The server's unix socket (the proxy's upstream)."""
        query = parse_qs(urlsplit(self.admin_dsn).query)
        return f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}"

    def restart(self, mode: str = "fast") -> None:
        """Stop and start the server: every connection drops (``immediate``: crash and recovery)."""
        self.pg.restart(mode=mode)  # type: ignore[arg-type]

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    async def create_schema(self, prefix: str) -> None:
        conn = await connect(self.dsn)
        try:
            await migrate(conn, prefix)
        finally:
            await conn.close()

    async def drop_schema(self, prefix: str) -> None:
        with contextlib.suppress(Exception):
            conn = await connect(self.dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
            finally:
                await conn.close()


async def connect(dsn: str, timeout: float = 20.0) -> Any:
    """Connect, retrying while the server restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _kill_leftovers(directory: Path) -> None:
    """Safety net: SIGKILL postgres processes still working in ``directory``."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and Path(proc.cwd()).resolve() == directory.resolve():
                proc.kill()
        except (psutil.Error, OSError):
            continue
