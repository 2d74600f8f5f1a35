"""The maintenance window's activity requests and results, and its reports (one environment, and a fleet)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from opsflow.maintenance import BackupPolicy, Guards, MaintenanceTask, StatusPage, TaskKind, WatchPolicy
from opsflow.models import ControlEvent, ProcedureReport, RegionTarget, SmokeResult

# -- activity requests and results ----------------------------------------------------------------------------


class WorkItem(BaseModel):
    """One task on one table (or one named sql statement)."""

    task: int  # index in maintenance.tasks
    kind: TaskKind
    table: str | None = None
    name: str | None = None
    sql: str | None = None
    reason: str = ""  # why it was picked (auto) or "listed"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.table or self.name}"


class PlanRequest(BaseModel):
    target: RegionTarget
    tasks: list[MaintenanceTask]
    backup: BackupPolicy
    max_tables: int = 500


class PlanResult(BaseModel):
    items: list[WorkItem]
    missing: list[str] = []  # listed tables that do not exist
    over_limit: list[WorkItem] = []
    backup_target: str = ""  # what the backup will use, or why it cannot


def _share(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0%}"


class IndexBloat(BaseModel):
    name: str  # schema.index
    bytes: int
    bloat: float | None  # the share of the index that is bloat, 0..1 (None: unknown, no statistics yet)
    method: str  # pgstattuple | estimate
    detail: str = ""


class TableStats(BaseModel):
    n_live_tup: int = 0
    n_dead_tup: int = 0
    table_bytes: int = 0
    index_bytes: int = 0
    last_vacuum: datetime | None = None
    last_analyze: datetime | None = None
    invalid_indexes: list[str] = []
    xid_age: int | None = None  # age(relfrozenxid), the greater of the table's and its TOAST table's
    mxid_age: int | None = None  # mxid_age(relminmxid)
    table_bloat: float | None = None  # dead and free space of the heap, 0..1 (before and after only)
    bloat_method: str | None = None  # pgstattuple | estimate
    indexes: list[IndexBloat] = []  # each btree index's bloat
    relfilenode: int | None = None  # the table's file: a rebuild (pg_repack) gives it a new one


class RunItemRequest(BaseModel):
    target: RegionTarget
    item: WorkItem
    guards: Guards
    # on_cutoff cancel: the activity cancels its own statement at this moment (pg_cancel_backend)
    cancel_at: datetime | None = None


# skipped: not started, for a reason the detail gives (pg_repack: the extension or the client is missing, no
# primary key, a replica lagging beyond the guard)
ItemOutcome = Literal[
    "done", "lock-timeout", "statement-timeout", "cancelled-at-cutoff", "cancelled", "failed", "skipped"
]


class ItemResult(BaseModel):
    key: str
    kind: TaskKind
    table: str | None = None
    name: str | None = None
    outcome: ItemOutcome
    detail: str = ""
    reason: str = ""
    attempts: int = 1
    seconds: float = 0.0
    lock_wait_seconds: float = 0.0
    before: TableStats | None = None
    after: TableStats | None = None
    dropped_invalid: list[str] = []  # leftover _ccnew indexes of an earlier failed REINDEX CONCURRENTLY


class HealthRequest(BaseModel):
    primary: RegionTarget
    replicas: list[RegionTarget] = []
    max_lag_bytes: int
    lag_wait: float = 600


class HealthResult(BaseModel):
    ok: bool
    detail: str = ""
    lag_bytes: dict[str, int] = {}
    waited_seconds: float = 0.0
    smoke: list[SmokeResult] = []


class BackupRequest(BaseModel):
    target: RegionTarget
    policy: BackupPolicy
    name: str  # derived from the workflow run: a retried take finds the same backup


class BackupResult(BaseModel):
    id: str
    method: str  # azure-on-demand | rds-snapshot | pg_basebackup
    state: str
    started_at: datetime | None = None
    completed_at: datetime | None = None
    size_bytes: int | None = None
    location: str = ""


class VerifyBackupRequest(BaseModel):
    target: RegionTarget
    policy: BackupPolicy
    backup: BackupResult
    not_before: datetime


class StatusPageRequest(BaseModel):
    page: StatusPage
    incident_id: str | None = None  # None: create the scheduled maintenance
    status: Literal["scheduled", "in_progress", "verifying", "completed"]
    body: str
    scheduled_for: datetime | None = None
    scheduled_until: datetime | None = None


class StatusPageResult(BaseModel):
    incident_id: str
    status: str


class WatchRequest(BaseModel):
    policy: WatchPolicy
    duration: float


class WatchQueryResult(BaseModel):
    name: str
    query: str
    samples: int = 0
    last: float | None = None
    worst: float | None = None
    breached: bool = False
    detail: str = ""


class WatchResult(BaseModel):
    ok: bool
    results: list[WatchQueryResult]


class AppJudgeRequest(BaseModel):
    policy: WatchPolicy  # with `during`
    after: str  # the item just done
    baseline_start: datetime
    baseline_end: datetime  # when the work began
    since: datetime  # the window's values start here at the earliest (when the work began)


class AppMetric(BaseModel):
    name: str
    verdict: str  # pass | high | low | inconclusive | skipped | breach
    baseline: float | None = None  # mean before the window
    current: float | None = None  # mean in the window
    ratio: float | None = None
    p_value: float | None = None
    samples: int = 0
    reason: str = ""


class AppJudgement(BaseModel):
    after: str
    at: datetime | None = None
    verdict: str  # pass | marginal | fail | inconclusive
    score: float = 0.0
    reason: str = ""
    metrics: list[AppMetric] = []

    @property
    def worse(self) -> bool:
        return self.verdict == "fail"


# -- reports --------------------------------------------------------------------------------------------------


class Deferred(BaseModel):
    key: str
    reason: str


class MaintenanceReport(ProcedureReport):
    procedure: str = "maintenance"
    region: str | None = None
    window: str = ""
    window_opened_at: datetime | None = None
    calendar: list[str] = []  # what the freezes did to the window: skipped, opened late, shortened
    override: ControlEvent | None = None
    backup: BackupResult | None = None
    backup_verified: str | None = None
    planned: list[WorkItem] = []
    items: list[ItemResult] = []
    deferred: list[Deferred] = []  # not started: cutoff, limits, abort
    skipped: list[Deferred] = []  # tried and given up: lock timeouts, statement timeouts
    maintenance_mode_on: bool = False
    status_page_incident: str | None = None
    watch: list[WatchQueryResult] = []
    watch_breached: bool = False
    app: list[AppJudgement] = []  # watch.during: the application judged after each table
    stopped_by_app: str | None = None  # a significant worsening stopped new work: why
    done: list[str] = []
    not_done: list[str] = []

    def figure_lines(self) -> list[str]:
        """The report's figures for people (opsflow report, the CLI's summary)."""
        out = [f"window {self.window}" + (f"; overridden by {self.override.by}" if self.override else "")]
        out += [f"CALENDAR {n}" for n in self.calendar]
        if self.backup:
            out.append(
                f"backup {self.backup.id}"
                + (f"; verified: {self.backup_verified}" if self.backup_verified else "; not verified")
            )
        for i in self.items:
            line = f"{i.key}: {i.outcome} in {i.seconds:.1f}s"
            if i.before and i.after:
                line += (
                    f", dead tuples {i.before.n_dead_tup} -> {i.after.n_dead_tup}, table+indexes "
                    f"{i.before.table_bytes + i.before.index_bytes} -> "
                    f"{i.after.table_bytes + i.after.index_bytes} bytes"
                )
                if i.before.xid_age is not None and i.after.xid_age is not None:
                    line += f", XID age {i.before.xid_age} -> {i.after.xid_age}"
                if i.after.bloat_method is not None:
                    line += (f", table bloat {_share(i.before.table_bloat)} -> {_share(i.after.table_bloat)} "
                             f"({i.after.bloat_method})")
                after = {b.name: b for b in i.after.indexes}
                line += "".join(f", index {b.name} bloat {_share(b.bloat)} -> {_share(after[b.name].bloat)}"
                                for b in i.before.indexes if b.name in after)
            if i.lock_wait_seconds:
                line += f", lock wait {i.lock_wait_seconds:.1f}s"
            if i.dropped_invalid:
                line += f", dropped invalid {', '.join(i.dropped_invalid)}"
            out.append(line + (f" ({i.reason})" if i.reason.startswith("auto") else ""))
        out += [f"SKIPPED {d.key}: {d.reason}" for d in self.skipped]
        out += [f"DEFERRED {d.key}: {d.reason}" for d in self.deferred]
        for j in self.app:
            out.append(f"app after {j.after}: {j.verdict.upper() if j.worse else j.verdict} (score {j.score:g})"
                       + "".join(f"; {m.name} {m.current if m.current is None else f'{m.current:.4g}'} vs "
                                 f"{m.baseline if m.baseline is None else f'{m.baseline:.4g}'} before ({m.verdict})"
                                 for m in j.metrics))
        if self.stopped_by_app:
            out.append(f"STOPPED (no new table started): {self.stopped_by_app}")
        out += [f"watch {w.name}: {'BREACHED ' + w.detail if w.breached else f'ok, last {w.last}'}" for w in self.watch]
        if self.status in ("failed", "aborted"):
            out += [f"NOT DONE {n}" for n in self.not_done]
        return out


class FleetMember(BaseModel):
    environment: str
    workflow_id: str
    status: str  # succeeded | failed | aborted | refused | not-started | running
    failure: str | None = None
    tables_done: int = 0
    deferred: int = 0


class FleetReport(ProcedureReport):
    procedure: str = "maintenance-fleet"
    max_concurrency: int = 1
    max_errors: int = 0
    members: list[FleetMember] = []
    peak_concurrency: int = 0

    def figure_lines(self) -> list[str]:
        return [
            f"at most {self.max_concurrency} at once (peak {self.peak_concurrency}), "
            f"stop after {self.max_errors} failure(s)"
        ] + [
            f"{m.environment} ({m.workflow_id}): {m.status}"
            + (f", {m.tables_done} table(s) done, {m.deferred} deferred" if m.status == "succeeded" else "")
            + (f" — {m.failure}" if m.failure else "")
            for m in self.members
        ]
