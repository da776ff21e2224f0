"""Every setting has an OBAN_* variable, derived from the Config fields; OBAN_CONFIG; DATABASE_URL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from oban_py import Config, load_config
from oban_py.config import env_settings, env_var
from oban_py.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _env_text(value: object) -> str:
    """A default as an operator would write it in the environment."""
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize("key", list(Config.model_fields))
def test_every_setting_reads_its_variable(key: str) -> None:
    assert env_var(key) == f"OBAN_{key.upper()}"
    default = Config().model_dump(mode="json")[key]
    text = _env_text(default)
    assert key in env_settings({env_var(key): text})
    # The default, written as text (JSON for tables, lists and null), reads back as the default.
    config = load_config(env={env_var(key): text})
    assert config.model_dump(mode="json")[key] == default


def test_every_setting_and_its_variable_are_documented() -> None:
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \|[^|]*\| `(OBAN_\w+)`", DOCS.read_text(), re.M)
    }
    missing = [k for k in Config.model_fields if rows.get(k) != env_var(k)]
    assert not missing, f"docs/configuration.md lacks a row (with its OBAN_* variable) for {missing}"


def test_values_are_converted_by_type() -> None:
    config = load_config(
        env={
            "OBAN_STAGE_INTERVAL": "0.5",
            "OBAN_LEADERSHIP": "false",
            "OBAN_MIGRATE": "true",
            "OBAN_PRUNE_AFTER": "null",
            "OBAN_VACUUM_INTERVAL": "none",
            "OBAN_MAX_ARGS_BYTES": "2048",
            "OBAN_MODULES": "app.a, app.b",
            "OBAN_QUEUES": '{"mail": {"limit": 3, "paused": true}, "default": 5}',
        }
    )
    assert (config.stage_interval, config.leadership, config.migrate) == (0.5, False, True)
    assert config.prune_after is None and config.vacuum_interval is None and config.max_args_bytes == 2048
    assert config.modules == ["app.a", "app.b"]
    assert config.queues["mail"].paused and config.queues["default"].limit == 5
    assert load_config(env={"OBAN_MODULES": '["x.y"]', "OBAN_QUEUES": "a:2,b"}).queues["b"].limit == 10


def test_bad_values_name_the_key_and_the_source() -> None:
    with pytest.raises(ConfigError, match=r"env: rescue_after='soon'"):
        load_config(env={"OBAN_RESCUE_AFTER": "soon"})
    with pytest.raises(ConfigError, match=r"env: queues=.*invalid JSON"):
        load_config(env={"OBAN_QUEUES": "{mail: 3}"})
    with pytest.raises(ConfigError, match="leadership"):
        load_config(env={"OBAN_LEADERSHIP": "null"})  # not optional: null is not a value


def test_oban_config_names_the_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text("pool_size = 3\n")
    second.write_text("pool_size = 4\n")
    assert load_config(env={"OBAN_CONFIG": str(first)}).pool_size == 3
    assert load_config(second, env={"OBAN_CONFIG": str(first)}).pool_size == 4  # -c wins
    with pytest.raises(ConfigError, match=r"missing\.toml: config file not found"):
        load_config(env={"OBAN_CONFIG": str(tmp_path / "missing.toml")})


def test_database_url_is_the_last_resort(tmp_path: Path) -> None:
    url = "postgresql://app@db.example/app"
    assert load_config(env={"DATABASE_URL": url}).dsn == url
    assert load_config(env={"DATABASE_URL": url, "OBAN_DSN": "postgresql://o/o"}).dsn == "postgresql://o/o"
    toml = tmp_path / "oban.toml"
    toml.write_text('dsn = "postgresql://t/t"\n')
    assert load_config(toml, env={"DATABASE_URL": url}).dsn == "postgresql://t/t"
    assert (
        load_config(env={"DATABASE_URL": url}, overrides={"dsn": "postgresql://a/a"}).dsn
        == "postgresql://a/a"
    )
    # Oban(...) reads the environment and its arguments: DATABASE_URL stands in for OBAN_DSN there.
    assert env_settings({"DATABASE_URL": url}) == {"dsn": url}
    assert env_settings({"DATABASE_URL": url, "OBAN_DSN": "postgresql://o/o"}) == {"dsn": "postgresql://o/o"}
    with pytest.raises(ConfigError, match="env DATABASE_URL: dsn"):
        load_config(env={"DATABASE_URL": "mysql://app@db/app"})


@pytest.mark.parametrize("scheme", ["postgresql+asyncpg", "postgres+asyncpg", "postgresql+psycopg"])
def test_sqlalchemy_urls_are_normalised(scheme: str) -> None:
    config = load_config(env={"DATABASE_URL": f"{scheme}://app:pw@db.example:5432/app"})
    assert config.dsn == f"{scheme.partition('+')[0]}://app:pw@db.example:5432/app"
    assert load_config(env={}, overrides={"dsn": f"{scheme}://db/app"}).dsn.startswith(
        ("postgresql://", "postgres://")
    )  # type: ignore[union-attr]
