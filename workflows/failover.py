"""Region failover, planned or emergency. Reads top to bottom; each step is one line.

Planned:   preflight -> approval -> maintenance on + fence old primary -> drain -> wait until the replica has
           replayed everything (LSN) -> [point of no return] promote -> move traffic -> verify -> scale up -> notify.
Emergency: preflight (old region may be dead) -> [approval if the inventory asks] -> traffic off the old
           region -> forced promotion -> verify -> scale up -> notify the incident channel.
Before the promotion any failure or abort undoes what was done; after it the procedure goes forward and
the report says what is left.
"""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import workflow

from workflows.procedure import Procedure, Stop

with workflow.unsafe.imports_passed_through():
    from opsflow.inventory import Inventory
    from opsflow.models import (
        CatchUpRequest,
        Decision,
        CatchUpResult,
        DbStatus,
        FailoverReport,
        KubeStatus,
        MaintenanceRequest,
        PromoteRequest,
        PromoteResult,
        RegionTarget,
        ScaleRequest,
        TrafficRequest,
        TrafficStatus,
        lsn_to_int,
    )


class FailoverInput(BaseModel):
    inventory: Inventory
    to_region: str
    emergency: bool = False
    dry_run: bool = False
    requester: str
    reason: str = ""
    # Set by a parent procedure (failback) that already holds the approval: the gate records it and goes on.
    approval: Decision | None = None


def plan(inp: FailoverInput, from_region: str) -> list[tuple[str, str]]:
    """Every step and what it would change: printed by --dry-run, and the order the procedure follows."""
    inv, to = inp.inventory, inp.to_region
    to_region, from_r = inv.region(to), inv.region(from_region)
    deployments = ", ".join(f"{d.name}={d.replicas}" for d in (to_region.kubernetes.deployments if to_region.kubernetes else []))
    service = from_r.kubernetes.service if from_r.kubernetes else None
    if inp.emergency:
        steps = [
            ("preflight", f"check {to} is a reachable replica (no change)"),
            *([("approval", "wait for an approver")] if inv.approval.emergency_requires_approval else []),
            ("traffic", f"{inv.traffic.provider}: send traffic to {to_region.traffic_endpoint}, disable {from_r.traffic_endpoint}"),
            ("promote", f"force-promote the {to_region.database.provider} replica in {to} (unreplayed WAL is lost)"),
        ]
    else:
        steps = [
            ("preflight", f"check {to} is a healthy streaming replica and its deployments are ready (no change)"),
            ("approval", f"wait for one of {', '.join(inv.approval.approvers)}" + (" (not the requester)" if inv.approval.require_distinct_approver else "")),
            ("maintenance", f"annotate service {service} in {from_region} maintenance=true" if service else f"no service to annotate in {from_region}"),
            ("fence", f"make the {from_region} primary read-only and end its sessions"),
            ("drain", f"wait {inv.failover.drain:.0f}s for in-flight work to finish"),
            ("catch-up", f"wait until {to} has replayed all WAL of {from_region} (up to {inv.failover.catch_up_timeout:.0f}s)"),
            ("promote", f"promote the {to_region.database.provider} replica in {to}"),
            ("traffic", f"{inv.traffic.provider}: enable {to_region.traffic_endpoint} first, then disable {from_r.traffic_endpoint}"),
        ]
    steps += [
        ("verify", f"{to} accepts writes, traffic is served by {to}" + (f", {len(to_region.smoke_urls)} smoke URL(s)" if to_region.smoke_urls else "")),
        ("scale-up", f"scale {to}: {deployments}" if deployments else f"no deployments to scale in {to}"),
        ("notify", f"notify {', '.join(c.name for c in inv.notifications) or 'nobody (no channels)'}"),
    ]
    return steps


