"""The package's layout rules (docs/architecture.md), checked on the source: no database needed.

* No module over ``MAX_LINES`` lines: a module that grows past it holds two concepts.
* No module imports another module's ``_private`` name, or reaches into one (``module._name``).
  Underscore *modules* (``oban_py._json``) are package-private: importing them inside the package
  is their purpose.
* No import cycle at run time: imports inside functions count (they run), imports under
  ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "oban_py"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(name: str) -> list[tuple[ast.stmt, str, list[str]]]:
    """(statement, imported module, imported names) for every run-time import of ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = _type_checking_nodes(tree)
    found: list[tuple[ast.stmt, str, list[str]]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.module, node.level)
            found.append((node, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node, alias.name, []))
    return found


def test_no_module_is_too_long() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_no_module_uses_another_modules_private_names() -> None:
    offences = []
    for name, path in MODULES.items():
        aliases: set[str] = set()
        for node, target, names in _imports(name):
            if not target.startswith("oban_py"):
                continue
            for imported in names:
                full = f"{target}.{imported}"
                if full in MODULES:
                    aliases.add(imported)  # a submodule: its own private names are off limits below
                elif imported.startswith("_") and not imported.startswith("__"):
                    offences.append(f"{name}:{node.lineno} imports {imported} from {target}")
            if isinstance(node, ast.Import):
                aliases.add(node.names[0].asname or node.names[0].name)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offences.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for _node, target, names in _imports(name):
            if target not in MODULES:
                continue
            # Importing a parent package of ``name`` adds nothing: it is initialised before ``name``.
            if not name.startswith(target + ".") and target != name:
                graph[name].add(target)
            for imported in names:
                if f"{target}.{imported}" in MODULES:
                    graph[name].add(f"{target}.{imported}")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_run_time() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_the_checker_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
