"""The package layout holds: each side imports only what it may, and no module import
cycle exists (read from the source with ast; lazy imports inside functions count, imports
only for type checkers under ``if TYPE_CHECKING:`` do not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runner", "dispatcher", "discovery", "images", "ktrdr_run", "tui")
#: What each package may import from the project (itself always).
ALLOWED = {
    "runner": set(),
    "images": set(),
    "discovery": {"runner", "dispatcher"},
    "dispatcher": {"runner", "discovery", "images"},
    "ktrdr_run": {"runner", "dispatcher", "discovery", "images", "tui"},
    "tui": {"runner", "dispatcher", "discovery", "ktrdr_run"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` names ``a.b.c`` when
    that is a module, else ``a.b``)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in project_imports(path):
            # the deepest known module the import names
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def test_each_package_imports_only_what_it_may() -> None:
    bad = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        for dst in targets
        if dst.split(".")[0] != src.split(".")[0] and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert not bad, bad


def test_no_module_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_dispatcher_package_has_no_cli_code() -> None:
    for path in (ROOT / "dispatcher").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "argparse" not in imported, path
        assert not any(
            isinstance(n, ast.ImportFrom) and (n.module or "").startswith(("ktrdr_run", "tui"))
            for n in ast.walk(tree)
        ), path


def test_only_the_dispatchers_sweep_trials_module_imports_optuna() -> None:
    """Containers never import Optuna: it drives random and TPE sweeps in the coordinator."""
    importers = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n.split(".")[0] == "optuna" for n in names):
                    importers.append(module_name(path))
    assert sorted(set(importers)) == ["dispatcher.sweep_trials"]