@workflow.defn(name="failover")
class FailoverWorkflow(Procedure):
    @workflow.run
    async def run(self, inp: FailoverInput) -> FailoverReport:
        inv = inp.inventory
        self.begin(
            FailoverReport(workflow_id="", environment=inv.environment, requester=inp.requester, reason=inp.reason, dry_run=inp.dry_run, emergency=inp.emergency, to_region=inp.to_region),
            inv,
        )
        await self.conclude(lambda: self.failover(inp))
        return self.report  # type: ignore[return-value]

    async def failover(self, inp: FailoverInput) -> None:
        inv, to, report = inp.inventory, inp.to_region, self.report
        assert isinstance(report, FailoverReport)
        if to not in inv.regions:
            raise Stop("refused", f"unknown region {to!r}; the inventory has: {', '.join(inv.regions)}")
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)

        # -- preflight: refuse before changing anything --------------------------------------------------
        new: DbStatus = await self.step("preflight", f"Check the database in {to}", "db.status", target, result_type=DbStatus, queue=q)
        if new.reachable and new.role == "primary":
            raise Stop("refused", f"{to} is already the primary")
        if not new.reachable:
            raise Stop("refused", f"the database in {to} is unreachable: {new.error}")
        others = [r for r in inv.regions if r != to]
        statuses = {}
        for r in others:
            statuses[r] = await self.step(f"preflight-{r}", f"Check the database in {r}", "db.status", RegionTarget.of(inv, r), result_type=DbStatus, queue=inv.region_queue(r) if not inp.emergency else q, attempts=2 if inp.emergency else 5)
        primaries = [r for r, s in statuses.items() if s.reachable and s.role == "primary"]
        source = primaries[0] if primaries else (inv.primary_region if inv.primary_region != to else others[0])
        report.from_region = source
        old = statuses[source]
        if not inp.emergency:
            if not old.reachable:
                raise Stop("refused", f"the primary in {source} is unreachable: a planned failover needs it (use --emergency)")
            if not new.streaming:
                raise Stop("refused", f"the replica in {to} is not streaming from {source}")
            lag = (lsn_to_int(old.current_lsn) or 0) - (lsn_to_int(new.replay_lsn) or 0)
            if lag > inv.failover.max_planned_lag_bytes:
                raise Stop("refused", f"replication lag {lag} bytes is above the limit of {inv.failover.max_planned_lag_bytes} for a planned failover")
            kube: KubeStatus = await self.step("preflight-k8s", f"Check deployments in {to}", "k8s.status", target, result_type=KubeStatus, queue=q)
            if not kube.ready:
                raise Stop("refused", f"Kubernetes in {to} is not ready: " + "; ".join(kube.waiting or [f"{d.name} {d.ready}/{d.desired}" for d in kube.deployments if d.ready < d.desired]))
        await self.step("preflight-traffic", "Check traffic routing", "traffic.status", TrafficRequest.of(inv, to), result_type=TrafficStatus, queue=q)

        if inp.dry_run:
            for name, what in plan(inp, source):
                self.end_step(self.begin_step(name, what), "planned")
            report.status = "planned"
            return

        if inp.emergency:
            await self.emergency(inp, source, new, old)
        else:
            await self.planned(inp, source)

    async def planned(self, inp: FailoverInput, source: str) -> None:
        inv, to, report = inp.inventory, inp.to_region, self.report
        assert isinstance(report, FailoverReport)
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        old, old_q = RegionTarget.of(inv, source), inv.region_queue(source)

        if inp.approval is not None:
            decision = report.approval = inp.approval
            self.end_step(self.begin_step("approval", "Approval (given to the parent procedure)"), "ok", f"approved by {decision.by}")
        else:
            decision = await self.approval_gate(f"planned failover of {inv.environment} from {source} to {to}")
        await self.step("maintenance", f"Maintenance mode on in {source}", "k8s.set_maintenance", MaintenanceRequest(target=old, on=True), result_type=KubeStatus, queue=old_q,
                        undo=("k8s.set_maintenance", f"Maintenance mode off in {source}", MaintenanceRequest(target=old, on=False)))
        await self.step("fence", f"Fence writes on {source}", "db.fence", old, result_type=DbStatus, queue=old_q,
                        undo=("db.unfence", f"Lift the write fence on {source}", old))
        await self.wait("drain", f"Drain {source}", inv.failover.drain)
        caught: CatchUpResult = await self.step(
            "catch-up", f"Wait until {to} has replayed all WAL", "db.wait_caught_up",
            CatchUpRequest(primary=old, replica=target, timeout_seconds=inv.failover.catch_up_timeout),
            result_type=CatchUpResult, queue=q, timeout=inv.failover.catch_up_timeout + 60, heartbeat=inv.failover.heartbeat_timeout, attempts=3,
            detail=lambda c: f"replayed up to {c.replay_lsn}, {c.lag_bytes} bytes behind, waited {c.waited_seconds:.1f}s")
        report.lag_at_promotion_bytes = caught.lag_bytes
        report.lag_at_promotion_seconds = caught.replay_delay_seconds

        await self.boundary()
        self.point_of_no_return = True
        await self.forward(inp, source, [("promote", lambda: self.promote(target, q, force=False)), ("move traffic", lambda: self.move_traffic(inp))], since=decision.at)
        # Planned: the old primary was fenced and the replica replayed every byte before promotion.
        report.rpo_bytes = 0
        report.rpo_proven = caught.lag_bytes == 0

    async def emergency(self, inp: FailoverInput, source: str, new: DbStatus, old: DbStatus) -> None:
        inv, to, report = inp.inventory, inp.to_region, self.report
        assert isinstance(report, FailoverReport)
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        since = workflow.now()
        if inv.approval.emergency_requires_approval:
            since = (await self.approval_gate(f"EMERGENCY failover of {inv.environment} from {source} to {to}")).at
        self.point_of_no_return = True
        promoted: list[PromoteResult] = []

        async def promote() -> None:
            promoted.append(await self.promote(target, q, force=True))

        await self.forward(inp, source, [("move traffic", lambda: self.move_traffic(inp)), ("promote", promote)], since=since)
        # Data-loss estimate: WAL the replica received but had not replayed when promoted, plus what the old
        # primary had written beyond that (known only when it still answered at preflight).
        p = promoted[0]
        replayed = lsn_to_int(p.lsn_at_promotion) or lsn_to_int(new.replay_lsn) or 0
        received = max(lsn_to_int(p.received_lsn) or 0, lsn_to_int(new.current_lsn) or 0, replayed)
        last_primary = lsn_to_int(old.current_lsn) if old.reachable else None
        report.lag_at_promotion_bytes = received - replayed
        report.rpo_bytes = max(received, last_primary or 0) - replayed
        report.rpo_proven = False

    async def promote(self, target: RegionTarget, q: str, force: bool) -> PromoteResult:
        inv = self.inventory
        result: PromoteResult = await self.step(
            "promote", f"{'Force-promote' if force else 'Promote'} the replica in {target.region}", "db.promote",
            PromoteRequest(target=target, force=force), result_type=PromoteResult, queue=q,
            timeout=inv.failover.promote_timeout, heartbeat=inv.failover.heartbeat_timeout, attempts=5,
            detail=lambda p: "already primary" if p.already_primary else f"promoted in {p.seconds:.2f}s, timeline {p.timeline}")
        assert isinstance(self.report, FailoverReport)
        self.report.promotion_seconds = result.seconds
        return result

    async def move_traffic(self, inp: FailoverInput) -> TrafficStatus:
        return await self.step("traffic", f"Send traffic to {inp.to_region}", "traffic.switch", TrafficRequest.of(inp.inventory, inp.to_region),
                               result_type=TrafficStatus, queue=inp.inventory.region_queue(inp.to_region), timeout=300, heartbeat=inp.inventory.failover.heartbeat_timeout,
                               detail=lambda t: f"serving region: {t.serving_region}")

    async def forward(self, inp: FailoverInput, source: str, critical: list, since) -> None:
        """Past the point of no return: run to the end; a failure lists what a person must still do."""
        inv, to, report = inp.inventory, inp.to_region, self.report
        assert isinstance(report, FailoverReport)
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        traffic = TrafficRequest.of(inv, to)
        after = [
            ("verify writes", lambda: self.step("verify-writes", f"Verify {to} accepts writes", "db.check_writable", target, queue=q)),
            ("verify routing", lambda: self.verify_routing(traffic, q)),
            *([("smoke tests", lambda: self.step("verify-smoke", f"Smoke tests in {to}", "http.smoke", target, queue=q, attempts=10))] if target.smoke_urls else []),
            ("scale up", lambda: self.step("scale-up", f"Scale up {to}", "k8s.scale_up", ScaleRequest(target=target), result_type=KubeStatus, queue=q, timeout=900, heartbeat=inv.failover.heartbeat_timeout,
                                           detail=lambda k: ", ".join(f"{d.name} {d.ready}/{d.desired}" for d in k.deployments))),
        ]
        todo = [label for label, _ in critical + after]
        try:
            for label, fn in critical:
                await fn()
                todo.remove(label)
            report.rto_seconds = (workflow.now() - since).total_seconds()
            for label, fn in after:
                await fn()
                todo.remove(label)
        except Stop:
            report.remaining = [f"{label} in {to}" for label in todo] + [f"tell the team: the failover of {inv.environment} to {to} is incomplete"]
            raise
        verb = "EMERGENCY failover" if inp.emergency else "Failover"
        await self.step_notify(f"{verb} of {inv.environment} from {source} to {to} done; RTO {report.rto_seconds:.1f}s", "critical" if inp.emergency else "info")

    async def verify_routing(self, traffic: TrafficRequest, q: str) -> TrafficStatus:
        status: TrafficStatus = await self.step("verify-routing", f"Verify traffic is served by {traffic.to_region}", "traffic.status", traffic, result_type=TrafficStatus, queue=q,
                                                detail=lambda t: ", ".join(f"{e.endpoint}={e.monitor_status}" for e in t.endpoints))
        if status.serving_region != traffic.to_region:
            raise Stop("failed", f"traffic is served by {status.serving_region}, not {traffic.to_region}")
        return status

    async def step_notify(self, text: str, severity: str) -> None:
        record = self.begin_step("notify", "Notify")
        await self.notify(text, severity=severity)
        self.end_step(record, "ok", text)
