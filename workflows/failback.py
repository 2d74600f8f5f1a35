"""Failback: return to a recovered region after a failover. Reads top to bottom; each step is one line.

preflight the recovered region (Kubernetes healthy; its old database reachable or gone) -> approval (nothing
destructive happens before it) -> rebuild a replica there from the current primary, keeping what the old
server holds first and reporting whether it took writes after the split -> wait until it is within the lag
limit, heartbeating the bytes behind -> wait for the low-traffic window (a person can override) -> the
planned failover back, as a child workflow (the same failover workflow) -> the region left becomes the
standby again (rebuilt as a replica of the primary) -> one report.

After a switchover (Azure virtual endpoint) the recovered region's old primary already streams from the current
primary: no rebuild (the step is recorded as skipped, the catch-up still proves it), the failover back is a
switchover too, and the region it leaves follows the new primary by itself (no "restandby" rebuild).
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError

from workflows.failover import FailoverInput, got, together
from workflows.procedure import Procedure, StepDecl, Stop, child_task_timeout, failure_message

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.db import DB_REBUILD_REPLICA, DB_STATUS, DB_WAIT_CAUGHT_UP
    from opsflow.contracts.k8s import K8S_STATUS
    from opsflow.models import (
        CatchUpRequest,
        ControlEvent,
        DbStatus,
        FailbackReport,
        FailoverReport,
        KubeStatus,
        RebuildRequest,
        RebuildResult,
        RegionTarget,
    )
    from opsflow.rules import ProcedureInput


class FailbackInput(ProcedureInput):
    to_region: str  # the recovered region to return to
    dry_run: bool = False
    requester: str
    reason: str = ""


def declare(inp: FailbackInput, primary: str) -> list[StepDecl]:
    """Every step after the preflight: the dry-run plan and the run's only names."""
    inv, to = inp.inventory, inp.to_region
    window = inv.failback.window
    return [
        StepDecl("approval", f"wait for one of {', '.join(inv.approval.names())}"),
        StepDecl(
            "rebuild",
            f"keep what the old server in {to} holds, then rebuild it as a replica of {primary} "
            "(pg_rewind where the timeline allows, else a fresh copy; Azure/RDS: a new replica)",
        ),
        StepDecl("catch-up", f"wait until {to} is within {inv.failover.max_planned_lag_bytes} bytes of {primary}"),
        StepDecl(
            "window",
            f"wait for the low-traffic window {window.model_dump() if window else ''} (override: opsflow override)",
            "the inventory has a failback window and it is closed",
            window is not None,
        ),
        StepDecl("failover", f"planned failover {primary} -> {to} (child workflow)"),
        StepDecl("restandby", f"rebuild {primary} as a replica of {to}"),
    ]


def follows(old: DbStatus, primary: DbStatus | None) -> bool:
    """The recovered region's database already streams from the current primary (after a switchover): a replica,
    streaming, on the primary's timeline (both known)."""
    return (
        primary is not None and old.reachable and old.role == "replica" and old.streaming
        and old.timeline is not None and old.timeline == primary.timeline
    )


