"""Activity inputs/outputs and procedure reports. Plain pydantic models, no I/O."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel

from opsflow.inventory import (
    AwsConnection,
    AzureConnection,
    Database,
    DrillPolicy,
    Inventory,
    KubernetesConfig,
    NotificationChannel,
    ReportStore,
    Traffic,
)


def lsn_to_int(lsn: str | None) -> int | None:
    """PostgreSQL LSN '16/B374D848' -> byte position."""
    if not lsn:
        return None
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


# -- what an activity acts on ----------------------------------------------------------------------------


class RegionTarget(BaseModel):
    """Everything an activity needs to act on one region; never a secret (only where secrets live)."""

    environment: str
    region: str
    database: Database
    kubernetes: KubernetesConfig | None = None
    smoke_urls: list[str] = []
    azure: AzureConnection | None = None
    aws: AwsConnection | None = None

    @classmethod
    def of(cls, inv: Inventory, region: str) -> "RegionTarget":
        r = inv.region(region)
        return cls(
            environment=inv.environment,
            region=region,
            database=r.database,
            kubernetes=r.kubernetes,
            smoke_urls=r.smoke_urls,
            azure=inv.azure,
            aws=inv.aws,
        )


class VirtualEndpointState(BaseModel):
    """An Azure virtual endpoint as ARM shows it: the writer always targets the pair's primary, the reader the
    server in `reader`. error: it could not be read (missing, not allowed...)."""

    name: str
    writer: str | None = None  # the server the writer endpoint targets (the pair's primary in ARM)
    reader: list[str] = []  # the servers the reader endpoint targets (properties.members)
    hosts: list[str] = []
    error: str | None = None


class DbStatus(BaseModel):
    region: str
    reachable: bool
    error: str | None = None
    role: Literal["primary", "replica", "unknown"] = "unknown"
    streaming: bool = False  # a replica whose WAL receiver is streaming from a primary
    read_only: bool = False  # fenced: default_transaction_read_only is on
    current_lsn: str | None = None  # primary: pg_current_wal_lsn(); replica: last received LSN
    replay_lsn: str | None = None  # replica: pg_last_wal_replay_lsn()
    replay_delay_seconds: float | None = None
    timeline: int | None = None
    cloud_state: str | None = None  # control-plane state where there is one (Azure 'Ready', RDS 'available')
    cloud_role: str | None = None  # control-plane replication role (Azure 'Primary'/'AsyncReplica')
    virtual_endpoint: VirtualEndpointState | None = None  # Azure, when the inventory names one


class CatchUpRequest(BaseModel):
    primary: RegionTarget
    replica: RegionTarget
    timeout_seconds: float
    max_lag_bytes: int = 0  # 0: wait until the replica has replayed everything
    control_plane_interval: float = 10  # read the cloud's control plane at most this often (SQL is polled)


class CatchUpResult(BaseModel):
    primary_lsn: str
    replay_lsn: str
    lag_bytes: int
    replay_delay_seconds: float | None = None
    waited_seconds: float
    polls: int = 0  # SQL polls made
    control_plane_reads: int = 0  # control-plane reads made (ARM GET / DescribeDBInstances)


class PromoteRequest(BaseModel):
    target: RegionTarget
    force: bool = False  # emergency: do not wait for the old primary
    # A planned switchover where the provider demotes the old primary itself (Patroni: the old cluster becomes a
    # standby cluster of the new one before it is promoted). None: the provider's own promotion only.
    demote: RegionTarget | None = None


class PromoteResult(BaseModel):
    already_primary: bool
    seconds: float
    timeline: int | None = None
    lsn_at_promotion: str | None = None  # the replay position the new primary started from
    received_lsn: str | None = None  # what the replica had received (received - replayed = WAL lost by promotion)
    switchover: bool = False  # Azure promoteMode Switchover: the old primary was demoted to this one's replica
    old_primary: str | None = None  # switchover: the server that was the primary
    old_primary_role: str | None = None  # switchover: its role in the control plane afterwards (e.g. AsyncReplica)


class DrainRequest(BaseModel):
    """Wait until the old primary's application sessions have no transaction in progress, at most limit_seconds."""

    target: RegionTarget
    limit_seconds: float


