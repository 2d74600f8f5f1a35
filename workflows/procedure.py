"""What every procedure shares: steps, the approval gate, pause/resume/abort, undo, UI details, the report.

A procedure subclasses `Procedure`, builds its report in `run`, and writes each step as one line:

    status = await self.step("preflight", "Check westeurope", "db.status", target, result_type=DbStatus)

People talk to a running procedure through Updates whose validators reject a request that may not
happen (a non-approver, a self-approval, an abort past the point of no return) before it reaches history.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Awaitable, Callable

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from opsflow.inventory import Inventory
    from opsflow.models import ControlEvent, Decision, Notification, NotifyRequest, ProcedureReport, StepRecord
    from opsflow.temporal import OPS_STATUS, OPS_STEP


class Request(BaseModel):
    """A person acting on a running procedure: approve, reject, pause, resume, abort, override."""

    by: str
    reason: str = ""


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


class Procedure:
    """Base class for procedure workflows (handlers are inherited by the @workflow.defn subclasses)."""

    report: ProcedureReport
    inventory: Inventory
    notify_on_stop = True

    def begin(self, report: ProcedureReport, inventory: Inventory) -> None:
        self.report = report
        self.inventory = inventory
        self.report.workflow_id = workflow.info().workflow_id
        self.report.started_at = workflow.now()
        self.awaiting_approval = False
        self.decision: Decision | None = None
        self.paused = False
        self.abort_requested: ControlEvent | None = None
        self.point_of_no_return = False  # past it, failures go forward instead of undoing
        self.undo_stack: list[tuple[str, str, Any, str | None, float]] = []
        self.show()

    # -- steps -------------------------------------------------------------------------------------------

    async def step(
        self,
        name: str,
        title: str,
        activity: str,
        arg: Any = None,
        *,
        result_type: type | None = None,
        queue: str | None = None,
        timeout: float = 60,
        heartbeat: float | None = None,
        attempts: int = 5,
        detail: Callable[[Any], str] | None = None,
        undo: tuple[str, str, Any] | None = None,
        undo_timeout: float = 60,
    ) -> Any:
        """Run one activity as a recorded step, at a step boundary (pause/abort are honoured here).

        `undo=(activity, title, arg)` registers what reverses this step should the procedure stop before
        the point of no return."""
        await self.boundary()
        record = self.begin_step(name, title)
        try:
            result = await workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                task_queue=queue,
                start_to_close_timeout=timedelta(seconds=timeout),
                heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=20),
                    maximum_attempts=attempts,
                    non_retryable_error_types=["BadInput", "Refused"],
                ),
                summary=title,
            )
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):  # the workflow was cancelled (UI/CLI): an abort
                self.end_step(record, "failed", "cancelled")
                raise Stop("aborted", "cancelled") from None
            self.end_step(record, "failed", failure_message(err))
            raise Stop("failed", f"{title}: {failure_message(err)}") from None
        if undo is not None:
            undo_activity, undo_title, undo_arg = undo
            self.owe(undo_title, undo_activity, undo_arg, queue=queue, timeout=undo_timeout)
        self.end_step(record, "ok", detail(result) if detail else "")
        return result

    def begin_step(self, name: str, title: str) -> StepRecord:
        record = StepRecord(name=name, title=title, started_at=workflow.now())
        self.report.steps.append(record)
        self.report.current_step = name
        self.report.status = "running"
        self.report.waiting_for = None
        self.show()
        return record

    def end_step(self, record: StepRecord, outcome: str, detail: str = "") -> None:
        record.outcome = outcome  # type: ignore[assignment]
        record.ended_at = workflow.now()
        record.detail = detail
        self.show()

    async def wait(self, name: str, title: str, seconds: float) -> None:
        """A timed wait shown as a step (e.g. the drain); an abort ends it early."""
        await self.boundary()
        record = self.begin_step(name, title)
        self.report.waiting_for = f"{title} ({seconds:.0f}s)"
        self.show()
        try:
            await workflow.wait_condition(lambda: self.abort_requested is not None, timeout=timedelta(seconds=seconds))
        except asyncio.TimeoutError:
            pass
        self.report.waiting_for = None
        self.end_step(record, "ok" if self.abort_requested is None else "failed", "" if self.abort_requested is None else "aborted")
        await self.boundary()

    async def boundary(self) -> None:
        if self.abort_requested is None and self.paused:
            self.report.status = "paused"
            self.report.waiting_for = "resume (opsflow resume)"
            self.show()
            await workflow.wait_condition(lambda: not self.paused or self.abort_requested is not None)
            self.report.status = "running"
            self.report.waiting_for = None
        if self.abort_requested is not None:
            a = self.abort_requested
            raise Stop("aborted", f"aborted by {a.by}" + (f": {a.reason}" if a.reason else ""))

    def owe(self, title: str, activity: str, arg: Any, *, queue: str | None, timeout: float = 60) -> None:
        """Record what undoes a change, to run (on the change's task queue) if the procedure stops."""
        self.undo_stack.append((title, activity, arg, queue, timeout))

    async def undo(self) -> None:
        """Reverse the recorded steps, newest first. Each undo is tried hard: it must not be skipped."""
        while self.undo_stack:
            title, activity, arg, queue, timeout = self.undo_stack.pop()
            record = self.begin_step(f"undo:{activity}", title)
            try:
                await workflow.execute_activity(
                    activity,
                    arg,
                    task_queue=queue,
                    start_to_close_timeout=timedelta(seconds=timeout),
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=20), maximum_attempts=10),
                    summary=title,
                )
                self.end_step(record, "compensated")
            except ActivityError as err:
                self.end_step(record, "failed", failure_message(err))
                self.report.remaining.append(f"{title} (undo failed: {failure_message(err)})")

    # -- people ------------------------------------------------------------------------------------------

    async def approval_gate(self, what: str) -> Decision:
        """Wait for an approval. No answer by the deadline: escalate, then abort or keep waiting."""
        policy = self.inventory.approval
        record = self.begin_step("approval", f"Approval: {what}")
        self.awaiting_approval = True
        self.report.status = "waiting"
        wid = self.report.workflow_id
        self.report.waiting_for = f"approval by one of {', '.join(self.allowed_approvers())}: opsflow approve {wid} --as NAME"
        self.show()
        await self.notify(f"Approval needed: {what}. Approve: opsflow approve {wid} --as NAME", severity="warning")
        try:
            await workflow.wait_condition(lambda: self.decision is not None or self.abort_requested is not None, timeout=timedelta(seconds=policy.timeout))
        except asyncio.TimeoutError:
            channels = [policy.escalation_channel] if policy.escalation_channel else []
            await self.notify(f"ESCALATION: nobody approved '{what}' within {policy.timeout:.0f}s", severity="critical", channels=channels)
            if policy.on_timeout == "abort":
                self.awaiting_approval = False
                self.end_step(record, "failed", "no approval by the deadline")
                raise Stop("aborted", f"no approval within {policy.timeout:.0f}s; escalated and aborted with nothing changed") from None
            self.report.waiting_for += " (escalated)"
            self.show()
            await workflow.wait_condition(lambda: self.decision is not None or self.abort_requested is not None)
        self.awaiting_approval = False
        if self.decision is None:
            self.end_step(record, "failed", "aborted while waiting")
            await self.boundary()
        d = self.decision
        assert d is not None
        self.end_step(record, "ok" if d.approved else "failed", f"{'approved' if d.approved else 'rejected'} by {d.by}" + (f": {d.reason}" if d.reason else ""))
        if not d.approved:
            raise Stop("aborted", f"rejected by {d.by}: {d.reason}")
        return d

    def allowed_approvers(self) -> list[str]:
        policy = self.inventory.approval
        return [a for a in policy.approvers if not (policy.require_distinct_approver and a == self.report.requester)]

    def _check_approver(self, req: Request) -> None:
        if not self.awaiting_approval:
            raise ApplicationError(f"nothing is waiting for approval (current step: {self.report.current_step})", type="NotWaiting")
        policy = self.inventory.approval
        if req.by not in policy.approvers:
            raise ApplicationError(f"{req.by!r} may not approve in {self.inventory.environment}; approvers: {', '.join(policy.approvers)}", type="NotAllowed")
        if policy.require_distinct_approver and req.by == self.report.requester:
            raise ApplicationError(f"{req.by!r} requested this procedure and may not approve it (a distinct approver is required)", type="NotAllowed")

    def _check_operator(self, req: Request) -> None:
        if req.by not in self.inventory.approval.approvers and req.by != self.report.requester:
            raise ApplicationError(f"{req.by!r} may not control this procedure; only the requester or an approver", type="NotAllowed")

    @workflow.update
    def approve(self, req: Request) -> Decision:
        self.decision = Decision(approved=True, by=req.by, at=workflow.now(), reason=req.reason)
        self.report.approval = self.decision
        return self.decision

    @approve.validator
    def _validate_approve(self, req: Request) -> None:
        self._check_approver(req)

    @workflow.update
    def reject(self, req: Request) -> Decision:
        self.decision = Decision(approved=False, by=req.by, at=workflow.now(), reason=req.reason)
        self.report.approval = self.decision
        return self.decision

    @reject.validator
    def _validate_reject(self, req: Request) -> None:
        self._check_approver(req)
        if not req.reason.strip():
            raise ApplicationError("a rejection needs a reason (--reason)", type="BadInput")

    @workflow.update
    def pause(self, req: Request) -> str:
        self.paused = True
        self.report.events.append(ControlEvent(action="pause", by=req.by, at=workflow.now(), reason=req.reason))
        return f"pausing at the next step boundary (current step: {self.report.current_step})"

    @pause.validator
    def _validate_pause(self, req: Request) -> None:
        self._check_operator(req)
        if self.paused:
            raise ApplicationError("already paused", type="NotAllowed")

    @workflow.update
    def resume(self, req: Request) -> str:
        self.paused = False
        self.report.events.append(ControlEvent(action="resume", by=req.by, at=workflow.now(), reason=req.reason))
        return "resumed"

    @resume.validator
    def _validate_resume(self, req: Request) -> None:
        self._check_operator(req)
        if not self.paused:
            raise ApplicationError("not paused", type="NotAllowed")

    @workflow.update
    def abort(self, req: Request) -> str:
        self.abort_requested = ControlEvent(action="abort", by=req.by, at=workflow.now(), reason=req.reason)
        self.report.events.append(self.abort_requested)
        return "aborting at the next step boundary; what was done will be undone"

    @abort.validator
    def _validate_abort(self, req: Request) -> None:
        self._check_operator(req)
        if self.point_of_no_return:
            raise ApplicationError("past the point of no return (the promotion has happened): the procedure goes forward", type="NotAllowed")
        if self.abort_requested is not None:
            raise ApplicationError("an abort is already under way", type="NotAllowed")

    @workflow.query
    def progress(self) -> ProcedureReport:
        return self.report

    # -- notifications, UI, ending ------------------------------------------------------------------------

    async def notify(self, text: str, *, severity: str = "info", channels: list[str] | None = None) -> None:
        """Best effort: a notification that cannot be delivered is noted, never fails the procedure."""
        if not self.inventory.notifications:
            return
        request = NotifyRequest(
            notification=Notification(environment=self.inventory.environment, channels=channels or [], text=text, severity=severity, workflow_id=self.report.workflow_id),  # type: ignore[arg-type]
            channels=self.inventory.notifications,
        )
        try:
            await workflow.execute_activity(
                "notify.send",
                request,
                task_queue=self.inventory.task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"notify: {text[:60]}",
            )
        except ActivityError as err:
            self.report.events.append(ControlEvent(action="notify-failed", by="opsflow", at=workflow.now(), reason=failure_message(err)))

    def show(self) -> None:
        """Mirror the report into the Temporal UI: current details (markdown) and search attributes."""
        r = self.report
        lines = [f"**{r.procedure}** in `{r.environment}` — **{r.status}**"]
        if r.current_step:
            lines.append(f"current step: `{r.current_step}`")
        if r.waiting_for:
            lines.append(f"waiting for: {r.waiting_for}")
        lines.append("")
        lines.append("| step | outcome | seconds |")
        lines.append("| --- | --- | --- |")
        for s in r.steps:
            secs = f"{s.seconds:.1f}" if s.seconds is not None else ""
            lines.append(f"| {s.title} | {s.outcome} | {secs} |")
        workflow.set_current_details("\n".join(lines))
        workflow.upsert_search_attributes([OPS_STEP.value_set(r.current_step or "start"), OPS_STATUS.value_set(r.status)])

    async def conclude(self, body: Callable[[], Awaitable[None]]) -> ProcedureReport:
        """Run the procedure body; on a stop or failure undo what can be undone, and end with the report.

        A procedure that did not succeed ends the workflow as failed (so the UI lists it as such) with the
        report in the failure's details; `opsflow report` reads it from there."""
        try:
            await body()
        except Stop as stop:
            return await self._stopped(stop.status, stop.reason)
        except asyncio.CancelledError:
            # Cancelled from the UI/CLI: treated as an abort, and the undo still runs.
            return await self._stopped("aborted", "cancelled")
        if self.report.status not in ("planned",):
            self.report.status = "succeeded"
        self.report.current_step = None
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        self.show()
        return self.report

    async def finalize(self) -> None:
        """Called once at the end, success or not, after any undo (e.g. to store the report)."""

    async def _stopped(self, status: str, reason: str) -> ProcedureReport:
        if not self.point_of_no_return:
            await self.undo()
        self.report.status = status  # type: ignore[assignment]
        self.report.failure = reason
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        self.show()
        if self.notify_on_stop:
            await self.notify(f"{self.report.procedure} {status}: {reason}", severity="critical" if status == "failed" else "warning")
        raise ApplicationError(f"{self.report.procedure} {status}: {reason}", self.report, type=status.capitalize(), non_retryable=True)
