"""The restore test: a scratch copy restored, verified and deleted (activities/restore.py)."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.models import CheckResult, RestoreRequest, RestoreWindow, ScratchTarget, VerifyRequest

RESTORE_WINDOW = Activity("restore.window", RestoreRequest, RestoreWindow)
RESTORE_LEFTOVERS = Activity("restore.leftovers", RestoreRequest, list[str])
RESTORE_START = Activity("restore.start", RestoreRequest, ScratchTarget)
RESTORE_WAIT = Activity("restore.wait", RestoreRequest, ScratchTarget)
RESTORE_DELETE = Activity("restore.delete", RestoreRequest, bool)
RESTORE_VALIDATE_CHECKS = Activity("restore.validate_checks", RestoreRequest, None)
RESTORE_VERIFY = Activity("restore.verify", VerifyRequest, list[CheckResult])
