"""The maintenance window's logic on the time-skipping server, activities stood in by name: the window wait,
cutoff deferral, on_cutoff cancel, a failing health check, abort in the middle of a table, lock retries, the
fleet's rate control, the dry run. The real activities are tested against PostgreSQL in tests/integration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import Worker

from activities.reports import store_report
from activities.rules import worker_inventory
from opsflow.client import send_update
from opsflow.contracts.db import DB_STATUS
from opsflow.contracts.k8s import K8S_SET_MAINTENANCE
from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
from opsflow.contracts.maintenance import (
    BACKUP_TAKE,
    BACKUP_VERIFY,
    MAINT_HEALTH,
    MAINT_PLAN,
    MAINT_RUN_ITEM,
    WATCH_JUDGE,
    WATCH_METRICS,
)
from opsflow.contracts.notify import NOTIFY_SEND, STATUSPAGE_UPDATE
from opsflow.contracts.traffic import HTTP_SMOKE
from opsflow.inventory import Inventory
from opsflow.maintenance_models import (
    AppJudgement,
    AppJudgeRequest,
    AppMetric,
    BackupRequest,
    BackupResult,
    HealthRequest,
    HealthResult,
    ItemResult,
    MaintenanceReport,
    PlanRequest,
    PlanResult,
    RunItemRequest,
    StatusPageRequest,
    StatusPageResult,
    TableStats,
    VerifyBackupRequest,
    WatchQueryResult,
    WatchRequest,
    WatchResult,
    WorkItem,
)
from opsflow.models import DbStatus, KubeStatus, MaintenanceRequest, NotifyRequest, RegionTarget, SmokeResult
from opsflow.procedures import fleet_workflow_id
from tests.workflow.conftest import inventory_dict, worker_holds
from workflows.maintenance import FleetInput, MaintenanceFleetWorkflow, MaintenanceInput, MaintenanceWorkflow
from workflows.procedure import Procedure, Request

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
QUEUE = "maint-tests"


@dataclass
class MaintWorld:
    """Environments' databases as the maintenance sees them; every call recorded."""

    calls: list = field(default_factory=list)
    maintenance: set = field(default_factory=set)  # environments with maintenance mode on
    peak_maintenance: int = 0
    statuspage: list = field(default_factory=list)
    notifications: list = field(default_factory=list)
    lock_held: dict = field(default_factory=dict)  # table -> how many more attempts find the lock held
    slow: set = field(default_factory=set)  # tables whose statement runs until cancelled
    started: dict = field(default_factory=dict)  # key -> threading.Event set when the statement started
    cancelled: list = field(default_factory=list)
    unhealthy_after: set = field(default_factory=set)  # keys after which the health check fails
    fail_plan: set = field(default_factory=set)  # environments whose preflight fails
    cancel_at: dict = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    block: set = field(default_factory=set)  # keys that wait for `release`
    db: dict = field(default_factory=dict)  # region -> the DbStatus it answers (default: eastus primary)
    app_worse_after: set = field(default_factory=set)  # keys after which the app's judgement is a fail
    judged: list = field(default_factory=list)  # the AppJudgeRequests
    skip: dict = field(default_factory=dict)  # table -> the reason its item is skipped (pg_repack's guards)

    def activities(self):
        w = self

        @DB_STATUS.implementation
        def db_status(t: RegionTarget) -> DbStatus:
            if t.region in w.db:
                return w.db[t.region]
            if t.region == "eastus":
                return DbStatus(region=t.region, reachable=True, role="primary", current_lsn="0/3000000")
            return DbStatus(
                region=t.region,
                reachable=True,
                role="replica",
                streaming=True,
                current_lsn="0/3000000",
                replay_lsn="0/3000000",
            )

        @MAINT_PLAN.implementation
        def plan(req: PlanRequest) -> PlanResult:
            w.calls.append((req.target.environment, "plan"))
            if req.target.environment in w.fail_plan:
                raise ApplicationError("database refused the preflight", type="Injected", non_retryable=True)
            items = []
            for i, task in enumerate(req.tasks):
                if task.kind == "sql":
                    items.append(WorkItem(task=i, kind="sql", name=task.name, sql=task.sql, reason="listed"))
                else:
                    items += [WorkItem(task=i, kind=task.kind, table=t, reason="listed") for t in task.tables]
            return PlanResult(items=items, backup_target="pg_basebackup into /backups")

        @BACKUP_TAKE.implementation
        def take(req: BackupRequest) -> BackupResult:
            w.calls.append((req.target.environment, "backup"))
            return BackupResult(
                id=req.name,
                method="pg_basebackup",
                state="completed",
                completed_at=activity.info().current_attempt_scheduled_time,
                size_bytes=1 << 20,
                location=f"/backups/{req.name}",
            )

        @BACKUP_VERIFY.implementation
        def verify(req: VerifyBackupRequest) -> str:
            w.calls.append((req.target.environment, "verify-backup"))
            return f"{req.backup.id} verified"

        @MAINT_RUN_ITEM.implementation
        def run_item(req: RunItemRequest) -> ItemResult:
            key = req.item.key
            w.calls.append((req.target.environment, key))
            w.cancel_at[key] = req.cancel_at
            w.started.setdefault(key, threading.Event()).set()
            base = dict(key=key, kind=req.item.kind, table=req.item.table, name=req.item.name, reason=req.item.reason)
            if req.item.table in w.skip:
                return ItemResult(**base, outcome="skipped", detail=w.skip[req.item.table])
            if w.lock_held.get(req.item.table, 0) > 0:
                w.lock_held[req.item.table] -= 1
                return ItemResult(
                    **base,
                    outcome="lock-timeout",
                    detail=f"lock not granted within {req.guards.lock_timeout:g}s",
                    lock_wait_seconds=req.guards.lock_timeout,
                )
            if req.item.table in w.slow:
                if req.cancel_at is not None:  # on_cutoff cancel: the real activity cancels itself at cancel_at
                    return ItemResult(
                        **base,
                        outcome="cancelled-at-cutoff",
                        detail="cancelled at the window's cutoff (pg_cancel_backend)",
                    )
                try:
                    while True:  # until the workflow cancels it (delivered with a heartbeat, raised in this thread)
                        activity.heartbeat({"progress": "scanning heap"})
                        if activity.is_cancelled():
                            raise CancelledError("cancelled")
                        time.sleep(0.05)
                except CancelledError:
                    w.cancelled.append(key)
                    raise
            if key in w.block:
                try:
                    while not w.release.wait(0.05):
                        activity.heartbeat()
                        if (
                            activity.is_cancelled()
                        ):  # a pause interrupts a long statement; it runs again after the resume
                            raise CancelledError("cancelled")
                except CancelledError:
                    w.cancelled.append(key)
                    raise
            return ItemResult(
                **base,
                outcome="done",
                seconds=0.2,
                before=TableStats(n_dead_tup=1000, table_bytes=8192 * 10),
                after=TableStats(n_dead_tup=0, table_bytes=8192 * 8),
            )

        @MAINT_HEALTH.implementation
        def health(req: HealthRequest) -> HealthResult:
            last = [c for e, c in w.calls if e == req.primary.environment][-1]
            w.calls.append((req.primary.environment, "health"))
            if last in w.unhealthy_after:
                return HealthResult(ok=False, detail="replica westeurope is not streaming")
            return HealthResult(ok=True, detail="healthy", lag_bytes={"westeurope": 0})

        @K8S_SET_MAINTENANCE.implementation
        def set_maintenance(req: MaintenanceRequest) -> KubeStatus:
            env = req.target.environment
            w.calls.append((env, f"maintenance-{'on' if req.on else 'off'}"))
            (w.maintenance.add if req.on else w.maintenance.discard)(env)
            w.peak_maintenance = max(w.peak_maintenance, len(w.maintenance))
            return KubeStatus(region=req.target.region, deployments=[], ready=True, maintenance=req.on)

        @HTTP_SMOKE.implementation
        def smoke(t: RegionTarget) -> list[SmokeResult]:
            w.calls.append((t.environment, "smoke"))
            return [SmokeResult(url=u, status=200, ok=True, seconds=0.01) for u in t.smoke_urls]

        @STATUSPAGE_UPDATE.implementation
        def statuspage(req: StatusPageRequest) -> StatusPageResult:
            w.statuspage.append((req.status, req.body))
            return StatusPageResult(incident_id=req.incident_id or "inc1", status=req.status)

        @WATCH_METRICS.implementation
        def watch(req: WatchRequest) -> WatchResult:
            breached = any(q.name == "errors" for q in req.policy.queries)
            return WatchResult(
                ok=not breached,
                results=[
                    WatchQueryResult(
                        name=q.name,
                        query=q.query,
                        samples=3,
                        last=5.0,
                        breached=breached,
                        detail="5 is above 1" if breached else "",
                    )
                    for q in req.policy.queries
                ],
            )

        @WATCH_JUDGE.implementation
        def judge_app(req: AppJudgeRequest) -> AppJudgement:
            w.judged.append(req)
            w.calls.append((None, f"app:{req.after}"))
            worse = req.after in w.app_worse_after
            metric = AppMetric(name="error rate", verdict="high" if worse else "pass", baseline=0.001,
                               current=0.2 if worse else 0.001, samples=20)
            return AppJudgement(after=req.after, verdict="fail" if worse else "pass", score=0 if worse else 100,
                                reason="error rate: higher: window mean 0.2 vs before 0.001" if worse else "score 100",
                                metrics=[metric])

        @NOTIFY_SEND.implementation
        def notify(req: NotifyRequest) -> list[str]:
            w.notifications.append((req.notification.severity, req.notification.text))
            return [c.name for c in req.channels]

        @TEMPORAL_UNSERVED_QUEUES.implementation
        def unserved(queues: list[str]) -> list[str]:
            return []

        return [
            worker_inventory,
            store_report,
            db_status,
            plan,
            take,
            verify,
            run_item,
            health,
            set_maintenance,
            smoke,
            statuspage,
            watch,
            judge_app,
            notify,
            unserved,
        ]


