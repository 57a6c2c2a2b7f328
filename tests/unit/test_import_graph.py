"""The client's modules import one another one way only, and the packages keep their layers.

Every import counts — at module level, inside a function, under ``if TYPE_CHECKING:`` — as
the source says it, read with ``ast``: a cycle hidden from the interpreter is still one
module that cannot be understood, or changed, without the other. ``Grid`` only assembles
the others, so no module but the package's lazy exports imports ``orchestrator.grid``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(file: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    return _names(file.read_text(), _module_name(file), file.name == "__init__.py", modules)


def _names(source: str, module: str, is_package: bool = False, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module ``source`` (the module ``module``) names in an import, anywhere in it.
    ``from a import b`` names ``a.b`` if that is one of ``modules``, else ``a`` (a package's
    ``__init__`` that runs before any of its modules does not count: it is not imported by
    name)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            subs = {f"{base}.{alias.name}" for alias in node.names}
            names.update(subs & modules)
            if subs - modules:
                names.add(base)
    return names


def _graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports."""
    files = sorted((ROOT / package).glob("*.py"))
    modules = {_module_name(f): f for f in files}
    known = frozenset(modules)
    return {name: {m for m in _imported(file, known) if m in known and m != name} for name, file in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def _packages_imported(package: str) -> dict[str, set[str]]:
    """File of ``package`` (recursively) → the top-level packages it imports."""
    return {str(f.relative_to(ROOT)): {m.split(".")[0] for m in _imported(f)}
            for f in sorted((ROOT / package).rglob("*.py"))}


def test_the_cycle_finder_finds_a_cycle_and_only_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_counts_function_level_and_type_checking_imports() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from orchestrator.grid import Grid\n"
              "def f():\n    from orchestrator import fl\n    import orchestrator.mpc\n    from . import gather\n")
    names = _names(source, "orchestrator.x", modules=frozenset({"orchestrator.fl", "orchestrator.gather"}))
    assert names == {"typing", "orchestrator.grid", "orchestrator.fl", "orchestrator.mpc", "orchestrator.gather"}


def test_the_client_modules_import_one_another_without_a_cycle() -> None:
    graph = _graph("orchestrator")
    assert {"orchestrator.grid", "orchestrator.pointer", "orchestrator.fl"} <= graph.keys()  # it read them
    assert "orchestrator.gather" in graph["orchestrator.fl"]
    cycle = _cycle(graph)
    assert cycle is None, "orchestrator's modules import one another in a circle: " + " → ".join(cycle or [])


def test_only_the_package_exports_import_grid() -> None:
    importers = sorted(name for name, imported in _graph("orchestrator").items() if "orchestrator.grid" in imported)
    assert importers == ["orchestrator"], f"Grid only assembles the others; these import it: {importers}"


def test_the_packages_keep_their_layers() -> None:
    """protocol is the core (it imports no other package of gridq); orchestrator and workers
    are the two sides on it, and ops the tools on top of all three."""
    rules = {"protocol": {"orchestrator", "workers", "ops"}, "orchestrator": {"ops"}, "workers": {"ops"}}
    broken = {file: sorted(imported & banned) for package, banned in rules.items()
              for file, imported in _packages_imported(package).items() if imported & banned}
    assert broken == {}, f"imports against the layers (package → what it may not import): {broken}"