class DrainResult(BaseModel):
    waited_seconds: float
    idle: bool  # True: it ended because the sessions were idle; False: the limit was reached
    busy_sessions: int = 0  # application sessions still in a transaction at the end (the fence ends them)
    detail: str = ""


class ShutdownRequest(BaseModel):
    """Self-managed switchover: shut the fenced old primary (`target`) down cleanly, read its shutdown checkpoint
    LSN (pg_controldata) and wait until `replica` has replayed past it, at most timeout_seconds."""

    target: RegionTarget
    replica: RegionTarget
    timeout_seconds: float = 60


class ShutdownResult(BaseModel):
    proven: bool  # the replica holds every byte the old primary wrote: it may follow the new one without a rewind
    checkpoint_lsn: str | None = None  # the old primary's shutdown checkpoint ("Latest checkpoint location")
    replay_lsn: str | None = None  # what the replica had replayed when last read
    seconds: float = 0.0
    detail: str = ""  # not proven: why (the old primary was started again, fenced: the standalone path follows)


class FollowRequest(BaseModel):
    """Start the cleanly shut down old primary (`target`) as a streaming standby of `primary`."""

    target: RegionTarget
    primary: RegionTarget
    timeout_seconds: float = 60


class RebuildRequest(BaseModel):
    """Make `target` (a recovered region whose old database diverged or is gone) a streaming replica of `primary`."""

    target: RegionTarget
    primary: RegionTarget
    preserve: bool = True  # keep what the old server holds before removing or rewinding it


class Divergence(BaseModel):
    """Whether the old primary took writes after the split (after an emergency failover they are lost): the old
    primary's last position on its timeline against the point where the new primary's timeline forked off it
    (read from the new primary's timeline history). diverged=None: unknown (the old primary cannot be read)."""

    old_last_lsn: str | None = None  # the old primary's last WAL position
    split_lsn: str | None = None  # where the new primary's timeline forked
    bytes_after_split: int | None = None
    transactions: int | None = None  # known only when the old server's WAL could be read
    detail: str = ""
    diverged: bool | None = None  # True: WAL past the split point exists only on the old primary
    old_region: str = ""
    new_region: str = ""
    old_timeline: int | None = None
    new_timeline: int | None = None


class DivergenceRequest(BaseModel):
    old: RegionTarget  # the former primary (recovered region)
    new: RegionTarget  # the current primary


class RebuildResult(BaseModel):
    method: str  # pg_rewind | pg_basebackup | azure-replica | rds-read-replica
    seconds: float
    detail: str = ""
    preserved: str | None = None  # what was kept of the old server (backup id, snapshot, moved data directory)
    divergence: Divergence | None = None


class FenceResult(BaseModel):
    """A best-effort fence of an old primary through the control plane (emergency failover)."""

    region: str
    fenced: bool
    method: str = ""  # e.g. azure-stop, rds-parameter-group, sql-read-only, k8s-scale-to-zero
    detail: str = ""


class TrafficRequest(BaseModel):
    environment: str
    traffic: Traffic
    endpoints: dict[str, str]  # region -> endpoint name / set identifier
    to_region: str
    azure: AzureConnection | None = None
    aws: AwsConnection | None = None

    @classmethod
    def of(cls, inv: Inventory, to_region: str) -> "TrafficRequest":
        inv.region(to_region)
        return cls(
            environment=inv.environment,
            traffic=inv.traffic,
            endpoints={name: r.traffic_endpoint for name, r in inv.regions.items()},
            to_region=to_region,
            azure=inv.azure,
            aws=inv.aws,
        )


class EndpointState(BaseModel):
    region: str
    endpoint: str
    enabled: bool
    priority: int | None = None
    monitor_status: str | None = None  # Online / Degraded / Disabled / CheckingEndpoint ...


