"""A small model of the world for workflow-logic tests: activities stood in by name (the Temporal way).

The real activities are tested against the lab (tests/integration); here only the procedure's logic is
under test: order, refusals, undo, gates. Every call is recorded so tests can assert what changed."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.reports import store_report
from activities.rules import worker_inventory
from opsflow.contracts.db import (
    DB_CHECK_WRITABLE,
    DB_DRAIN,
    DB_FENCE,
    DB_FENCE_CONTROL_PLANE,
    DB_FOLLOW,
    DB_PROMOTE,
    DB_REBUILD_REPLICA,
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
from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
from opsflow.contracts.notify import NOTIFY_SEND, REPORT_STORE
from opsflow.contracts.traffic import HTTP_SMOKE, TRAFFIC_PREPARE, TRAFFIC_STATUS, TRAFFIC_SWITCH
from opsflow.models import (
    AutoscalerChange,
    AutoscalerResult,
    CatchUpRequest,
    CatchUpResult,
    DbStatus,
    DeploymentState,
    DrainRequest,
    DrainResult,
    EndpointState,
    FenceResult,
    FollowRequest,
    KubeStatus,
    MaintenanceRequest,
    NotifyRequest,
    PromoteRequest,
    PromoteResult,
    RebuildRequest,
    RebuildResult,
    RegionTarget,
    ScaleRequest,
    ShutdownRequest,
    ShutdownResult,
    SmokeResult,
    StoreReportRequest,
    TrafficRequest,
    TrafficStatus,
    VirtualEndpointState,
)


@dataclass
class World:
    primary: str = "eastus"
    regions: tuple = ("eastus", "westeurope")
    lsn: int = 0x3000000
    replay: dict = field(default_factory=lambda: {"westeurope": 0x3000000})
    streaming: bool = True
    reachable: dict = field(default_factory=dict)
    fenced: set = field(default_factory=set)
    maintenance: set = field(default_factory=set)
    serving: str = "eastus"
    warm: set = field(default_factory=set)  # endpoints enabled behind the serving one (traffic.prepare)
    prepared: list = field(default_factory=list)  # the regions traffic.prepare was called for
    scaled: set = field(default_factory=set)
    promotions: int = 0
    rebuilds: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    notifications: list = field(default_factory=list)
    fail: dict = field(default_factory=dict)  # activity name -> message (non-retryable failure)
    kube_ready: bool = True
    block_promote: threading.Event | None = None
    unserved: set = field(default_factory=set)  # task queues no worker serves (as DescribeTaskQueue would say)
    lost: set = field(default_factory=set)  # task queues whose worker is there for the first question, then gone
    asked: set = field(default_factory=set)
    old_fenced: list = field(default_factory=list)  # control-plane fences of an old primary (emergency)
    cancelled: list = field(default_factory=list)  # activities that stopped on a cancellation
    block_catch_up: threading.Event | None = None  # the catch-up waits (heartbeating) until this is set
    catch_up_attempts: int = 0
    fail_after: dict = field(default_factory=dict)  # activity name -> message: acts, then reports a failure
    hold: dict = field(default_factory=dict)  # activity name -> threading.Event: the step waits in flight until set
    virtual_endpoint: VirtualEndpointState | None = None  # what db.status reports (default: over both servers)
    switchovers: list = field(default_factory=list)  # (old primary, new primary, force) of each switchover
    demoted: list = field(default_factory=list)  # (demoted, promoted) of each promotion asked to demote (Patroni)
    timelines: dict = field(default_factory=dict)  # replica region -> the timeline it follows (set by a switchover)
    busy_sessions: int = 0  # application sessions in a transaction on the old primary during the drain
    block_drain: threading.Event | None = None  # with busy sessions: the drain waits (heartbeating) until set
    stopped: set = field(default_factory=set)  # self-managed servers shut down cleanly (a switchover)
    proof: str | None = None  # self-managed switchover: None proven; else why the shutdown proved nothing
    hpas: dict = field(default_factory=dict)  # region -> (min, max) of an HPA on web; scale_up raises, lower lowers
    # activity names whose first attempt is taken by a worker that dies: no heartbeat, no answer (until set)
    lost_first: set = field(default_factory=set)
    lost_answer: threading.Event = field(default_factory=threading.Event)

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.hold:
            self.hold[name].wait(30)
        if name in self.fail:
            raise ApplicationError(self.fail[name], type="Injected", non_retryable=True)

    def _wait_while_blocked(self, block: threading.Event | None, name: str) -> None:
        """A long step in flight: heartbeat until `block` is set (at once when None); a cancellation ends it, and
        the activity's name is recorded in `cancelled`."""
        try:
            while block is not None and not block.is_set():
                activity.heartbeat()
                if activity.is_cancelled():
                    raise CancelledError()
                time.sleep(0.02)
        except BaseException:
            self.cancelled.append(name)
            raise

    def status_of(self, region: str) -> DbStatus:
        if not self.reachable.get(region, True) or region in self.stopped:
            return DbStatus(region=region, reachable=False, error="connection refused")
        if region == self.primary:
            return DbStatus(
                region=region,
                reachable=True,
                role="primary",
                current_lsn=f"0/{self.lsn:X}",
                read_only=region in self.fenced,
                timeline=1 + self.promotions,
            )
        r = self.replay.get(region, self.lsn)
        return DbStatus(region=region, reachable=True, role="replica", streaming=self.streaming,
                        current_lsn=f"0/{self.lsn:X}", replay_lsn=f"0/{r:X}", replay_delay_seconds=0.0,
                        timeline=self.timelines.get(region))

    def activities(self):
        w = self

        @DB_STATUS.implementation
        def db_status(t: RegionTarget) -> DbStatus:
            w._maybe_fail(DB_STATUS.name)
            status = w.status_of(t.region)
            name = getattr(t.database, "virtual_endpoint", None)
            if name and status.reachable:
                other = next(r for r in w.regions if r != w.primary)
                status.virtual_endpoint = w.virtual_endpoint or VirtualEndpointState(
                    name=name, writer=f"pg-{w.primary}", reader=[f"pg-{other}"])
            return status

        @DB_FENCE.implementation
        def db_fence(t: RegionTarget) -> DbStatus:
            w._maybe_fail(DB_FENCE.name)
            w.fenced.add(t.region)
            return w.status_of(t.region)

        @DB_UNFENCE.implementation
        def db_unfence(t: RegionTarget) -> DbStatus:
            w._maybe_fail(DB_UNFENCE.name)
            w.fenced.discard(t.region)
            return w.status_of(t.region)

        @DB_WAIT_CAUGHT_UP.implementation
        def db_wait(req: CatchUpRequest) -> CatchUpResult:
            w._maybe_fail(DB_WAIT_CAUGHT_UP.name)
            w.catch_up_attempts += 1
            w._wait_while_blocked(w.block_catch_up, DB_WAIT_CAUGHT_UP.name)
            w.replay[req.replica.region] = w.lsn
            return CatchUpResult(
                primary_lsn=f"0/{w.lsn:X}",
                replay_lsn=f"0/{w.lsn:X}",
                lag_bytes=0,
                replay_delay_seconds=0.0,
                waited_seconds=0.1,
            )

        @DB_DRAIN.implementation
        def db_drain(req: DrainRequest) -> DrainResult:
            w._maybe_fail(DB_DRAIN.name)
            if not w.busy_sessions:
                return DrainResult(waited_seconds=0.05, idle=True, detail="sessions idle")
            w._wait_while_blocked(w.block_drain, DB_DRAIN.name)
            return DrainResult(waited_seconds=req.limit_seconds, idle=False, busy_sessions=w.busy_sessions,
                               detail=f"drain limit reached, {w.busy_sessions} session(s) still in a transaction")

        @DB_SHUT_DOWN.implementation
        def db_shut_down(req: ShutdownRequest) -> ShutdownResult:
            w._maybe_fail(DB_SHUT_DOWN.name)
            if w.proof is not None:
                return ShutdownResult(proven=False, checkpoint_lsn=f"0/{w.lsn:X}", detail=w.proof)
            w.stopped.add(req.target.region)
            w.lsn += 0x28  # the shutdown checkpoint record, streamed and replayed
            w.replay[req.replica.region] = w.lsn
            return ShutdownResult(proven=True, checkpoint_lsn=f"0/{w.lsn - 0x28:X}", replay_lsn=f"0/{w.lsn:X}",
                                  detail=f"{req.replica.region} replayed past the shutdown checkpoint")

        @DB_START.implementation
        def db_start(t: RegionTarget) -> DbStatus:
            w._maybe_fail(DB_START.name)
            w.stopped.discard(t.region)
            return w.status_of(t.region)

        @DB_FOLLOW.implementation
        def db_follow(req: FollowRequest) -> DbStatus:
            w._maybe_fail(DB_FOLLOW.name)
            old = req.target.region
            w.stopped.discard(old)
            w.fenced.discard(old)
            w.replay[old] = w.lsn
            w.timelines[old] = 1 + w.promotions
            return w.status_of(old)

        @DB_PROMOTE.implementation
        def db_promote(req: PromoteRequest) -> PromoteResult:
            w._maybe_fail(DB_PROMOTE.name)
            if w.block_promote is not None:
                w.block_promote.wait(10)
            if w.primary == req.target.region:
                return PromoteResult(already_primary=True, seconds=0.0)
            replayed = w.replay.get(req.target.region, w.lsn)
            old = w.primary
            w.primary = req.target.region
            w.promotions += 1
            if DB_PROMOTE.name in w.fail_after:
                raise ApplicationError(w.fail_after[DB_PROMOTE.name], type="Injected", non_retryable=True)
            result = PromoteResult(already_primary=False, seconds=0.5, timeline=1 + w.promotions,
                                   lsn_at_promotion=f"0/{replayed:X}", received_lsn=f"0/{w.lsn:X}")
            if req.demote is not None:  # Patroni: the old cluster was made a standby cluster of this one first
                w.demoted.append((req.demote.region, req.target.region))
            if getattr(req.target.database, "virtual_endpoint", None) or req.demote is not None:  # a switchover
                w.switchovers.append((old, w.primary, req.force))
                w.replay[old] = w.lsn
                w.timelines[old] = 1 + w.promotions  # it follows the new primary's timeline
                return result.model_copy(
                    update={"switchover": True, "old_primary": f"pg-{old}", "old_primary_role": "AsyncReplica"})
            return result

        @DB_CHECK_WRITABLE.implementation
        def db_check_writable(t: RegionTarget) -> None:
            w._maybe_fail(DB_CHECK_WRITABLE.name)
            if t.region != w.primary or t.region in w.fenced:
                raise ApplicationError(f"{t.region} refuses writes", type="NotWritable")

        @DB_REBUILD_REPLICA.implementation
        def db_rebuild(req: RebuildRequest) -> RebuildResult:
            w._maybe_fail(DB_REBUILD_REPLICA.name)
            w.rebuilds.append(req.target.region)
            w.fenced.discard(req.target.region)
            w.replay[req.target.region] = w.lsn
            return RebuildResult(method="pg_rewind", seconds=1.0)

        @TRAFFIC_STATUS.implementation
        def traffic_status(req: TrafficRequest) -> TrafficStatus:
            w._maybe_fail(TRAFFIC_STATUS.name)
            return w.traffic(req)

        @TRAFFIC_SWITCH.implementation
        def traffic_switch(req: TrafficRequest) -> TrafficStatus:
            w._maybe_fail(TRAFFIC_SWITCH.name)
            w.serving = req.to_region
            w.warm.clear()  # the others are disabled
            return w.traffic(req)

        @TRAFFIC_PREPARE.implementation
        def traffic_prepare(req: TrafficRequest) -> TrafficStatus:
            w._maybe_fail(TRAFFIC_PREPARE.name)
            w.prepared.append(req.to_region)
            if req.to_region != w.serving:
                w.warm.add(req.to_region)
            return w.traffic(req)

        @K8S_STATUS.implementation
        def kube_status(t: RegionTarget) -> KubeStatus:
            w._maybe_fail(K8S_STATUS.name)
            return KubeStatus(
                region=t.region,
                deployments=[DeploymentState(name="web", desired=1, ready=1 if w.kube_ready else 0)],
                ready=w.kube_ready,
                maintenance=t.region in w.maintenance,
            )

        @K8S_SET_MAINTENANCE.implementation
        def set_maintenance(req: MaintenanceRequest) -> KubeStatus:
            w._maybe_fail(K8S_SET_MAINTENANCE.name)
            (w.maintenance.add if req.on else w.maintenance.discard)(req.target.region)
            return KubeStatus(region=req.target.region, deployments=[], ready=True, maintenance=req.on)

        @K8S_SCALE_UP.implementation
        def scale_up(req: ScaleRequest) -> KubeStatus:
            w._maybe_fail(K8S_SCALE_UP.name)
            w.scaled.add(req.target.region)
            changes = []
            if req.target.region in w.hpas:
                lo, hi = w.hpas[req.target.region]
                w.hpas[req.target.region] = (max(lo, 3), max(hi, lo, 3))
                changes = [w.hpa_change(req.target.region, (lo, hi), "raised")]
            return KubeStatus(
                region=req.target.region, deployments=[DeploymentState(name="web", desired=3, ready=3)], ready=True,
                autoscalers=changes,
            )

        @K8S_LOWER_AUTOSCALERS.implementation
        def lower_autoscalers(t: RegionTarget) -> AutoscalerResult:
            w._maybe_fail(K8S_LOWER_AUTOSCALERS.name)
            if t.region not in w.hpas:
                return AutoscalerResult(region=t.region)
            before = w.hpas[t.region]
            w.hpas[t.region] = (1, before[1])
            return AutoscalerResult(region=t.region, changes=[w.hpa_change(t.region, before, "lowered")])

        @HTTP_SMOKE.implementation
        def smoke(t: RegionTarget) -> list[SmokeResult]:
            w._maybe_fail(HTTP_SMOKE.name)
            return [SmokeResult(url=u, status=200, ok=True, seconds=0.01) for u in t.smoke_urls]

        @NOTIFY_SEND.implementation
        def notify(req: NotifyRequest) -> list[str]:
            w.notifications.append((req.notification.severity, req.notification.text, list(req.notification.channels)))
            return [c.name for c in req.channels]

        @DB_FENCE_CONTROL_PLANE.implementation
        def fence_control_plane(t: RegionTarget) -> FenceResult:
            w._maybe_fail(DB_FENCE_CONTROL_PLANE.name)
            w.old_fenced.append(("db", t.region))
            return FenceResult(region=t.region, fenced=True, method="stand-in", detail="stopped")

        @K8S_SCALE_TO_ZERO.implementation
        def scale_to_zero(t: RegionTarget) -> FenceResult:
            w._maybe_fail(K8S_SCALE_TO_ZERO.name)
            w.old_fenced.append(("k8s", t.region))
            return FenceResult(region=t.region, fenced=True, method="stand-in", detail="0 replicas")

        @REPORT_STORE.implementation
        def store(req: StoreReportRequest) -> list[str]:
            if REPORT_STORE.name in w.lost_first and activity.info().attempt == 1:
                w.lost_answer.wait(120)
            return store_report(req)

        @TEMPORAL_UNSERVED_QUEUES.implementation
        def unserved_queues(queues: list[str]) -> list[str]:
            gone = [q for q in queues if q in w.unserved or q in w.lost and q in w.asked]
            w.asked.update(queues)
            return gone

        return [
            worker_inventory,
            store,
            fence_control_plane,
            scale_to_zero,
            unserved_queues,
            db_status,
            db_fence,
            db_unfence,
            db_wait,
            db_promote,
            db_check_writable,
            db_rebuild,
            db_drain,
            db_shut_down,
            db_start,
            db_follow,
            traffic_status,
            traffic_switch,
            traffic_prepare,
            kube_status,
            set_maintenance,
            scale_up,
            lower_autoscalers,
            smoke,
            notify,
        ]

    def hpa_change(self, region: str, before: tuple[int, int], action: str) -> AutoscalerChange:
        after = self.hpas[region]
        return AutoscalerChange(region=region, namespace="shop", name="web", deployment="web", min_before=before[0],
                                max_before=before[1], min_after=after[0], max_after=after[1], action=action)

    def traffic(self, req: TrafficRequest) -> TrafficStatus:
        return TrafficStatus(
            endpoints=[
                EndpointState(
                    region=r,
                    endpoint=e,
                    enabled=r == self.serving or r in self.warm,
                    priority=1 if r == self.serving else 2,
                    monitor_status="Online" if r == self.serving or r in self.warm else "Disabled",
                )
                for r, e in req.endpoints.items()
            ],
            serving_region=self.serving,
        )

    @property
    def unchanged(self) -> bool:
        """Nothing in the world differs from the start (what a refusal/abort must leave)."""
        return (
            self.primary == "eastus"
            and not self.fenced
            and not self.maintenance
            and self.serving == "eastus"
            and not self.warm
            and not self.scaled
            and self.promotions == 0
            and not self.stopped
        )
