"""What every procedure shares: steps, gates, pause/resume/abort, undo, UI details, the report.

A procedure subclasses `Procedure`, builds its state in `@workflow.init` and writes each step as one line:

    status = await self.step("preflight", "Check westeurope", DB_STATUS, target)

The activity is its typed declaration (opsflow/contracts/), so the step's result is a `DbStatus`.

A step's activity runs as a task raced against abort (and, for long steps, pause): an abort cancels it,
waits until it has stopped, then undoes what was done. Every activity has a bound on how long it may wait
for a worker. People talk to a running procedure through Updates whose validators reject a request that may
not happen (a non-approver, a self-approval, an abort past the point of no return) before it reaches history.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable, TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from opsflow.inventory import ApprovalPolicy, Inventory
    from opsflow.models import ControlEvent, Decision, Notification, NotifyRequest, ProcedureReport, StepRecord
    from opsflow.procedures import SCHEDULABLE
    from opsflow.rules import START_UNSIGNED, InventoryDigest, RulesRequest, WorkerRules, input_digest
    from opsflow.temporal import OPS_STATUS, OPS_STEP
    from opsflow import signing  # cryptography: a native extension, must not be re-imported in the sandbox
    from opsflow.contracts.base import Activity
    from opsflow.contracts.kernel import RULES_INVENTORY, TEMPORAL_UNSERVED_QUEUES
    from opsflow.contracts.notify import NOTIFY_SEND

A = TypeVar("A")
R = TypeVar("R")


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


@dataclass
class StepDecl:
    """One declared step: the dry-run plan prints these, and a run may only record declared names."""

    name: str
    what: str  # what it would change
    when: str | None = None  # the condition under which it runs, if any
    runs: bool = True  # the condition, evaluated at plan time (False: listed as skipped)


@dataclass(frozen=True)
class Undo:
    """What reverses a change, run (on the change's task queue) should the procedure stop before the point of no
    return. `name` is the step it runs under (default `undo:<activity>`); a long undo (a `timeout` of minutes) takes
    a `heartbeat` timeout, so a worker lost while it runs costs that, not the whole timeout."""

    activity: Activity
    title: str
    arg: Any = None
    queue: str | None = None
    timeout: float = 60
    name: str | None = None
    heartbeat: float | None = None


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
        return [n for n in self.policy.names() if n not in taken and not (self.policy.require_distinct_approver and n == self.requester)]


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


RETRY_NEVER = ["BadInput", "Refused", "NotFound"]
NOTIFY_HEARTBEAT = 10  # seconds; notify.send heartbeats every 2 s while it sends


class Procedure:
    """Base class for procedure workflows (handlers are inherited by the @workflow.defn subclasses)."""

    notify_on_stop = True

    def __init__(self, inventory: Inventory | None, report: ProcedureReport) -> None:
        # The rules: until `take_rules` has the worker's inventory, none (an input's inventory is not trusted).
        self.inventory: Inventory = inventory  # type: ignore[assignment]
        self.rules_taken = False
        self.used_requests: list[str] = []  # what accepted signed requests signed (signing.request_key): no replay
        self.worker_rules = False  # True: this run acts by the worker's inventory (every run since "worker-rules")
        self.report = report
        self.report.workflow_id = workflow.info().workflow_id
        self.report.started_at = workflow.now()
        self.gates: dict[str, GateState] = {}
        self.paused = False
        self.paused_at: datetime | None = None
        self.abort_requested: ControlEvent | None = None
        self.point_of_no_return = False  # past it, failures go forward instead of undoing
        self.writes_down: str | None = None  # set while a step has made the service unwritable (said on pause)
        self.undo_stack: list[Undo] = []
        self.busy_waited: dict[str, float] = {}  # step name -> seconds its activity waited for a busy worker
        self.window_override: ControlEvent | None = None  # an approver's `opsflow override` of a window wait
        self.awaiting_override = False
        self.declared: list[StepDecl] | None = None
        self._shown: tuple[str, str] | None = None  # the search attributes last upserted

    # -- declared steps and the dry-run plan -------------------------------------------------------------

    def declare(self, decls: list[StepDecl]) -> None:
        """The steps this run will take from here on; `plan()` prints them, `step()` keeps to them."""
        self.declared = decls

    def plan(self) -> None:
        """Dry run: record every declared step as planned (or skipped, with its condition), change nothing."""
        for d in self.declared or []:
            detail = d.what + (f" (when {d.when})" if d.when else "")
            self.end_step(self.begin_step(d.name, d.what), "planned" if d.runs else "skipped", detail)
        self.report.status = "planned"

    # -- steps -------------------------------------------------------------------------------------------

    def activity_options(self, queue: str | None, timeout: float, heartbeat: float | None, attempts: int) -> dict:
        """Every activity is bounded: how long it may wait for a worker, run, and be retried."""
        return dict(
            task_queue=queue,
            schedule_to_start_timeout=timedelta(seconds=self.inventory.limits.worker_wait),
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=20),
                maximum_attempts=attempts,
                non_retryable_error_types=RETRY_NEVER,
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def step(
        self,
        name: str,
        title: str,
        activity: Activity[A, R],
        arg: A,
        *,
        queue: str | None = None,
        timeout: float = 60,
        heartbeat: float | None = None,
        attempts: int = 5,
        detail: Callable[[R], str] | None = None,
        undo: Undo | None = None,
        undo_timeout: float = 60,
        interruptible: bool = False,
    ) -> R:
        """Run one activity as a recorded step, between step boundaries (pause/abort are honoured there).

        An abort cancels the running activity (it stops on its next heartbeat) and the undo follows.
        `interruptible` steps (long waits) are also cancelled by a pause and run again after the resume.
        `undo=Undo(activity, title, arg)` registers what reverses this step should the procedure stop before
        the point of no return (on the step's queue); it is owed as soon as the step has started, since it may
        have acted."""
        self._check_declared(name)
        while True:
            await self.boundary()
            record = self.begin_step(name, title)
            opts = self.activity_options(queue, timeout, heartbeat, attempts)
            handle = workflow.start_activity(activity.name, arg, result_type=activity.result_type, summary=title,
                                             **opts)
            if undo is not None:
                self.owe(replace(undo, queue=queue, timeout=undo_timeout))
            paused = await self._race(handle, interruptible)
            try:
                result = await handle
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    if paused and self.abort_requested is None:
                        self.end_step(record, "skipped", "interrupted by the pause; runs again after the resume")
                        continue
                    self.end_step(record, "failed", "cancelled")
                    if self.abort_requested is None:  # cancelled from the UI/CLI: an abort
                        raise Stop("aborted", "cancelled") from None
                    await self.boundary()
                if not_started(err):
                    if await self._worker_busy(queue or self.inventory.task_queue, record):
                        continue
                    message = f"no worker serves {queue or self.inventory.task_queue} (waited {self.inventory.limits.worker_wait:.0f}s)"
                else:
                    message = failure_message(err)
                self.end_step(record, "failed", message)
                raise Stop("failed", f"{title}: {message}") from None
            except asyncio.CancelledError:
                self.end_step(record, "failed", "cancelled")
                raise
            self.end_step(record, "ok", detail(result) if detail else "")
            if self.abort_requested is not None:
                await self.boundary()
            return result

    async def _worker_busy(self, queue: str, record: StepRecord) -> bool:
        """A step not picked up in `limits.worker_wait`: is a worker polling `queue` (busy, every slot taken)
        rather than missing? Then it is scheduled again, for up to `limits.busy_wait` in all. Asked on the workflow's
        queue, not as a local activity: with a full workflow cache, pending local activities stall a worker
        (temporalio/sdk-rust#886; seen here with 1000 procedures on one worker)."""
        if not workflow.patched("busy-workers"):
            return False
        limits = self.inventory.limits
        waited = self.busy_waited.get(record.name, 0.0) + limits.worker_wait
        if waited > limits.busy_wait:
            return False
        try:
            unserved: list[str] = await workflow.execute_activity(
                TEMPORAL_UNSERVED_QUEUES.name, [queue], result_type=TEMPORAL_UNSERVED_QUEUES.result_type,
                summary=f"is a worker polling {queue}?",
                **self.activity_options(self.inventory.task_queue, 10, None, 3))
        except ActivityError:
            return False
        if unserved:
            return False
        self.busy_waited[record.name] = waited
        self.end_step(record, "skipped", f"not picked up in {limits.worker_wait:.0f}s: the worker serving {queue} is busy; scheduled again")
        return True

    async def _race(self, handle: Any, interruptible: bool) -> bool:
        """Wait for the activity, or cancel it on an abort (or a pause, when interruptible). True if paused."""

        def interrupted() -> bool:
            return self.abort_requested is not None and not self.point_of_no_return or interruptible and self.paused

        await workflow.wait_condition(lambda: handle.done() or interrupted())
        if handle.done():
            return False
        # Histories recorded before interruptible steps waited for the step to end (replay keeps that).
        if not workflow.patched("interruptible-steps"):
            await workflow.wait_condition(handle.done)
            return False
        paused = self.paused and self.abort_requested is None
        self.report.waiting_for = "the running step to stop (cancelled)"
        self.show()
        handle.cancel()
        await workflow.wait_condition(handle.done)
        return paused

    def _check_declared(self, name: str) -> None:
        if self.declared is not None and not name.startswith("undo:") and name not in {d.name for d in self.declared}:
            raise ApplicationError(f"step {name!r} is not declared in the procedure's plan", type="BadProcedure", non_retryable=True)

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
        """A timed wait shown as a step (e.g. the drain, a bake); an abort ends it at once."""
        self._check_declared(name)
        await self.boundary()
        record = self.begin_step(name, title)
        self.report.waiting_for = f"{title} ({seconds:.0f}s)"
        self.show()
        try:
            await workflow.wait_condition(lambda: self.abort_requested is not None, timeout=timedelta(seconds=seconds))
        except asyncio.TimeoutError:
            pass
        self.report.waiting_for = None
        aborted = self.abort_requested is not None
        self.end_step(record, "failed" if aborted else "ok", "aborted" if aborted else "")
        await self.boundary()

    async def boundary(self) -> None:
        """Honour a pause (with its deadline and escalation) and an abort."""
        if self.abort_requested is None and self.paused:
            self.report.status = "paused"
            self.report.waiting_for = "resume (opsflow resume)" + (f" — WRITES ARE DOWN: {self.writes_down}" if self.writes_down else "")
            self.show()
            # A pause has a deadline (recorded histories paused without one: replay keeps that).
            deadline = timedelta(seconds=self.inventory.limits.pause_timeout) if workflow.patched("pause-deadline") else None
            try:
                await workflow.wait_condition(lambda: not self.paused or self.abort_requested is not None, timeout=deadline)
            except asyncio.TimeoutError:
                minutes = self.inventory.limits.pause_timeout / 60
                await self.notify(
                    f"ESCALATION: {self.report.procedure} of {self.inventory.environment} paused for {minutes:.0f} min"
                    + (f"; WRITES ARE DOWN: {self.writes_down}" if self.writes_down else ""),
                    severity="critical",
                )
                self.report.waiting_for += " (escalated)"
                self.show()
                await workflow.wait_condition(lambda: not self.paused or self.abort_requested is not None)
            self.report.status = "running"
            self.report.waiting_for = None
        if self.abort_requested is not None:
            a = self.abort_requested
            raise Stop("aborted", f"aborted by {a.by}" + (f": {a.reason}" if a.reason else ""))

    def owe(self, undo: Undo) -> None:
        """Record what undoes a change, to run if the procedure stops (once, however often it is owed)."""
        if undo not in self.undo_stack:
            self.undo_stack.append(undo)

    async def undo(self) -> None:
        """Reverse the recorded steps, newest first. Each undo is tried hard, and bounded: one that cannot
        run says so in `remaining`, for a person to do."""
        while self.undo_stack:
            u = self.undo_stack.pop()
            record = self.begin_step(u.name or f"undo:{u.activity.name}", u.title)
            opts = self.activity_options(u.queue, u.timeout, u.heartbeat, 10)
            opts["retry_policy"] = RetryPolicy(maximum_interval=timedelta(seconds=20), maximum_attempts=10)
            try:
                await workflow.execute_activity(u.activity.name, u.arg, summary=u.title, **opts)
                self.end_step(record, "compensated")
            except ActivityError as err:
                why = f"no worker serves {u.queue}" if not_started(err) else failure_message(err)
                self.end_step(record, "failed", why)
                self.report.remaining.append(f"{u.title} (undo failed: {why})")

    # -- gates -------------------------------------------------------------------------------------------

    async def gate(self, gate_id: str, what: str, *, policy: ApprovalPolicy | None = None) -> list[Decision]:
        """Wait until people approve `what` by the gate's quorum. A rejection or an abort stops the procedure;
        no answer by the deadline escalates, then aborts or keeps waiting (the policy says which)."""
        policy = policy or self.inventory.approval
        gate = self.gates[gate_id] = GateState(gate_id, what, policy, self.report.requester, [])
        record = self.begin_step(gate_id, f"Approval: {what}")
        self.report.status = "waiting"
        wid = self.report.workflow_id
        self.report.waiting_for = self._gate_waiting(gate)
        self.show()
        await self.notify(f"Approval needed: {what}. Approve: opsflow approve {wid} --as NAME", severity="warning")

        def decided() -> bool:
            return gate.outcome is not None or self.abort_requested is not None

        try:
            await workflow.wait_condition(decided, timeout=timedelta(seconds=policy.timeout))
        except asyncio.TimeoutError:
            channels = [policy.escalation_channel] if policy.escalation_channel else []
            await self.notify(f"ESCALATION: nobody approved '{what}' within {policy.timeout:.0f}s", severity="critical", channels=channels)
            if policy.on_timeout == "abort":
                gate.open = False
                self.end_step(record, "failed", "no approval by the deadline")
                raise Stop("aborted", f"no approval within {policy.timeout:.0f}s; escalated and aborted with nothing changed") from None
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

    async def approval_gate(self, what: str, gate_id: str = "approval", policy: ApprovalPolicy | None = None) -> Decision:
        """The usual single gate: returns the decision that completed the quorum."""
        return (await self.gate(gate_id, what, policy=policy))[-1]

    def _gate_waiting(self, gate: GateState) -> str:
        wid = self.report.workflow_id
        need = gate.missing() if gate.decisions else None
        who = ", ".join(gate.eligible()) or "nobody eligible"
        roles = f" (roles needed: {', '.join(gate.policy.require)})" if gate.policy.require else ""
        return f"approval by one of {who}{roles}: opsflow approve {wid} --as NAME" + (f" — still needs {need}" if need else "")

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
            raise ApplicationError(f"nothing is waiting for approval (current step: {self.report.current_step})", type="NotWaiting")
        if len(open_gates) > 1:
            raise ApplicationError(f"several gates are open ({', '.join(g.id for g in open_gates)}): name one with --gate", type="BadInput")
        return open_gates[0]

    def check_approver(self, req: Request, gate: GateState, action: str) -> None:
        policy = gate.policy
        if req.by not in policy.names():
            raise ApplicationError(
                f"{req.by!r} may not approve in {self.inventory.environment}; approvers: {', '.join(policy.names())}", type="NotAllowed"
            )
        if policy.require_distinct_approver and req.by == self.report.requester:
            raise ApplicationError(
                f"{req.by!r} requested this procedure and may not approve it (a distinct approver is required)", type="NotAllowed"
            )
        if any(d.by == req.by for d in gate.decisions):
            raise ApplicationError(f"{req.by!r} has already answered gate {gate.id!r}; another person is needed", type="NotAllowed")
        self.verify_request(req, action, gate.id, policy)

    def check_rules_taken(self) -> None:
        if not self.rules_taken:
            raise ApplicationError("the procedure is still taking its rules from the worker; try again in a moment", type="NotWaiting")

    def check_operator(self, req: Request, action: str) -> None:
        self.check_rules_taken()
        if req.by not in self.inventory.approval.names() and req.by != self.report.requester:
            raise ApplicationError(f"{req.by!r} may not control this procedure; only the requester or an approver", type="NotAllowed")
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

    # -- the rules: the worker's inventory, and who started the run --------------------------------------------

    async def fetch_rules(self, wanted: dict[str, InventoryDigest | None], nonce: str | None = None) -> dict[str, Inventory]:
        """The worker's inventories for `wanted` (environment -> the digest the requester saw), recorded in the
        history; a refusal (a digest that differs, an environment the worker does not hold, a start signature
        already used) stops the run before anything changed."""
        try:
            rules: WorkerRules = await workflow.execute_activity(
                RULES_INVENTORY.name, RulesRequest(environments=wanted, start_nonce=nonce),
                result_type=RULES_INVENTORY.result_type, task_queue=workflow.info().task_queue,
                schedule_to_start_timeout=timedelta(seconds=60), start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=RETRY_NEVER),
                summary=f"the worker's rules for {', '.join(wanted)}")
        except ActivityError as err:
            raise Stop("refused", f"could not take the worker's rules: {failure_message(err)}") from None
        refusals = [r.refusal for r in rules.environments if r.inventory is None]
        if refusals:
            raise Stop("refused", "; ".join(str(r) for r in refusals))
        self.report.rules_sha256 = ",".join(r.sha256[:16] for r in rules.environments)
        return {r.environment: r.inventory for r in rules.environments if r.inventory is not None}

    async def take_rules(self, inp: Any) -> Any:
        """The input with the worker's inventory in place of whatever it carried (README "Who decides the rules").
        Histories recorded before (their inputs carried the inventory) replay as they ran."""
        if not workflow.patched("worker-rules"):
            self.rules_taken = True
            return inp
        self.worker_rules = True
        self.inventory = None  # type: ignore[assignment]
        nonce = (workflow.memo_value(signing.START_MEMO, None, type_hint=dict) or {}).get("nonce")
        found = await self.fetch_rules(self.rules_wanted(inp), nonce if self.is_top_level() else None)
        inp = self.with_rules(inp, found)
        self.rules_taken = True
        return inp

    def rules_wanted(self, inp: Any) -> dict[str, InventoryDigest | None]:
        """environment -> the digest of the inventory the requester saw (a fleet asks for each member's)."""
        return {inp.environment: inp.seen_digest()}

    def with_rules(self, inp: Any, found: dict[str, Inventory]) -> Any:
        """Keep the worker's inventory as this run's rules; -> the input carrying it."""
        self.inventory = found[inp.environment]
        return inp.model_copy(update={"inventory": self.inventory})

    def is_top_level(self) -> bool:
        return workflow.info().parent is None

    def expected_workflow_ids(self) -> list[str]:
        """The ids this run may have: the environment's lock (a run under another id would dodge it)."""
        return [f"opsflow-{self.inventory.environment}"]

    def check_start(self, received: Any = None) -> None:
        """Who may start this procedure (`operators:`) and, when signatures are required, the requester's start
        signature (in the memo; opsflow/signing.py) over this very input. A child procedure (a failback's
        failover, a fleet's member, a scheduled launch) is checked by `check_child`."""
        info = workflow.info()
        self.report.run_id = info.run_id
        if self.worker_rules and info.workflow_id not in self.expected_workflow_ids():
            raise Stop("refused", f"a {self.report.procedure} of {self.inventory.environment} runs as "
                                  f"{' or '.join(self.expected_workflow_ids())} (the environment's lock), not {info.workflow_id}")
        if info.parent is not None:
            if self.worker_rules:
                self.check_child(info.parent, received)
            return
        memo = workflow.memo_value(signing.START_MEMO, None, type_hint=dict)
        digest = input_digest(received, START_UNSIGNED) if self.worker_rules and received is not None else None
        try:
            record = signing.check_start(
                self.inventory,
                procedure=self.report.procedure,
                requester=self.report.requester,
                reason=self.report.reason,
                memo=memo,
                now=workflow.now(),
                input_sha256=digest,
            )
        except ValueError as e:
            raise Stop("refused", str(e)) from None
        if record is not None:
            self.report.start_signature, self.report.start_signed_at = record.signature, record.signed_at
            self.report.start_input_sha256, self.report.start_nonce = record.input_sha256, record.nonce

    def check_child(self, parent: Any, received: Any = None) -> None:
        """A child run: a Schedule's launch (its signed creation is in the memo), or a parent that starts this
        procedure as a child (see the overrides)."""
        record = workflow.memo_value(signing.SCHEDULE_MEMO, None, type_hint=dict)
        if record is None:
            raise Stop("refused", f"a {self.report.procedure} is not started as the child of another workflow "
                                  f"({parent.workflow_id}); start it with opsflow")
        try:
            signed = signing.check_schedule(self.inventory, procedure=self.report.procedure, record=record,
                                            parent_workflow_id=parent.workflow_id, dry_run=self.report.dry_run,
                                            input_sha256=input_digest(received, START_UNSIGNED), schedulable=SCHEDULABLE)
        except ValueError as e:
            raise Stop("refused", str(e)) from None
        self.report.scheduled_by, self.report.schedule_id = record.get("by"), record.get("schedule_id")
        if signed is not None:
            self.report.start_signature, self.report.start_signed_at = signed.signature, signed.signed_at
            self.report.start_input_sha256 = signed.input_sha256

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

    # -- pause, resume, abort ----------------------------------------------------------------------------

    def remember_signed(self, req: Request, action: str, gate_id: str | None) -> None:
        info = workflow.info()
        key = signing.request_key(req, workflow_id=info.workflow_id, run_id=info.run_id, gate_id=gate_id, action=action)
        if key:
            self.used_requests.append(key)

    def event(self, action: str, req: Request, signed_as: str | None = None) -> ControlEvent:
        self.remember_signed(req, signed_as or action, None)
        e = ControlEvent(action=action, by=req.by, at=workflow.now(), reason=req.reason, signature=req.signature, signed_at=req.signed_at)
        self.report.events.append(e)
        return e

    @workflow.update
    async def pause(self, req: Request) -> str:
        self.paused = True
        self.event("pause", req)
        if self.writes_down:
            await self.notify(
                f"{self.report.procedure} of {self.inventory.environment} PAUSED by {req.by} while WRITES ARE DOWN: {self.writes_down}",
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

    # -- overrides: a window or a freeze an approver may set aside ------------------------------------

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
            await workflow.wait_condition(lambda: self.window_override is not None or self.abort_requested is not None, timeout=timeout)
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
            raise ApplicationError(f"{req.by!r} may not override; approvers: {', '.join(policy.names())}", type="NotAllowed")
        if self.override_needs_reason and not req.reason.strip():
            raise ApplicationError("an override needs a reason (--reason)", type="BadInput")
        if not self.awaiting_override or self.window_override is not None:
            raise ApplicationError("not waiting for an override", type="NotWaiting")
        self.verify_request(req, "override", None, policy)

    @workflow.query
    def progress(self) -> ProcedureReport:
        return self.report

    @workflow.query
    def rules(self) -> Inventory | None:
        """The inventory this run acts by (the worker's): the CLI reads whose keys sign a request from it."""
        return self.inventory if self.rules_taken else None

    # -- workers -------------------------------------------------------------------------------------------

    async def check_workers(self, queues: list[str], *, name: str = "preflight-workers") -> None:
        """Refuse before changing anything when a task queue this procedure will use has no worker."""
        if not workflow.patched("check-workers"):
            return
        unserved: list[str] = await self.step(
            name,
            "Check that a worker serves every task queue",
            TEMPORAL_UNSERVED_QUEUES,
            sorted(set(queues)),
            queue=self.inventory.task_queue,
            timeout=10,  # one DescribeTaskQueue per queue; a worker lost mid-check costs this, not the 60 s default
            attempts=3,
            detail=lambda u: f"unserved: {', '.join(u)}" if u else "all served",
        )
        if unserved:
            raise Stop("refused", "; ".join(f"no worker serves {q}" for q in unserved) + " (start one: opsflow worker --env ...)")

    # -- notifications, UI, ending ------------------------------------------------------------------------

    async def notify(self, text: str, *, severity: str = "info", channels: list[str] | None = None) -> None:
        """Best effort: a notification that cannot be delivered is noted, never fails the procedure."""
        if self.inventory is None or not self.inventory.notifications:
            return
        request = NotifyRequest(
            notification=Notification(
                environment=self.inventory.environment,
                channels=channels or [],
                text=text,
                severity=severity,
                workflow_id=self.report.workflow_id,
            ),  # type: ignore[arg-type]
            channels=self.inventory.notifications,
        )
        # A worker lost while it sends costs the heartbeat timeout, not the 30 s bound (the activity heartbeats).
        opts = self.activity_options(self.inventory.task_queue, 30, NOTIFY_HEARTBEAT, 3)
        opts.pop("cancellation_type")
        try:
            await workflow.execute_activity(NOTIFY_SEND.name, request, summary=f"notify: {text[:60]}", **opts)
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
        shown = (r.current_step or "start", r.status)
        # An upsert is a command in history and costs a round trip: only when a value changed (recorded
        # histories upserted on every redraw; replay keeps that).
        if shown == self._shown and workflow.patched("lean-ui"):
            return
        self._shown = shown
        workflow.upsert_search_attributes([OPS_STEP.value_set(shown[0]), OPS_STATUS.value_set(shown[1])])

    async def conclude(self, inp: Any, body: Callable[[Any], Awaitable[None]]) -> ProcedureReport:
        """Take the worker's rules, check the start, run the procedure body; on a stop or failure undo what can
        be undone, and end with the report.

        A Temporal cancel (the UI, `temporal workflow cancel`, an emergency's preemption) is an abort: before
        the point of no return the running step is cancelled and the undo runs; after it the procedure goes
        forward to a consistent state, and says so. A procedure that did not succeed ends the workflow as failed
        (so the UI lists it as such) with the report in the failure's details; `opsflow report` reads it."""
        self.show()
        if not workflow.patched("cancel-as-abort"):  # histories recorded before: a cancel ended the body at once
            return await self._run_body(inp, body)
        task = asyncio.ensure_future(self._run_body(inp, body))
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                await self.cancelled_through_temporal()

    async def cancelled_through_temporal(self) -> None:
        now = workflow.now()
        if not self.point_of_no_return:
            if self.abort_requested is None:
                self.abort_requested = ControlEvent(action="abort", by="temporal", at=now,
                                                    reason="cancelled through Temporal, unsigned")
                self.report.events.append(self.abort_requested)
            return
        self.report.events.append(ControlEvent(action="cancel-refused", by="temporal", at=now,
                                               reason="cancelled through Temporal past the point of no return: going forward"))
        self.show()
        await self.notify(f"{self.report.procedure} of {self.report.environment}: a Temporal cancel arrived past the point "
                          "of no return; the procedure goes forward to a consistent state", severity="warning")

    async def _run_body(self, inp: Any, body: Callable[[Any], Awaitable[None]]) -> ProcedureReport:
        try:
            received = inp
            inp = await self.take_rules(inp)
            self.check_start(received)
            await body(inp)
        except Stop as stop:
            return await self._stopped(stop.status, stop.reason)
        except asyncio.CancelledError:
            # Cancelled from the UI/CLI (or preempted by an emergency): an abort, and the undo still runs.
            return await self._stopped("aborted", "cancelled")
        if self.report.status not in ("planned",):
            self.report.status = "succeeded"
        self.report.current_step = None
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        self.show()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.report

    async def finalize(self) -> None:
        """Called once at the end, success or not, after any undo (e.g. to store the report)."""

    async def _stopped(self, status: str, reason: str) -> ProcedureReport:
        if not self.point_of_no_return:
            await self.undo()
            self.writes_down = None
        self.report.status = status  # type: ignore[assignment]
        self.report.failure = reason
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        self.show()
        if self.notify_on_stop:
            await self.notify(f"{self.report.procedure} {status}: {reason}", severity="critical" if status == "failed" else "warning")
        await workflow.wait_condition(workflow.all_handlers_finished)  # a pause's notification, say, still in flight
        raise ApplicationError(f"{self.report.procedure} {status}: {reason}", self.report, type=status.capitalize(), non_retryable=True)
