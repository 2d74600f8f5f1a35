"""The activity contracts (opsflow/contracts/) and the activities the worker registers (worker/registry.py) match one
to one, by name and by type; and outside the declarations no code names an activity by a string literal (issue 19):
a rename or a changed type fails here, not in a running procedure."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import typing
from collections import Counter
from pathlib import Path

import pytest
from temporalio import activity

import opsflow.contracts
from opsflow.contracts.base import Activity
from worker.registry import GLOBAL_ACTIVITIES, REGION_ACTIVITIES

ROOT = Path(__file__).resolve().parents[2]
# Where production code calls activities: each must go through a declaration, never its name as a string.
NO_NAME_LITERALS = ("workflows", "worker", "starters", "opsflow", "activities")


def declarations() -> list[tuple[str, Activity]]:
    """(module.CONSTANT, declaration) for every Activity declared in opsflow/contracts/."""
    found = []
    for info in pkgutil.iter_modules(opsflow.contracts.__path__):
        module = importlib.import_module(f"opsflow.contracts.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, Activity) and attr.isupper():
                found.append((f"{info.name}.{attr}", value))
    return found


DECLARED = declarations()
BY_NAME = {d.name: d for _, d in DECLARED}
REGISTERED = REGION_ACTIVITIES + GLOBAL_ACTIVITIES


def registered_name(fn) -> str:
    return activity._Definition.must_from_callable(fn).name


def test_the_contracts_are_found_and_each_name_is_declared_once():
    assert len(DECLARED) >= 40  # the 44 of issue 19: the walk over opsflow/contracts/ found them
    twice = [name for name, n in Counter(d.name for _, d in DECLARED).items() if n > 1]
    assert not twice, f"declared more than once: {twice}"


def test_every_declaration_has_exactly_one_registered_implementation():
    names = Counter(registered_name(fn) for fn in REGISTERED)
    missing = sorted(f"{where} ({d.name})" for where, d in DECLARED if names[d.name] == 0)
    doubled = sorted(name for name, n in names.items() if n > 1)
    assert not missing, f"declared but not registered in worker/registry.py: {missing}"
    assert not doubled, f"registered more than once: {doubled}"


def test_every_registered_activity_has_a_declaration():
    undeclared = sorted(f"{fn.__module__}.{fn.__name__} ({registered_name(fn)})" for fn in REGISTERED
                        if registered_name(fn) not in BY_NAME)
    assert not undeclared, f"registered without a declaration in opsflow/contracts/: {undeclared}"


def test_every_implementation_is_registered_from_its_declaration():
    """`@DB_STATUS.implementation`, not `@activity.defn(name="db.status")`: the name is written once."""
    loose = sorted(f"{fn.__module__}.{fn.__name__}" for fn in REGISTERED
                   if getattr(fn, "__opsflow_contract__", None) is not BY_NAME.get(registered_name(fn)))
    assert not loose, f"decorated by name instead of by its declaration: {loose}"


@pytest.mark.parametrize("fn", REGISTERED, ids=registered_name)
def test_the_implementation_takes_and_returns_the_declared_types(fn):
    decl = BY_NAME[registered_name(fn)]
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters)
    assert len(params) == 1, f"{decl.name}: one argument (the declared {decl.arg}), got {params}"
    assert hints.get(params[0]) == decl.arg, f"{decl.name}: argument {hints.get(params[0])}, declared {decl.arg}"
    declared_result = type(None) if decl.result is None else decl.result
    assert hints.get("return") == declared_result, f"{decl.name}: returns {hints.get('return')}, declared {decl.result}"


def name_literals(path: Path, root: Path = ROOT) -> list[str]:
    """`path:line: 'db.status'` for every string constant that is exactly a declared activity's name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(root)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in BY_NAME]


def test_no_activity_is_named_by_a_string_literal_outside_the_declarations():
    contracts = ROOT / "opsflow" / "contracts"
    found = [hit for package in NO_NAME_LITERALS for path in sorted((ROOT / package).rglob("*.py"))
             if contracts not in path.parents for hit in name_literals(path)]
    assert not found, "use the declaration (DB_STATUS, DB_STATUS.name) instead:\n" + "\n".join(found)


def test_the_literal_finder_reports_a_name_and_not_a_mention(tmp_path):
    """The check above can fail: a string that is an activity's name is reported; a comment, a docstring or a
    longer text that mentions one is not."""
    sample = tmp_path / "wf.py"
    sample.write_text('"""Calls db.status."""\nstep("s", "S", \'db.status\', t)  # "k8s.status"\n'
                      'log("db.status failed")\n')
    assert name_literals(sample, tmp_path) == ["wf.py:2: 'db.status'"]


def updates_by_name(path: Path) -> list[str]:
    """Calls that send an Update by its name (`handle.execute_update("approve", ...)`) instead of by the method."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute_update", "start_update") and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def test_no_update_is_sent_by_its_name():
    """`send_update(handle, Procedure.approve, req)`: a renamed Update fails at import, not at 3 a.m."""
    found = [hit for package in ("opsflow", "activities", "workflows", "worker", "starters", "lab", "bench", "tests")
             for path in sorted((ROOT / package).rglob("*.py")) for hit in updates_by_name(path)]
    assert not found, "send the Update by its method (opsflow.client.send_update): " + ", ".join(found)


def test_a_contract_with_a_heartbeat_timeout_is_implemented_by_an_activity_that_heartbeats():
    """The kernel schedules these with the contract's heartbeat timeout: one that never heartbeats would time out."""
    silent = sorted(
        registered_name(fn) for fn in REGISTERED
        if BY_NAME[registered_name(fn)].heartbeat and "heartbeat" not in inspect.getsource(fn).split('"""')[-1]
    )
    assert not silent, f"declared with a heartbeat timeout but do not heartbeat: {silent}"
