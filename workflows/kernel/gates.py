"""Gates: where a procedure waits for people's approval, by the policy's quorum (approve/reject Updates)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from opsflow import signing  # cryptography: a native extension, must not be re-imported in the sandbox
    from opsflow.inventory import ApprovalPolicy
    from opsflow.models import Decision

from workflows.kernel.common import Request, Stop


@dataclass
class GateState:
    """A point where the procedure waits for people. Decisions accumulate until the policy's quorum."""

    id: str
    title: str
    policy: ApprovalPolicy
    requester: str
    decisions: list[Decision]
    open: bool = True
    outcome: str | None = None  # approved | rejected

    def approvals(self) -> list[Decision]:
        return [d for d in self.decisions if d.approved]

    def missing(self) -> str | None:
        """What the quorum still needs (None: met)."""
        people = [d.by for d in self.approvals()]
        needed = []
        if len(set(people)) < self.policy.min_approvals:
            needed.append(f"{self.policy.min_approvals - len(set(people))} more approval(s)")
        uncovered = self.uncovered_roles(people)
        if uncovered:
            needed.append("an approval by role " + " and ".join(uncovered))
        return "; ".join(needed) or None

    def uncovered_roles(self, people: list[str]) -> list[str]:
        """Required roles that no assignment of distinct approvers covers (each person covers one role)."""
        required = self.policy.require
        if not required:
            return []
        best = list(required)
        for perm in itertools.permutations(set(people), min(len(set(people)), len(required))):
            left = list(required)
            for person in perm:
                for role in self.policy.roles_of(person):
                    if role in left:
                        left.remove(role)
                        break
            if len(left) < len(best):
                best = left
            if not best:
                break
        return best

    def eligible(self) -> list[str]:
        taken = {d.by for d in self.decisions}
        return [
            n
            for n in self.policy.names()
            if n not in taken and not (self.policy.require_distinct_approver and n == self.requester)
        ]


