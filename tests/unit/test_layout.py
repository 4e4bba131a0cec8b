"""The house rules of nvmevfio/ (issue 22): no import cycle between its modules, no file over
600 lines, no class over 500. Read with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "nvmevfio"
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 500
# Files still over the limit, each with the work that cuts it; an entry that is no longer over
# must leave this table. Empty since issue 22 cut service/daemon.py, nvme/spec.py and dma.py.
OVER_LIMIT: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name; compiled ones (the shim) too, as leaves."""
    out = {}
    for path in sorted(ROOT.rglob("*.so")):
        out["nvmevfio." + path.name.split(".")[0]] = path
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The nvmevfio modules ``name`` imports, at any depth of its code (a lazy import is an edge too)."""
    if path.suffix != ".py":
        return set()
    is_pkg = path.name == "__init__.py"
    got = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        # a module not in the tree (the compiled shim, before a build) is a leaf
        got |= {t for t in targets if (t == "nvmevfio" or t.startswith("nvmevfio.")) and t != name}
    return got


def test_no_module_imports_in_a_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "nvmevfio.broker.facade" in graph and graph["nvmevfio.broker"], "the walk found the broker package"
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        for n in graph[m]:
            graph.setdefault(n, set())
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_broker_package_imports_point_down():
    """Each broker file imports only files below it in this order (docs/architecture.md)."""
    order = ["common", "state", "core", "cmb", "execute", "commands", "namespaces", "queues", "events", "recovery",
             "passthrough", "admin", "submit", "service", "metadata", "syncio", "zones", "facade"]
    modules = _modules()
    assert {m.rpartition(".")[2] for m in modules if m.startswith("nvmevfio.broker.")} == set(order)
    for i, name in enumerate(order):
        mod = f"nvmevfio.broker.{name}"
        below = {f"nvmevfio.broker.{n}" for n in order[:i]}
        inside = {m for m in _imports(mod, modules[mod], modules) if m.startswith("nvmevfio.broker")}
        assert inside <= below, f"{name} imports {sorted(inside - below)}, not below it"


def test_no_file_or_class_is_too_long():
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES and rel not in OVER_LIMIT:
            too_long.append(f"{rel}: {lines} lines")
        if rel in OVER_LIMIT and lines <= MAX_FILE_LINES:
            too_long.append(f"{rel} is {lines} lines now: take it out of OVER_LIMIT")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and rel not in OVER_LIMIT:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    too_long.append(f"{rel}: class {node.name} is {n} lines")
    too_long += [f"{rel} is in OVER_LIMIT but no longer exists" for rel in OVER_LIMIT if not (ROOT / rel).exists()]
    assert not too_long, "; ".join(too_long)
