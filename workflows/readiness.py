"""Readiness: could this environment fail over now? The failover's preflight for every region, changing nothing,
run by hand (`opsflow readiness`) or on a Schedule (`opsflow schedule create ready --procedure readiness`).

every region's database (reachable; one writable primary; each replica streaming, lag under the planned-failover
limit) -> each failover target's Kubernetes (deployments ready) -> traffic routing (endpoints healthy, serving
the primary's region) -> a worker polls every queue a failover would use -> ready, or failed with what is not.
A check that cannot be made (its activity fails) counts as not ready; every check runs either way.
"""

from __future__ import annotations

from temporalio import workflow

from workflows.procedure import Procedure, StepDecl, Stop

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.db import DB_STATUS
    from opsflow.contracts.k8s import K8S_STATUS
    from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
    from opsflow.contracts.traffic import TRAFFIC_STATUS
    from opsflow.models import DbStatus, ReadinessCheck, ReadinessReport, RegionTarget, TrafficRequest, lsn_to_int
    from opsflow.rules import ProcedureInput

HEALTHY_ENDPOINT = {"Online", "CheckingEndpoint", None}  # Traffic Manager monitor states that still take traffic


class ReadinessInput(ProcedureInput):
    dry_run: bool = False
    requester: str
    reason: str = ""


def declare(inp: ReadinessInput) -> list[StepDecl]:
    regions = list(inp.inventory.regions)
    return [
        *(StepDecl(f"database-{r}", f"ask the database in {r} its role, replication and lag") for r in regions),
        *(StepDecl(f"kubernetes-{r}", f"ask Kubernetes in {r} whether its deployments are ready",
                   when="a replica region (a failover target)") for r in regions),
        StepDecl("traffic", "ask the traffic router which endpoints are healthy and where traffic goes"),
        StepDecl("workers", "ask Temporal whether a worker polls every queue a failover would use"),
    ]


@workflow.defn(name="readiness")
class ReadinessWorkflow(Procedure[ReadinessReport]):
    @workflow.init
    def __init__(self, inp: ReadinessInput) -> None:
        super().__init__(inp.inventory, ReadinessReport.of(inp))

    @workflow.run
    async def run(self, inp: ReadinessInput) -> ReadinessReport:
        return await self.conclude(inp, self.readiness)

    async def readiness(self, inp: ReadinessInput) -> None:
        inv, report = inp.inventory, self.report
        self.declare(declare(inp))
        if inp.dry_run:
            self.plan()
            return
        statuses = {r: await self.database(r) for r in inv.regions}
        primaries = [r for r, s in statuses.items() if s and s.reachable and s.role == "primary" and not s.read_only]
        self.found(None, "database", len(primaries) == 1,
                   f"writable primary: {', '.join(primaries) or 'none'}")
        primary = report.primary_region = primaries[0] if len(primaries) == 1 else None
        for region, status in statuses.items():
            if region != primary and status is not None and status.reachable:
                self.replica(region, status, statuses.get(primary) if primary else None)
                await self.kubernetes(region)
        await self.traffic(primary or inv.primary_region)
        await self.workers([inv.task_queue, *(inv.region_queue(r) for r in inv.regions)])
        failing = [c for c in report.checks if not c.ok]
        report.ready = not failing
        if failing:
            raise Stop("failed", "not ready: " + "; ".join(
                f"{c.check}{f' in {c.region}' if c.region else ''}: {c.detail}" for c in failing))

    def found(self, region: str | None, check: str, ok: bool, detail: str) -> None:
        self.report.checks.append(ReadinessCheck(check=check, region=region, ok=ok, detail=detail))

    async def checked(self, region: str | None, check: str, run):
        """A check's activity; one that fails is a check not passed (recorded), not the end of the run."""
        try:
            return await run()
        except Stop as stop:
            if stop.status != "failed":  # an abort (or a refusal) ends the run
                raise
            self.found(region, check, False, stop.reason)
            return None

    async def database(self, region: str) -> DbStatus | None:
        inv = self.inventory
        status: DbStatus | None = await self.checked(region, "database", lambda: self.step(
            f"database-{region}", f"Check the database in {region}", DB_STATUS, RegionTarget.of(inv, region),
            queue=inv.region_queue(region), attempts=2,
            detail=lambda s: f"{s.role}{' (fenced)' if s.read_only else ''}" if s.reachable else "unreachable"))
        if status is not None:
            self.found(region, "database", status.reachable,
                       status.role + (" (fenced)" if status.read_only else "") if status.reachable
                       else f"unreachable: {status.error}")
        return status

    def replica(self, region: str, status: DbStatus, primary: DbStatus | None) -> None:
        """A failover target: streaming from the primary, no further behind than a planned failover allows."""
        limit = self.inventory.failover.max_planned_lag_bytes
        if status.role == "primary" and status.read_only:
            self.found(region, "replica", False, "a fenced old primary, not a replica: nothing protects the primary "
                                                 f"until `opsflow failback --to {region}`")
            return
        if status.role != "replica" or not status.streaming:
            self.found(region, "replica", False, f"{status.role}, not streaming from the primary")
            return
        if primary is None:
            self.found(region, "replica", True, "streaming")
            return
        lag = (lsn_to_int(primary.current_lsn) or 0) - (lsn_to_int(status.replay_lsn) or 0)
        self.found(region, "replica", lag <= limit, f"streaming, {lag} bytes behind (limit {limit})")

    async def kubernetes(self, region: str) -> None:
        inv = self.inventory
        kube = await self.checked(region, "kubernetes", lambda: self.step(
            f"kubernetes-{region}", f"Check deployments in {region}", K8S_STATUS, RegionTarget.of(inv, region),
            queue=inv.region_queue(region), attempts=2))
        if kube is not None:
            not_ready = kube.waiting or [f"{d.name} {d.ready}/{d.desired}" for d in kube.deployments
                                         if d.ready < d.desired]
            self.found(region, "kubernetes", kube.ready, "; ".join(not_ready) or "deployments ready")

    async def traffic(self, primary: str) -> None:
        inv = self.inventory
        traffic = await self.checked(None, "traffic", lambda: self.step(
            "traffic", "Check traffic routing", TRAFFIC_STATUS, TrafficRequest.of(inv, primary),
            queue=inv.region_queue(primary), attempts=2))
        if traffic is None:
            return
        # A standby endpoint may be disabled (the failover enables it); one that takes traffic must be healthy.
        down = [f"{e.endpoint} {e.monitor_status}" for e in traffic.endpoints
                if e.enabled and e.monitor_status not in HEALTHY_ENDPOINT]
        wrong = traffic.serving_region != primary
        detail = [*down, f"serving {traffic.serving_region}" + (f", not the primary's {primary}" if wrong else "")]
        self.found(None, "traffic", not down and not wrong, "; ".join(detail))

    async def workers(self, queues: list[str]) -> None:
        unserved = await self.checked(None, "workers", lambda: self.step(
            "workers", "Check that a worker serves every task queue", TEMPORAL_UNSERVED_QUEUES, sorted(set(queues)),
            queue=self.inventory.task_queue, timeout=10, attempts=3))
        if unserved is not None:
            self.found(None, "workers", not unserved,
                       f"no worker polls {', '.join(unserved)}" if unserved else "every queue polled")