def window_around(
    now: datetime, *, opens_in: timedelta = timedelta(hours=-1), length: timedelta = timedelta(hours=3)
) -> dict:
    start = now + opens_in
    end = start + length
    return {"days": [DAYS[start.weekday()]], "start": f"{start:%H:%M}", "end": f"{end:%H:%M}", "timezone": "UTC"}


def maint_inventory(now: datetime, env: str | None = None, **maintenance) -> Inventory:
    section = {
        "window": window_around(now),
        "cutoff": "20m",
        "tasks": [
            {"kind": "vacuum-analyze", "tables": ["public.orders", "public.events"]},
            {"kind": "reindex", "tables": ["public.events"]},
        ],
        "guards": {"lock_timeout": "2s", "lock_retries": 1},
        "heartbeat_timeout": "2s",  # cancellation reaches a running statement with its next heartbeat
        "backup": {"take": True, "verify": True, "directory": "/backups"},
        "status_page": {"api_url": "http://127.0.0.1:9/sp", "page_id": "p", "api_key": {"env": "SP_KEY"}},
        **maintenance,
    }
    inv = inventory_dict(maintenance=section, workflow_task_queue=QUEUE)
    if env:
        inv["environment"] = env
    for r in inv["regions"].values():
        r["task_queue"] = QUEUE
    return Inventory.model_validate(inv)


