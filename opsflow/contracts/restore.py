"""The restore test: a scratch copy restored, verified and deleted (activities/restore.py)."""

from __future__ import annotations

from opsflow.contracts.base import HEARTBEATS, Activity
from opsflow.models import (
    CheckResult,
    DrillHistoryRequest,
    DrillRun,
    MysqlRestoreResult,
    RestoreRequest,
    RestoreWindow,
    ScratchTarget,
    VerifyRequest,
)

RESTORE_WINDOW = Activity("restore.window", RestoreRequest, RestoreWindow)
RESTORE_LEFTOVERS = Activity("restore.leftovers", RestoreRequest, list[str])
RESTORE_START = Activity("restore.start", RestoreRequest, ScratchTarget)
RESTORE_WAIT = Activity("restore.wait", RestoreRequest, ScratchTarget)
RESTORE_DELETE = Activity("restore.delete", RestoreRequest, bool)
RESTORE_VALIDATE_CHECKS = Activity("restore.validate_checks", RestoreRequest, None)
RESTORE_VERIFY = Activity("restore.verify", VerifyRequest, list[CheckResult])
RESTORE_HISTORY = Activity("restore.history", DrillHistoryRequest, list[DrillRun], heartbeat=HEARTBEATS)
# s3-mysqldump: restore, verify and remove in one activity (the scratch server lives on the worker that runs it)
RESTORE_MYSQL_DUMP = Activity("restore.mysql_dump", RestoreRequest, MysqlRestoreResult)
