"""Connections: creating the pool, recognising lost connections, and unwrapping a caller's connection.

Lost connections are expected (a restarted server, ``pg_terminate_backend``, a failover); every
engine loop catches :class:`~oban_py.errors.DatabaseUnavailable`, backs off and resumes.
:func:`is_transient` decides which driver errors mean "the connection or server went away" (retry) as
opposed to "this statement is wrong" (a bug to surface); :func:`connection_broken` decides whether the
connection an error came from may be used again.

During an outage asyncpg's pool keeps trying to restore its ``min_size`` connections in the background
and logs a full traceback for every failed attempt. :func:`quiet_pool_log` (installed by the driver)
turns that into one line per outage; errors that do not mean "unreachable" still log in full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from .._secrets import dsn_problem, mask_secrets, masked_dsn
from ..errors import ConfigError, DatabaseUnavailable

__all__ = [
    "connect_like",
    "connection_broken",
    "create_pool",
    "is_transient",
    "pool_recovered",
    "quiet_pool_log",
    "raw_connection",
    "unavailable",
]

# SQLSTATE classes/codes that mean the connection or server is gone or not ready (not a bad statement).
_TRANSIENT_SQLSTATE_PREFIXES = ("08",)  # connection exceptions
_TRANSIENT_SQLSTATES = {
    "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up / shutting down)
    "57P05",  # idle_session_timeout
    "53300",  # too_many_connections
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "25P03",  # idle_in_transaction_session_timeout
    "57014",  # query_canceled (statement_timeout)
}
# Server errors after which the server closes the session: the connection must not be reused.
_SESSION_ENDING_SQLSTATES = {"57P01", "57P02", "57P03", "57P05", "25P03"}
_SESSION_ENDING_SEVERITIES = {"FATAL", "PANIC"}
# Client-side errors about a statement's arguments or the configuration, not about the connection.
_STATEMENT_INTERFACE_ERRORS = (
    asyncpg.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` means the database was unreachable or the connection was lost.

    Besides network errors and connection SQLSTATEs this covers asyncpg's ``InterfaceError`` (closed or
    released connection, "another operation is in progress") and ``InternalClientError`` (a protocol
    left mid-operation by a killed backend), but not ``DataError`` and other errors about a statement's
    arguments, which would fail the same way on any connection.
    """
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, _STATEMENT_INTERFACE_ERRORS):
        return False
    if isinstance(
        exc,
        (OSError, asyncio.TimeoutError, ConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError),
    ):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return code in _TRANSIENT_SQLSTATES or code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def connection_broken(exc: BaseException) -> bool:
    """True unless ``exc`` is a server-side SQL error that leaves its connection usable.

    An ordinary ``ERROR`` (a constraint, a lock timeout, a cancelled statement) ends with the server
    ready for the next query. A ``FATAL`` one (``pg_terminate_backend``, a shutdown, class 08) ends the
    session, and asyncpg may not have noticed the socket closing yet; anything else (a cancelled or
    timed-out query, an interface or protocol error) may leave the connection mid-operation.
    """
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    code = getattr(exc, "sqlstate", None) or ""
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    return (
        code in _SESSION_ENDING_SQLSTATES
        or code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
        or severity in _SESSION_ENDING_SEVERITIES
    )


def unavailable(exc: BaseException, where: str = "") -> DatabaseUnavailable:
    reason = str(exc).strip() or type(exc).__name__
    text = f"database unavailable{f' ({where})' if where else ''}: {type(exc).__name__}: {reason}"
    return DatabaseUnavailable(text)


async def connect_like(pool: asyncpg.Pool) -> asyncpg.Connection:
    """A new connection outside ``pool``, made with the pool's own connect arguments.

    Same DSN, timeouts, server settings (``application_name`` included), connection and record classes,
    and ``connect=`` callable if the pool was given one, so it reaches the same server the same way. The
    pool's ``init``/``setup`` callbacks are not run: the connection is for the engine's own use (LISTEN,
    heartbeats), not for a caller's queries.
    """
    args = tuple(getattr(pool, "_connect_args", ()) or ())
    kwargs: dict[str, Any] = dict(getattr(pool, "_connect_kwargs", None) or {})
    connect = getattr(pool, "_connect", None) or asyncpg.connect
    conn: asyncpg.Connection = await connect(
        *args,
        connection_class=getattr(pool, "_connection_class", asyncpg.Connection),
        record_class=getattr(pool, "_record_class", asyncpg.Record),
        **kwargs,
    )
    return conn


class _PoolLogFilter(logging.Filter):
    """One line per outage for asyncpg's pool, instead of a traceback per reconnect attempt.

    A record from ``asyncpg.pool`` carrying a transient error (server down, refused, shutting down) is
    shortened to one line without the traceback the first time, and dropped while the outage lasts;
    the outage ends when a connection succeeds (:meth:`recovered`, called by the leases) or after
    ``quiet_for`` seconds without such a record. Records with any other error, or none, pass as they are.
    """

    def __init__(self, quiet_for: float = 180.0) -> None:
        super().__init__()
        self.quiet_for = quiet_for
        self._last: float | None = None  # when the last transient record of this outage was seen
        self.suppressed = 0

    def recovered(self) -> None:
        self._last = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not is_transient(exc):
            return True
        now = time.monotonic()
        ongoing = self._last is not None and now - self._last < self.quiet_for
        self._last = now
        if ongoing:
            self.suppressed += 1
            return False
        message = record.getMessage()
        reason = str(exc).strip() or type(exc).__name__
        record.msg = "%s (%s: %s); further failures are not logged until the database is reachable again"
        record.args = (message, type(exc).__name__, reason)
        record.exc_info = None
        record.exc_text = None
        return True


_pool_log_filter = _PoolLogFilter()


def quiet_pool_log() -> None:
    """Install the one-line-per-outage filter on asyncpg's pool logger (idempotent)."""
    logger = logging.getLogger("asyncpg.pool")
    if _pool_log_filter not in logger.filters:
        logger.addFilter(_pool_log_filter)


def pool_recovered() -> None:
    """A pool connection succeeded: the next outage is logged again."""
    _pool_log_filter.recovered()


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
    """Create an asyncpg pool; an unreachable server raises DatabaseUnavailable with a masked DSN.

    No ``command_timeout``: a migration or a caller's statement may legitimately run long. The engine's
    own loops (producers, maintenance, heartbeats) put their own deadlines on every statement instead.
    """
    problem = dsn_problem(dsn)
    if problem is not None:
        raise ConfigError(f"invalid DSN {masked_dsn(dsn)}: {problem}", key="dsn")
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
        reason = mask_secrets(str(exc).strip()) or type(exc).__name__
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