@pytest.fixture
def mworld() -> MaintWorld:
    return MaintWorld()


@pytest_asyncio.fixture
async def worker(env, mworld):
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        async with Worker(
            env.client,
            task_queue=QUEUE,
            workflows=[MaintenanceWorkflow, MaintenanceFleetWorkflow],
            activities=mworld.activities(),
            activity_executor=ex,
            max_concurrent_activities=16,
        ):
            yield env


async def start(env, inv: Inventory, **kw):
    worker_holds(inv)
    return await env.client.start_workflow(
        MaintenanceWorkflow.run,
        MaintenanceInput(inventory=inv, requester="alice", **kw),
        id=f"opsflow-{inv.environment}",
        task_queue=QUEUE,
    )


async def until(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def approve_when_waiting(handle, by: str = "bob"):
    deadline = time.monotonic() + 30
    while True:
        try:
            return await send_update(handle, Procedure.approve, Request(by=by, reason="ok"))
        except WorkflowUpdateFailedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        except Exception:  # the workflow (a child) may not exist yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def failed_report(handle) -> MaintenanceReport:
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    details = info.value.cause.details
    return MaintenanceReport.model_validate(
        details[0] if not isinstance(details[0], MaintenanceReport) else details[0].model_dump()
    )


def keys(report: MaintenanceReport) -> list[str]:
    return [i.key for i in report.items]


async def test_a_whole_window_in_order(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time())
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded"
    e = inv.environment
    order = [c for env_, c in mworld.calls if env_ == e]
    assert order == [
        "plan",
        "backup",
        "verify-backup",
        "maintenance-on",
        "vacuum-analyze:public.orders",
        "health",
        "vacuum-analyze:public.events",
        "health",
        "reindex:public.events",
        "health",
        "maintenance-off",
        "smoke",
    ]
    assert [s for s, _ in mworld.statuspage] == ["scheduled", "in_progress", "completed"]
    assert keys(report) == ["vacuum-analyze:public.orders", "vacuum-analyze:public.events", "reindex:public.events"]
    assert report.items[0].before.n_dead_tup == 1000 and report.items[0].after.n_dead_tup == 0
    assert report.backup and report.backup.id.startswith("opsflow-maint-") and report.backup_verified
    assert not report.maintenance_mode_on and not mworld.maintenance
    assert not report.deferred and not report.skipped
    assert "3 item(s) done, 3000 dead tuples removed" in mworld.notifications[-1][1]


async def test_waits_for_the_window_and_an_approver_can_override_it(worker, mworld):
    env = worker
    now = await env.get_current_time()
    inv = maint_inventory(now, window=window_around(now, opens_in=timedelta(hours=5), length=timedelta(hours=2)))
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()  # the time-skipping server jumps to the opening
    assert report.window_opened_at >= now + timedelta(hours=5) - timedelta(minutes=1)
    assert [s.name for s in report.steps if s.name == "window"] == ["window"]
    assert report.status == "succeeded"

    # override: starts now, recorded; a non-approver may not
    now = await env.get_current_time()
    inv = maint_inventory(now, window=window_around(now, opens_in=timedelta(hours=5), length=timedelta(hours=2)))
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await send_update(handle, Procedure.override, Request(by="mallory", reason="now"))
    assert "may not override" in str(refused.value.cause)
    await until_update(handle, Procedure.override, Request(by="bob", reason="quiet night"))
    report = await handle.result()
    assert report.override and report.override.by == "bob"
    assert report.window_opened_at < now + timedelta(hours=1)
    assert len(report.items) == 3  # no cutoff outside the window: the approver chose the time


async def until_update(handle, update, req: Request):
    deadline = time.monotonic() + 20
    while True:
        try:
            return await send_update(handle, update, req)
        except WorkflowUpdateFailedError as e:
            if "not waiting" not in str(e.cause) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_at_the_cutoff_no_new_table_starts_and_the_rest_is_deferred(worker, mworld):
    env = worker
    now = await env.get_current_time()
    # the window closes in 40 min, cutoff 20 min: after 25 min inside the first table, no new one may start
    inv = maint_inventory(
        now, window=window_around(now, opens_in=timedelta(minutes=-10), length=timedelta(minutes=50)), cutoff="20m"
    )
    mworld.block.add("vacuum-analyze:public.orders")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: mworld.started.setdefault("vacuum-analyze:public.orders", threading.Event()).wait(20)
    )
    # 25 minutes pass while paused (time skips only while no activity runs): the pause interrupts the statement
    await send_update(handle, Procedure.pause, Request(by="alice", reason="look at the graphs"))
    await until(lambda: mworld.cancelled, "the running statement to stop for the pause")
    await env.sleep(timedelta(minutes=25))
    mworld.release.set()
    await send_update(handle, Procedure.resume, Request(by="alice"))
    report = await handle.result()
    assert report.status == "succeeded"
    assert keys(report) == ["vacuum-analyze:public.orders"]  # on_cutoff finish: the interrupted one ran to its end
    assert [d.key for d in report.deferred] == ["vacuum-analyze:public.events", "reindex:public.events"]
    assert all("cutoff" in d.reason for d in report.deferred)
    assert mworld.cancel_at["vacuum-analyze:public.orders"] is None
    assert not mworld.maintenance  # maintenance mode off after the cutoff
    assert "deferred: vacuum-analyze:public.events, reindex:public.events" in mworld.notifications[-1][1]


