"""Fetch a secret on the worker from where the inventory says it lives. Never logged, never returned to a workflow."""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.exceptions import ApplicationError

from opsflow.inventory import SecretRef


def resolve(ref: SecretRef) -> str:
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise ApplicationError(f"secret: environment variable {ref.env} is not set on this worker", type="SecretMissing", non_retryable=True)
        return value
    path = Path(ref.file or "")
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ApplicationError(f"secret: cannot read {path}: {e.strerror}", type="SecretMissing", non_retryable=True) from None