class Gates:
    """The gates of a procedure (a part `Procedure` composes; `self` is the procedure)."""

    async def gate(self, gate_id: str, what: str, *, policy: ApprovalPolicy | None = None) -> list[Decision]:
        """Wait until people approve `what` by the gate's quorum. A rejection or an abort stops the procedure;
        no answer by the deadline escalates, then aborts or keeps waiting (the policy says which)."""
        policy = policy or self.inventory.approval
        gate = self.gates[gate_id] = GateState(gate_id, what, policy, self.report.requester, [])
        record = self.begin_step(gate_id, f"Approval: {what}", "gate")
        self.report.status = "waiting"
        wid = self.report.workflow_id
        self.report.waiting_for = self._gate_waiting(gate)
        self.show()
        asked = ""  # who asked and why: an alert's request (opsflow alert-receiver) says which alert
        if workflow.patched("approval-notice-names-requester"):
            asked = f" Requested by {self.report.requester}" + (f": {self.report.reason}" if self.report.reason else "")
            asked = asked.rstrip(".") + "."
        await self.notify(f"Approval needed: {what}.{asked} Approve: opsflow approve {wid} --as NAME",
                          severity="warning")

        def decided() -> bool:
            return gate.outcome is not None or self.abort_requested is not None

        try:
            await workflow.wait_condition(decided, timeout=timedelta(seconds=policy.timeout))
        except asyncio.TimeoutError:
            channels = [policy.escalation_channel] if policy.escalation_channel else []
            await self.notify(
                f"ESCALATION: nobody approved '{what}' within {policy.timeout:.0f}s",
                severity="critical",
                channels=channels,
            )
            if policy.on_timeout == "abort":
                gate.open = False
                self.end_step(record, "failed", "no approval by the deadline")
                raise Stop(
                    "aborted", f"no approval within {policy.timeout:.0f}s; escalated and aborted with nothing changed"
                ) from None
            self.report.waiting_for += " (escalated)"
            self.show()
            await workflow.wait_condition(decided)
        gate.open = False
        if gate.outcome is None:
            self.end_step(record, "failed", "aborted while waiting")
            await self.boundary()
        last = gate.decisions[-1]
        who = ", ".join(d.by for d in gate.decisions if d.approved == last.approved)
        self.end_step(
            record,
            "ok" if last.approved else "failed",
            f"{'approved' if last.approved else 'rejected'} by {who}" + (f": {last.reason}" if last.reason else ""),
        )
        if not last.approved:
            raise Stop("aborted", f"rejected by {last.by}: {last.reason}")
        return gate.approvals()

    async def approval_gate(
        self, what: str, gate_id: str = "approval", policy: ApprovalPolicy | None = None
    ) -> Decision:
        """The usual single gate: returns the decision that completed the quorum."""
        return (await self.gate(gate_id, what, policy=policy))[-1]

    def _gate_waiting(self, gate: GateState) -> str:
        wid = self.report.workflow_id
        need = gate.missing() if gate.decisions else None
        who = ", ".join(gate.eligible()) or "nobody eligible"
        roles = f" (roles needed: {', '.join(gate.policy.require)})" if gate.policy.require else ""
        return f"approval by one of {who}{roles}: opsflow approve {wid} --as NAME" + (
            f" — still needs {need}" if need else ""
        )

    def open_gate(self, req: Request) -> GateState:
        """The gate a request answers: the one it names, else the single open one."""
        open_gates = [g for g in self.gates.values() if g.open]
        if req.gate is not None:
            gate = self.gates.get(req.gate)
            if gate is None or not gate.open:
                names = ", ".join(g.id for g in open_gates) or "none"
                raise ApplicationError(f"gate {req.gate!r} is not open (open gates: {names})", type="NotWaiting")
            return gate
        if not open_gates:
            raise ApplicationError(
                f"nothing is waiting for approval (current step: {self.report.current_step})", type="NotWaiting"
            )
        if len(open_gates) > 1:
            raise ApplicationError(
                f"several gates are open ({', '.join(g.id for g in open_gates)}): name one with --gate", type="BadInput"
            )
        return open_gates[0]

    def check_approver(self, req: Request, gate: GateState, action: str) -> None:
        policy = gate.policy
        if req.by not in policy.names():
            raise ApplicationError(
                f"{req.by!r} may not approve in {self.inventory.environment}; approvers: {', '.join(policy.names())}",
                type="NotAllowed",
            )
        if policy.require_distinct_approver and req.by == self.report.requester:
            raise ApplicationError(
                f"{req.by!r} requested this procedure and may not approve it (a distinct approver is required)",
                type="NotAllowed",
            )
        if any(d.by == req.by for d in gate.decisions):
            raise ApplicationError(
                f"{req.by!r} has already answered gate {gate.id!r}; another person is needed", type="NotAllowed"
            )
        self.verify_request(req, action, gate.id, policy)

    def check_operator(self, req: Request, action: str) -> None:
        self.check_rules_taken()
        if req.by not in self.inventory.approval.names() and req.by != self.report.requester:
            raise ApplicationError(
                f"{req.by!r} may not control this procedure; only the requester or an approver", type="NotAllowed"
            )
        self.verify_request(req, action, None, self.inventory.approval)

    def verify_request(self, req: Request, action: str, gate_id: str | None, policy: ApprovalPolicy) -> None:
        """Signed requests (opsflow/signing.py): refuse a missing (when required), wrong-key, other-run/gate/action,
        stale or replayed signature. Pure: checked against the workflow's clock and its own records."""
        info = workflow.info()
        used = [x.signature for x in (*self.report.approvals, *self.report.events) if x.signature] + self.used_requests
        try:
            signing.verify_request(
                signing.Keyring.of(self.inventory, policy),
                req,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                gate_id=gate_id,
                action=action,
                now=workflow.now(),
                used=used,
            )
        except ValueError as e:
            raise ApplicationError(str(e), type="NotAllowed") from None

    def _decide(self, req: Request, approved: bool) -> Decision:
        gate = self.open_gate(req)
        decision = Decision(
            approved=approved,
            by=req.by,
            at=workflow.now(),
            reason=req.reason,
            gate=gate.id,
            roles=gate.policy.roles_of(req.by),
            signature=req.signature,
            signed_at=req.signed_at,
        )
        gate.decisions.append(decision)
        self.remember_signed(req, "approve" if approved else "reject", gate.id)
        self.report.approvals.append(decision)
        if not approved:
            gate.outcome = "rejected"
        elif gate.missing() is None:
            gate.outcome = "approved"
        if gate.outcome is not None:
            self.report.approval = decision
        else:
            self.report.waiting_for = self._gate_waiting(gate)
            self.show()
        return decision

    @workflow.update
    def approve(self, req: Request) -> Decision:
        return self._decide(req, True)

    @approve.validator
    def _validate_approve(self, req: Request) -> None:
        self.check_approver(req, self.open_gate(req), "approve")

    @workflow.update
    def reject(self, req: Request) -> Decision:
        return self._decide(req, False)

    @reject.validator
    def _validate_reject(self, req: Request) -> None:
        self.check_approver(req, self.open_gate(req), "reject")
        if not req.reason.strip():
            raise ApplicationError("a rejection needs a reason (--reason)", type="BadInput")