async def test_on_cutoff_cancel_hands_the_cutoff_to_the_running_statement(worker, mworld):
    env = worker
    now = await env.get_current_time()
    inv = maint_inventory(now, window=window_around(now, opens_in=timedelta(minutes=-10), length=timedelta(minutes=50)),
                          cutoff="20m", on_cutoff="cancel")
    mworld.slow.add("public.orders")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    cancel_at = mworld.cancel_at["vacuum-analyze:public.orders"]
    closes = (now + timedelta(minutes=40)).replace(second=0, microsecond=0)
    assert abs((cancel_at - (closes - timedelta(minutes=20))).total_seconds()) < 61
    assert report.items[0].outcome == "cancelled-at-cutoff"
    assert (
        report.deferred[0].key == "vacuum-analyze:public.orders"
        and "cancelled at the window's cutoff" in report.deferred[0].reason
    )


async def test_a_failed_health_check_stops_the_run_with_maintenance_mode_off(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time())
    mworld.unhealthy_after.add("vacuum-analyze:public.orders")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await failed_report(handle)
    assert report.status == "failed" and "not streaming" in report.failure
    e = inv.environment
    assert [c for env_, c in mworld.calls if env_ == e][-3:] == [
        "vacuum-analyze:public.orders",
        "health",
        "maintenance-off",
    ]
    assert not mworld.maintenance
    assert mworld.statuspage[-1][0] == "completed" and "ended early (failed)" in mworld.statuspage[-1][1]
    assert "vacuum-analyze:public.orders: done" in report.done
    assert any(n.startswith("reindex:public.events: not started") for n in report.not_done)