class TrafficStatus(BaseModel):
    endpoints: list[EndpointState]
    serving_region: str | None  # the region traffic goes to now


class MaintenanceRequest(BaseModel):
    target: RegionTarget
    on: bool


class ScaleRequest(BaseModel):
    target: RegionTarget


class DeploymentState(BaseModel):
    name: str
    desired: int
    ready: int


class AutoscalerChange(BaseModel):
    """What a failover did to one HorizontalPodAutoscaler: its bounds before and after. The values before the first
    change are also kept on the HPA itself (annotation opsflow.dev/autoscaler-before) until a later failover
    restores them."""

    region: str
    namespace: str
    name: str  # the HPA
    deployment: str  # its scale target
    min_before: int
    max_before: int
    min_after: int
    max_after: int
    action: Literal["raised", "lowered", "restored", "unchanged"]


class AutoscalerResult(BaseModel):
    region: str
    changes: list[AutoscalerChange] = []


class KubeStatus(BaseModel):
    region: str
    deployments: list[DeploymentState]
    ready: bool
    maintenance: bool | None = None
    waiting: list[str] = []  # why it is not ready: rollouts in progress, nodes not Ready
    autoscalers: list[AutoscalerChange] = []  # k8s.scale_up: the HPAs of the inventory's deployments it raised


class SmokeResult(BaseModel):
    url: str
    status: int | None
    ok: bool
    error: str | None = None
    seconds: float


class Notification(BaseModel):
    environment: str
    channels: list[str]  # names from the inventory; empty: all channels
    text: str
    severity: Literal["info", "warning", "critical"] = "info"
    workflow_id: str | None = None


class NotifyRequest(BaseModel):
    notification: Notification
    channels: list[NotificationChannel]  # the inventory's channels (urls or where their secret url lives)


# -- restore drills -------------------------------------------------------------------------------------


class RestoreRequest(BaseModel):
    """Restore the source region's database into a scratch target named `scratch_name`."""

    source: RegionTarget
    drill: DrillPolicy
    method: str
    scratch_name: str = ""
    point_in_time: datetime | None = None  # None: the latest restorable time
    environment: str = ""  # scratch targets are tagged by environment and run: cleanup never crosses them
    run_id: str = ""
    control_plane_interval: float = 10.0  # restore.wait reads the cloud's control plane at most this often

    @property
    def scratch_environment(self) -> str:
        return self.environment or self.source.environment


def scratch_name(prefix: str, environment: str, run_id: str, method: str) -> str:
    """A scratch target's name for a drill run: `<prefix>-<env>-<run8>` for cloud servers/instances (letters,
    digits, hyphens), `<prefix>_<env>_<run8>` for a database restored from a dump; at most 63 characters."""
    run8 = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8]
    sep = "_" if method == "s3-dump" else "-"
    env = re.sub(r"[^a-z0-9]+", sep, environment.lower()).strip(sep) or "env"
    return f"{prefix}{sep}{env[:63 - len(prefix) - len(run8) - 2]}{sep}{run8}"


class RestoreWindow(BaseModel):
    earliest: datetime | None
    latest: datetime
    detail: str = ""  # e.g. the dump object chosen


class ScratchTarget(BaseModel):
    name: str
    method: str
    ready: bool
    dsn: str | None = None  # libpq DSN without password; the password is the source's (restores copy roles)
    restore_point: datetime | None = None
    detail: str = ""


class MysqlRestoreResult(BaseModel):
    """restore.mysql_dump: a mysqldump restored into a scratch server on the worker, verified, and removed."""

    scratch: ScratchTarget  # the dump restored (restore_point: when it was taken) and where
    restore_seconds: float  # download, scratch server start and load, as the worker measured them
    checks: list[CheckResult] = []
    cleaned: bool  # the scratch server stopped and its data directory removed


class VerifyRequest(BaseModel):
    source: RegionTarget
    scratch: ScratchTarget
    drill: DrillPolicy
    restore_point: datetime


