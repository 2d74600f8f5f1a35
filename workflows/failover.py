"""Region failover, planned or emergency. Reads top to bottom; each step is one line.

Planned:   preflight -> approval -> maintenance on (no new traffic) -> [Traffic Manager: the new region's endpoint
           enabled behind the old one's, so its probes pass meanwhile] -> drain (in-flight work finishes) -> fence
           the old primary (writes stop here) -> wait until the replica has replayed everything (LSN) -> promote
           -> move traffic -> verify -> scale up -> notify. (Runs recorded before "drain-before-fence" fenced
           first, then drained.)
Emergency: preflight (old region may be dead) -> [approval if the inventory asks] -> traffic off the old
           region -> forced promotion -> fence the old primary through the control plane (best effort)
           -> verify -> scale up -> notify the incident channel.
On Azure with a virtual endpoint named in the inventory the promotion is a switchover (planned: Switchover/Planned,
emergency: Switchover/Forced): the old primary becomes the new one's replica; a planned failover then lifts its
fence and checks that it streams ("old-replica"), so failing back is the same move the other way (no rebuild).
Self-managed PostgreSQL whose host the inventory reaches (database.host) switches over too, in the spirit of
CloudNativePG's demotion token: after the catch-up the old primary is shut down cleanly ("shut-down") and the
replica must replay past its shutdown checkpoint before the promotion; then the old primary starts as the new
one's standby ("old-replica"), no pg_rewind, no base backup. Not proven: it starts again, fenced, and the failover
goes on standalone (the failback rebuilds). The drain ends as soon as no application session is in a
transaction (at most failover.drain).
Until a promotion may have happened, any failure or abort undoes what was done: a failed promotion whose
target is verifiably still a replica is undone too. After it the procedure goes forward and the report
says what is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from temporalio import workflow

from workflows.procedure import Procedure, StepDecl, Stop, Undo

with workflow.unsafe.imports_passed_through():
    from opsflow import signing
    from opsflow.contracts.db import (
        DB_CHECK_WRITABLE,
        DB_DRAIN,
        DB_FENCE,
        DB_FENCE_CONTROL_PLANE,
        DB_FOLLOW,
        DB_PROMOTE,
        DB_SHUT_DOWN,
        DB_START,
        DB_STATUS,
        DB_UNFENCE,
        DB_WAIT_CAUGHT_UP,
    )
    from opsflow.contracts.k8s import (
        K8S_LOWER_AUTOSCALERS,
        K8S_SCALE_TO_ZERO,
        K8S_SCALE_UP,
        K8S_SET_MAINTENANCE,
        K8S_STATUS,
    )
    from opsflow.contracts.traffic import HTTP_SMOKE, TRAFFIC_PREPARE, TRAFFIC_STATUS, TRAFFIC_SWITCH
    from opsflow.models import (
        AutoscalerResult,
        CatchUpRequest,
        CatchUpResult,
        DbStatus,
        Decision,
        DrainRequest,
        DrainResult,
        FailoverReport,
        FenceResult,
        FollowRequest,
        KubeStatus,
        MaintenanceRequest,
        PromoteRequest,
        PromoteResult,
        RegionTarget,
        ScaleRequest,
        ShutdownRequest,
        ShutdownResult,
        TrafficRequest,
        TrafficStatus,
        lsn_to_int,
    )
    from opsflow.rules import ProcedureInput


class FailoverInput(ProcedureInput):
    to_region: str
    emergency: bool = False
    dry_run: bool = False
    requester: str
    reason: str = ""
    # Set by a parent procedure (failback) that already holds the approval: the gate records it and goes on.
    approval: Decision | None = None
    # Set by the client when an emergency had to cancel routine work to take the environment's lock.
    preempted: list[str] = []


@dataclass(frozen=True)
class FailoverPlan:
    """What a run decided once its preflight was done: the path it takes, fixed for the rest of the run (built in
    one place, FailoverWorkflow.decide). What changes as it goes (point_of_no_return, writes_down, promoted,
    switchover_proven) stays on the workflow."""

    source: str  # the primary's region at the preflight
    # Maintenance mode and the drain before the fence (runs recorded before "drain-before-fence" fenced first).
    drain_first: bool = True
    # The drain ends when the sessions are idle (runs recorded before "drain-until-idle" waited on a timer).
    until_idle: bool = False
    # Self-managed switchover: shut-down, promote, old-replica ("self-managed-switchover").
    host_switchover: bool = False
    # The scale-up raises the new region's HPAs ("autoscalers-follow"; the activity does it).
    autoscalers: bool = False
    # A planned failover lowers the old region's HPAs afterwards (a step of its own).
    lower_old_autoscalers: bool = False
    # The old primary becomes the new one's replica: "virtual-endpoint" (Azure), "patroni", "host" (self-managed),
    # None (standalone promotion: it stays fenced until a failback rebuilds it).
    old_follows: str | None = None
    # Traffic Manager: the new region's endpoint enabled behind the old one's right after the maintenance mode, so
    # its probes have passed when the traffic moves ("traffic-warm"; it was disabled at the preflight).
    warm_traffic: bool = False


def plan_of(inp: FailoverInput, source: str, drain_first: bool = True, until_idle: bool = False,
            host_switch: bool = False, autoscalers: bool = False, warm_traffic: bool = False) -> FailoverPlan:
    """The plan from the preflight's findings and the run's patch decisions (no workflow call: pure)."""
    to = inp.to_region
    old_follows = None
    if host_switch:
        old_follows = "host"
    elif not inp.emergency and switches_over(inp, to):
        old_follows = "patroni" if patroni(inp, to) else "virtual-endpoint"
    return FailoverPlan(source=source, drain_first=drain_first, until_idle=until_idle, host_switchover=host_switch,
                        autoscalers=autoscalers, lower_old_autoscalers=lowers_old_autoscalers(inp, source, autoscalers),
                        old_follows=old_follows, warm_traffic=warm_traffic)


def declare(inp: FailoverInput, plan: FailoverPlan) -> list[StepDecl]:
    """Every step after the preflight, and what it would change: the dry-run plan and the run's only names."""
    inv, to, source = inp.inventory, inp.to_region, plan.source
    drain_first, until_idle, host_switchover = plan.drain_first, plan.until_idle, plan.host_switchover
    drain = (f"wait until {source}'s application sessions are idle (no transaction in progress), at most "
             f"{inv.failover.drain:.0f}s" if until_idle
             else f"wait {inv.failover.drain:.0f}s for in-flight work to finish (no new traffic meanwhile)")
    drain_and_fence = [
        StepDecl("drain", drain),
        StepDecl("fence", f"make the {source} primary read-only and end its sessions (writes are down from here)"),
    ]
    to_region, from_r = inv.region(to), inv.region(source)
    deployments = ", ".join(
        f"{d.name}={d.replicas}" for d in (to_region.kubernetes.deployments if to_region.kubernetes else [])
    )
    service = from_r.kubernetes.service if from_r.kubernetes else None
    approvers = ", ".join(inv.approval.names()) + (
        " (not the requester)" if inv.approval.require_distinct_approver else ""
    )
    smoke = f"{len(to_region.smoke_urls)} smoke URL(s) in {to} answer"
    ve = virtual_endpoint(inp, to)
    how = f"switch over (virtual endpoint {ve}: {source} becomes its replica)" if ve else "promote"
    if host_switchover:
        how = f"promote (a switchover: {source} then follows it, no rebuild)"
    if patroni(inp, to) and not inp.emergency:
        how = (f"switch over (Patroni: {source} becomes a standby cluster of {to}, then {to} is promoted)"
               if to_region.database.layout == "per-region" else f"switch over (Patroni's POST /switchover in one "
               f"cluster: {to}'s member leads, {source}'s follows it)")
    if inp.emergency:
        steps = [
            StepDecl(
                "approval",
                f"wait for one of {approvers}",
                "the inventory requires approval for emergencies",
                inv.approval.emergency_requires_approval,
            ),
            StepDecl(
                "traffic",
                f"{inv.traffic.provider}: send traffic to {to_region.traffic_endpoint}, disable "
                f"{from_r.traffic_endpoint}",
            ),
            StepDecl(
                "promote", f"force-{how} the {to_region.database.provider} replica in {to} (unreplayed WAL is lost)"
            ),
            StepDecl(
                "fence-old", f"best effort: fence the old primary in {source} through its control plane (split brain)"
            ),
            StepDecl("scale-down-old", f"best effort: scale {source}'s deployments to zero"),
        ]
    else:
        steps = [
            StepDecl("approval", f"wait for one of {approvers}"),
            StepDecl(
                "maintenance",
                f"annotate service {service} in {source} maintenance=true"
                if service
                else f"no service to annotate in {source}",
            ),
            *([StepDecl("traffic-warm", f"{inv.traffic.provider}: enable {to_region.traffic_endpoint} behind "
                                        f"{from_r.traffic_endpoint} (no traffic while {source}'s serves) so its health "
                                        "probes have passed when the traffic moves")]
              if plan.warm_traffic else []),
            *(drain_and_fence if drain_first else drain_and_fence[::-1]),
            StepDecl(
                "catch-up",
                f"wait until {to} has replayed all WAL of {source} (up to {inv.failover.catch_up_timeout:.0f}s)",
            ),
            *([StepDecl("shut-down", f"shut {source} down cleanly and wait until {to} has replayed its shutdown "
                                     f"checkpoint (not proven: {source} starts again, fenced; standalone promotion)")]
              if host_switchover else []),
            StepDecl("promote", f"{how} the {to_region.database.provider} replica in {to}"),
            StepDecl(
                "verify-not-promoted",
                f"ask {to}'s database whether it is still a replica; if so undo",
                "the promotion fails",
                False,
            ),
            StepDecl(
                "traffic",
                f"{inv.traffic.provider}: enable {to_region.traffic_endpoint} first, then disable "
                f"{from_r.traffic_endpoint}",
            ),
        ]
    return steps + [
        StepDecl("verify-writes", f"{to} accepts writes"),
        StepDecl("verify-routing", f"traffic is served by {to}"),
        StepDecl("verify-smoke", smoke, "smoke URLs are configured", bool(to_region.smoke_urls)),
        StepDecl("scale-up", f"scale {to}: {deployments}" + (" (raising their HPAs' minReplicas to match)"
                                                              if plan.autoscalers else "")
                 if deployments else f"no deployments to scale in {to}"),
        *([StepDecl("autoscalers-old", f"lower the HPAs of {source}'s deployments to minReplicas "
                                       f"{from_r.kubernetes.standby_min_replicas} (the values before are kept on each "
                                       "HPA for the failback)")]
          if plan.lower_old_autoscalers else []),
        *([StepDecl("old-replica", f"lift the fence on {source}, now a replica of {to}, and check that it streams")]
          if plan.old_follows in ("virtual-endpoint", "patroni") else []),
        *([StepDecl("old-replica", f"start {source} as a standby of {to} (standby.signal, primary_conninfo; no "
                                   "pg_rewind, no base backup), unfenced, and check that it streams")]
          if host_switchover else []),
        StepDecl("notify", f"notify {', '.join(c.name for c in inv.notifications) or 'nobody (no channels)'}"),
    ]