async def test_abort_in_the_middle_of_a_table_cancels_the_statement_and_turns_maintenance_mode_off(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time())
    mworld.slow.add("public.events")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: mworld.started.setdefault("vacuum-analyze:public.events", threading.Event()).wait(20)
    )
    await send_update(handle, Procedure.abort, Request(by="alice", reason="traffic spike"))
    report = await failed_report(handle)
    assert report.status == "aborted"
    assert mworld.cancelled == ["vacuum-analyze:public.events"]  # the statement was stopped, not left running
    assert not mworld.maintenance
    assert [s for s, _ in mworld.statuspage][-1] == "completed" and "ended early (aborted)" in mworld.statuspage[-1][1]
    assert report.done == ["vacuum-analyze:public.orders: done"]
    assert any(n.startswith("reindex:public.events: not started") for n in report.not_done)


async def test_a_locked_table_is_retried_after_the_others_then_skipped(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time())
    mworld.lock_held["public.orders"] = 5  # held for the whole run
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    e = inv.environment
    runs = [c for env_, c in mworld.calls if env_ == e and ":" in c]
    assert runs == [
        "vacuum-analyze:public.orders",
        "vacuum-analyze:public.events",
        "reindex:public.events",
        "vacuum-analyze:public.orders",
    ]
    assert [s.key for s in report.skipped] == ["vacuum-analyze:public.orders"]
    assert "lock not granted within 2s (2 attempt(s))" in report.skipped[0].reason


async def test_dry_run_prints_the_plan_and_changes_nothing(worker, mworld):
    env = worker
    inv = maint_inventory(
        await env.get_current_time(),
        watch={"prometheus": "http://prom", "duration": "1h", "queries": [{"name": "p95", "query": "x", "max": 1}]},
    )
    handle = await start(env, inv, dry_run=True)
    report = await handle.result()
    assert report.status == "planned"
    planned = [(s.name, s.outcome) for s in report.steps if s.outcome in ("planned", "skipped")]
    assert ("backup", "planned") in planned and ("vacuum-analyze:public.orders", "planned") in planned
    assert ("health:reindex:public.events", "planned") in planned and ("watch", "planned") in planned
    assert [c for _, c in mworld.calls] == ["plan"] and not mworld.statuspage and not mworld.maintenance


