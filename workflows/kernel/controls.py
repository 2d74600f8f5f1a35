"""Controls: pause, resume, abort and override, each an Update whose validator refuses what may not happen."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from opsflow import signing  # cryptography: a native extension, must not be re-imported in the sandbox
    from opsflow.inventory import ApprovalPolicy
    from opsflow.models import ControlEvent

from workflows.kernel.common import Request


class Controls:
    """The controls of a procedure (a part `Procedure` composes; `self` is the procedure)."""

    def remember_signed(self, req: Request, action: str, gate_id: str | None) -> None:
        info = workflow.info()
        key = signing.request_key(req, workflow_id=info.workflow_id, run_id=info.run_id, gate_id=gate_id, action=action)
        if key:
            self.used_requests.append(key)

    def event(self, action: str, req: Request, signed_as: str | None = None) -> ControlEvent:
        self.remember_signed(req, signed_as or action, None)
        e = ControlEvent(
            action=action,
            by=req.by,
            at=workflow.now(),
            reason=req.reason,
            signature=req.signature,
            signed_at=req.signed_at,
        )
        self.report.events.append(e)
        return e

    @workflow.update
    async def pause(self, req: Request) -> str:
        self.paused = True
        self.event("pause", req)
        if self.writes_down:
            await self.notify(
                f"{self.report.procedure} of {self.inventory.environment} PAUSED by {req.by} "
                f"while WRITES ARE DOWN: {self.writes_down}",
                severity="critical",
            )
            return f"paused — WRITES ARE DOWN while paused: {self.writes_down}; resume or abort soon"
        return f"pausing (a long step stops now, a short one at its end; current step: {self.report.current_step})"

    @pause.validator
    def _validate_pause(self, req: Request) -> None:
        self.check_operator(req, "pause")
        if self.paused:
            raise ApplicationError("already paused", type="NotAllowed")

    @workflow.update
    def resume(self, req: Request) -> str:
        self.paused = False
        self.event("resume", req)
        return "resumed"

    @resume.validator
    def _validate_resume(self, req: Request) -> None:
        self.check_operator(req, "resume")
        if not self.paused:
            raise ApplicationError("not paused", type="NotAllowed")

    @workflow.update
    def abort(self, req: Request) -> str:
        self.abort_requested = self.event("abort", req)
        return "aborting now: the running step is cancelled and what was done is undone"

    @abort.validator
    def _validate_abort(self, req: Request) -> None:
        self.check_operator(req, "abort")
        if self.point_of_no_return:
            raise ApplicationError("past the point of no return: the procedure goes forward", type="NotAllowed")
        if self.abort_requested is not None:
            raise ApplicationError("an abort is already under way", type="NotAllowed")

    # Which procedures take an override and how: who may (`override_policy`), whether a reason is required.
    override_needs_reason = False

    def override_policy(self) -> ApprovalPolicy:
        return self.inventory.approval

    def overridden(self, event: ControlEvent) -> str:
        """Record the override in the procedure's report; the answer the person sees."""
        return "the wait is overridden: the procedure goes on now"

    async def wait_for_override(self, waiting_for: str, timeout: timedelta) -> bool:
        """Wait `timeout` (a window to open, an override's deadline) unless an approver overrides first (then
        True) or the procedure is aborted. `waiting_for` is what the UI and `opsflow status` show."""
        self.report.status = "waiting"
        self.report.waiting_for = waiting_for
        self.awaiting_override = True
        self.show()
        try:
            await workflow.wait_condition(
                lambda: self.window_override is not None or self.abort_requested is not None, timeout=timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.awaiting_override = False
        return self.window_override is not None

    @workflow.update
    def override(self, req: Request) -> str:
        self.window_override = self.event("override-window", req, signed_as="override")
        return self.overridden(self.window_override)

    @override.validator
    def _validate_override(self, req: Request) -> None:
        self.check_rules_taken()
        policy = self.override_policy()
        if req.by not in policy.names():
            raise ApplicationError(f"{req.by!r} may not override; approvers: {', '.join(policy.names())}",
                                   type="NotAllowed")
        if self.override_needs_reason and not req.reason.strip():
            raise ApplicationError("an override needs a reason (--reason)", type="BadInput")
        if not self.awaiting_override or self.window_override is not None:
            raise ApplicationError("not waiting for an override", type="NotWaiting")
        self.verify_request(req, "override", None, policy)
