"""The import graph keeps its layers (issue 7): `opsflow/` at the bottom, the CLI (`starters/`) at the top, the lab
beside production code, never inside it. Imports are read with `ast`, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("opsflow", "activities", "workflows", "worker", "starters", "lab", "bench")

# What each layer may not import (top-level package names).
FORBIDDEN = {
    "opsflow": {"activities", "workflows", "worker", "starters", "lab", "bench"},  # the kernel imports nothing above it
    "activities": {"workflows", "worker", "starters", "lab", "bench"},
    "workflows": {"worker", "starters", "lab", "bench"},
    "worker": {"starters", "lab", "bench"},
    "lab": {"starters"},  # the lab uses opsflow.client; the CLI's `lab` subcommand is the only way in from above
    "bench": {"starters"},  # benches run the CLI as a person does (a subprocess) or use opsflow.client
    "starters": {"bench"},
}
# Known breaks, named one by one so no new one slips in; each should go (see the note beside it).
WAIVED = {
    # The codec resolves its key through the worker's secret stores; they belong in opsflow/ (a move for the
    # security work, which owns both files), after which this line goes.
    "opsflow/codec.py imports activities",
}
# Tests that must reach the system through opsflow.client, never the CLI's internals (tests of the CLI in
# tests/unit and tests/integration run it, in process for its parsing or as a subprocess as a person does).
CLIENT_ONLY_TESTS = ("tests/workflow",)


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    """package -> the packages of this project it imports."""
    return {p: {i for m in modules(p) for i in imported_packages(m)
                if i in PACKAGES and i != p and f"{m.relative_to(ROOT)} imports {i}" not in WAIVED} for p in PACKAGES}


def test_layers_import_nothing_they_must_not():
    offences = []
    for package, banned in FORBIDDEN.items():
        for module in modules(package):
            for bad in sorted(imported_packages(module) & banned):
                offence = f"{module.relative_to(ROOT)} imports {bad}"
                if offence not in WAIVED:
                    offences.append(offence)
    assert not offences, "layering broken:\n  " + "\n  ".join(offences)


def test_no_circle_between_packages():
    g = graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in g[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(p for p in PACKAGES if p in reach(p))
    assert not circles, f"packages on an import circle: {circles} (graph: { {k: sorted(v) for k, v in g.items()} })"


def test_tests_reach_the_system_through_the_client_not_the_cli():
    offences = []
    for folder in CLIENT_ONLY_TESTS:
        for module in sorted((ROOT / folder).rglob("*.py")):
            if "starters" in imported_packages(module):
                offences.append(str(module.relative_to(ROOT)))
    assert not offences, f"tests importing the CLI instead of opsflow.client (run the CLI as a subprocess): {offences}"


def test_the_production_image_does_not_need_the_lab():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY lab" not in dockerfile
    assert not list(ROOT.glob("*.whl")), "no wheels committed at the repository root"


PRODUCTION = ("opsflow", "activities", "workflows", "worker", "starters", "lab")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports when it is imported: statements at module level (also inside a
    module-level `with`/`try`/`if`), not those inside functions, which run later."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
            elif isinstance(node, (ast.With, ast.If, ast.Try)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return {m for m in found if m in known}


def test_no_import_circle_among_production_modules():
    """A module-level import circle works only by the order modules happen to be imported in (and bottom-of-file
    imports or `model_rebuild` blocks to close it): issue 19 took them all out; this keeps them out."""
    paths = {module_name(p): p for package in PRODUCTION for p in modules(package)}
    known = set(paths)
    edges = {m: module_level_imports(p, known) - {m} for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def strongly_connected(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strongly_connected(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(edges):
        if m not in index:
            strongly_connected(m)
    assert not circles, "modules on an import circle: " + "; ".join(" ↔ ".join(c) for c in circles)