@workflow.defn(name="failback")
class FailbackWorkflow(Procedure[FailbackReport]):
    @workflow.init
    def __init__(self, inp: FailbackInput) -> None:
        super().__init__(inp.inventory, FailbackReport.of(inp, to_region=inp.to_region))

    @workflow.run
    async def run(self, inp: FailbackInput) -> FailbackReport:
        return await self.conclude(inp, self.failback)

    async def failback(self, inp: FailbackInput) -> None:
        inv, to, report = inp.inventory, inp.to_region, self.report
        if to not in inv.regions:
            raise Stop("refused", f"unknown region {to!r}; the inventory has: {', '.join(inv.regions)}")
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)

        # -- preflight ------------------------------------------------------------------------------------
        others = [r for r in inv.regions if r != to]
        checks = {
            "k8s": lambda: self.step("preflight-k8s", f"Check Kubernetes in {to}", K8S_STATUS, target, queue=q),
            "old": lambda: self.step(
                "preflight-db",
                f"Check the old database in {to}",
                DB_STATUS,
                target,
                queue=q,
                detail=lambda s: f"{s.role}, reachable" if s.reachable else f"gone ({s.error})",
            ),
            **{f"db:{r}": (lambda r=r: self.step(
                f"preflight-{r}", f"Check the database in {r}", DB_STATUS, RegionTarget.of(inv, r),
                queue=inv.region_queue(r),
            )) for r in others},
        }
        # The reads at once (runs recorded before read one after the other); the refusals keep their order.
        ahead = await together(checks) if workflow.patched("preflight-together") else None

        async def check(key: str):
            return got(ahead[key]) if ahead is not None else await checks[key]()

        kube: KubeStatus = await check("k8s")
        if not kube.ready:
            raise Stop("refused", f"Kubernetes in {to} is not healthy: " + "; ".join(kube.waiting or ["not ready"]))
        old: DbStatus = await check("old")
        if old.reachable and old.role == "primary" and not old.read_only:
            raise Stop("refused", f"{to} is a writable primary: nothing to fail back (or a split brain: check it)")
        primary, primary_status = None, None
        for r in others:
            s: DbStatus = await check(f"db:{r}")
            if s.reachable and s.role == "primary":
                primary, primary_status = r, s
        if primary is None:
            raise Stop("refused", "no reachable primary to fail back from")
        report.from_region = primary
        current = RegionTarget.of(inv, primary)

        await self.check_workers([inv.task_queue, q, inv.region_queue(primary)])
        self.declare(declare(inp, primary))
        if inp.dry_run:
            self.plan()
            return

        # Recorded histories rebuilt before asking; from now on nothing destructive happens before approval.
        approve_first = workflow.patched("approve-before-rebuild")
        if approve_first:
            decision = await self.approval_gate(
                f"failback of {inv.environment} from {primary} to {to} "
                + ("(a switchover back: its database already streams from the primary)" if follows(old, primary_status)
                   else f"(rebuilds the database in {to}; what it holds is kept first)")
            )

        # -- rebuild and catch up -------------------------------------------------------------------------
        if follows(old, primary_status) and workflow.patched("failback-after-switchover"):
            self._check_declared("rebuild")
            skipped = self.begin_step("rebuild", f"Rebuild {to} as a replica of {primary}")
            self.end_step(skipped, "skipped", f"{to} already streams from {primary} (timeline {old.timeline}): "
                                              "the failover was a switchover, nothing to rebuild")
            report.rebuild_method, report.rebuild_seconds = "none (streaming)", 0.0
        else:
            await self.rebuild(inp, primary, target, current)
        await self.step(
            "catch-up",
            f"Wait until {to} has caught up with {primary}",
            DB_WAIT_CAUGHT_UP,
            CatchUpRequest(
                primary=current,
                replica=target,
                timeout_seconds=inv.failback.catch_up_timeout,
                max_lag_bytes=inv.failover.max_planned_lag_bytes,
                control_plane_interval=inv.limits.control_plane_interval,
            ),
            queue=q,
            timeout=inv.failback.catch_up_timeout + 60,
            heartbeat=inv.failover.heartbeat_timeout,
            attempts=3,
            interruptible=True,
            detail=lambda c: f"{c.lag_bytes} bytes behind after {c.waited_seconds:.0f}s",
        )

        # -- people and the window ------------------------------------------------------------------------
        if not approve_first:
            decision = await self.approval_gate(f"failback of {inv.environment} from {primary} to {to}")
        await self.wait_for_window()

        # -- the failover back: the same workflow, as a child ---------------------------------------------
        await self.boundary()
        self._check_declared("failover")
        record = self.begin_step("failover", f"Planned failover {primary} -> {to} (child workflow)")
        child_input = FailoverInput(
            inventory=inv,
            to_region=to,
            requester=inp.requester,
            reason=f"failback: {inp.reason}".strip(": "),
            approval=decision,
        )
        if self.worker_rules:  # the child takes the worker's rules itself; it is told the digest of these
            child_input = child_input.without_rules(inv)
        try:
            child = await workflow.execute_child_workflow(
                "failover",
                child_input,
                id=f"{workflow.info().workflow_id}-failover",
                result_type=FailoverReport,
                task_queue=inv.task_queue,
                static_summary=f"Failover back to {to} (part of {workflow.info().workflow_id})",
                task_timeout=child_task_timeout(),
            )
        except ChildWorkflowError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.details:
                report.failover = FailoverReport.model_validate(cause.details[0])
                report.remaining = report.failover.remaining
            self.end_step(record, "failed", failure_message(err))
            raise Stop("failed", f"the failover back to {to} failed: {failure_message(err)}") from None
        report.failover = child
        self.end_step(record, "ok", f"RTO {child.rto_seconds:.1f}s" if child.rto_seconds is not None else "")

        # The region we leave becomes the standby again, streaming from the primary we returned to.
        self.point_of_no_return = True
        if child.switchover and child.old_primary_replica:
            self._check_declared("restandby")
            skipped = self.begin_step("restandby", f"Rebuild {primary} as a replica of {to}")
            self.end_step(skipped, "skipped", f"the failover back was a switchover: {primary} streams from {to}")
            return
        await self.step(
            "restandby",
            f"Rebuild {primary} as a replica of {to}",
            DB_REBUILD_REPLICA,
            RebuildRequest(target=current, primary=target),
            queue=inv.region_queue(primary),
            timeout=inv.failback.rebuild_timeout,
            heartbeat=inv.failback.rebuild_heartbeat(inv.failover),
            attempts=5,
            detail=lambda r: f"{r.method} in {r.seconds:.1f}s" + (f"; kept: {r.preserved}" if r.preserved else ""),
        )

    async def rebuild(self, inp: FailbackInput, primary: str, target: RegionTarget, current: RegionTarget) -> None:
        """Make the recovered region's database a replica of the current primary (what it holds is kept first)."""
        inv, to, report = inp.inventory, inp.to_region, self.report
        q = inv.region_queue(to)
        rebuilt: RebuildResult = await self.step(
            "rebuild",
            f"Rebuild {to} as a replica of {primary}",
            DB_REBUILD_REPLICA,
            RebuildRequest(target=target, primary=current),
            queue=q,
            timeout=inv.failback.rebuild_timeout,
            heartbeat=inv.failback.rebuild_heartbeat(inv.failover),
            attempts=5,
            interruptible=True,
            detail=lambda r: (
                f"{r.method} in {r.seconds:.1f}s"
                + (f" ({r.detail})" if r.detail else "")
                + (f"; kept: {r.preserved}" if r.preserved else "")
            ),
        )
        report.rebuild_method, report.rebuild_seconds = rebuilt.method, rebuilt.seconds
        report.old_primary_preserved, report.divergence = rebuilt.preserved, rebuilt.divergence

    async def wait_for_window(self) -> None:
        window = self.inventory.failback.window
        if window is None:
            return
        opens = window.next_opening(workflow.now())
        if opens is None:
            return
        self._check_declared("window")
        record = self.begin_step(
            "window",
            f"Wait for the low-traffic window ({', '.join(window.days)} {window.start}-{window.end} {window.timezone})",
        )
        await self.wait_for_override(
            f"the window opening at {opens:%Y-%m-%d %H:%M}Z (override: opsflow override {self.report.workflow_id} "
            "--as NAME)",
            opens - workflow.now(),
        )
        self.report.window_opened_at = workflow.now()
        self.end_step(
            record, "ok", f"overridden by {self.window_override.by}" if self.window_override else "window open"
        )
        await self.boundary()

    def overridden(self, event: ControlEvent) -> str:
        return "the window wait is overridden: the failover back starts now"