async def test_fleet_runs_at_most_n_at_once(worker, mworld):
    env = worker
    now = await env.get_current_time()
    invs = [maint_inventory(now, env=f"f{uuid.uuid4().hex[:6]}") for _ in range(3)]
    for inv in invs:
        mworld.block.add("reindex:public.events")
    worker_holds(*invs)
    fleet = await env.client.start_workflow(
        MaintenanceFleetWorkflow.run,
        FleetInput(inventories=invs, requester="alice", max_concurrency=2),
        id=fleet_workflow_id([i.environment for i in invs]),
        task_queue=QUEUE,
    )
    handles = [env.client.get_workflow_handle(f"opsflow-{i.environment}") for i in invs]
    await approve_when_waiting(handles[0])
    await approve_when_waiting(handles[1])
    await until(lambda: len(mworld.maintenance) == 2, "two environments in maintenance")
    assert not any(e == invs[2].environment for e, _ in mworld.calls)  # the third waits for a free slot
    mworld.release.set()
    await approve_when_waiting(handles[2])
    report = await fleet.result()
    assert [m.status for m in report.members] == ["succeeded"] * 3
    assert report.peak_concurrency == 2 and mworld.peak_maintenance == 2


async def test_fleet_starts_no_new_environment_after_max_errors_failures(worker, mworld):
    env = worker
    now = await env.get_current_time()
    invs = [maint_inventory(now, env=f"g{uuid.uuid4().hex[:6]}") for _ in range(4)]
    mworld.fail_plan.add(invs[1].environment)
    worker_holds(*invs)
    fleet = await env.client.start_workflow(
        MaintenanceFleetWorkflow.run,
        FleetInput(inventories=invs, requester="alice", max_concurrency=1, max_errors=1),
        id=fleet_workflow_id([i.environment for i in invs]),
        task_queue=QUEUE,
    )
    await approve_when_waiting(env.client.get_workflow_handle(f"opsflow-{invs[0].environment}"))
    with pytest.raises(WorkflowFailureError) as info:
        await fleet.result()
    from opsflow.maintenance_models import FleetReport

    details = info.value.cause.details[0]
    report = FleetReport.model_validate(details if isinstance(details, dict) else details.model_dump())
    assert [m.status for m in report.members] == ["succeeded", "failed", "not-started", "not-started"]
    assert "max_errors 1" in report.members[2].failure
    assert not any(e in (invs[2].environment, invs[3].environment) for e, _ in mworld.calls)


async def test_parallel_runs_that_many_tables_at_once(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time(), guards={"lock_timeout": "2s", "parallel": 2})
    mworld.block.update({"vacuum-analyze:public.orders", "vacuum-analyze:public.events"})
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    both = [
        mworld.started.setdefault(k, threading.Event())
        for k in ("vacuum-analyze:public.orders", "vacuum-analyze:public.events")
    ]
    await asyncio.get_running_loop().run_in_executor(None, lambda: all(e.wait(20) for e in both))
    assert "reindex:public.events" not in mworld.started  # a third waits for a free lane
    mworld.release.set()
    report = await handle.result()
    assert sorted(keys(report)) == [
        "reindex:public.events",
        "vacuum-analyze:public.events",
        "vacuum-analyze:public.orders",
    ]


async def test_aborting_the_fleet_cancels_the_running_environments_which_undo(worker, mworld):
    env = worker
    now = await env.get_current_time()
    invs = [maint_inventory(now, env=f"h{uuid.uuid4().hex[:6]}") for _ in range(3)]
    mworld.slow.add("public.orders")
    worker_holds(*invs)
    fleet = await env.client.start_workflow(
        MaintenanceFleetWorkflow.run,
        FleetInput(inventories=invs, requester="alice", max_concurrency=2),
        id=fleet_workflow_id([i.environment for i in invs]),
        task_queue=QUEUE,
    )
    for inv in invs[:2]:
        await approve_when_waiting(env.client.get_workflow_handle(f"opsflow-{inv.environment}"))
    await until(
        lambda: sum(c == "vacuum-analyze:public.orders" for _, c in mworld.calls) == 2, "both environments mid-table"
    )
    await send_update(fleet, Procedure.abort, Request(by="alice", reason="incident elsewhere"))
    with pytest.raises(WorkflowFailureError) as info:
        await fleet.result()
    from opsflow.maintenance_models import FleetReport

    details = info.value.cause.details[0]
    report = FleetReport.model_validate(details if isinstance(details, dict) else details.model_dump())
    assert report.status == "aborted"
    assert [m.status for m in report.members] == ["aborted", "aborted", "not-started"]
    assert not mworld.maintenance  # each child turned maintenance mode off again
    assert sorted(mworld.cancelled) == ["vacuum-analyze:public.orders"] * 2  # their running statements were stopped


