"""Connections: creating the pool, recognising lost connections, and unwrapping a caller's connection.

Lost connections are expected (a restarted server, ``pg_terminate_backend``, a failover); every
engine loop catches :class:`~oban_py.errors.DatabaseUnavailable`, backs off and resumes.
:func:`is_transient` decides which driver errors mean "the connection or server went away" (retry) as
opposed to "this statement is wrong" (a bug to surface).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ..embedded import masked_dsn
from ..errors import DatabaseUnavailable

__all__ = ["create_pool", "is_transient", "raw_connection", "unavailable"]

# SQLSTATE classes/codes that mean the connection or server is gone or not ready (not a bad statement).
_TRANSIENT_SQLSTATE_PREFIXES = ("08",)  # connection exceptions
_TRANSIENT_SQLSTATES = {
    "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up / shutting down)
    "53300",  # too_many_connections
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "25P03",  # idle_in_transaction_session_timeout
    "57014",  # query_canceled (statement_timeout)
}


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` means the database was unreachable or the connection was lost."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, (OSError, asyncio.TimeoutError, ConnectionError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return code in _TRANSIENT_SQLSTATES or code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def unavailable(exc: BaseException, where: str = "") -> DatabaseUnavailable:
    reason = str(exc).strip() or type(exc).__name__
    text = f"database unavailable{f' ({where})' if where else ''}: {type(exc).__name__}: {reason}"
    return DatabaseUnavailable(text)


async def _reset(conn: asyncpg.Connection) -> None:
    """Cheap pool reset: only roll back a transaction left open by an abnormal exit.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; ...`` on every release, a full round trip
    that halved single-insert throughput. The engine leaves no session state behind (locks and
    settings are transaction-scoped; the notifier removes its listeners), so nothing else is needed.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "oban_py",
    connect_timeout: float = 10.0,
) -> asyncpg.Pool:
    """Create an asyncpg pool; an unreachable server raises DatabaseUnavailable with a masked DSN."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            command_timeout=None,
            max_inactive_connection_lifetime=300.0,
            reset=_reset,
            server_settings={"application_name": application_name},
        )
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise DatabaseUnavailable(
            f"could not connect to {masked_dsn(dsn)}: {reason}. Check that PostgreSQL is running and the "
            f"DSN (OBAN_DSN, dsn= or `dsn` in oban.toml) is right"
        ) from None
    assert pool is not None
    return pool


async def raw_connection(conn: Any) -> Any:
    """The asyncpg connection behind ``conn``.

    Accepts an asyncpg connection (or pool proxy), or a SQLAlchemy ``AsyncConnection`` /
    ``AsyncSession`` using the asyncpg driver; statements then run inside the caller's transaction
    and roll back with it.
    """
    if (
        isinstance(conn, asyncpg.Connection)
        or hasattr(conn, "_con")
        or type(conn).__name__ == "PoolConnectionProxy"
    ):
        return conn
    module = type(conn).__module__
    if module.startswith("sqlalchemy"):
        if hasattr(conn, "get_raw_connection"):  # AsyncConnection
            async_conn = conn
        elif hasattr(conn, "connection"):  # AsyncSession
            async_conn = await conn.connection()
        else:  # pragma: no cover - other SQLAlchemy objects
            raise TypeError(f"cannot use {type(conn).__name__} as a connection")
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, on its first statement; make sure the
        # caller's transaction exists before we write through the raw connection.
        await async_conn.exec_driver_sql("SELECT 1")
        fairy = await async_conn.get_raw_connection()
        driver = getattr(fairy, "driver_connection", None)
        if not isinstance(driver, asyncpg.Connection):
            raise TypeError(
                "conn= needs SQLAlchemy's asyncpg driver (postgresql+asyncpg://...), got "
                f"{type(driver).__name__}"
            )
        return driver
    raise TypeError(
        "conn= must be an asyncpg connection or a SQLAlchemy AsyncConnection/AsyncSession, "
        f"not {type(conn).__name__}"
    )
