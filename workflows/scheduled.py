"""A procedure started by a Temporal Schedule, under the environment's lock.

A Schedule appends the scheduled time to the workflow id it starts, so a scheduled procedure cannot take
the environment's lock id (`opsflow-<env>`) itself. This small launcher is what the Schedule starts: it
starts the procedure as a child with the lock id, so a scheduled drill or maintenance is refused
(`skipped`) while another procedure runs on the environment, exactly as a CLI start would be."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from opsflow import signing
    from opsflow.procedures import SCHEDULABLE
    from opsflow.temporal import OPS_ENVIRONMENT, OPS_PROCEDURE


class LaunchInput(BaseModel):
    procedure: str  # the workflow type, e.g. drill, maintenance
    environment: str
    task_queue: str
    arg: dict[str, Any]  # the procedure's input model, as JSON
    summary: str = ""
    # The Schedule's creation, signed by an operator over its id, the procedure, the environment and `arg`: the
    # procedure checks it against the worker's keys (signing.check_schedule) before it changes anything.
    schedule_id: str = ""
    by: str = ""
    signature: str | None = None
    signed_at: str | None = None


@workflow.defn(name="scheduled")
class ScheduledLaunch:
    @workflow.run
    async def run(self, inp: LaunchInput) -> dict:
        lock = f"opsflow-{inp.environment}"
        memo = None
        if workflow.patched("signed-schedules"):
            if inp.procedure not in SCHEDULABLE and not inp.arg.get("dry_run"):
                raise ApplicationError(f"a Schedule may run {', '.join(sorted(SCHEDULABLE))} or dry runs, "
                                       f"not a {inp.procedure}", type="Refused", non_retryable=True)
            memo = {signing.SCHEDULE_MEMO: {"schedule_id": inp.schedule_id, "by": inp.by, "signature": inp.signature,
                                            "signed_at": inp.signed_at}}
        try:
            child = await workflow.start_child_workflow(
                inp.procedure,
                inp.arg,
                id=lock,
                task_queue=inp.task_queue,
                static_summary=inp.summary or None,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(OPS_PROCEDURE, inp.procedure),
                        SearchAttributePair(OPS_ENVIRONMENT, inp.environment),
                    ]
                ),
                run_timeout=None,
                execution_timeout=None,
                task_timeout=timedelta(seconds=10),
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                memo=memo,
            )
        except WorkflowAlreadyStartedError:
            workflow.set_current_details(f"skipped: another procedure holds {lock}")
            return {"status": "skipped", "reason": f"another procedure is running on {inp.environment} ({lock})"}
        workflow.set_current_details(f"started {inp.procedure} as {lock}")
        try:
            return {"status": "started", "workflow_id": lock, "report": await child}
        except ChildWorkflowError as err:
            cause = err.cause
            details = cause.details if isinstance(cause, ApplicationError) else ()
            raise ApplicationError(
                f"{inp.procedure} on {inp.environment} did not succeed: {cause}",
                *details,
                type="ProcedureFailed",
                non_retryable=True,
            ) from None
