"""The DSN's password never shows: not in the config's repr, str or JSON dump, not in configuration
errors (whatever the key, whatever the shape of the value), not in CLI output, and a malformed DSN is a
one-line ConfigError (exit code 2), never a traceback. Code that connects still gets the real DSN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import SecretStr

from oban_py import Oban, embedded
from oban_py._secrets import Dsn, mask_secrets, masked_dsn
from oban_py.config import Config, load_config
from oban_py.db import connect
from oban_py.errors import ConfigError, ObanError

pytestmark = pytest.mark.anyio

SECRET = "Sup3rS3cret"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "oban.toml"
    path.write_text(text)
    return path


def _cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "OBAN_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "oban_py", *args],
        cwd=cwd,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_masked_dsn_lives_in_its_own_module() -> None:
    assert embedded.masked_dsn is masked_dsn and connect.masked_dsn is masked_dsn
    assert masked_dsn(f"postgresql://app:{SECRET}@db/app") == "postgresql://app:***@db/app"


def test_config_repr_str_and_json_mask_the_password() -> None:
    dsn = f"postgresql://app:{SECRET}@db.internal:5432/app?sslmode=require"
    config = load_config(None, env={}, overrides={"dsn": dsn})
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.dsn)):
        assert SECRET not in text and "app:***@db.internal" in text
    assert (
        config.model_dump(mode="json")["dsn"] == "postgresql://app:***@db.internal:5432/app?sslmode=require"
    )
    # What connects gets the real DSN.
    assert isinstance(config.dsn, str) and config.dsn == dsn and str(config.dsn) == dsn
    assert isinstance(config.dsn, Dsn) and config.dsn.masked == masked_dsn(dsn)
    # The python dump keeps it usable, so Oban(config=..., **overrides) still connects.
    rebuilt = Oban(config=config, pool_size=3).config
    assert rebuilt.dsn == dsn and rebuilt.pool_size == 3 and SECRET not in repr(rebuilt)
    assert Config(dsn=SecretStr(dsn)).dsn == dsn  # type: ignore[arg-type]
    assert load_config(None, env={"OBAN_DSN": dsn}).dsn == dsn


async def test_a_dsn_with_a_password_still_connects(test_dsn: str, prefix: str) -> None:
    parts = urlsplit(test_dsn)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    with_password = urlunsplit((parts.scheme, f"{user}:{SECRET}@{host}", parts.path, parts.query, ""))
    # The test server trusts local connections, so any password is accepted: the point is that the
    # masked text is not what is sent.
    async with Oban(with_password, prefix=prefix) as oban:
        assert SECRET not in repr(oban.config)
        await oban.check_queues()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (f'database_url = "postgresql://app:{SECRET}@db/app"\n', "database_url"),
        (f'dsn = ["postgresql://app:{SECRET}@db/app"]\n', "dsn"),
        (f'dsn = {{ url = "postgresql://app:{SECRET}@db/app" }}\n', "dsn"),
        (f'dsn = "postgresql://app:{SECRET}/x@db/app"\n', "dsn"),
        (f'dsn = "postgresql://app:{SECRET}?x@db/app"\n', "dsn"),
        (f'dsn = "postgresql://app:{SECRET}#x@db/app"\n', "dsn"),
        (f'dsn = "postgresql://app:{SECRET}@x@db/app"\n', "dsn"),
        (f'dsn = "postgresql://app:{SECRET}@db:port/app"\n', "dsn"),
        (f'dsn = "mysql://app:{SECRET}@db/app"\n', "dsn"),
        (f'dsn = "host=db password={SECRET}"\n', "dsn"),
        # A long value is cut short in the message: the mask is applied before it is cut.
        (f'dsn = ["{"x" * 30}", "postgresql://{"u" * 60}:{SECRET}{"p" * 80}@db/app"]\n', "dsn"),
        (f'[queues]\n"postgresql://app:{SECRET}@db" = 1\n', "queues"),
    ],
)
def test_configuration_errors_never_echo_the_password(tmp_path: Path, toml: str, key: str) -> None:
    path = _write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert key in message and str(path) in message
    assert SECRET not in message and SECRET not in repr(info.value.value)
    assert SECRET[:4] not in message  # not even the part before an unencoded "/", "?" or "#"


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        (f"postgresql://app:{SECRET}/x@127.0.0.1:1/db", "unencoded '/', '?' or '#'"),
        (f"postgresql://app:{SECRET}?x@127.0.0.1:1/db", "unencoded '/', '?' or '#'"),
        (f"postgresql://app:{SECRET}@x@127.0.0.1:1/db", "unencoded '@'"),
        (f"postgresql://app:{SECRET}@127.0.0.1:notaport/db", "port"),
        (f"postgresql://app:{SECRET}@127.0.0.1:99999/db", "port"),
        (f"postgresql://app:{SECRET}@[::1/db", "IPv6"),
        (f"postgresql://app:{SECRET}@127.0.0.1:1/db?a", "query string"),
        (f"postgresql://app:{SECRET}@127.0.0.1:1/db?sslmode=bogus", "sslmode"),
        (f"mysql://app:{SECRET}@127.0.0.1/db", "postgresql://"),
        ("not a dsn", "postgresql://"),
    ],
)
def test_malformed_dsns_are_config_errors(dsn: str, reason: str) -> None:
    for build in (
        lambda: load_config(None, env={}, overrides={"dsn": dsn}),
        lambda: load_config(None, env={"OBAN_DSN": dsn}),
        lambda: Oban(dsn),
    ):
        with pytest.raises(ConfigError) as info:
            build()
        assert reason in str(info.value) and "dsn" in str(info.value)
        assert SECRET[:4] not in str(info.value)


def test_well_formed_dsns_are_accepted() -> None:
    for dsn in (
        "postgresql://app@db/app",
        "postgres://app:p%2Fw%40x@db:5432/app?sslmode=require&application_name=x",
        "postgresql://postgres@/postgres?host=/tmp/sock&port=5432",
        "postgresql://[::1]:5432/app",
        "postgresql://a:5432,b:5433/app",
        "postgresql://db/app?user=me@corp",
        "",
    ):
        assert load_config(None, env={}, overrides={"dsn": dsn}).dsn == dsn


def test_mask_secrets_in_free_text() -> None:
    text = f"x=['postgresql://a:{SECRET}@h/db', \"postgres://b:{SECRET}/q@h\"] password={SECRET} y"
    masked = mask_secrets(text)
    assert SECRET not in masked and "postgresql://a:***@h/db" in masked and "password=***" in masked
    assert mask_secrets("postgresql://db:5432/app") == "postgresql://db:5432/app"


BAD_DSN = f"postgresql://app:{SECRET}/x@127.0.0.1:1/db"


@pytest.mark.parametrize(
    ("args", "env", "toml"),
    [
        (["migrate", "--dsn", BAD_DSN], None, None),
        (["queues", "--dsn", BAD_DSN], None, None),
        (["demo", "--dsn", BAD_DSN], None, None),
        (["start", "--dsn", BAD_DSN, "--queues", "default:1"], None, None),
        (["migrate"], {"OBAN_DSN": BAD_DSN}, None),
        (["queues"], None, f'dsn = "{BAD_DSN}"\n'),
        (["migrate"], None, f'dsn = ["{BAD_DSN}"]\n'),
        (["migrate"], None, f'database_url = "{BAD_DSN}"\n'),
        (["migrate", "--dsn", f"postgresql://app:{SECRET}@127.0.0.1:99999/db"], None, None),
        (["migrate", "--dsn", f"postgresql://app:{SECRET}@[::1/db"], None, None),
        (["queues", "--dsn", f"postgresql://app:{SECRET}?x@127.0.0.1:1/db"], None, None),
    ],
)
def test_cli_prints_one_masked_line_and_exits_2(
    tmp_path: Path, args: list[str], env: dict[str, str] | None, toml: str | None
) -> None:
    if toml is not None:
        _write(tmp_path, toml)
    result = _cli(*args, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("oban-py: configuration error:")
    assert SECRET[:4] not in output


def test_typed_errors_are_obanerrors() -> None:
    with pytest.raises(ObanError):
        load_config(None, env={}, overrides={"dsn": BAD_DSN})
