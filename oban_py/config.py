"""Configuration: one validated model fed by oban.toml, then the environment, then arguments.

Later layers win key by key. Every key is checked (unknown keys are errors, with a suggestion for a
near miss), and an error names the key, the value and where it came from: the TOML file's path,
``env OBAN_...``, or ``arguments``. Every key is documented in ``docs/configuration.md``.

Every key ``name`` has the variable ``OBAN_NAME``, derived from the fields (:func:`env_var`), so a new
setting needs no line here; ``OBAN_CONFIG`` names the file, and ``DATABASE_URL`` is the DSN of last
resort. ``postgresql+asyncpg://`` (SQLAlchemy) URLs lose their driver suffix.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from ._secrets import Dsn
from .cron.task import CronTaskConfig, TaskName
from .errors import ConfigError
from .hooks.lifecycle import HOOK_KEYS, HookSpec, normalize_hooks
from .limits import RateLimit
from .validation import MAX_GLOBAL_LIMIT, MAX_LOCAL_LIMIT, first_problem, validate_queue_pattern

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10
    import tomli as tomllib

__all__ = ["Config", "QueueConfig", "env_var", "load_config", "parse_queues"]

DEFAULT_FILE = "oban.toml"
_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # fullmatch: "$" would allow a trailing newline


def _pattern(value: str, field: str) -> str:
    """A queue name, or a prefix pattern ending in ``*``."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: a queue name must be a string, not {type(value).__name__}")
    try:
        return validate_queue_pattern(value, field=field)
    except ValueError as exc:  # our ValidationError, as the plain ValueError pydantic reports
        raise ValueError(str(exc)) from None


