"""Every example in docs/ runs.

Python blocks of a page run in order in one namespace (top-level ``await`` allowed), with ``oban`` a
started instance on a fresh schema and ``OBAN_DSN``/``OBAN_PREFIX`` pointing there, so ``Oban(...)``
in an example needs no DSN. A block that calls ``asyncio.run(`` is a whole script and runs in its
own process. TOML blocks must load as configuration, unless their first line is ``# invalid``, in
which case they must be rejected.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from oban_py import Oban, load_config
from oban_py.errors import ConfigError

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def test_every_page_is_linked_from_the_index() -> None:
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page.name not in ("index.md", "README.md"):
            assert f"({page.name})" in index, page.name


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
async def test_examples_run(page: Path, oban: Oban, test_dsn: str, prefix: str, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("OBAN_DSN", test_dsn)
    monkeypatch.setenv("OBAN_PREFIX", prefix)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}", "oban": oban}
    for number, (lang, code) in enumerate(blocks(page)):
        where = f"{page.name} block {number}"
        if lang == "python" and "asyncio.run(" in code:
            script = tmp_path / f"example_{number}.py"
            script.write_text(code)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), cwd=tmp_path, env={**os.environ},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, f"{where}:\n{out.decode()}"
        elif lang == "python":
            compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, namespace)
            if inspect.isawaitable(result):
                await result
        elif lang == "toml":
            path = tmp_path / "example.toml"
            path.write_text(code)
            if code.startswith("# invalid"):
                with pytest.raises(ConfigError):
                    load_config(path, env={})
            else:
                load_config(path, env={})
