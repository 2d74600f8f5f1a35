"""The weekly maintenance window, for one environment (`maintenance`) or a fleet (`maintenance-fleet`).

preflight (primary, tables, replicas, backup target) -> announce on the status page -> backup -> verify it ->
approval -> wait for the window (or an approver's `override`) -> maintenance mode on -> each table: its task,
then a health check (database answers, replicas stream within the lag limit, smoke URLs) -> at the cutoff no
new task starts (on_cutoff cancel: the running statement is cancelled too) -> maintenance mode off -> smoke ->
watch the metrics -> status page completed -> notify.
Any failure or abort: maintenance mode off (undo), the status page says the window ended early, and the report
says what was done and what was not.

History: one step per table (and one health check after it) keeps each table visible and retryable on its own.
A run is bounded by `maintenance.max_tables` (500 by default, a few thousand events); tables beyond it are
deferred to the next window and listed. Long statements heartbeat their progress instead of adding events.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel, Field, model_validator
from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError

from workflows.procedure import Procedure, Request, StepDecl, Stop, Undo, child_task_timeout, failure_message

with workflow.unsafe.imports_passed_through():
    from opsflow.calendar import Calendar
    from opsflow.contracts.db import DB_STATUS
    from opsflow.contracts.k8s import K8S_SET_MAINTENANCE
    from opsflow.contracts.maintenance import (
        BACKUP_TAKE,
        BACKUP_VERIFY,
        MAINT_HEALTH,
        MAINT_PLAN,
        MAINT_RUN_ITEM,
        WATCH_JUDGE,
        WATCH_METRICS,
    )
    from opsflow.contracts.notify import STATUSPAGE_UPDATE
    from opsflow.contracts.traffic import HTTP_SMOKE
    from opsflow.inventory import Inventory
    from opsflow.maintenance import MaintenancePolicy, calendar_notes
    from opsflow.maintenance_models import (
        AppJudgement,
        AppJudgeRequest,
        BackupRequest,
        Deferred,
        FleetMember,
        FleetReport,
        HealthRequest,
        HealthResult,
        ItemResult,
        MaintenanceReport,
        PlanRequest,
        PlanResult,
        RunItemRequest,
        StatusPageRequest,
        StatusPageResult,
        VerifyBackupRequest,
        WatchRequest,
        WatchResult,
        WorkItem,
    )
    from opsflow.models import ControlEvent, DbStatus, MaintenanceRequest, RegionTarget
    from opsflow.procedures import fleet_workflow_id
    from opsflow.rules import InventoryDigest, ProcedureInput, digest_of


class MaintenanceInput(ProcedureInput):
    region: str | None = None  # default: the region whose database is the primary now
    dry_run: bool = False
    requester: str
    reason: str = ""


VERBS = {"vacuum": "VACUUM", "analyze": "ANALYZE", "vacuum-analyze": "VACUUM (ANALYZE)",
         "vacuum-freeze": "VACUUM (FREEZE, ANALYZE)", "reindex": "REINDEX CONCURRENTLY", "repack": "pg_repack"}


def breaches(w: WatchResult) -> str:
    return "; ".join(f"{r.name} {r.detail}" for r in w.results if r.breached)


def item_title(item: WorkItem) -> str:
    return f"SQL: {item.name}" if item.kind == "sql" else f"{VERBS[item.kind]} {item.table}"


def declare(inp: MaintenanceInput, region: str, plan: PlanResult) -> list[StepDecl]:
    """Every step after the preflight: the dry-run plan, and the only step names the run may record."""
    inv, policy = inp.inventory, inp.inventory.maintenance
    assert policy is not None
    page, service = (
        policy.status_page,
        (inv.regions[region].kubernetes.service if inv.regions[region].kubernetes else None),
    )
    smoke = inv.regions[region].smoke_urls
    during = policy.watch.during if policy.watch else None
    decls = [
        StepDecl(
            "announce",
            f"status page {page.page_id if page else '-'}: scheduled maintenance",
            "a status page is configured",
            page is not None,
        ),
        StepDecl(
            "backup", plan.backup_target, "the inventory asks for one (maintenance.backup.take)", policy.backup.take
        ),
        StepDecl(
            "verify-backup",
            "the backup completed after the start and is not empty",
            "the inventory asks for it (maintenance.backup.verify)",
            policy.backup.take and policy.backup.verify,
        ),
        StepDecl("approval", f"wait for one of {', '.join(inv.approval.names())}"),
        StepDecl("window", f"wait for the window ({policy.window_text()})", "outside the window"),
        StepDecl(
            "maintenance-on",
            f"annotate service {service} in {region} maintenance=true",
            "maintenance_mode and a service",
            policy.maintenance_mode and service is not None,
        ),
        StepDecl("status-in-progress", "status page: in progress", "a status page is configured", page is not None),
    ]
    for item in plan.items:
        decls.append(StepDecl(item.key, f"{item_title(item)} ({item.reason})"))
        decls.append(
            StepDecl(
                f"health:{item.key}",
                "health: database answers, replicas within the lag limit" + (", smoke URLs" if smoke else ""),
            )
        )
        if during is not None:
            decls.append(StepDecl(f"app:{item.key}", f"judge the app's metrics against the {during.baseline:.0f}s "
                                  "before the window (a significant worsening stops new work and alerts)"))
    return decls + [
        StepDecl(
            "maintenance-off",
            f"remove the maintenance annotation of {service} in {region}",
            "maintenance mode was turned on",
            policy.maintenance_mode and service is not None,
        ),
        StepDecl("smoke", f"{len(smoke)} smoke URL(s) answer", "smoke URLs are configured", bool(smoke)),
        StepDecl(
            "watch",
            f"watch {len(policy.watch.queries)} metric(s) for {policy.watch.duration:.0f}s"
            if policy.watch
            else "watch metrics",
            "watch is configured",
            policy.watch is not None,
        ),
        StepDecl("status-completed", "status page: completed", "a status page is configured", page is not None),
        StepDecl("status-ended-early", "status page: the window ended early", "the run stops", False),
        StepDecl("notify", f"notify {', '.join(c.name for c in inv.notifications) or 'nobody (no channels)'}"),
    ]


@workflow.defn(name="maintenance")
class MaintenanceWorkflow(Procedure[MaintenanceReport]):
    @workflow.init
    def __init__(self, inp: MaintenanceInput) -> None:
        super().__init__(inp.inventory, MaintenanceReport.of(inp, region=inp.region))
        self.in_window = False
        self.incident: str | None = None
        self.items_left: list[WorkItem] = []
        self.app_watch = False  # watch.during: the application judged between tables
        self.work_began = None

    @workflow.run
    async def run(self, inp: MaintenanceInput) -> MaintenanceReport:
        return await self.conclude(inp, self.body)

    def check_child(self, parent, received=None) -> None:
        # A fleet (checked at its own start) runs one maintenance per environment as its children.
        if not parent.workflow_id.startswith("opsflow-fleet-"):
            super().check_child(parent, received)

    async def body(self, inp: MaintenanceInput) -> None:
        inv, report = inp.inventory, self.report
        policy = inv.maintenance
        if policy is None:
            raise Stop("refused", f"the inventory of {inv.environment} has no maintenance: section")
        self.policy: MaintenancePolicy = policy
        self.freezes_honoured = workflow.patched("maintenance-calendar-freezes")
        self.calendar = policy.calendar(inv.rollout) if self.freezes_honoured else Calendar(windows=[policy.window])
        report.window = f"{policy.window_text()}, cutoff {policy.cutoff:.0f}s, on_cutoff {policy.on_cutoff}"
        if self.freezes_honoured and (self.calendar.freezes or self.calendar.ics):
            report.window += "; " + "; ".join(self.calendar.describe().split("; ")[1:])

        # -- preflight: refuse before changing anything ------------------------------------------------------
        await self.check_workers(inv.all_queues())
        statuses: dict[str, DbStatus] = {}
        for r in inv.regions:
            statuses[r] = await self.step(
                f"preflight-{r}",
                f"Check the database in {r}",
                DB_STATUS,
                RegionTarget.of(inv, r),
                queue=inv.region_queue(r),
            )
        if workflow.patched("maintenance-writable-primary"):
            region = self.find_primary(inp, statuses)
        else:
            primaries = [r for r, s in statuses.items() if s.reachable and s.role == "primary"]
            region = inp.region or (primaries[0] if primaries else None)
        if region is None:
            raise Stop("refused", "no region's database answers as the primary")
        if region not in inv.regions:
            raise Stop("refused", f"unknown region {region!r}; the inventory has: {', '.join(inv.regions)}")
        if statuses[region].role != "primary" or not statuses[region].reachable:
            raise Stop(
                "refused",
                f"the database in {region} is not a reachable primary "
                f"({statuses[region].error or statuses[region].role}): "
                "VACUUM and REINDEX need the primary",
            )
        report.region = region
        self.target, self.queue = RegionTarget.of(inv, region), inv.region_queue(region)
        self.replicas = [RegionTarget.of(inv, r) for r in inv.regions if r != region]
        bad = [
            f"{r}: {s.error or 'not streaming'}"
            for r, s in statuses.items()
            if r != region and not (s.reachable and s.streaming)
        ]
        if bad:
            raise Stop("refused", "replicas are not healthy: " + "; ".join(bad))
        plan: PlanResult = await self.step(
            "preflight-tables",
            "Pick the tables, check they exist and the backup target",
            MAINT_PLAN,
            PlanRequest(target=self.target, tasks=policy.tasks, backup=policy.backup, max_tables=policy.max_tables),
            queue=self.queue,
            timeout=120,
            detail=lambda p: f"{len(p.items)} item(s); backup: {p.backup_target}",
        )
        if plan.missing:
            raise Stop("refused", f"listed table(s) do not exist on {region}: {', '.join(plan.missing)}")
        report.planned = plan.items
        report.deferred += [
            Deferred(key=i.key, reason=f"over maintenance.max_tables ({policy.max_tables}): next window")
            for i in plan.over_limit
        ]
        self.items_left = list(plan.items)
        self.declare(declare(inp, region, plan))
        if inp.dry_run:
            self.plan()
            return

        # -- before the window ---------------------------------------------------------------------------------
        now = workflow.now()
        opens = self.calendar.next_opening(now) or now
        closes = self.calendar.closes_at(opens) if opens != now else self.calendar.closes_at(now)
        if policy.status_page:
            text = f"Database maintenance of {inv.environment}: " + ", ".join(
                sorted({item_title(i).split(" ")[0] for i in plan.items})
            )
            res: StatusPageResult = await self.step(
                "announce",
                "Announce the maintenance on the status page",
                STATUSPAGE_UPDATE,
                StatusPageRequest(
                    page=policy.status_page, status="scheduled", body=text, scheduled_for=opens, scheduled_until=closes
                ),
                queue=inv.task_queue,
                heartbeat=self.statuspage_heartbeat(),
                detail=lambda r: f"incident {r.incident_id}",
            )
            self.incident = report.status_page_incident = res.incident_id
        if policy.backup.take:
            started = report.started_at or workflow.now()
            report.backup = await self.step(
                "backup",
                plan.backup_target,
                BACKUP_TAKE,
                BackupRequest(
                    target=self.target, policy=policy.backup, name=f"opsflow-maint-{workflow.info().run_id[:8]}"
                ),
                queue=self.queue,
                timeout=policy.backup.timeout + 60,
                heartbeat=max(policy.heartbeat_timeout, 30),
                attempts=3,
                interruptible=True,
                detail=lambda b: f"{b.method} {b.id.rsplit('/', 1)[-1]}",
            )
            if policy.backup.verify:
                report.backup_verified = await self.step(
                    "verify-backup",
                    "Verify the backup",
                    BACKUP_VERIFY,
                    VerifyBackupRequest(
                        target=self.target, policy=policy.backup, backup=report.backup, not_before=started
                    ),
                    queue=self.queue,
                    timeout=policy.backup.timeout,
                    heartbeat=None,
                    attempts=3,
                    detail=lambda d: d,
                )
        await self.approval_gate(f"maintenance of {inv.environment} ({region}): {len(plan.items)} item(s)")
        await self.wait_for_window()

        # -- in the window -------------------------------------------------------------------------------------
        if policy.watch is not None and policy.watch.during is not None:
            self.app_watch = workflow.patched("maintenance-watch-during")
        self.work_began = workflow.now()  # the application's figures before this are the baseline
        service = inv.regions[region].kubernetes.service if inv.regions[region].kubernetes else None
        if policy.maintenance_mode and service:
            await self.step(
                "maintenance-on",
                f"Maintenance mode on in {region}",
                K8S_SET_MAINTENANCE,
                MaintenanceRequest(target=self.target, on=True),
                queue=self.queue,
            )
            # owed from here on: turned off at the end, and on any failure or abort
            self.owe(Undo(K8S_SET_MAINTENANCE, f"Maintenance mode off in {region}",
                          MaintenanceRequest(target=self.target, on=False), queue=self.queue, name="maintenance-off"))
            report.maintenance_mode_on = True
        await self.status_page("status-in-progress", "in_progress", f"Maintenance of {inv.environment} is in progress")
        await self.run_items()

        # -- after ---------------------------------------------------------------------------------------------
        await self.undo()  # maintenance mode off (recorded as step maintenance-off)
        report.maintenance_mode_on = False
        if self.target.smoke_urls:
            await self.step(
                "smoke", f"Smoke tests in {region}", HTTP_SMOKE, self.target, queue=self.queue, attempts=10
            )
        if policy.watch:
            watched: WatchResult = await self.step(
                "watch",
                f"Watch the metrics for {policy.watch.duration:.0f}s",
                WATCH_METRICS,
                WatchRequest(policy=policy.watch, duration=policy.watch.duration),
                queue=inv.task_queue,
                timeout=policy.watch.duration + 120,
                heartbeat=policy.watch.interval + 60,
                attempts=3,
                interruptible=True,
                detail=lambda w: "within thresholds" if w.ok else "BREACH: " + breaches(w),
            )
            report.watch, report.watch_breached = watched.results, not watched.ok
            if not watched.ok:
                await self.notify(
                    f"Maintenance of {inv.environment}: metrics breached after the window: {breaches(watched)}",
                    severity="critical",
                )
        await self.status_page("status-completed", "completed", self.summary())
        record = self.begin_step("notify", "Notify")
        await self.notify(
            self.summary(), severity="warning" if report.deferred or report.skipped or report.watch_breached else "info"
        )
        self.end_step(record, "ok", self.summary())

    def find_primary(self, inp: MaintenanceInput, statuses: dict[str, DbStatus]) -> str | None:
        """The writable primary (the one `--region` names, else the one that takes writes). After a planned
        failover the old primary is still a primary, fenced read-only, and not yet a replica of the new one: it
        is said to be so, with the command that makes it a replica again, rather than taken for the primary or
        reported as a replica that does not stream."""
        primaries = [r for r, s in statuses.items() if s.reachable and s.role == "primary"]
        writable = [r for r in primaries if not statuses[r].read_only]
        region = inp.region or (writable[0] if writable else primaries[0] if primaries else None)
        fenced = [r for r in primaries if statuses[r].read_only and r != region]
        if region in primaries and statuses[region].read_only:
            now = f"; the primary now is {writable[0]} (run without --region)" if writable else ""
            raise Stop(
                "refused",
                f"the database in {region} is fenced (read-only: default_transaction_read_only is on){now}: "
                "VACUUM and REINDEX need the writable primary",
            )
        if fenced and region is not None:
            raise Stop(
                "refused",
                "; ".join(
                    f"the database in {r} is the old primary, fenced (read-only) and not yet a replica of {region}, "
                    f"the primary now: maintenance needs every replica streaming. Rebuild it as a replica with "
                    f"`opsflow failback --to {r}` (it keeps what the old server holds, rebuilds it from {region}, "
                    "waits for it to catch up, then fails back after approval), then run the maintenance again"
                    for r in fenced
                ),
            )
        return region

    # -- the window ------------------------------------------------------------------------------------------

    async def wait_for_window(self) -> None:
        if self.freezes_honoured:
            _, notes = calendar_notes(self.calendar, Calendar(windows=[self.policy.window]), workflow.now())
            self.report.calendar = notes
        opens = self.calendar.next_opening(workflow.now())
        if opens is None:
            self.in_window = True
            self.report.window_opened_at = workflow.now()
            return
        record = self.begin_step("window", "Wait for the maintenance window")
        await self.wait_for_override(
            f"the window opening at {opens:%Y-%m-%d %H:%M}Z (override: opsflow override {self.report.workflow_id} "
            "--as NAME)",
            opens - workflow.now(),
        )
        self.report.waiting_for = None
        await self.boundary()
        self.in_window = self.window_override is None or self.calendar.is_open(workflow.now())
        self.report.window_opened_at = workflow.now()
        said = f"overridden by {self.window_override.by}" if self.window_override else "window open"
        self.end_step(record, "ok", "; ".join([said, *self.report.calendar]))

    def overridden(self, event: ControlEvent) -> str:
        self.report.override = event
        return "the window wait is overridden: the maintenance starts now (no cutoff applies outside the window)"

    @workflow.signal
    def abort_from_fleet(self, req: Request) -> None:
        """The fleet's abort, passed down: a parent workflow can signal its children, not send them Updates. It
        takes the path `opsflow abort` takes: the running statement cancelled, maintenance mode off, reported."""
        if self.abort_requested is None:
            self.abort_requested = self.event("abort", req)

    def cutoff_reached(self) -> bool:
        # Started by an override outside the window: the approver chose the time; there is no window to end.
        return self.in_window and self.calendar.cutoff_reached(workflow.now(), self.policy.cutoff)

    def cancel_at(self):
        if self.policy.on_cutoff != "cancel" or not self.in_window:
            return None
        closes = self.calendar.closes_at(workflow.now())
        return closes - timedelta(seconds=self.policy.cutoff) if closes else None

    # -- the tables ------------------------------------------------------------------------------------------

    async def run_items(self) -> None:
        """Each item under the guards, `parallel` at once; a table whose lock was not granted is tried again
        after the others (lock_retries times), then skipped. At the cutoff no new item starts."""
        guards, report = self.policy.guards, self.report
        tries: dict[str, int] = {}
        for attempt in range(guards.lock_retries + 1):
            todo = [i for i in self.items_left]
            retry: list[WorkItem] = []

            async def lane() -> None:
                while todo:
                    if self.cutoff_reached() or self.report.stopped_by_app:
                        return
                    item = todo.pop(0)
                    tries[item.key] = tries.get(item.key, 0) + 1
                    result = await self.run_item(item)
                    result.attempts = tries[item.key]
                    self.items_left.remove(item)
                    if result.outcome == "lock-timeout" and attempt < guards.lock_retries:
                        retry.append(item)
                        self.items_left.append(item)
                        continue
                    report.items.append(result)
                    if result.outcome in ("lock-timeout", "statement-timeout", "skipped"):
                        report.skipped.append(
                            Deferred(key=item.key, reason=f"{result.detail} ({tries[item.key]} attempt(s))")
                        )
                    elif result.outcome == "cancelled-at-cutoff":
                        report.deferred.append(Deferred(key=item.key, reason=result.detail))
                    await self.health(item)
                    await self.judge_app(item)

            lanes = [asyncio.ensure_future(lane()) for _ in range(guards.parallel)]
            try:
                await asyncio.gather(*lanes)
            except BaseException:
                for other in lanes:  # one lane stopped the run (health, abort): the others stop too
                    other.cancel()
                await asyncio.gather(*lanes, return_exceptions=True)
                raise
            if self.cutoff_reached() or not retry or report.stopped_by_app:
                break
        if self.items_left:
            why = (f"not started: the application worsened during the window ({report.stopped_by_app})"
                   if report.stopped_by_app else
                   f"the cutoff ({self.policy.cutoff:.0f}s before the window closes) was reached")
            report.deferred += [Deferred(key=i.key, reason=why) for i in self.items_left]
            self.items_left = []

    async def run_item(self, item: WorkItem) -> ItemResult:
        guards = self.policy.guards

        def detail(r: ItemResult) -> str:
            if r.outcome != "done":
                return f"{r.outcome}: {r.detail}"
            if r.before and r.after:
                ages = (f", XID age {r.before.xid_age} -> {r.after.xid_age}"
                        if r.before.xid_age is not None and r.after.xid_age is not None else "")
                return (
                    f"dead tuples {r.before.n_dead_tup} -> {r.after.n_dead_tup}, size "
                    f"{r.before.table_bytes + r.before.index_bytes} -> "
                    f"{r.after.table_bytes + r.after.index_bytes} bytes, lock wait {r.lock_wait_seconds:.1f}s" + ages
                )
            return f"done in {r.seconds:.1f}s"

        return await self.step(
            item.key,
            item_title(item),
            MAINT_RUN_ITEM,
            RunItemRequest(target=self.target, item=item, guards=guards, cancel_at=self.cancel_at()),
            queue=self.queue,
            # a repack first waits (up to lag_wait) for the replicas to come under the lag guard
            timeout=guards.statement_timeout + guards.lock_timeout + 120 + (guards.lag_wait if item.kind == "repack"
                                                                            else 0),
            heartbeat=self.policy.heartbeat_timeout,
            attempts=3,
            interruptible=True,
            detail=detail,
        )

    async def health(self, item: WorkItem) -> None:
        guards = self.policy.guards
        h: HealthResult = await self.step(
            f"health:{item.key}",
            f"Health after {item_title(item)}",
            MAINT_HEALTH,
            HealthRequest(
                primary=self.target,
                replicas=self.replicas,
                max_lag_bytes=guards.max_replication_lag,
                lag_wait=guards.lag_wait,
            ),
            queue=self.queue,
            timeout=guards.lag_wait + 120,
            heartbeat=60,
            attempts=3,
            interruptible=True,
            detail=lambda h: h.detail + (f"; lag {h.lag_bytes}" if h.lag_bytes else ""),
        )
        if not h.ok:
            raise Stop("failed", f"health check after {item_title(item)}: {h.detail}")

    async def judge_app(self, item: WorkItem) -> None:
        """watch.during: the app's metrics since the work began against the minutes before it (the canary's
        judge, in an activity); a significant worsening stops new work (no further table starts) and alerts."""
        if not self.app_watch:
            return
        watch = self.policy.watch
        assert watch is not None and watch.during is not None and self.work_began is not None
        j: AppJudgement = await self.step(
            f"app:{item.key}",
            f"Judge the application after {item_title(item)}",
            WATCH_JUDGE,
            AppJudgeRequest(policy=watch, after=item.key, since=self.work_began, baseline_end=self.work_began,
                            baseline_start=self.work_began - timedelta(seconds=watch.during.baseline)),
            queue=self.inventory.task_queue,
            timeout=120 + 30 * len(watch.queries),
            heartbeat=60,
            attempts=3,
            detail=lambda j: f"{j.verdict} (score {j.score:g}): {j.reason}",
        )
        self.report.app.append(j)
        if j.worse and not self.report.stopped_by_app:
            self.report.stopped_by_app = f"after {item.key}: {j.reason}"
            left = [i.key for i in self.items_left]
            await self.notify(
                f"Maintenance of {self.inventory.environment}: the application worsened during the window after "
                f"{item_title(item)}: {j.reason}. No new table is started"
                + (f" ({len(left)} deferred: {', '.join(left)})" if left else "")
                + "; the running one finishes, then maintenance mode goes off.",
                severity="critical",
            )

    # -- status page, summary, the end ----------------------------------------------------------------------------

    def statuspage_heartbeat(self) -> float | None:
        """statuspage.update heartbeats: a worker lost while it ran one cost the window its 60 s bound (found by the
        crash suite, the worker killed just after it took the announcement); now the heartbeat timeout."""
        return STATUSPAGE_UPDATE.heartbeat if workflow.patched("statuspage-heartbeat") else None

    async def status_page(self, name: str, status: str, body: str) -> None:
        """Best effort once announced: a status page that does not answer is noted, never stops the maintenance."""
        if self.incident is None or self.policy.status_page is None:
            return
        record = self.begin_step(name, f"Status page: {status.replace('_', ' ')}")
        try:
            await workflow.execute_activity(
                STATUSPAGE_UPDATE.name,
                StatusPageRequest(page=self.policy.status_page, incident_id=self.incident, status=status, body=body),  # type: ignore[arg-type]
                result_type=STATUSPAGE_UPDATE.result_type,
                **self.activity_options(self.inventory.task_queue, 60, self.statuspage_heartbeat(), 5),
            )
            self.end_step(record, "ok", status)
        except Exception as err:  # noqa: BLE001 - an ActivityError; the procedure goes on
            self.end_step(record, "failed", failure_message(err))

    def summary(self) -> str:
        r = self.report
        done = [i for i in r.items if i.outcome == "done"]
        dead = sum((i.before.n_dead_tup - i.after.n_dead_tup) for i in done if i.before and i.after)
        text = f"Maintenance of {r.environment} ({r.region}): {len(done)} item(s) done, {dead} dead tuples removed"
        if r.skipped:
            text += f"; skipped: {', '.join(s.key for s in r.skipped)}"
        if r.deferred:
            text += f"; deferred: {', '.join(d.key for d in r.deferred)}"
        if r.backup:
            text += f"; backup {r.backup.id.rsplit('/', 1)[-1]}"
        if r.stopped_by_app:
            text += f"; STOPPED: the application worsened during the window ({r.stopped_by_app})"
        if r.watch_breached:
            text += "; METRICS BREACHED after the window"
        return text

    async def finalize(self) -> None:
        r = self.report
        status, step = r.status, r.current_step  # recording the status page step below must not change how it ended
        r.done = [f"{i.key}: {i.outcome}" for i in r.items]
        r.not_done = [f"{d.key}: {d.reason}" for d in r.deferred + r.skipped]
        if r.status in ("failed", "aborted"):
            r.not_done += [
                f"{i.key}: not started ({r.status})"
                for i in self.items_left
                if i.key not in {d.key for d in r.deferred}
            ]
            await self.status_page(
                "status-ended-early",
                "completed",
                f"The maintenance ended early ({r.status}): {r.failure}. {self.summary()}",
            )
        r.status, r.current_step = status, step


# -- the fleet -----------------------------------------------------------------------------------------------------


class FleetInput(BaseModel):
    environments: list[str] = []
    inventory_digests: dict[str, InventoryDigest] = {}  # what the requester saw, per environment
    inventories: list[Inventory] = []  # inputs recorded before the worker held the rules carried them
    region: str | None = None
    dry_run: bool = False
    requester: str
    reason: str = ""
    max_concurrency: int = Field(default=1, ge=1)
    max_errors: int = Field(default=1, ge=1)  # once this many have failed, no new one starts (SSM MaxErrors)

    @model_validator(mode="after")
    def _named(self) -> "FleetInput":
        if not self.environments:
            self.environments = [i.environment for i in self.inventories]
        if not self.environments:
            raise ValueError("a fleet names at least one environment")
        return self

    def seen_digest(self, environment: str) -> InventoryDigest | None:
        if environment in self.inventory_digests:
            return self.inventory_digests[environment]
        return next((digest_of(i) for i in self.inventories if i.environment == environment), None)

    def without_rules(self, _inventory: Inventory | None = None) -> "FleetInput":
        digests = {e: d for e in self.environments if (d := self.seen_digest(e)) is not None}
        return self.model_copy(update={"inventories": [], "inventory_digests": digests})


@workflow.defn(name="maintenance-fleet")
class MaintenanceFleetWorkflow(Procedure[FleetReport]):
    """One maintenance per environment as child workflows `opsflow-<env>` (each environment's lock holds), at
    most max_concurrency at once; after max_errors failures no new one starts. Each child keeps its own gates
    (approval, override): its approvers answer it by its id. An abort is passed down to the running children
    (their statements are cancelled and they undo) and no new one starts."""

    @workflow.init
    def __init__(self, inp: FleetInput) -> None:
        envs = inp.environments
        super().__init__(
            inp.inventories[0] if inp.inventories else None,
            FleetReport(
                workflow_id="",
                environment=",".join(envs),
                requester=inp.requester,
                reason=inp.reason,
                dry_run=inp.dry_run,
                max_concurrency=inp.max_concurrency,
                max_errors=inp.max_errors,
                members=[FleetMember(environment=e, workflow_id=f"opsflow-{e}", status="not-started") for e in envs],
            ),
        )

    @workflow.run
    async def run(self, inp: FleetInput) -> FleetReport:
        return await self.conclude(inp, self.body)

    # Every member's rules from the worker, checked against what the requester saw, before any child starts.
    def rules_wanted(self, inp: FleetInput) -> dict[str, InventoryDigest | None]:  # type: ignore[override]
        return {e: inp.seen_digest(e) for e in inp.environments}

    def with_rules(self, inp: FleetInput, found: dict[str, Inventory]) -> FleetInput:  # type: ignore[override]
        self.inventory = found[inp.environments[0]]
        return inp.model_copy(update={"inventories": [found[e] for e in inp.environments]})

    def expected_workflow_ids(self) -> list[str]:
        return [fleet_workflow_id(self.report.environment.split(","))]

    async def body(self, inp: FleetInput) -> None:
        report = self.report
        self.declare(
            [
                StepDecl(
                    f"env:{i.environment}", f"maintenance of {i.environment} (child workflow opsflow-{i.environment})"
                )
                for i in inp.inventories
            ]
        )
        # --dry-run: each child runs its own dry run (its preflight and plan)
        members = {m.environment: m for m in report.members}
        running = 0
        failed = 0
        children: list = []

        async def one(inv: Inventory) -> None:
            nonlocal running, failed
            member = members[inv.environment]
            record = self.begin_step(f"env:{inv.environment}", f"Maintenance of {inv.environment}")
            member.status = "running"
            self.show()
            try:
                child_input = MaintenanceInput(
                    inventory=inv, region=inp.region, dry_run=inp.dry_run, requester=inp.requester, reason=inp.reason
                )
                handle = await workflow.start_child_workflow(
                    MaintenanceWorkflow.run,
                    child_input.without_rules(inv) if self.worker_rules else child_input,
                    id=member.workflow_id,
                    task_queue=inv.task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    static_summary=f"maintenance of {inv.environment} (fleet {report.workflow_id})",
                    task_timeout=child_task_timeout(),
                )
                children.append(handle)
                child = await handle
                member.status = child.status
                member.tables_done = sum(1 for i in child.items if i.outcome == "done")
                member.deferred = len(child.deferred)
                self.end_step(record, "ok", member.status)
            except ChildWorkflowError as err:
                failed += 1
                member.failure = failure_message(err)
                member.status = _child_status(err)
                self.end_step(record, "failed", member.failure)
            except Exception as err:  # noqa: BLE001 - e.g. the id is taken: another procedure runs there
                failed += 1
                member.status, member.failure = "refused", f"could not start: {failure_message(err)}"
                self.end_step(record, "failed", member.failure)
            finally:
                running -= 1

        tasks = []
        for inv in inp.inventories:
            await workflow.wait_condition(lambda: running < inp.max_concurrency or self.abort_requested is not None)
            if self.abort_requested is not None or failed >= inp.max_errors:
                break
            running += 1
            report.peak_concurrency = max(report.peak_concurrency, running)
            tasks.append(asyncio.ensure_future(one(inv)))
        await workflow.wait_condition(lambda: running == 0 or self.abort_requested is not None)
        if self.abort_requested is not None:
            a = self.abort_requested
            for h in children:
                try:
                    await h.signal(
                        MaintenanceWorkflow.abort_from_fleet,
                        Request(by=a.by, reason=f"fleet {report.workflow_id} aborted: {a.reason}"),
                    )
                except Exception:  # noqa: BLE001 - the child has ended meanwhile
                    pass
        await asyncio.gather(*tasks, return_exceptions=True)
        for m in report.members:
            if m.status == "not-started":
                m.failure = (
                    "aborted before it started"
                    if self.abort_requested
                    else f"not started: {failed} failed (max_errors {inp.max_errors})"
                )
        await self.boundary()
        if failed:
            raise Stop(
                "failed",
                f"{failed} of {len(inp.inventories)} environment(s) failed: "
                + "; ".join(
                    f"{m.environment} {m.status}" for m in report.members if m.status not in ("succeeded", "planned")
                ),
            )


def _child_status(err: BaseException) -> str:
    cause = err
    while getattr(cause, "cause", None) is not None:
        if isinstance(cause, ApplicationError) and cause.type in ("Failed", "Aborted", "Refused"):
            return cause.type.lower()
        cause = cause.cause  # type: ignore[assignment]
    if isinstance(cause, ApplicationError) and cause.type in ("Failed", "Aborted", "Refused"):
        return cause.type.lower()
    return "failed"
