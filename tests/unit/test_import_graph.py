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
# Where `starters` may be imported: the CLI itself, and tests of the CLI's own parsing.
STARTERS_ALLOWED_IN_TESTS = {"tests/unit/test_docs.py", "tests/unit/test_inventory.py", "tests/unit/test_calendar.py", "tests/unit/test_client.py",
                             "tests/integration/test_schedules.py"}


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
    return {p: {i for m in modules(p) for i in imported_packages(m) if i in PACKAGES and i != p} for p in PACKAGES}


def test_layers_import_nothing_they_must_not():
    offences = []
    for package, banned in FORBIDDEN.items():
        for module in modules(package):
            for bad in sorted(imported_packages(module) & banned):
                offences.append(f"{module.relative_to(ROOT)} imports {bad}")
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
    for module in sorted((ROOT / "tests").rglob("*.py")):
        rel = str(module.relative_to(ROOT))
        if "starters" in imported_packages(module) and rel not in STARTERS_ALLOWED_IN_TESTS:
            offences.append(rel)
    assert not offences, f"tests importing the CLI instead of opsflow.client (run the CLI as a subprocess): {offences}"


def test_the_production_image_does_not_need_the_lab():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY lab" not in dockerfile
    assert not list(ROOT.glob("*.whl")), "no wheels committed at the repository root"
