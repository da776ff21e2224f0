"""Every exception oban_py raises on purpose.

One root, :class:`ObanError`, so callers can catch everything we raise deliberately. Input problems
derive from :class:`ValidationError` (also a ``ValueError``) and always name the offending field and value,
and they are raised before anything is written. Database trouble that a caller can retry is
:class:`DatabaseUnavailable`; its message never contains a password.
"""

from __future__ import annotations

import reprlib
from typing import Any

from ._secrets import mask_secrets, mask_value

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "EmbeddedUnavailable",
    "InstanceNotFound",
    "JobNotFound",
    "LimitOptionsError",
    "MigrationError",
    "ObanError",
    "UniqueConflict",
    "UniqueOptionsError",
    "UnknownWorker",
    "ValidationError",
]


class _BoundedRepr(reprlib.Repr):
    """A repr that stays small and safe for hostile values: cyclic or deeply nested containers, huge
    strings, ints too long for ``str()``."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 8
        self.maxstring = self.maxother = 100
        self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # also beyond what str() may convert (sys.get_int_max_str_digits)
            return f"<int of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= self.maxstring else repr(x[: self.maxstring - 3]) + "..."


_REPR = _BoundedRepr()


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; safe for any value (never raises, never huge)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ must not hide the error being reported
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ObanError(Exception):
    """Root of every error oban_py raises on purpose."""


class ValidationError(ObanError, ValueError):
    """Bad input, caught before anything is written.

    ``field`` is a dotted path to what was wrong (``"args.when"``, ``"unique.period"``), ``value`` the
    value that was given and ``reason`` what is expected instead.
    """

    def __init__(self, field: str, value: Any, reason: str, *, worker: str | None = None) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.worker = worker
        where = f" (worker {worker})" if worker else ""
        super().__init__(f"{field}={short_repr(value)}{where}: {reason}")


class UniqueOptionsError(ValidationError):
    """An invalid ``unique=`` option: unknown field or state, bad period, missing key path."""


class LimitOptionsError(ValidationError):
    """An invalid concurrency or rate limit option."""


class ConfigError(ObanError):
    """Configuration that cannot be used: malformed TOML, unknown keys, bad values.

    Names the key, the value and the file (or ``"env"``/``"arguments"``) it came from. Passwords of
    DSN-looking values (``scheme://user:pass@...``, ``password=...``) are masked, in ``value`` as in the
    message, wherever in the value they sit and whatever the key.
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, source: str | None = None):
        self.key = key
        self.value = mask_value(value)
        self.source = source
        parts = []
        if source:
            parts.append(source)
        if key:
            parts.append(f"{key}={short_repr(self.value)}" if value is not None else key)
        prefix = ": ".join(parts)
        super().__init__(mask_secrets(f"{prefix}: {message}" if prefix else message))


class UnknownWorker(ObanError):
    """A worker name that is not in this process's registry.

    Raised on insert of an unregistered name, and recorded as the error of a job whose ``worker`` column
    names a worker this process does not have. Nothing is ever imported from that name.
    """

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = known or []
        hint = ""
        if self.known:
            hint = f"; registered workers: {', '.join(sorted(self.known)[:10])}"
            if len(self.known) > 10:
                hint += ", ..."
        super().__init__(
            f"worker {name!r} is not registered in this process (import its module, or list it under "
            f"`modules` in oban.toml){hint}"
        )


class UniqueConflict(ObanError):
    """Moving a job into a state would make it a second holder of a unique key.

    Raised by :meth:`Oban.retry_job` and friends; ``holder_id`` is the job that holds the key now.
    """

    def __init__(
        self, job_id: int, holder_id: int, state: str | None = None, *, action: str = "retried"
    ) -> None:
        self.job_id = job_id
        self.holder_id = holder_id
        self.holder_state = state
        held = f" ({state})" if state else ""
        super().__init__(
            f"job {job_id} cannot be {action}: its unique key is held by job {holder_id}{held}; cancel or "
            f"delete job {holder_id} first, or retry with unique checks bypassed"
        )


class JobNotFound(ObanError, LookupError):
    """No job with that id exists (it may have been pruned)."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} does not exist")


class InstanceNotFound(ObanError, LookupError):
    """``Worker.enqueue`` (or a ``@job`` function's) found no started :class:`Oban` instance of the
    worker's ``oban=`` name (or the default) to insert through."""


class DatabaseUnavailable(ObanError, ConnectionError):
    """The database could not be reached or the connection was lost; safe to retry.

    The message names the host and database but never the password.
    """


class MigrationError(ObanError):
    """The schema is missing, too old, or a migration failed."""


class EmbeddedUnavailable(ObanError):
    """No DSN was given and the embedded PostgreSQL could not be started."""
