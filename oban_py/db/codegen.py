"""Writes :mod:`oban_py.db.query_names` from the query headers in ``sql/queries/*.sql``.

Run ``python -m oban_py.db.codegen`` after adding, renaming or re-kinding a query; a unit test
(``tests/unit/test_sql.py``) fails while the module is out of date. Generated code rather than a
runtime ``Literal`` because mypy must see the names without importing the SQL files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .sql import KINDS, METHODS, Kind, query_kinds

__all__ = ["TYPE_NAMES", "names_path", "render_names", "write_names"]

#: The Literal type generated for each kind.
TYPE_NAMES: dict[Kind, str] = {
    "many": "ManyQuery",
    "one": "OneQuery",
    "scalar": "ScalarQuery",
    "exec": "ExecQuery",
}


def names_path() -> Path:
    return Path(__file__).resolve().with_name("query_names.py")


def render_names() -> str:
    """The text of ``query_names.py``: one ``Literal`` per kind, names sorted (ruff-format clean)."""
    kinds = query_kinds()
    out = [
        '"""Query names by result kind, generated from ``sql/queries/*.sql``: do not edit.',
        "",
        "Regenerate with ``python -m oban_py.db.codegen``. The driver method for each kind is fixed (see",
        "``oban_py.db.sql``), so a misspelt name, or a name passed to the wrong method, fails mypy.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Literal",
        "",
        "__all__ = [" + ", ".join(f'"{t}"' for t in [*TYPE_NAMES.values(), "QueryName"]) + "]",
    ]
    for kind in KINDS:
        names = [name for name, k in kinds.items() if k == kind]
        out += [
            "",
            f"#: Queries run with ``Driver.{METHODS[kind]}`` (``:{kind}``).",
            f"{TYPE_NAMES[kind]} = Literal[",
        ]
        out += [f'    "{name}",' for name in names]
        out.append("]")
    out += ["", "QueryName = Literal[" + ", ".join(TYPE_NAMES.values()) + "]", ""]
    return "\n".join(out)


def write_names(path: Path | None = None) -> bool:
    """Write the module if it changed; returns whether it did."""
    target = path or names_path()
    text = render_names()
    if target.exists() and target.read_text() == text:
        return False
    target.write_text(text)
    return True


if __name__ == "__main__":
    changed = write_names()
    print(f"{names_path()}: {'written' if changed else 'up to date'}")
    sys.exit(0)
