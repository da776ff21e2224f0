"""Configuration: TOML, env and arguments in order; errors that name the key, value and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from oban_py import Oban, load_config
from oban_py.config import parse_queues
from oban_py.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "oban.toml"
    path.write_text(text)
    return path


def test_toml_env_and_arguments_layer(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'dsn = "postgresql://file/db"\nprefix = "app"\nmodules = ["a.b"]\n'
        "[queues]\ndefault = 10\n[queues.mail]\nlimit = 3\npaused = true\n",
    )
    config = load_config(path, env={})
    assert config.dsn == "postgresql://file/db" and config.prefix == "app" and config.modules == ["a.b"]
    assert (
        config.queues["default"].limit == 10
        and config.queues["mail"].limit == 3
        and config.queues["mail"].paused
    )
    config = load_config(path, env={"OBAN_DSN": "postgresql://env/db", "OBAN_QUEUES": "x:2,y"})
    assert (
        config.dsn == "postgresql://env/db"
        and set(config.queues) == {"x", "y"}
        and config.queues["y"].limit == 10
    )
    config = load_config(
        path, env={"OBAN_DSN": "postgresql://env/db"}, overrides={"dsn": "postgresql://arg/db"}
    )
    assert config.dsn == "postgresql://arg/db"


def test_oban_table_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, '[oban]\nprefix = "x"\n[oban.queues]\nq = 1\n')
    assert load_config(path, env={}).queues["q"].limit == 1


def test_default_file_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "pool_size = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).pool_size == 3


def test_unknown_key_names_key_value_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "queus = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert (
        str(path) in message and "queus=3" in message and "unknown key" in message and "'queues'" in message
    )
    assert info.value.key == "queus" and info.value.source == str(path)


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[queues.mail]\nlimit = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "queues.mail.limit=0" in str(info.value) and str(path) in str(info.value)
    path = write(tmp_path, "[queues.mail]\nlimt = 4\n")
    with pytest.raises(ConfigError, match=r"queues\.mail\.limt"):
        load_config(path, env={})
    path = write(tmp_path, '[queues]\n"bad queue" = 4\n')
    with pytest.raises(ConfigError, match="bad queue"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="env: pool_size='many'"):
        load_config(None, env={"OBAN_POOL_SIZE": "many"})
    with pytest.raises(ConfigError, match="prefix"):
        load_config(None, env={}, overrides={"prefix": "drop table;"})
    with pytest.raises(ConfigError, match="rescue_after"):
        load_config(None, env={}, overrides={"rescue_after": 1, "heartbeat_interval": 5})


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[queues\ndefault = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value) and "invalid TOML" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_oban_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="arguments: queues"):
        Oban(queues={"": 1})
    with pytest.raises(ConfigError, match="unknown key"):
        Oban(pool_sise=3)
    oban = Oban.from_toml(write(tmp_path, "[queues]\na = 2\n"), pool_size=4)
    assert oban.config.queues["a"].limit == 2 and oban.config.pool_size == 4


def test_parse_queues() -> None:
    assert parse_queues("default:10, mail:5,bare") == {"default": 10, "mail": 5, "bare": 10}
    with pytest.raises(ValueError, match="not an integer"):
        parse_queues("a:b")
