"""Keeping the DSN's password out of everything that is printed: reprs, errors, logs, CLI output.

* :func:`masked_dsn` masks the password of one DSN (a URL or a libpq ``key=value`` string).
* :func:`mask_secrets` masks every DSN-looking piece of a free text (``scheme://user:pass@``,
  ``password=...``): error messages that echo a value run through it.
* :func:`mask_value` masks the strings inside a config value (a list, a table) before it is echoed.
* :class:`Dsn` is the type of ``Config.dsn``: a ``str`` (so code that connects gets the real value)
  whose ``repr`` is masked, so ``repr(config)``, ``str(config)`` and ``config.model_dump_json()`` never
  show the password.
* :func:`dsn_problem` says why asyncpg could not parse a DSN (without quoting it), so a malformed DSN is a
  one-line :class:`~oban_py.errors.ConfigError` at configuration time, not a traceback at connect time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from pydantic import GetCoreSchemaHandler, SecretStr
from pydantic_core import core_schema

__all__ = ["Dsn", "dsn_problem", "mask_secrets", "mask_value", "masked_dsn"]

_URL_PREFIX = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_PASSWORD = re.compile(r"([?&;](?:ssl)?password=)[^&#]*", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*(?:'|$)|[^\s']\S*)", re.IGNORECASE)
# In free text a DSN ends at whitespace or a quote. The password part is greedy up to the last "@" of that
# run, so an unencoded "@", "/", "?" or "#" in it is masked too.
_TEXT_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'\"]*:)[^\s'\"]*(@)")
_TEXT_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)([^\s&'\"]+)", re.IGNORECASE)
_MASK = "***"


def masked_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, for logs and error messages.

    Handles URLs (``scheme://user:pw@host/db``, including unencoded ``@``, ``/`` or ``?`` in the password,
    where it masks more rather than less), ``password=``/``sslpassword=`` query parameters and libpq
    ``key=value`` strings with quoted values.
    """
    dsn = str.__str__(dsn)  # a plain str, also for a Dsn
    match = _URL_PREFIX.match(dsn)
    if match is None:
        return _KV_PASSWORD.sub(r"\1***", dsn)
    head, rest = dsn[: match.end()], dsn[match.end() :]
    netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, netloc_end)
    if at < 0:
        # No userinfo in the authority as urllib sees it; an "@" further on means a password holding "/", "?"
        # or "#" unencoded, which libpq and urllib read differently: mask up to the last "@".
        at = rest.rfind("@")
    colon = rest.find(":")
    if 0 <= colon < at:
        rest = rest[: colon + 1] + _MASK + rest[at:]
    return head + _QUERY_PASSWORD.sub(r"\1***", rest)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every DSN-looking piece in it (``scheme://user:pw@``,
    ``password=pw``) replaced by ``***``."""
    if "://" not in text and "assword" not in text.lower():
        return text
    text = _TEXT_USERINFO.sub(r"\1***\2", text)
    return _TEXT_PASSWORD.sub(r"\1***", text)


def mask_value(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with every string in it masked (for echoing config values in errors).

    Strings that are a whole DSN go through :func:`masked_dsn`, other strings through
    :func:`mask_secrets`; lists, tuples and mappings are copied (to a bounded depth); anything else is
    returned as is.
    """
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        plain = str.__str__(value)
        return masked_dsn(plain) if _URL_PREFIX.match(plain) else mask_secrets(plain)
    if _depth > 20:
        return value
    if isinstance(value, list):
        return [mask_value(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(mask_value(v, _depth + 1) for v in value)
    if isinstance(value, Mapping):
        return {mask_value(k, _depth + 1): mask_value(v, _depth + 1) for k, v in value.items()}
    return value


_SCHEMES = frozenset({"postgresql", "postgres"})
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_URL_HINT = "a postgresql:// URL, e.g. postgresql://app@db.internal:5432/app (password after 'app:')"
_ENCODE_HINT = "percent-encode it (@ as %40, / as %2F, ? as %3F, # as %23, : as %3A)"


def _port_ok(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _hosts_problem(hostspec: str) -> str | None:
    """What asyncpg's host list parser would choke on in ``host1:port1,[v6]:port2``."""
    for spec in hostspec.split(",") if hostspec else ():
        if not spec:
            return "has an empty host in its host list"
        if spec.startswith("/"):
            continue
        if spec.startswith("["):
            m = re.fullmatch(r"\[[^\]]+\](?::(.*))?", spec)
            if m is None:
                return "has an invalid IPv6 host (write it as [::1] or [::1]:5432)"
            port = m.group(1)
        else:
            port = spec.partition(":")[2] if ":" in spec else None
        if port is not None and not _port_ok(unquote(port)):
            return "has a port that is not a number from 1 to 65535"
    return None


def dsn_problem(dsn: str) -> str | None:
    """Why ``dsn`` is not a DSN asyncpg can use, or None. The reason never quotes the DSN.

    Mirrors what asyncpg's parser rejects (or misreads) so that a bad DSN fails when the config is
    built: a wrong scheme, an invalid URL, a user name or password holding an unencoded ``@ / ? #``,
    a port that is not a number from 1 to 65535, a malformed query string, an unknown ``sslmode``.
    """
    if "\x00" in dsn:
        return "must not contain a NUL character"
    if _URL_PREFIX.match(dsn) is None:
        if "=" in dsn:
            return f"must be {_URL_HINT}; libpq key=value strings are not supported"
        return f"must be {_URL_HINT}"
    try:
        parts = urlparse(dsn)
        netloc, query = parts.netloc, parts.query
    except ValueError as exc:
        hint = " (unbalanced [ ] around an IPv6 address?)" if "IPv6" in str(exc) else ""
        return f"is not a valid URL{hint}"
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        if scheme.startswith(("postgresql+", "postgres+")):
            return "must use the postgresql:// scheme (drop the SQLAlchemy driver suffix, e.g. +asyncpg)"
        return "must use the postgresql:// (or postgres://) scheme"
    if netloc.count("@") > 1:
        return f"the user name or password holds an unencoded '@': {_ENCODE_HINT}"
    hostspec = netloc.partition("@")[2] if "@" in netloc else netloc
    host_problem = _hosts_problem(hostspec)
    if "@" not in netloc:
        # "user:pa/ss@host": urllib ends the authority at the first "/", "?" or "#", so the rest of the
        # password and the host became path, query or fragment (and the password's start a "port").
        rest = "".join((parts.path, parts.params, parts.query, parts.fragment))
        if "@" in parts.path or ("@" in rest and host_problem is not None):
            return f"the password (or user name) holds an unencoded '/', '?' or '#': {_ENCODE_HINT}"
    if host_problem is not None:
        return host_problem
    if query:
        try:
            params = parse_qs(query, strict_parsing=True)
        except ValueError:
            return "has a malformed query string (each parameter must be name=value, joined by &)"
        for value in params.get("port", []):
            if not all(_port_ok(p) for p in value.split(",")):
                return "has a port parameter that is not a number from 1 to 65535"
        for value in params.get("sslmode", []):
            if value not in _SSLMODES:
                return f"sslmode must be one of {', '.join(sorted(_SSLMODES))}"
    return None


class Dsn(str):
    """A DSN: the real text for code that connects, a masked one in ``repr`` and JSON dumps.

    As a pydantic field type it accepts a ``str`` (or a ``SecretStr``) and checks it with
    :func:`dsn_problem`; an empty string means "no DSN" (the embedded server).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(masked_dsn(self))

    @property
    def masked(self) -> str:
        return masked_dsn(self)

    @classmethod
    def _validate(cls, value: Any) -> Dsn:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            raise ValueError(f"must be a string: {_URL_HINT}")
        if value:
            problem = dsn_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value if type(value) is cls else cls(value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(masked_dsn, when_used="json"),
        )