async def together(calls: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, Any]:
    """Run read-only steps at once: each one's result, or what it raised, by key (`got` gives it back or raises)."""
    results = await asyncio.gather(*(call() for call in calls.values()), return_exceptions=True)
    return dict(zip(calls, results))


def got(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


def lowers_old_autoscalers(inp: FailoverInput, source: str, patched: bool) -> bool:
    """A planned failover lowers the old region's HPAs (an emergency scaled its deployments to zero: an HPA leaves
    a deployment at zero alone, and the old region may not answer)."""
    k8s_old = inp.inventory.region(source).kubernetes
    return patched and not inp.emergency and bool(k8s_old and k8s_old.deployments)


def virtual_endpoint(inp: FailoverInput, region: str) -> str | None:
    """The Azure virtual endpoint the inventory names for the region's database (None: none, or not Azure)."""
    return getattr(inp.inventory.region(region).database, "virtual_endpoint", None)


def host_switchover(inp: FailoverInput, source: str) -> bool:
    """A planned failover between self-managed servers whose old primary's host the inventory reaches."""
    dbs = [inp.inventory.region(r).database for r in (source, inp.to_region)]
    return (not inp.emergency and all(d.provider == "postgres" for d in dbs)
            and getattr(dbs[0], "host", None) is not None)


def patroni(inp: FailoverInput, region: str) -> bool:
    """Patroni clusters: a planned failover is a switchover too (the old cluster becomes a standby cluster)."""
    return inp.inventory.region(region).database.provider == "patroni"


def switches_over(inp: FailoverInput, region: str) -> bool:
    """A planned failover to `region` leaves the old primary a replica of the new one (no rebuild to come back)."""
    return bool(virtual_endpoint(inp, region)) or patroni(inp, region)


REPLICA_ROLES = ("AsyncReplica", "GeoAsyncReplica")  # Azure's replication roles of a read replica


@workflow.defn(name="failover")
class FailoverWorkflow(Procedure[FailoverReport]):
    @workflow.init
    def __init__(self, inp: FailoverInput) -> None:
        report = FailoverReport.of(inp, emergency=inp.emergency, to_region=inp.to_region, preempted=inp.preempted)
        super().__init__(inp.inventory, report)
        self.how: FailoverPlan | None = None  # decided once, after the preflight (decide())
        self.switchover_proven = False  # the replica replayed the old primary's shutdown checkpoint
        self.promoted: PromoteResult | None = None

    @workflow.run
    async def run(self, inp: FailoverInput) -> FailoverReport:
        return await self.conclude(inp, self.failover)

    # A failback runs its failover back as a child `<its id>-failover`, handing over the approval it holds.
    def expected_workflow_ids(self) -> list[str]:
        lock = f"opsflow-{self.inventory.environment}"
        return [f"{lock}-failover"] if workflow.info().parent is not None else [lock]

    def check_child(self, parent, received=None) -> None:
        if parent.workflow_id != f"opsflow-{self.inventory.environment}":
            super().check_child(parent, received)

    def parent_approval(self, decision: Decision) -> Decision:
        """The approval a failback parent passes down, checked again by the worker's rules: only from the failback
        of the same environment (its id is that environment's lock), by one of the worker's approvers, signed
        for that parent run's approval gate where signatures are required."""
        if not self.worker_rules:
            return decision
        parent = workflow.info().parent
        if parent is None:
            raise Stop("refused", "an approval in the input is honoured only from a failback of the same environment")
        policy = self.inventory.approval
        if (
            decision.by not in policy.names()
            or policy.require_distinct_approver
            and decision.by == self.report.requester
        ):
            raise Stop(
                "refused",
                f"the approval handed down by {parent.workflow_id} is by {decision.by!r}, who may not approve",
            )
        try:
            signing.verify_request(signing.Keyring.of(self.inventory, policy), decision, workflow_id=parent.workflow_id,
                                   run_id=parent.run_id, gate_id=decision.gate or "approval", action="approve",
                                   now=decision.signed_at or decision.at)
        except ValueError as e:
            raise Stop("refused", f"the approval handed down by {parent.workflow_id}: {e}") from None
        return decision

    async def failover(self, inp: FailoverInput) -> None:
        inv, to, report = inp.inventory, inp.to_region, self.report
        if to not in inv.regions:
            raise Stop("refused", f"unknown region {to!r}; the inventory has: {', '.join(inv.regions)}")
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)

        # -- preflight: refuse before changing anything --------------------------------------------------
        others = [r for r in inv.regions if r != to]
        checks = {
            "new": lambda: self.step("preflight", f"Check the database in {to}", DB_STATUS, target, queue=q),
            **{f"db:{r}": (lambda r=r: self.step(
                f"preflight-{r}",
                f"Check the database in {r}",
                DB_STATUS,
                RegionTarget.of(inv, r),
                queue=inv.region_queue(r) if not inp.emergency else q,
                attempts=2 if inp.emergency else 5,
            )) for r in others},
            "k8s": lambda: self.step("preflight-k8s", f"Check deployments in {to}", K8S_STATUS, target, queue=q),
            "traffic": lambda: self.step(
                "preflight-traffic", "Check traffic routing", TRAFFIC_STATUS, TrafficRequest.of(inv, to), queue=q
            ),
        }
        if inp.emergency:
            del checks["k8s"]  # the emergency does not wait for the new region's deployments (it scales them up)
        # The preflight's reads at once (each a read-only step; runs recorded before read one after the other, and
        # only as far as the first refusal). The refusals below keep their order either way.
        ahead = await together(checks) if workflow.patched("preflight-together") else None

        async def check(key: str):
            return got(ahead[key]) if ahead is not None else await checks[key]()

        new: DbStatus = await check("new")
        if new.reachable and new.role == "primary":
            raise Stop("refused", f"{to} is already the primary")
        if not new.reachable:
            raise Stop("refused", f"the database in {to} is unreachable: {new.error}")
        statuses = {}
        for r in others:
            statuses[r] = await check(f"db:{r}")
        primaries = [r for r, s in statuses.items() if s.reachable and s.role == "primary"]
        source = primaries[0] if primaries else (inv.primary_region if inv.primary_region != to else others[0])
        report.from_region = source
        old = statuses[source]
        if not inp.emergency:
            if not old.reachable:
                raise Stop(
                    "refused", f"the primary in {source} is unreachable: a planned failover needs it (use --emergency)"
                )
            if not new.streaming:
                raise Stop("refused", f"the replica in {to} is not streaming from {source}")
            lag = (lsn_to_int(old.current_lsn) or 0) - (lsn_to_int(new.replay_lsn) or 0)
            if lag > inv.failover.max_planned_lag_bytes:
                raise Stop(
                    "refused",
                    f"replication lag {lag} bytes is above the limit of {inv.failover.max_planned_lag_bytes} for a "
                    "planned failover",
                )
            self.check_virtual_endpoint(inp, source, new)
            kube: KubeStatus = await check("k8s")
            if not kube.ready:
                raise Stop(
                    "refused",
                    f"Kubernetes in {to} is not ready: "
                    + "; ".join(
                        kube.waiting
                        or [f"{d.name} {d.ready}/{d.desired}" for d in kube.deployments if d.ready < d.desired]
                    ),
                )
        routing: TrafficStatus = await check("traffic")
        # Emergency: the old region's queue may have no worker (it is down); it is only used best effort.
        await self.check_workers([inv.task_queue, q] + ([] if inp.emergency else [inv.region_queue(source)]))

        how = self.how = self.decide(inp, source, routing)
        self.declare(declare(inp, how))
        if inp.dry_run:
            self.plan()
            return
        if inp.emergency:
            await self.emergency(inp, how, new, old)
        else:
            await self.planned(inp, how)

    def decide(self, inp: FailoverInput, source: str, routing: TrafficStatus) -> FailoverPlan:
        """The run's plan, once the preflight is done. Every patch decision of the path is taken here, in this
        order and at this point of the history (recorded runs replay them where they were taken)."""
        # Stop new traffic and let in-flight work finish BEFORE the fence ends the sessions (runs recorded before
        # fenced first: replay keeps that order).
        drain_first = not inp.emergency and workflow.patched("drain-before-fence")
        # The drain as long as needed (runs recorded before waited the whole drain on a timer).
        until_idle = drain_first and workflow.patched("drain-until-idle")
        host_switch = host_switchover(inp, source) and workflow.patched("self-managed-switchover")
        # The scale-up raises the new region's HPAs (inside the activity); a planned failover then lowers the old
        # region's (a new step: runs recorded before have none).
        autoscalers = workflow.patched("autoscalers-follow")
        # Traffic Manager probes an endpoint only while it is enabled: the new region's, disabled at the preflight, is
        # enabled behind the old one's before the fence, not at the switch (runs recorded before waited for the
        # probes inside the traffic step).
        warm = (not inp.emergency and inp.inventory.traffic.provider == "azure-traffic-manager"
                and any(e.region == inp.to_region and not e.enabled for e in routing.endpoints)
                and workflow.patched("traffic-warm"))
        return plan_of(inp, source, drain_first, until_idle, host_switch, autoscalers, warm)

    async def planned(self, inp: FailoverInput, how: FailoverPlan) -> None:
        inv, to, report, source = inp.inventory, inp.to_region, self.report, how.source
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        old, old_q = RegionTarget.of(inv, source), inv.region_queue(source)

        if inp.approval is not None:
            decision = report.approval = self.parent_approval(inp.approval)
            self.end_step(
                self.begin_step("approval", "Approval (given to the parent procedure)"),
                "ok",
                f"approved by {decision.by}",
            )
        else:
            decision = await self.approval_gate(f"planned failover of {inv.environment} from {source} to {to}")
        await self.step(
            "maintenance",
            f"Maintenance mode on in {source}",
            K8S_SET_MAINTENANCE,
            MaintenanceRequest(target=old, on=True),
            queue=old_q,
            undo=Undo(
                K8S_SET_MAINTENANCE, f"Maintenance mode off in {source}", MaintenanceRequest(target=old, on=False)
            ),
        )
        ahead: dict = {}
        if how.warm_traffic:
            ahead["warm"] = lambda: self.warm_traffic(inp, source)
        if how.until_idle:
            ahead["drain"] = lambda: self.drain(inp, source)
        elif how.drain_first:
            limit = inv.failover.drain
            ahead["drain"] = lambda: self.wait("drain", f"Drain {source}: let in-flight work finish", limit)
        if len(ahead) > 1:  # both only wait (Traffic Manager's probes, the sessions): at once (a new shape)
            for result in (await together(ahead)).values():
                got(result)
        else:
            for call in ahead.values():
                await call()
        await self.step(
            "fence",
            f"Fence writes on {source}",
            DB_FENCE,
            old,
            queue=old_q,
            undo=Undo(DB_UNFENCE, f"Lift the write fence on {source}", old),
        )
        self.writes_down = f"the old primary in {source} is fenced (read-only) until the promotion"
        if not how.drain_first:
            await self.wait("drain", f"Drain {source}", inv.failover.drain)
        caught: CatchUpResult = await self.step(
            "catch-up",
            f"Wait until {to} has replayed all WAL",
            DB_WAIT_CAUGHT_UP,
            CatchUpRequest(
                primary=old,
                replica=target,
                timeout_seconds=inv.failover.catch_up_timeout,
                control_plane_interval=inv.limits.control_plane_interval,
            ),
            queue=q,
            timeout=inv.failover.catch_up_timeout + 60,
            heartbeat=inv.failover.heartbeat_timeout,
            attempts=3,
            interruptible=True,
            detail=lambda c: (
                f"replayed up to {c.replay_lsn}, {c.lag_bytes} bytes behind, waited {c.waited_seconds:.1f}s"
            ),
        )
        report.lag_at_promotion_bytes = caught.lag_bytes
        report.lag_at_promotion_seconds = caught.replay_delay_seconds
        if how.host_switchover:
            await self.shut_down(inp, source)

        await self.boundary()
        self.point_of_no_return = True  # a promotion may happen from here: no abort (it is refused, not lost)
        critical = [
            ("promote", lambda: self.promote(target, q, force=False, demote=old if patroni(inp, to) else None)),
            ("move traffic", lambda: self.move_traffic(inp)),
        ]
        await self.forward(inp, how, critical, since=decision.at)
        # Planned: the old primary was fenced and the replica replayed every byte before promotion.
        report.rpo_bytes = 0
        report.rpo_proven = caught.lag_bytes == 0

    async def warm_traffic(self, inp: FailoverInput, source: str) -> None:
        """The new region's endpoint enabled behind the old one's (traffic.prepare), so Traffic Manager probes it
        before the switch. Best effort: if it fails, the traffic step waits for the probes as before."""
        inv, to = inp.inventory, inp.to_region
        try:
            await self.step(
                "traffic-warm",
                f"Enable {to}'s traffic endpoint behind {source}'s (no traffic yet; its health probes start)",
                TRAFFIC_PREPARE,
                TrafficRequest.of(inv, to),
                queue=inv.region_queue(to),
                timeout=120,
                attempts=3,
                undo=Undo(TRAFFIC_SWITCH, f"Traffic to {source} only again", TrafficRequest.of(inv, source)),
                undo_timeout=300,
                detail=lambda t: ", ".join(f"{e.endpoint} {'enabled' if e.enabled else 'disabled'} ({e.monitor_status})"
                                           for e in t.endpoints),
            )
        except Stop as stop:
            if stop.status != "failed":
                raise  # an abort stays an abort

    async def drain(self, inp: FailoverInput, source: str) -> None:
        """Maintenance mode is on: wait until no application session of the old primary is in a transaction, at
        most failover.drain; the fence ends what is left. The report says how long and why it ended."""
        inv, report = inp.inventory, self.report
        limit = inv.failover.drain
        d: DrainResult = await self.step(
            "drain",
            f"Drain {source}: wait until its sessions are idle (at most {limit:.0f}s)",
            DB_DRAIN,
            DrainRequest(target=RegionTarget.of(inv, source), limit_seconds=limit),
            queue=inv.region_queue(source),
            timeout=limit + 60,
            heartbeat=inv.failover.heartbeat_timeout,
            attempts=3,
            detail=lambda d: f"{d.detail} after {d.waited_seconds:.1f}s",
            kind="wait",
            waiting=f"Drain {source}: its sessions to be idle (at most {limit:.0f}s)",
        )
        report.drain_seconds = d.waited_seconds
        report.drain_ended = (
            "sessions idle" if d.idle else f"drain limit reached, {d.busy_sessions} session(s) ended by the fence"
        )

    async def shut_down(self, inp: FailoverInput, source: str) -> None:
        """Self-managed switchover: shut the fenced old primary down cleanly and prove that the replica replayed its
        shutdown checkpoint. Not proven: it runs again, fenced, and the failover goes on standalone."""
        inv, to, report = inp.inventory, inp.to_region, self.report
        old = RegionTarget.of(inv, source)
        host = inv.region(source).database.host
        wait = min(inv.failover.catch_up_timeout, 60.0)
        shut: ShutdownResult = await self.step(
            "shut-down",
            f"Shut {source} down cleanly; {to} must replay its shutdown checkpoint",
            DB_SHUT_DOWN,
            ShutdownRequest(target=old, replica=RegionTarget.of(inv, to), timeout_seconds=wait),
            queue=inv.region_queue(source),
            timeout=wait + 3 * host.command_timeout + 30,
            heartbeat=inv.failover.heartbeat_timeout,
            attempts=3,
            undo=Undo(DB_START, f"Start {source} again (the primary, fenced)", old),
            undo_timeout=host.command_timeout + 30,
            detail=lambda s: s.detail if s.proven else (
                f"switchover not proven: {s.detail}; {source} runs again, fenced: standalone promotion, the failback "
                "rebuilds"),
        )
        self.switchover_proven = shut.proven
        report.switchover_detail = shut.detail if shut.proven else f"not proven, standalone promotion: {shut.detail}"

    def check_virtual_endpoint(self, inp: FailoverInput, source: str, new: DbStatus) -> None:
        """A switchover needs the inventory's virtual endpoint to exist and to point where we think: its writer at
        the primary in `source`, its reader at the replica we promote."""
        name = virtual_endpoint(inp, inp.to_region)
        if not name:
            return
        ve = new.virtual_endpoint
        primary = getattr(inp.inventory.region(source).database, "server_name", None)
        replica = getattr(inp.inventory.region(inp.to_region).database, "server_name", None)
        if ve is None or ve.error:
            why = ve.error if ve else "not reported by the database status"
            raise Stop("refused", f"virtual endpoint {name!r}: {why}")
        if (ve.writer or "").lower() != (primary or "").lower():
            raise Stop("refused",
                       f"virtual endpoint {name!r} writes to {ve.writer}, not to {primary} (the primary in {source})")
        if (replica or "").lower() not in [r.lower() for r in ve.reader]:
            raise Stop("refused", f"virtual endpoint {name!r} reads from {', '.join(ve.reader) or 'nothing'}, not from "
                       f"{replica} in {inp.to_region}: Azure switches over only to the reader's target")

    async def emergency(self, inp: FailoverInput, how: FailoverPlan, new: DbStatus, old: DbStatus) -> None:
        inv, to, report, source = inp.inventory, inp.to_region, self.report, how.source
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        since = workflow.now()
        if inv.approval.emergency_requires_approval:
            since = (await self.approval_gate(f"EMERGENCY failover of {inv.environment} from {source} to {to}")).at
        self.point_of_no_return = True
        promoted: list[PromoteResult] = []

        async def promote() -> None:
            promoted.append(await self.promote(target, q, force=True))

        await self.forward(
            inp, how, [("move traffic", lambda: self.move_traffic(inp)), ("promote", promote)], since=since
        )
        # Data-loss estimate: WAL the replica received but had not replayed when promoted, plus what the old
        # primary had written beyond that (known only when it still answered at preflight).
        p = promoted[0]
        replayed = lsn_to_int(p.lsn_at_promotion) or lsn_to_int(new.replay_lsn) or 0
        received = max(lsn_to_int(p.received_lsn) or 0, lsn_to_int(new.current_lsn) or 0, replayed)
        last_primary = lsn_to_int(old.current_lsn) if old.reachable else None
        report.lag_at_promotion_bytes = received - replayed
        report.rpo_bytes = max(received, last_primary or 0) - replayed
        report.rpo_proven = False

    async def promote(
        self, target: RegionTarget, q: str, force: bool, demote: RegionTarget | None = None
    ) -> PromoteResult:
        inv = self.inventory
        result: PromoteResult = await self.step(
            "promote",
            f"{'Force-promote' if force else 'Promote'} the replica in {target.region}"
            + (f" ({demote.region} demoted first)" if demote else ""),
            DB_PROMOTE,
            PromoteRequest(target=target, force=force, demote=demote),
            queue=q,
            timeout=inv.failover.promote_timeout,
            heartbeat=inv.failover.heartbeat_timeout,
            attempts=5,
            detail=lambda p: (
                "already primary" if p.already_primary else f"promoted in {p.seconds:.2f}s, timeline {p.timeline}"
            ),
        )
        self.report.promotion_seconds = result.seconds
        self.report.switchover = result.switchover or self.switchover_proven
        self.promoted = result
        return result

    async def still_a_replica(self, target: RegionTarget, q: str) -> bool:
        """After a failed promotion: does the database itself say it is still a replica? (Not the cloud.)"""
        try:
            s: DbStatus = await self.step(
                "verify-not-promoted",
                f"Ask the database in {target.region} whether it was promoted",
                DB_STATUS,
                target,
                queue=q,
                attempts=3,
                detail=lambda s: f"{s.role}" if s.reachable else f"unreachable: {s.error}",
            )
        except Stop:
            return False
        return s.reachable and s.role == "replica"

    async def move_traffic(self, inp: FailoverInput) -> TrafficStatus:
        return await self.step(
            "traffic",
            f"Send traffic to {inp.to_region}",
            TRAFFIC_SWITCH,
            TrafficRequest.of(inp.inventory, inp.to_region),
            queue=inp.inventory.region_queue(inp.to_region),
            timeout=300,
            heartbeat=inp.inventory.failover.heartbeat_timeout,
            detail=lambda t: f"serving region: {t.serving_region}",
        )

    async def forward(self, inp: FailoverInput, how: FailoverPlan, critical: list, since) -> None:
        """Past the point of no return: run to the end; a failure lists what a person must still do."""
        inv, to, report, source = inp.inventory, inp.to_region, self.report, how.source
        target, q = RegionTarget.of(inv, to), inv.region_queue(to)
        traffic = TrafficRequest.of(inv, to)
        heartbeat = inv.failover.heartbeat_timeout
        after = [
            (
                "verify writes",
                lambda: self.step("verify-writes", f"Verify {to} accepts writes", DB_CHECK_WRITABLE, target, queue=q),
            ),
            ("verify routing", lambda: self.verify_routing(traffic, q)),
            *(
                [
                    (
                        "smoke tests",
                        lambda: self.step(
                            "verify-smoke", f"Smoke tests in {to}", HTTP_SMOKE, target, queue=q, attempts=10
                        ),
                    )
                ]
                if target.smoke_urls
                else []
            ),
            ("scale up", lambda: self.scale_up(target, q, heartbeat)),
        ]
        if how.lower_old_autoscalers:
            after.append(("lower the old region's autoscalers", lambda: self.lower_old_autoscalers(inp, source)))
        if how.old_follows is not None:
            after.append(("old primary follows", lambda: self.old_primary_follows(inp, how)))
        todo = [label for label, _ in critical + after]
        try:
            for label, fn in critical:
                try:
                    await fn()
                except Stop as stop:
                    if (
                        label == "promote"
                        and not inp.emergency
                        and workflow.patched("undo-unpromoted")
                        and await self.still_a_replica(target, q)
                    ):
                        self.point_of_no_return = (
                            False  # nothing irreversible happened: undo, the old primary writes again
                        )
                        raise Stop(
                            "failed",
                            f"{stop.reason}; {to} is verifiably still a replica, so the failover was undone "
                            f"({source} is writable again, traffic untouched)",
                        ) from None
                    raise
                todo.remove(label)
            self.writes_down = None
            report.rto_seconds = (workflow.now() - since).total_seconds()
            if inp.emergency and workflow.patched("emergency-fence"):
                await self.fence_old(inp, source, q)
            for label, fn in after:
                await fn()
                todo.remove(label)
        except Stop as stop:
            if self.point_of_no_return:
                report.remaining = [f"{label} in {to}" for label in todo] + report.remaining
                report.remaining.append(f"tell the team: the failover of {inv.environment} to {to} is incomplete")
            raise stop
        verb = "EMERGENCY failover" if inp.emergency else "Failover"
        follows = "; the old primary is now a replica" if report.old_primary_replica else ""
        await self.step_notify(
            f"{verb} of {inv.environment} from {source} to {to} done; RTO {report.rto_seconds:.1f}s{follows}",
            "critical" if inp.emergency else "info",
        )

    async def scale_up(self, target: RegionTarget, q: str, heartbeat: float) -> KubeStatus:
        status: KubeStatus = await self.step(
            "scale-up",
            f"Scale up {target.region}",
            K8S_SCALE_UP,
            ScaleRequest(target=target),
            queue=q,
            timeout=900,
            heartbeat=heartbeat,
            detail=lambda k: ", ".join(
                [f"{d.name} {d.ready}/{d.desired}" for d in k.deployments]
                + [f"HPA {a.name} min {a.min_before}->{a.min_after}, max {a.max_before}->{a.max_after}"
                   for a in k.autoscalers if a.action != "unchanged"]
            ),
        )
        self.report.autoscalers += status.autoscalers
        return status

    async def lower_old_autoscalers(self, inp: FailoverInput, source: str) -> None:
        """The old region's HPAs give up their floor (or get back the values a failover raised them from), so its
        idle pods can go. Best effort: never fails the failover; what is not done is listed."""
        try:
            result: AutoscalerResult = await self.step(
                "autoscalers-old",
                f"Lower {source}'s autoscalers",
                K8S_LOWER_AUTOSCALERS,
                RegionTarget.of(inp.inventory, source),
                queue=inp.inventory.region_queue(source),
                timeout=60,
                attempts=3,
                detail=lambda r: ", ".join(
                    f"HPA {a.name} {a.action}: min {a.min_before}->{a.min_after}, max {a.max_before}->{a.max_after}"
                    for a in r.changes) or "no HPA",
            )
            self.report.autoscalers += result.changes
        except Stop as stop:
            self.report.remaining.append(f"lower the HPAs of {source}'s deployments by hand ({stop.reason})")

    async def old_primary_follows(self, inp: FailoverInput, how: FailoverPlan) -> None:
        """After a switchover the old primary is the new one's replica: lift its write fence (else it would be
        read-only when a failback switches back to it) and check that it streams. Never fails the failover."""
        report, source = self.report, how.source
        if how.host_switchover and not self.switchover_proven:
            self._check_declared("old-replica")
            record = self.begin_step("old-replica", f"Start {source} as a standby of {inp.to_region}")
            self.end_step(record, "skipped", f"the switchover was not proven ({report.switchover_detail}): {source} "
                                             "stays a fenced primary; the failback rebuilds it")
            return
        if self.promoted is None or not report.switchover:
            return
        old = RegionTarget.of(inp.inventory, source)
        try:
            if how.host_switchover:
                host = inp.inventory.region(source).database.host
                s: DbStatus = await self.step(
                    "old-replica",
                    f"Start {source} as a standby of {inp.to_region} (no rewind, no base backup)",
                    DB_FOLLOW,
                    FollowRequest(target=old, primary=RegionTarget.of(inp.inventory, inp.to_region)),
                    queue=inp.inventory.region_queue(source),
                    timeout=2 * host.command_timeout + 90,
                    heartbeat=inp.inventory.failover.heartbeat_timeout,
                    attempts=3,
                    detail=lambda s: f"{s.role}, streaming" if s.streaming else f"{s.role}, not streaming ({s.error})",
                )
            else:
                s = await self.step(
                    "old-replica",
                    f"Lift the fence on {source}, now a replica of {inp.to_region}",
                    DB_UNFENCE,
                    old,
                    queue=inp.inventory.region_queue(source),
                    timeout=300,
                    attempts=3,
                    detail=lambda s: f"{s.role}, streaming" if s.streaming else f"{s.role}, not streaming ({s.error})",
                )
            report.old_primary_replica = s.reachable and s.role == "replica" and s.streaming
        except Stop as stop:
            report.old_primary_replica, why = False, stop.reason
        else:
            why = f"it is {s.role}, {'streaming' if s.streaming else 'not streaming'}"
        if not report.old_primary_replica:
            report.remaining.append(
                f"check that {source} streams from {inp.to_region} ({why}); else fail back with a rebuild")

    async def fence_old(self, inp: FailoverInput, source: str, q: str) -> None:
        """Best effort, never blocking: keep a returning old region from taking writes (split brain)."""
        old = RegionTarget.of(inp.inventory, source)
        for name, title, activity in (
            ("fence-old", f"Fence the old primary in {source} (control plane)", DB_FENCE_CONTROL_PLANE),
            ("scale-down-old", f"Scale {source}'s deployments to zero", K8S_SCALE_TO_ZERO),
        ):
            p = self.promoted
            if name == "fence-old" and p is not None and p.switchover and p.old_primary_role in REPLICA_ROLES:
                # A forced switchover made it the new primary's replica: a fence would only follow it back to
                # primary on the failback (the server parameter stays), and a replica takes no writes anyway.
                self._check_declared(name)
                record = self.begin_step(name, title)
                self.end_step(record, "skipped", f"the switchover made it a replica ({p.old_primary_role})")
                continue
            try:
                done: FenceResult = await self.step(
                    name,
                    title,
                    activity,
                    old,
                    queue=q,
                    timeout=60,
                    attempts=2,
                    detail=lambda f: f"{f.method}: {f.detail}" if f.fenced else f"not done: {f.detail}",
                )
                ok, why = done.fenced, done.detail
            except Stop as stop:
                ok, why = False, stop.reason
            if not ok:
                self.report.remaining.append(f"{title.lower()} by hand before it comes back ({why})")

    async def verify_routing(self, traffic: TrafficRequest, q: str) -> TrafficStatus:
        status: TrafficStatus = await self.step(
            "verify-routing",
            f"Verify traffic is served by {traffic.to_region}",
            TRAFFIC_STATUS,
            traffic,
            queue=q,
            detail=lambda t: ", ".join(f"{e.endpoint}={e.monitor_status}" for e in t.endpoints),
        )
        if status.serving_region != traffic.to_region:
            raise Stop("failed", f"traffic is served by {status.serving_region}, not {traffic.to_region}")
        return status

    async def step_notify(self, text: str, severity: str) -> None:
        self._check_declared("notify")
        record = self.begin_step("notify", "Notify")
        await self.notify(text, severity=severity)
        self.end_step(record, "ok", text)