class CheckResult(BaseModel):
    kind: Literal["row_count", "sql", "schema"]
    name: str
    ok: bool
    detail: str = ""
    expected: int | None = None
    actual: int | None = None


class StoreReportRequest(BaseModel):
    environment: str
    workflow_id: str
    reports_dir: str
    store: ReportStore
    aws: AwsConnection | None = None
    json_text: str
    markdown: str


class DrillHistoryRequest(BaseModel):
    """Read back the last `limit` drills of an environment from their stored reports (the trend across runs)."""

    environment: str
    reports_dir: str
    store: ReportStore
    aws: AwsConnection | None = None
    limit: int = 10
    exclude_run: str = ""  # the running drill's own run id: it is not one of the earlier runs


# -- reports --------------------------------------------------------------------------------------------

StepOutcome = Literal["running", "ok", "failed", "skipped", "compensated", "planned"]


class StepRecord(BaseModel):
    name: str
    title: str
    # What the step was, as the kernel knows it (None: recorded before kinds, read from names by the HTML report).
    kind: Literal["action", "gate", "wait", "undo"] | None = None
    outcome: StepOutcome = "running"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None


class Decision(BaseModel):
    """An approval or rejection: who, when, why."""

    approved: bool
    by: str
    at: datetime
    reason: str = ""
    gate: str = "approval"
    roles: list[str] = []  # the approver's roles in the gate's policy, when it has role groups
    signature: str | None = None  # SSHSIG armor, when the request was signed
    signed_at: datetime | None = None


class ControlEvent(BaseModel):
    """pause / resume / abort / override, with who and why."""

    action: str
    by: str
    at: datetime
    reason: str = ""
    signature: str | None = None
    signed_at: datetime | None = None


ProcedureStatus = Literal["running", "waiting", "paused", "succeeded", "failed", "aborted", "refused", "planned"]


class ProcedureReport(BaseModel):
    """What every procedure reports: live (the `progress` query) and at the end (its result)."""

    procedure: str
    workflow_id: str
    environment: str
    requester: str
    reason: str = ""
    dry_run: bool = False
    # Signed requests (opsflow/signing.py): the run the signatures bind to, and the requester's start signature;
    # decisions and control events carry their own. `opsflow verify-report` re-checks them all.
    run_id: str = ""
    start_signature: str | None = None
    start_signed_at: datetime | None = None
    start_input_sha256: str | None = None  # what a version 2 start signature binds: the input's digest, a nonce
    start_nonce: str | None = None
    scheduled_by: str | None = None  # a run a Schedule launched: who created (and signed) the Schedule, its id
    schedule_id: str | None = None
    rules_sha256: str | None = None  # the worker's inventory this run acted by (opsflow/rules.py)
    stored_at: list[str] = []  # where the report was kept at the end (reports directory, S3)
    status: ProcedureStatus = "running"
    failure: str | None = None
    current_step: str | None = None
    waiting_for: str | None = None
    steps: list[StepRecord] = []
    approval: Decision | None = None  # the decision that opened the (last) approval gate
    approvals: list[Decision] = []  # every decision at every gate, in order
    events: list[ControlEvent] = []
    remaining: list[str] = []  # after a failure past the point of no return: what a person must still do
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @classmethod
    def of(cls, inp: Any, **fields: Any) -> Self:
        """The report a run of `inp` starts with: any procedure input (inventory, requester, reason, dry_run);
        the workflow id is filled in once the run knows it."""
        environment = getattr(inp, "environment", "") or inp.inventory.environment
        return cls(workflow_id="", environment=environment, requester=inp.requester, reason=inp.reason,
                   dry_run=inp.dry_run, **fields)


