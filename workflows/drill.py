"""The restore test (monthly DR drill). Reads top to bottom; each step is one line.

validate the checks against the source -> find the restorable range and the restore point -> remove scratch
targets a crashed run left behind -> restore into a scratch target -> wait for it (heartbeating) -> verify
(row counts at the restore point, SQL checks, schema objects) -> ALWAYS delete the scratch target (after
success, failure or cancellation) -> keep the report (local + S3) -> notify with one line.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.kernel.common import failure_message
from workflows.procedure import Procedure, StepDecl, Stop, Undo

with workflow.unsafe.imports_passed_through():
    from activities.providers import default_restore_method
    from opsflow.contracts.db import DB_STATUS
    from opsflow.contracts.restore import (
        RESTORE_DELETE,
        RESTORE_HISTORY,
        RESTORE_LEFTOVERS,
        RESTORE_MYSQL_DUMP,
        RESTORE_START,
        RESTORE_VALIDATE_CHECKS,
        RESTORE_VERIFY,
        RESTORE_WAIT,
        RESTORE_WINDOW,
    )
    from opsflow.models import (
        CheckResult,
        ControlEvent,
        DbStatus,
        DrillHistoryRequest,
        DrillReport,
        MysqlRestoreResult,
        ObjectiveResult,
        RegionTarget,
        RestoreRequest,
        RestoreWindow,
        ScratchTarget,
        VerifyRequest,
    )
    from opsflow.rules import ProcedureInput


class DrillInput(ProcedureInput):
    source_region: str | None = None  # default: the inventory's primary region
    point_in_time: datetime | None = None  # default: the latest restorable time
    dry_run: bool = False
    requester: str
    reason: str = ""


def declare(inp: DrillInput, source: str, method: str, name: str, point: datetime) -> list[StepDecl]:
    """Every step after the restore point is known: the dry-run plan and the run's only names."""
    policy = inp.inventory.drill
    leftovers = StepDecl(
        "leftovers",
        f"delete scratch targets of finished drills of {inp.inventory.environment} ({policy.scratch_prefix}-*)",
    )
    checks = (f"{len(policy.row_counts)} row count(s), {len(policy.checks)} SQL check(s), "
              f"{len(policy.schema_objects)} schema object(s)")
    if method == "s3-mysqldump":
        return [
            leftovers,
            StepDecl("restore", f"{method}: the dump of {point.isoformat()} or before into a scratch MariaDB/MySQL "
                                f"server {name} on the worker; {checks}; the server stopped and removed"),
            StepDecl("cleanup", f"delete {name} if a worker crash left it (always)"),
        ]
    return [
        leftovers,
        StepDecl("restore", f"{method}: restore {source} as of {point.isoformat()} into {name}"),
        StepDecl("restore-wait", f"wait for {name} (up to {policy.restore_timeout:.0f}s)"),
        StepDecl("verify", checks),
        StepDecl("cleanup", f"delete {name} (always: after success, failure or abort)"),
    ]