class QueueConfig(BaseModel):
    """One producer on this node: a queue, or an ordered selection of queues."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Jobs this node runs at once from the queue (or selection).
    limit: int = Field(default=10, ge=1, le=MAX_LOCAL_LIMIT)
    #: Start paused (a pause/resume made at runtime is stored in the database and wins).
    paused: bool = False
    #: Running jobs of the queue across every node.
    global_limit: int | None = Field(default=None, ge=1, le=MAX_GLOBAL_LIMIT)
    #: At most ``allowed`` starts per ``period`` seconds across every node (optionally ``by`` partition).
    rate_limit: RateLimit | None = None
    #: An ordered selection instead of one queue: names or ``prefix*`` patterns, drained in order.
    queues: list[str] | None = None

    @field_validator("queues")
    @classmethod
    def _selection(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one queue or pattern")
        return [_pattern(v, "queues") for v in value]

    @model_validator(mode="after")
    def _limits(self) -> QueueConfig:
        if self.global_limit is not None and self.limit > self.global_limit:
            raise ValueError(
                f"limit ({self.limit}) is above global_limit ({self.global_limit}): a node could never run "
                "more than the global limit; lower limit or raise global_limit"
            )
        if self.queues is not None and (self.global_limit is not None or self.rate_limit is not None):
            raise ValueError(
                "global_limit and rate_limit belong to a single queue: set them in that queue's own table"
            )
        return self


class Config(BaseModel):
    """Every setting of an Oban instance or runner. See docs/configuration.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A ``str`` whose repr (and JSON dump) masks the password; checked when the config is built.
    dsn: Dsn | None = None
    prefix: str = "public"
    node: str | None = None
    queues: dict[str, QueueConfig] = Field(default_factory=dict)
    modules: list[str] = Field(default_factory=list)
    pool_size: int = Field(default=10, ge=1, le=1000)
    notifier: Literal["listen", "poll"] = "listen"
    poll_interval: float = Field(default=1.0, gt=0, le=3600)
    heartbeat_interval: float = Field(default=5.0, gt=0, le=3600)
    rescue_after: float = Field(default=30.0, gt=0)
    stage_interval: float = Field(default=1.0, gt=0, le=3600)
    shutdown_timeout: float = Field(default=15.0, ge=0)
    #: Worker processes ``oban-py start`` runs under a supervisor (1: this process, no supervisor).
    processes: int = Field(default=1, ge=1, le=256)
    #: A file ``oban-py start`` writes its pid to (and locks) while it runs; None: no pidfile.
    pidfile: str | None = None
    prune_after: float | None = Field(default=86_400.0, gt=0)
    prune_interval: float = Field(default=60.0, gt=0)
    vacuum_interval: float | None = Field(default=2.0, gt=0)
    vacuum_threshold: int = Field(default=1000, ge=0)
    leadership: bool = True
    migrate: bool | None = None
    max_args_bytes: int = Field(default=1024 * 1024, ge=1024)
    insert_chunk_size: int = Field(default=5000, ge=1, le=50_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    embedded_dir: str | None = None
    #: Hooks (docs/hooks.md): callables or dotted paths ("myapp.hooks:started"), imported at startup.
    on_start: tuple[HookSpec, ...] = ()
    on_stop: tuple[HookSpec, ...] = ()
    on_worker_start: tuple[HookSpec, ...] = ()
    on_worker_stop: tuple[HookSpec, ...] = ()
    #: ``on_error(error, context)`` for the engine's own failures (not jobs').
    on_error: tuple[HookSpec, ...] = ()
    #: Recurring tasks, ``[cron.<name>]`` tables (see docs/recurring.md).
    cron: dict[TaskName, CronTaskConfig] = Field(default_factory=dict)

    @field_validator(*HOOK_KEYS, mode="before")
    @classmethod
    def _hooks(cls, value: Any) -> tuple[HookSpec, ...]:
        return normalize_hooks(value)

    @field_validator("dsn", mode="before")
    @classmethod
    def _dsn(cls, value: Any) -> Any:
        """``postgresql+asyncpg://`` (a SQLAlchemy URL, often the app's own) -> ``postgresql://``."""
        return _DRIVER_SUFFIX.sub(r"\1", value, count=1) if isinstance(value, str) else value

    @field_validator("processes")
    @classmethod
    def _processes(cls, value: int) -> int:
        if value > 1 and sys.platform == "win32":
            raise ValueError(
                "more than one process needs the supervisor, which runs on Linux and macOS only: "
                "on Windows set processes = 1 and start one `oban-py start` per process"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if _PREFIX_RE.fullmatch(value) is None:
            raise ValueError(
                "must be a plain PostgreSQL identifier (letters, digits, _; at most 63 characters)"
            )
        return value

    @field_validator("node")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or len(value) > 255):
            raise ValueError("must be a non-empty name of at most 255 characters")
        if value is not None and not value.isprintable():
            raise ValueError("must not contain control characters (NUL, newline...) or surrogates")
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _queues(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = parse_queues(value)
        if not isinstance(value, Mapping):
            raise ValueError("must be a table of queue = limit (or queue = {limit = n, ...})")
        out: dict[str, Any] = {}
        for name, spec in value.items():
            _pattern(
                name,
                f"queues.{name}" if isinstance(name, str) and name.isprintable() else f"queues[{name!r}]",
            )
            if isinstance(spec, bool):
                raise ValueError(f"queue {name!r}: give a limit (integer) or a table")
            spec = {"limit": spec} if isinstance(spec, int) else spec
            if name.endswith("*") and isinstance(spec, Mapping) and "queues" not in spec:
                spec = {**spec, "queues": [name]}  # "mail*" = 5: a selection of every mail... queue
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _intervals(self) -> Config:
        if self.rescue_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"rescue_after ({self.rescue_after}) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}), or live nodes would be rescued"
            )
        return self


def parse_queues(text: str) -> dict[str, int]:
    """``"default:10,mail:5"`` -> ``{"default": 10, "mail": 5}`` (a bare name gets limit 10)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, limit = part.partition(":")
        if not sep:
            out[name.strip()] = 10
            continue
        try:
            out[name.strip()] = int(limit)
        except ValueError:
            raise ValueError(f"queue {name.strip()!r}: limit {limit!r} is not an integer") from None
    return out


#: Every setting ``key`` is also the environment variable ``OBAN_<KEY>`` (``pool_size`` ->
#: ``OBAN_POOL_SIZE``), derived from the fields so a new setting gets one without a line here.
ENV_PREFIX = "OBAN_"
#: Names the TOML file when no path is given (``-c`` wins over it).
CONFIG_FILE_VAR = "OBAN_CONFIG"
#: The DSN when neither ``dsn`` nor ``OBAN_DSN`` gives one (the Heroku/Render/Railway convention).
DATABASE_URL_VAR = "DATABASE_URL"
_NULLS = frozenset({"null", "none"})
# SQLAlchemy spells the driver into the scheme; the rest of its URL is the libpq one asyncpg reads.
_DRIVER_SUFFIX = re.compile(r"^(\s*postgres(?:ql)?)\+[A-Za-z0-9_]+(?=://)", re.IGNORECASE)


def env_var(key: str) -> str:
    """The environment variable of setting ``key``: ``OBAN_`` and the key in capitals."""
    return ENV_PREFIX + key.upper()


def _kinds(annotation: Any) -> set[Any]:
    """The origins of a field's type, with ``None`` for an optional one (``list[str] | None``)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else ()
    return {None if a is type(None) else (typing.get_origin(a) or a) for a in args or (annotation,)}


def _env_value(key: str, text: str) -> Any:
    """An ``OBAN_*`` value for ``key``: JSON when it starts with ``[`` or ``{``, ``null``/``none`` for an
    optional setting, a comma-separated list for a list setting, else the text (pydantic converts
    numbers and booleans, and ``queues`` reads ``q:n,...``)."""
    kinds = _kinds(Config.model_fields[key].annotation)
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON ({exc.msg})", key=key, value=text, source="env") from None
    if stripped.lower() in _NULLS and None in kinds:
        return None
    if kinds & {list, tuple, set, frozenset}:
        return [m.strip() for m in text.split(",") if m.strip()]
    return text


def env_settings(env: Mapping[str, str], *, database_url: bool = True) -> dict[str, Any]:
    """Settings given as ``OBAN_*`` environment variables (an empty one is not set).

    With ``database_url``, ``DATABASE_URL`` is the DSN when ``OBAN_DSN`` is not set: right when the only
    later layer is arguments (``Oban(...)``); :func:`load_config` puts it below the TOML file instead.
    """
    out: dict[str, Any] = {}
    for key in Config.model_fields:
        value = env.get(env_var(key))
        if value is None or value == "":
            continue
        out[key] = _env_value(key, value)
    if database_url and "dsn" not in out and env.get(DATABASE_URL_VAR):
        out["dsn"] = env[DATABASE_URL_VAR]
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config file not found", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from None
    # Allow the settings to sit under an [oban] table too (handy in pyproject-style files).
    if set(data) == {"oban"} and isinstance(data["oban"], dict):
        nested: dict[str, Any] = data["oban"]
        return nested
    return data


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(Config.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_config(layers: list[tuple[str, Mapping[str, Any]]]) -> Config:
    """Merge ``(source, values)`` layers (later wins) and validate, naming the source of a bad key."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            if key not in Config.model_fields:
                raise ConfigError(f"unknown key{_suggest(key)}", key=key, value=value, source=source)
            merged[key] = value
            origin[key] = source
    try:
        return Config.model_validate(merged)
    except PydanticValidationError as exc:
        problem = first_problem(exc, merged, unknown="unknown key")
        top = str(problem.loc[0]) if problem.loc else ""
        # A cross-key error (no location) has no one value to show: the merged config is not it.
        bad = problem.value if problem.loc else None
        raise ConfigError(
            problem.reason, key=problem.field() or "config", value=bad, source=origin.get(top, "config")
        ) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read ``path`` (or ``$OBAN_CONFIG``, or ./oban.toml if present), then ``OBAN_*`` env vars, then
    ``overrides``; ``DATABASE_URL`` is the DSN when none of them gives one."""
    env = os.environ if env is None else env
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if env.get(DATABASE_URL_VAR):  # the lowest layer: any dsn, OBAN_DSN or --dsn wins over it
        layers.append((f"env {DATABASE_URL_VAR}", {"dsn": env[DATABASE_URL_VAR]}))
    path = path if path is not None else env.get(CONFIG_FILE_VAR) or None
    if path is not None:
        file = Path(path)
        layers.append((str(file), _read_toml(file)))
    elif Path(DEFAULT_FILE).is_file():
        layers.append((DEFAULT_FILE, _read_toml(Path(DEFAULT_FILE))))
    env_values = env_settings(env, database_url=False)
    if env_values:
        layers.append(("env", env_values))
    if overrides:
        layers.append(("arguments", {k: v for k, v in overrides.items() if v is not None}))
    return build_config(layers)