class FailoverReport(ProcedureReport):
    procedure: str = "failover"
    emergency: bool = False
    from_region: str | None = None
    to_region: str = ""
    rto_seconds: float | None = None  # approval (emergency: start) -> traffic moved
    lag_at_promotion_bytes: int | None = None
    lag_at_promotion_seconds: float | None = None
    rpo_bytes: int | None = None  # planned: 0, proven by LSN compare; emergency: WAL not replayed (estimate)
    rpo_proven: bool = False
    promotion_seconds: float | None = None
    preempted: list[str] = []  # procedures an emergency failover aborted to run
    switchover: bool = False  # the promotion swapped roles (Azure virtual endpoint): no rebuild for the failback
    old_primary_replica: bool | None = None  # switchover: the old primary streams from the new one (checked)
    switchover_detail: str | None = None  # self-managed: the shutdown checkpoint proof, or why it was not proven
    drain_seconds: float | None = None  # how long the drain waited
    drain_ended: str | None = None  # why: "sessions idle" or "drain limit reached, N sessions ended by the fence"
    autoscalers: list[AutoscalerChange] = []  # HPAs raised in the new region, lowered in the old (values before)


class ObjectiveResult(BaseModel):
    name: str  # restore_time | restore_point_age
    objective_seconds: float
    measured_seconds: float
    met: bool


class DrillRun(BaseModel):
    """One drill as its stored report tells it: a row of the trend across runs."""

    workflow_id: str
    run_id: str = ""
    started_at: datetime | None = None
    status: str
    method: str | None = None
    restore_point_chosen: str | None = None
    restore_seconds: float | None = None
    restore_point_age_seconds: float | None = None
    latest_point_age_seconds: float | None = None
    checks_passed: int = 0
    checks: int = 0
    objectives_met: bool | None = None  # None: the drill had no objectives
    missed: list[str] = []  # the objectives it missed
    stored_at: str = ""  # where the report was read

    @classmethod
    def of(cls, r: "DrillReport", stored_at: str = "") -> "DrillRun":
        return cls(workflow_id=r.workflow_id, run_id=r.run_id, started_at=r.started_at, status=r.status,
                   method=r.method, restore_point_chosen=r.restore_point_chosen, restore_seconds=r.restore_seconds,
                   restore_point_age_seconds=r.restore_point_age_seconds,
                   latest_point_age_seconds=r.latest_point_age_seconds,
                   checks_passed=sum(c.ok for c in r.checks), checks=len(r.checks),
                   objectives_met=all(o.met for o in r.objectives) if r.objectives else None,
                   missed=[o.name for o in r.objectives if not o.met], stored_at=stored_at)


class DrillReport(ProcedureReport):
    procedure: str = "drill"
    source_region: str | None = None
    method: str | None = None
    scratch_name: str | None = None
    restore_point: datetime | None = None
    restore_point_age_seconds: float | None = None  # the RPO the backups really give
    restore_seconds: float | None = None
    latest_point_age_seconds: float | None = None  # the newest restorable point's age: what the RPO is judged on
    restore_point_chosen: Literal["given", "newest", "random"] | None = None  # how the restore point was chosen
    objectives: list[ObjectiveResult] = []  # drill.objectives, judged
    checks: list[CheckResult] = []
    scratch_deleted: bool | None = None
    window_earliest: datetime | None = None  # the restorable window the restore point was chosen in
    window_latest: datetime | None = None
    trend: list[DrillRun] = []  # the drills before this one, oldest first, read back from their stored reports


class FailbackReport(ProcedureReport):
    procedure: str = "failback"
    from_region: str | None = None  # the current primary
    to_region: str = ""  # the recovered region traffic returns to
    rebuild_method: str | None = None
    rebuild_seconds: float | None = None
    old_primary_preserved: str | None = None
    divergence: Divergence | None = None
    window_opened_at: datetime | None = None
    failover: FailoverReport | None = None  # the child failover's report


class ReadinessCheck(BaseModel):
    """One thing a failover would need, checked without changing anything."""

    check: str  # database, replica, kubernetes, traffic, workers
    region: str | None = None
    ok: bool
    detail: str = ""


class ReadinessReport(ProcedureReport):
    """Could this environment fail over now? The failover's preflight for every region, changing nothing."""

    procedure: str = "readiness"
    primary_region: str | None = None
    ready: bool | None = None
    checks: list[ReadinessCheck] = []