@workflow.defn(name="drill")
class DrillWorkflow(Procedure[DrillReport]):
    notify_on_stop = False  # finalize() sends the one-line summary, success or not
    stores_own_report = True

    @workflow.init
    def __init__(self, inp: DrillInput) -> None:
        super().__init__(inp.inventory, DrillReport.of(inp))

    @workflow.run
    async def run(self, inp: DrillInput) -> DrillReport:
        return await self.conclude(inp, self.drill)

    async def drill(self, inp: DrillInput) -> None:
        inv, report, policy = inp.inventory, self.report, inp.inventory.drill
        source = inp.source_region or await self.current_primary()
        if source not in inv.regions:
            raise Stop("refused", f"unknown region {source!r}; the inventory has: {', '.join(inv.regions)}")
        method = policy.method or default_restore_method(inv.region(source).database.provider)
        # One scratch target per drill, named by the run: a retried or crashed step finds the same one.
        # (the run id's last 8 hex digits: its first are a time prefix (UUIDv7) that drills a minute apart share)
        run_hex = workflow.info().run_id.replace("-", "")
        run8 = run_hex[-8:] if workflow.patched("scratch-name-random-part") else run_hex[:8]
        name = f"{policy.scratch_prefix}-{run8}"
        report.source_region, report.method, report.scratch_name = source, method, name
        q = inv.region_queue(source)
        req = RestoreRequest(
            source=RegionTarget.of(inv, source),
            drill=policy,
            method=method,
            scratch_name=name,
            environment=inv.environment,
            run_id=workflow.info().run_id,
        )

        await self.step(
            "validate",
            "Check that the verified tables exist on the source",
            RESTORE_VALIDATE_CHECKS,
            req,
            queue=q,
            attempts=3,
        )
        window: RestoreWindow = await self.step(
            "window",
            f"Find the restorable range ({method})",
            RESTORE_WINDOW,
            req,
            queue=q,
            detail=lambda w: f"{w.earliest or '?'} .. {w.latest}" + (f"; {w.detail}" if w.detail else ""),
        )
        report.window_earliest, report.window_latest = window.earliest, window.latest
        if inp.point_in_time:
            report.restore_point_chosen = "given"
        point = inp.point_in_time or self.choose_point(window, policy.retention, method)
        if point > workflow.now():
            raise Stop("refused", f"the point in time {point.isoformat()} is in the future")
        if window.earliest and point < window.earliest:
            raise Stop(
                "refused",
                f"the point in time {point.isoformat()} is before the earliest restorable time "
                f"{window.earliest.isoformat()} (retention)",
            )
        if point > window.latest:
            raise Stop(
                "refused",
                f"the point in time {point.isoformat()} is after the latest restorable time "
                f"{window.latest.isoformat()}",
            )
        req.point_in_time = report.restore_point = point
        report.restore_point_age_seconds = (workflow.now() - point).total_seconds()
        report.latest_point_age_seconds = (workflow.now() - window.latest).total_seconds()

        await self.check_workers([inv.task_queue, q])
        self.declare(declare(inp, source, method, name, point))
        if inp.dry_run:
            self.plan()
            return

        await self.step(
            "leftovers",
            "Remove scratch targets left by earlier runs",
            RESTORE_LEFTOVERS,
            req,
            queue=q,
            detail=lambda found: f"removed {', '.join(found)}" if found else "none",
        )
        # From here on the scratch target may exist: its deletion is owed whatever happens.
        self.owe(Undo(RESTORE_DELETE, f"Delete scratch target {name}", req, queue=q, timeout=policy.restore_timeout,
                      name="cleanup", heartbeat=policy.heartbeat_timeout))
        if method == "s3-mysqldump":  # a new method: no run recorded before it takes this branch
            checks = await self.restore_mysql(req, inp.point_in_time is None)
            return await self.judge(report, policy, checks)
        started = workflow.now()
        await self.step(
            "restore",
            f"Restore {source} as of {point:%Y-%m-%d %H:%M:%S}Z into {name}",
            RESTORE_START,
            req,
            queue=q,
            attempts=5,
        )
        scratch: ScratchTarget = await self.step(
            "restore-wait",
            f"Wait for {name}",
            RESTORE_WAIT,
            req,
            queue=q,
            timeout=policy.restore_timeout,
            heartbeat=policy.heartbeat_timeout,
            attempts=3,
            interruptible=True,
            detail=lambda t: t.detail,
        )
        report.restore_seconds = (workflow.now() - started).total_seconds()
        if scratch.restore_point and scratch.restore_point != point:  # a dump restores to when it was taken
            report.restore_point = scratch.restore_point
            report.restore_point_age_seconds = (workflow.now() - scratch.restore_point).total_seconds()
            if inp.point_in_time is None:  # the newest dump is the newest restorable point
                report.latest_point_age_seconds = report.restore_point_age_seconds
        checks: list[CheckResult] = await self.step(
            "verify",
            "Verify integrity",
            RESTORE_VERIFY,
            VerifyRequest(
                source=req.source, scratch=scratch, drill=policy, restore_point=scratch.restore_point or point
            ),
            queue=q,
            timeout=1800,
            heartbeat=policy.heartbeat_timeout,  # a worker lost mid-check is retried within it, not after 30 min
            attempts=3,
            detail=lambda rs: f"{sum(r.ok for r in rs)}/{len(rs)} checks passed",
        )
        await self.judge(report, policy, checks)

    async def restore_mysql(self, req: RestoreRequest, newest: bool) -> list[CheckResult]:
        """s3-mysqldump: restore, verify and remove in one step, on one worker (its scratch server lives there)."""
        policy = req.drill
        result: MysqlRestoreResult = await self.step(
            "restore",
            f"Restore the dump into scratch server {req.scratch_name}, verify it, remove it",
            RESTORE_MYSQL_DUMP,
            req,
            queue=self.inventory.region_queue(req.source.region),
            timeout=policy.restore_timeout,
            heartbeat=policy.heartbeat_timeout,
            attempts=3,
            interruptible=True,
            detail=lambda r: r.scratch.detail + ("" if r.cleaned else "; NOT removed"),
        )
        report = self.report
        report.restore_seconds = result.restore_seconds
        if result.scratch.restore_point:  # a dump restores to when it was taken
            report.restore_point = result.scratch.restore_point
            report.restore_point_age_seconds = (workflow.now() - result.scratch.restore_point).total_seconds()
            if newest:
                report.latest_point_age_seconds = report.restore_point_age_seconds
        return result.checks

    async def judge(self, report: DrillReport, policy, checks: list[CheckResult]) -> None:
        """Checks and objectives; the scratch target deleted before a failure is said."""
        report.checks = checks
        report.objectives = judge_objectives(policy.objectives, report)
        await self.undo()  # delete the scratch target now; on failure or cancellation `conclude` does it
        failed = [c for c in checks if not c.ok]
        if failed:
            raise Stop(
                "failed", "integrity check(s) failed: " + "; ".join(f"{c.kind} {c.name}: {c.detail}" for c in failed)
            )
        missed = [o for o in report.objectives if not o.met]
        if missed:
            raise Stop("failed", "objective(s) missed: " + "; ".join(
                f"{o.name.replace('_', ' ')} {o.measured_seconds:.0f}s, objective {o.objective_seconds:.0f}s"
                for o in missed))

    def choose_point(self, window: RestoreWindow, retention: float, method: str) -> datetime:
        """No point given: the newest, or one at random within the restorable window (seeded by the run, so a
        replay chooses the same)."""
        if self.inventory.drill.restore_point != "random":
            self.report.restore_point_chosen = "newest"
            return window.latest
        if method in ("s3-dump", "s3-mysqldump"):
            raise Stop("refused", "drill.restore_point random needs a point-in-time method (azure-pitr, rds-pitr): "
                                  f"the {method} method restores a dump to when it was taken")
        oldest = window.latest - timedelta(seconds=retention)
        earliest = max(window.earliest, oldest) if window.earliest else oldest
        span = max(0.0, (window.latest - earliest).total_seconds())
        self.report.restore_point_chosen = "random"
        return earliest + timedelta(seconds=workflow.random().uniform(0, span))

    async def current_primary(self) -> str:
        """The region whose database is primary now (after a failover it is not the inventory's)."""
        inv = self.inventory
        for region in inv.regions:
            status: DbStatus = await self.step(
                f"find-primary-{region}",
                f"Check the database in {region}",
                DB_STATUS,
                RegionTarget.of(inv, region),
                queue=inv.region_queue(region),
                attempts=2,
            )
            if status.reachable and status.role == "primary" and not status.read_only:  # a fenced old primary is not it
                return region
        return inv.primary_region

    async def read_trend(self) -> None:
        """The drills before this one, read back from their stored reports (drill.trend of them): shown in this
        report beside its own figures. Best effort and bounded: a history that cannot be read is an event."""
        inv, report = self.inventory, self.report
        if not inv.drill.trend_runs:
            return
        request = DrillHistoryRequest(environment=inv.environment, reports_dir=inv.reports_dir, store=inv.reports,
                                      aws=inv.aws, limit=inv.drill.trend_runs, exclude_run=workflow.info().run_id)
        try:
            report.trend = await workflow.execute_activity(
                RESTORE_HISTORY.name, request, result_type=RESTORE_HISTORY.result_type,
                summary=f"read the last {inv.drill.trend_runs} drills' reports",
                **self.aside_options(RESTORE_HISTORY, 60, 3))
        except ActivityError as err:
            report.events.append(ControlEvent(action="trend-unread", by="opsflow", at=workflow.now(),
                                              reason=failure_message(err)))

    async def finalize(self) -> None:
        """Keep the evidence: the report as JSON and Markdown, locally and in S3; then one line to the channels."""
        report, inv = self.report, self.inventory
        if inv is None:  # refused before the worker's rules were taken: nothing ran, nothing to keep
            return
        if report.dry_run:
            return
        deletions = [s for s in report.steps if s.name in ("cleanup", "undo:restore.delete")]
        if deletions:
            report.scratch_deleted = all(s.outcome == "compensated" for s in deletions)
        if workflow.patched("drill-trend"):
            await self.read_trend()
        await self.store_report()  # before the summary line, as drills always have (the kernel keeps others' after)
        status = report.status if report.status != "running" else "succeeded"
        ok = sum(c.ok for c in report.checks)
        line = (
            f"restore drill {inv.environment}/{report.source_region}: {status}; restore point "
            f"{report.restore_point:%Y-%m-%d %H:%M}Z"
            if report.restore_point
            else f"restore drill {inv.environment}: {status}"
        )
        if report.restore_seconds is not None:
            line += f", restored in {report.restore_seconds:.0f}s, checks {ok}/{len(report.checks)}"
        if report.objectives:
            line += ", objectives " + ", ".join(f"{o.name} {'met' if o.met else 'MISSED'}" for o in report.objectives)
        if report.failure:
            line += f" — {report.failure}"
        await self.notify(
            line, severity="info" if status == "succeeded" else "critical", channels=inv.drill.notify_channels or None
        )


def judge_objectives(objectives, report: DrillReport) -> list[ObjectiveResult]:
    """drill.objectives against the figures measured: restore time (RTO of a restore), the newest restorable
    point's age (the RPO the backups give)."""
    if objectives is None:
        return []
    out = []
    figures = (("restore_time", objectives.restore_time, report.restore_seconds),
               ("restore_point_age", objectives.restore_point_age, report.latest_point_age_seconds))
    for name, target, measured in figures:
        if target is not None and measured is not None:
            out.append(ObjectiveResult(name=name, objective_seconds=target, measured_seconds=measured,
                                       met=measured <= target))
    return out
