"""What every part of the kernel shares: a person's request, the stop of a procedure, failure messages."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    pass

A = TypeVar("A")
R = TypeVar("R")
RETRY_NEVER = ["BadInput", "Refused", "NotFound"]


class Request(BaseModel):
    """A person acting on a running procedure: approve, reject, pause, resume, abort, override, promote."""

    by: str
    reason: str = ""
    gate: str | None = None  # the gate this answers; default: the one open
    full: bool = False  # canary `promote --full`: straight to 100 %
    signature: str | None = None  # SSHSIG armor over the request (see opsflow/signing.py)
    signed_at: datetime | None = None


class Stop(Exception):
    """Ends the procedure early: refused, aborted or failed. Caught in `Procedure.conclude`."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def failure_message(err: BaseException) -> str:
    """The innermost message of an activity/child failure: what actually went wrong."""
    while isinstance(err, (ActivityError, ChildWorkflowError)) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__


def child_task_timeout() -> timedelta | None:
    """A child procedure's workflow task timeout: its parent's (the inventory's `limits.workflow_task_timeout`, set
    at the start), so a worker that dies mid-decision costs the child no more than the parent."""
    return workflow.info().task_timeout if workflow.patched("child-task-timeout") else None


def not_started(err: ActivityError) -> bool:
    """True when the activity never reached a worker within its bound."""
    return isinstance(err.cause, TimeoutError) and err.cause.type == TimeoutType.SCHEDULE_TO_START