async def test_after_a_planned_failover_the_fenced_old_primary_is_named_with_the_command_that_fixes_it(worker, mworld):
    env = worker
    # eastus: the old primary, fenced read-only, not a replica yet; westeurope: promoted, takes writes
    mworld.db = {"eastus": DbStatus(region="eastus", reachable=True, role="primary", read_only=True),
                 "westeurope": DbStatus(region="westeurope", reachable=True, role="primary")}
    inv = maint_inventory(await env.get_current_time())
    report = await failed_report(await start(env, inv))
    assert report.status == "refused" and report.region is None
    assert "not streaming" not in report.failure and "replicas are not healthy" not in report.failure
    assert "eastus is the old primary, fenced (read-only) and not yet a replica of westeurope" in report.failure
    assert "`opsflow failback --to eastus`" in report.failure
    assert not [c for e, c in mworld.calls if e == inv.environment]  # nothing planned, nothing changed

    # --region naming the fenced one: refused, naming the writable primary
    report = await failed_report(await start(env, inv, region="eastus"))
    assert "eastus is fenced (read-only" in report.failure and "the primary now is westeurope" in report.failure

    # once the old primary is a streaming replica again, the window runs on the new primary
    mworld.db["eastus"] = DbStatus(region="eastus", reachable=True, role="replica", streaming=True,
                                   current_lsn="0/3000000", replay_lsn="0/3000000")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded" and report.region == "westeurope"


async def test_a_rollout_freeze_over_the_window_skips_it_to_the_next_one_and_the_report_says_so(worker, mworld):
    from tests.workflow.test_canary_workflow import ROLLOUT

    env = worker
    now = await env.get_current_time()
    freeze = {"name": "release freeze", "start": (now + timedelta(hours=4)).isoformat(),
              "end": (now + timedelta(hours=8)).isoformat()}
    raw = inventory_dict(workflow_task_queue=QUEUE, rollout={**ROLLOUT, "freezes": [freeze]}, maintenance={
        "window": window_around(now, opens_in=timedelta(hours=5), length=timedelta(hours=2)),
        "tasks": [{"kind": "vacuum", "tables": ["public.orders"]}], "backup": {"take": False}})
    for r in raw["regions"].values():
        r["task_queue"] = QUEUE
    inv = Inventory.model_validate(raw)
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded"
    # not the window in 5 hours (frozen), the same one a week later
    opened = now + timedelta(days=7, hours=5)
    assert opened - timedelta(minutes=1) <= report.window_opened_at <= opened + timedelta(minutes=5)
    assert len(report.calendar) == 1 and "is skipped (freeze release freeze)" in report.calendar[0], report.calendar
    assert "frozen release freeze" in report.window
    window_step = next(s for s in report.steps if s.name == "window")
    assert "is skipped (freeze release freeze)" in window_step.detail
    assert any(line.startswith("CALENDAR the window") for line in report.figure_lines())


async def test_a_freeze_starting_inside_the_window_shortens_it_and_the_cutoff_comes_earlier(worker, mworld):
    env = worker
    now = await env.get_current_time()
    # open since 10 minutes for 3 hours, but a freeze starts in 30 minutes: with a 40-minute cutoff nothing starts
    freeze = {"name": "payroll run", "start": (now + timedelta(minutes=30)).isoformat(),
              "end": (now + timedelta(hours=2)).isoformat()}
    inv = maint_inventory(now, window=window_around(now, opens_in=timedelta(minutes=-10), length=timedelta(hours=3)),
                          cutoff="40m", freezes=[freeze], backup={"take": False})
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded"
    assert keys(report) == []
    assert [d.key for d in report.deferred] == ["vacuum-analyze:public.orders", "vacuum-analyze:public.events",
                                                "reindex:public.events"]
    assert len(report.calendar) == 1 and "is shortened" in report.calendar[0], report.calendar
    assert "(freeze payroll run starts)" in report.calendar[0]

    # without the freeze the same window runs every table (the freeze made the difference)
    inv = maint_inventory(await env.get_current_time(), cutoff="40m", backup={"take": False})
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert len(keys(report)) == 3 and report.calendar == []


WATCHED = {"prometheus": "http://127.0.0.1:9", "duration": "1m", "interval": "10s",
           "queries": [{"name": "error rate", "query": "sum(rate(errors[1m]))", "max": 0.05}],
           "during": {"baseline": "10m", "recent": "5m", "step": "15s"}}


async def test_a_significant_worsening_of_the_app_during_the_window_stops_new_work_and_alerts(worker, mworld):
    """watch.during: after each table (and its health check) the app is judged against the minutes before the
    work began; a fail stops new work -- the rest deferred, said -- alerts, and the window still ends cleanly."""
    env = worker
    inv = maint_inventory(await env.get_current_time(), watch=WATCHED, status_page=None)
    mworld.app_worse_after.add("vacuum-analyze:public.orders")
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded"
    order = [c for _, c in mworld.calls if c != "plan"]
    assert order[order.index("maintenance-on"):] == ["maintenance-on", "vacuum-analyze:public.orders", "health",
                                                     "app:vacuum-analyze:public.orders", "maintenance-off", "smoke"]
    assert keys(report) == ["vacuum-analyze:public.orders"]  # no further table was started
    assert [d.key for d in report.deferred] == ["vacuum-analyze:public.events", "reindex:public.events"]
    assert all("the application worsened" in d.reason and "error rate" in d.reason for d in report.deferred)
    assert report.stopped_by_app and "after vacuum-analyze:public.orders" in report.stopped_by_app
    assert [j.verdict for j in report.app] == ["fail"]
    alerts = [t for sev, t in mworld.notifications if sev == "critical"]
    assert len(alerts) == 1 and "worsened during the window" in alerts[0] and "2 deferred" in alerts[0], alerts
    assert not mworld.maintenance and not report.maintenance_mode_on
    lines = report.figure_lines()
    assert any(line.startswith("STOPPED (no new table started)") for line in lines), lines
    assert any("app after vacuum-analyze:public.orders: FAIL" in line for line in lines), lines
    # the baseline is the 10 minutes before the work began, the window's values start there
    req = mworld.judged[0]
    assert req.baseline_end == req.since and req.baseline_end - req.baseline_start == timedelta(minutes=10)
    assert [s.name for s in report.steps if s.name.startswith("app:")] == ["app:vacuum-analyze:public.orders"]


async def test_a_steady_app_lets_every_table_run_and_each_is_judged(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time(), watch=WATCHED, status_page=None)
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded" and not report.stopped_by_app and not report.deferred
    assert [j.after for j in report.app] == keys(report) == ["vacuum-analyze:public.orders",
                                                            "vacuum-analyze:public.events", "reindex:public.events"]
    assert not [t for sev, t in mworld.notifications if sev == "critical"]
    # without watch.during nothing is judged (and no app: step is declared)
    mworld.judged.clear()
    inv = maint_inventory(await env.get_current_time(), watch={**WATCHED, "during": None}, status_page=None)
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded" and not mworld.judged and not report.app


async def test_a_repack_skipped_by_its_guards_is_listed_as_skipped_with_the_reason(worker, mworld):
    env = worker
    inv = maint_inventory(await env.get_current_time(), status_page=None,
                          tasks=[{"kind": "repack", "tables": ["public.orders", "public.events"]}])
    why = "the pg_repack extension is not installed in database shop: run `CREATE EXTENSION pg_repack;`"
    mworld.skip["public.orders"] = why
    handle = await start(env, inv)
    await approve_when_waiting(handle)
    report = await handle.result()
    assert report.status == "succeeded"
    assert [(i.key, i.outcome) for i in report.items] == [("repack:public.orders", "skipped"),
                                                          ("repack:public.events", "done")]
    assert [d.key for d in report.skipped] == ["repack:public.orders"] and why in report.skipped[0].reason
    assert "skipped: repack:public.orders" in mworld.notifications[-1][1]
