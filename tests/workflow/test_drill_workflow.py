"""The restore drill's logic on the time-skipping server: checks, cleanup after success/failure/cancel,
heartbeat-timeout retry yielding one scratch target, refusals before anything is created."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.reports import drill_history, store_report
from activities.rules import worker_inventory
from opsflow.client import ClientError, fetch_report
from opsflow.contracts.db import DB_STATUS
from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
from opsflow.contracts.notify import NOTIFY_SEND
from opsflow.contracts.restore import (
    RESTORE_DELETE,
    RESTORE_LEFTOVERS,
    RESTORE_MYSQL_DUMP,
    RESTORE_START,
    RESTORE_VALIDATE_CHECKS,
    RESTORE_VERIFY,
    RESTORE_WAIT,
    RESTORE_WINDOW,
)
from opsflow.inventory import Inventory
from opsflow.models import (
    CheckResult,
    DbStatus,
    DrillReport,
    MysqlRestoreResult,
    NotifyRequest,
    RegionTarget,
    RestoreRequest,
    RestoreWindow,
    ScratchTarget,
    VerifyRequest,
)
from opsflow.sections import DrillObjectives
from tests.helpers import eventually_async
from tests.workflow.conftest import inventory_dict, queue_workers, worker_holds
from workflows.drill import DrillInput

NOW = datetime.now(timezone.utc)
ROOT = Path(__file__).resolve().parents[2]


class Backups:
    """Stand-ins for the restore activities, keeping count of the scratch targets that exist."""

    def __init__(self):
        self.scratch: set[str] = set()
        self.created: list[str] = []
        self.calls: list[str] = []
        self.checks_ok = True
        self.fail_wait = False
        self.stall_first_wait = False
        self.wait_attempts = 0
        self.block_wait: threading.Event | None = None
        self.notifications: list[str] = []

    def activities(self):
        b = self

        @RESTORE_VALIDATE_CHECKS.implementation
        def validate(req: RestoreRequest) -> None:
            b.calls.append("validate")
            for c in req.drill.row_counts:
                if c.table == "nope":
                    raise ApplicationError("unknown table 'nope' on the source", type="BadInput", non_retryable=True)

        @RESTORE_WINDOW.implementation
        def window(req: RestoreRequest) -> RestoreWindow:
            b.calls.append("window")
            return RestoreWindow(earliest=NOW - timedelta(days=7), latest=NOW - timedelta(minutes=5))

        @RESTORE_LEFTOVERS.implementation
        def leftovers(req: RestoreRequest) -> list[str]:
            found = sorted(n for n in b.scratch if n.startswith(req.drill.scratch_prefix) and n != req.scratch_name)
            b.scratch -= set(found)
            return found

        @RESTORE_START.implementation
        def start(req: RestoreRequest) -> ScratchTarget:
            b.calls.append("start")
            if req.scratch_name not in b.scratch:
                b.scratch.add(req.scratch_name)
                b.created.append(req.scratch_name)
            return ScratchTarget(name=req.scratch_name, method=req.method, ready=False)

        @RESTORE_WAIT.implementation
        def wait(req: RestoreRequest) -> ScratchTarget:
            b.wait_attempts += 1
            if b.stall_first_wait and b.wait_attempts == 1:
                time.sleep(3)  # no heartbeat: the heartbeat timeout (1 s) expires and the attempt is retried
            if b.block_wait is not None:
                while not b.block_wait.is_set():
                    activity.heartbeat()
                    time.sleep(0.05)
            if b.fail_wait:
                raise ApplicationError("restore failed: WAL segment missing", type="RestoreFailed", non_retryable=True)
            return ScratchTarget(
                name=req.scratch_name,
                method=req.method,
                ready=True,
                dsn="host=scratch",
                restore_point=req.point_in_time,
                detail="ready",
            )

        @RESTORE_DELETE.implementation
        def delete(req: RestoreRequest) -> bool:
            b.calls.append("delete")
            existed = req.scratch_name in b.scratch
            b.scratch.discard(req.scratch_name)
            return existed

        @RESTORE_VERIFY.implementation
        def verify(req: VerifyRequest) -> list[CheckResult]:
            return [
                CheckResult(kind="row_count", name="orders", ok=True, expected=10, actual=10),
                CheckResult(
                    kind="sql",
                    name="no negative totals",
                    ok=b.checks_ok,
                    detail="returned false" if not b.checks_ok else "true",
                ),
            ]

        @RESTORE_MYSQL_DUMP.implementation
        def mysql_dump(req: RestoreRequest) -> MysqlRestoreResult:
            b.calls.append("mysql_dump")
            b.created.append(req.scratch_name)  # made and removed within the activity
            return MysqlRestoreResult(
                scratch=ScratchTarget(name=req.scratch_name, method=req.method, ready=True,
                                      restore_point=NOW - timedelta(hours=2), detail="s3://b/mysql/shop.sql.gz"),
                restore_seconds=42.0, cleaned=True,
                checks=[CheckResult(kind="row_count", name="orders", ok=True, expected=200, actual=200),
                        CheckResult(kind="sql", name="no negative totals", ok=b.checks_ok,
                                    detail="true" if b.checks_ok else "returned 0, not true")])

        @DB_STATUS.implementation
        def db_status(t: RegionTarget) -> DbStatus:
            return DbStatus(region=t.region, reachable=True, role="primary" if t.region == "eastus" else "replica")

        @NOTIFY_SEND.implementation
        def notify(req: NotifyRequest) -> list[str]:
            b.notifications.append(req.notification.text)
            return []

        @TEMPORAL_UNSERVED_QUEUES.implementation
        def unserved_queues(queues: list[str]) -> list[str]:
            return []

        return [
            worker_inventory,
            unserved_queues,
            db_status,
            validate,
            window,
            leftovers,
            start,
            wait,
            delete,
            verify,
            mysql_dump,
            notify,
            store_report,
            drill_history,
        ]


@pytest.fixture
def backups():
    return Backups()


@pytest.fixture
def drill_inventory(tmp_path) -> Inventory:
    data = inventory_dict()
    data["reports_dir"] = str(tmp_path / "reports")
    data["drill"] = {
        "method": "s3-dump",
        "dumps": {"bucket": "b"},
        "scratch_server": {"dsn": "host=scratch dbname=postgres"},
        "row_counts": [{"table": "orders"}],
        "checks": [{"name": "no negative totals", "query": "select true"}],
        "heartbeat_timeout": "1s",
    }
    return Inventory.model_validate(data)


@pytest_asyncio.fixture
async def drilling(env, backups, drill_inventory):
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        workers = queue_workers(env.client, drill_inventory, backups.activities(), ex)
        async with workers[0], workers[1], workers[2]:
            yield env


async def start(env, inv, **kw):
    from opsflow.client import start_procedure

    worker_holds(inv)
    return await start_procedure(
        env.client, inv, "drill", DrillInput(inventory=inv, requester="schedule:monthly", **kw), "drill"
    )


async def failed(handle) -> DrillReport:
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    return DrillReport.model_validate(exc.value.cause.details[0])


async def test_successful_drill_deletes_scratch_and_keeps_the_report(drilling, backups, drill_inventory, tmp_path):
    backups.scratch.add("opsflow-drill-deadbeef")  # left behind by a crashed run
    report = DrillReport.model_validate(await (await start(drilling, drill_inventory)).result())
    assert report.status == "succeeded" and report.scratch_deleted is True
    assert backups.scratch == set() and len(backups.created) == 1
    assert [c.name for c in report.checks] == ["orders", "no negative totals"]
    assert report.restore_point is not None and report.restore_point_age_seconds >= 300
    assert report.restore_seconds is not None
    leftovers = next(s for s in report.steps if s.name == "leftovers")
    assert "opsflow-drill-deadbeef" in leftovers.detail
    stored = [p for p in report.stored_at if p.endswith(".md")]
    assert stored and "restore" in open(stored[0]).read() and (tmp_path / "reports").exists()
    assert len(backups.notifications) == 1 and "succeeded" in backups.notifications[0]


async def test_failed_check_fails_the_drill_with_the_check_named(drilling, backups, drill_inventory):
    backups.checks_ok = False
    report = await failed(await start(drilling, drill_inventory))
    assert report.status == "failed" and "no negative totals" in report.failure
    assert report.scratch_deleted is True and backups.scratch == set()
    assert [c.ok for c in report.checks] == [True, False]
    assert "failed" in backups.notifications[-1] and "no negative totals" in backups.notifications[-1]


async def test_cleanup_after_a_failed_restore(drilling, backups, drill_inventory):
    backups.fail_wait = True
    report = await failed(await start(drilling, drill_inventory))
    assert "WAL segment missing" in report.failure
    assert report.scratch_deleted is True and backups.scratch == set() and backups.created


async def test_cleanup_after_cancellation(drilling, backups, drill_inventory):
    backups.block_wait = threading.Event()
    handle = await start(drilling, drill_inventory)
    for _ in range(200):
        if backups.created:
            break
        await asyncio.sleep(0.05)
    assert backups.scratch
    await handle.cancel()
    report = await failed(handle)
    backups.block_wait.set()
    assert report.status == "aborted" and report.scratch_deleted is True
    assert backups.scratch == set()


async def test_restore_outlasting_the_heartbeat_timeout_is_retried_with_one_scratch_target(
    drilling, backups, drill_inventory
):
    backups.stall_first_wait = True
    report = DrillReport.model_validate(await (await start(drilling, drill_inventory)).result())
    assert report.status == "succeeded"
    assert backups.wait_attempts == 2 and len(backups.created) == 1 and backups.calls.count("start") == 1


@pytest.mark.parametrize(
    "kw, reason",
    [
        ("future", "in the future"),
        ({"point_in_time": NOW - timedelta(days=30)}, "before the earliest restorable time"),
        ({"source_region": "mars"}, "unknown region 'mars'"),
    ],
)
async def test_bad_point_in_time_or_region_refused_before_anything_is_created(
    drilling, backups, drill_inventory, kw, reason
):
    if kw == "future":  # the test server's clock runs ahead by the time it skipped: ask it
        kw = {"point_in_time": await drilling.get_current_time() + timedelta(days=1)}
    report = await failed(await start(drilling, drill_inventory, **kw))
    assert report.status == "refused" and reason in report.failure
    assert backups.created == [] and "start" not in backups.calls


async def test_unknown_table_in_a_check_is_an_error_before_anything_is_created(drilling, backups, drill_inventory):
    data = drill_inventory.model_dump()
    data["drill"]["row_counts"] = [{"table": "nope"}]
    inv = Inventory.model_validate(data)
    report = await failed(await start(drilling, inv))
    assert "unknown table 'nope'" in report.failure
    assert backups.created == []


async def test_dry_run_creates_nothing(drilling, backups, drill_inventory):
    report = DrillReport.model_validate(await (await start(drilling, drill_inventory, dry_run=True)).result())
    assert report.status == "planned" and backups.created == []
    assert [s.name for s in report.steps if s.outcome == "planned"] == [
        "leftovers",
        "restore",
        "restore-wait",
        "verify",
        "cleanup",
    ]


async def test_a_scheduled_drill_takes_the_environment_lock_or_is_skipped(drilling, backups, drill_inventory):
    from workflows.scheduled import LaunchInput

    inv = drill_inventory
    worker_holds(inv)
    launch = LaunchInput(procedure="drill", environment=inv.environment, task_queue=inv.task_queue,
                         arg=DrillInput(inventory=inv, requester="schedule:monthly").model_dump(mode="json"),
                         schedule_id=f"opsflow-{inv.environment}-monthly", by="alice")
    done = await drilling.client.execute_workflow(
        "scheduled", launch, id=f"opsflow-{inv.environment}-monthly-1", task_queue=inv.task_queue, result_type=dict
    )
    assert done["status"] == "started" and done["workflow_id"] == f"opsflow-{inv.environment}"
    assert DrillReport.model_validate(done["report"]).status == "succeeded"

    backups.block_wait = threading.Event()  # a drill holds the lock while the schedule fires again
    held = await start(drilling, inv)
    skipped = await drilling.client.execute_workflow(
        "scheduled", launch, id=f"opsflow-{inv.environment}-monthly-2", task_queue=inv.task_queue, result_type=dict
    )
    assert skipped["status"] == "skipped" and "another procedure is running" in skipped["reason"]
    backups.block_wait.set()
    assert DrillReport.model_validate(await held.result()).status == "succeeded"

    # `opsflow status|report <the launch's id>` (what `schedule trigger` prints) shows the procedure it launched.
    launched = await fetch_report(drilling.client.get_workflow_handle(f"opsflow-{inv.environment}-monthly-1"))
    assert isinstance(launched, DrillReport) and launched.workflow_id == f"opsflow-{inv.environment}"
    with pytest.raises(ClientError, match="ran no procedure .another procedure is running"):
        await fetch_report(drilling.client.get_workflow_handle(f"opsflow-{inv.environment}-monthly-2"))
    backups.block_wait = threading.Event()
    running = await drilling.client.start_workflow("scheduled", launch, id=f"opsflow-{inv.environment}-monthly-3",
                                                   task_queue=inv.task_queue)

    async def drill_running() -> DrillReport | None:
        try:
            report = await fetch_report(running, query_timeout=5, client=drilling.client)
        except ClientError:  # the launch has not started its drill yet
            return None
        return report if report.status == "running" else None

    report = await eventually_async(drill_running, what="the launch's drill, running")
    assert report.procedure == "drill" and report.workflow_id == f"opsflow-{inv.environment}"
    backups.block_wait.set()
    assert (await running.result(rpc_timeout=None))["status"] == "started"


async def test_the_launcher_started_by_hand_runs_nothing(drilling, backups, drill_inventory):
    """An attacker with namespace permissions starts the Schedule's launcher themselves: no Schedule of that id
    started it, or it names a procedure no Schedule may run. Nothing is restored."""
    from temporalio.client import WorkflowFailureError

    from workflows.failover import FailoverInput
    from workflows.scheduled import LaunchInput

    inv = drill_inventory
    worker_holds(inv)
    drill = DrillInput(inventory=inv, requester="schedule:monthly").model_dump(mode="json")
    by_hand = LaunchInput(procedure="drill", environment=inv.environment, task_queue=inv.task_queue, arg=drill,
                          schedule_id=f"opsflow-{inv.environment}-monthly", by="alice")
    with pytest.raises(WorkflowFailureError) as refused:
        await drilling.client.execute_workflow(
            "scheduled", by_hand, id=f"evil-{inv.environment}", task_queue=inv.task_queue
        )
    assert "which no Schedule" in str(refused.value.cause)
    failover = FailoverInput(inventory=inv, to_region="westeurope", requester="mallory").model_dump(mode="json")
    launch = LaunchInput(procedure="failover", environment=inv.environment, task_queue=inv.task_queue, arg=failover,
                         schedule_id=f"opsflow-{inv.environment}-x", by="mallory")
    with pytest.raises(WorkflowFailureError) as refused:
        await drilling.client.execute_workflow(
            "scheduled", launch, id=f"opsflow-{inv.environment}-x-1", task_queue=inv.task_queue
        )
    assert "may run drill, maintenance, readiness or dry runs, not a failover" in str(refused.value.cause)
    assert backups.created == []


async def test_objectives_are_judged_and_a_missed_one_fails_the_drill_naming_it(drilling, backups, drill_inventory):
    # the newest restorable point is at least 5 minutes old: an RPO objective of one minute is missed (the
    # time-skipping server may have skipped years by now in this module: the objective met below is generous)
    inv = drill_inventory.model_copy(deep=True)
    inv.drill = inv.drill.model_copy(update={"objectives": DrillObjectives(restore_time="1h", restore_point_age="1m")})
    report = await failed(await start(drilling, inv))
    assert report.status == "failed", report.failure
    assert "objective(s) missed: restore point age" in report.failure and "objective 60s" in report.failure
    assert [(o.name, o.met) for o in report.objectives] == [("restore_time", True), ("restore_point_age", False)]
    assert report.scratch_deleted is True and backups.scratch == set()
    assert "restore_point_age MISSED" in backups.notifications[-1]

    generous = DrillObjectives(restore_time=3600, restore_point_age=10**11)
    inv.drill = inv.drill.model_copy(update={"objectives": generous})
    report = DrillReport.model_validate(await (await start(drilling, inv)).result())
    assert report.status == "succeeded" and all(o.met for o in report.objectives) and len(report.objectives) == 2
    assert report.objectives[1].measured_seconds == report.latest_point_age_seconds >= 300


async def test_a_random_restore_point_falls_within_the_window_and_differs_between_runs(drilling, backups,
                                                                                      drill_inventory):
    """drill.restore_point random (AWS Backup's RANDOM_WITHIN_WINDOW): each run restores its own point of the window
    the provider reports (here the last 7 days, the retention, up to 5 minutes ago); the default is the newest."""
    inv = drill_inventory.model_copy(deep=True)  # the environment the module's worker serves
    inv.drill = inv.drill.model_copy(update={"method": "rds-pitr", "restore_point": "random"})
    points = []
    for _ in range(3):
        report = DrillReport.model_validate(await (await start(drilling, inv)).result())
        assert report.status == "succeeded" and report.restore_point_chosen == "random"
        assert NOW - timedelta(days=7, minutes=5) <= report.restore_point <= NOW - timedelta(minutes=5)
        points.append(report.restore_point)
    assert len(set(points)) == 3

    inv.drill = inv.drill.model_copy(update={"restore_point": "newest"})
    newest = DrillReport.model_validate(await (await start(drilling, inv)).result())
    assert newest.restore_point_chosen == "newest" and newest.restore_point == NOW - timedelta(minutes=5)


def test_a_random_restore_point_needs_a_point_in_time_method():
    data = inventory_dict()
    data["drill"] = {"method": "s3-dump", "dumps": {"bucket": "b"}, "scratch_server": {"dsn": "host=s dbname=postgres"},
                     "restore_point": "random"}
    with pytest.raises(ValueError, match="restore_point random needs a point-in-time method"):
        Inventory.model_validate(data)


async def test_the_trend_reads_the_earlier_drills_back_from_their_stored_reports(drilling, backups, drill_inventory,
                                                                                  tmp_path):
    """drill.trend: each drill's report shows the drills before it (read back from the reports directory, where
    every procedure's report is kept), oldest first, with restore time, restore point age and objectives; the
    Markdown and HTML pages show the table, and `opsflow drill history` reads the same."""
    inv = drill_inventory.model_copy(deep=True)  # the environment the module's worker serves, its own reports folder
    objectives = DrillObjectives(restore_time="1h", restore_point_age="1m")
    inv.drill = inv.drill.model_copy(update={"trend": 2, "objectives": objectives})
    first = await failed(await start(drilling, inv))  # the newest point is at least 5 min old: RPO missed
    assert first.status == "failed" and first.trend == []
    # another procedure's report in the same folder is not a drill; an unreadable file is skipped
    folder = tmp_path / "reports" / inv.environment
    (folder / f"opsflow-{inv.environment}-aaaaaaaa.json").write_text('{"procedure": "failover", "workflow_id": "x"}')
    (folder / f"opsflow-{inv.environment}-bbbbbbbb.json").write_text('{"procedure": "drill", "status": 7')
    inv.drill = inv.drill.model_copy(update={"objectives": DrillObjectives(restore_point_age=10**11)})
    second = DrillReport.model_validate(await (await start(drilling, inv)).result())
    third = DrillReport.model_validate(await (await start(drilling, inv)).result())

    assert second.status == "succeeded" and [r.run_id for r in second.trend] == [first.run_id]
    was = second.trend[0]
    assert (was.status, was.objectives_met, was.missed, was.checks) == ("failed", False, ["restore_point_age"], 2)
    assert was.restore_seconds == first.restore_seconds and was.latest_point_age_seconds >= 300
    assert was.stored_at.endswith(".json") and f"/{inv.environment}/" in was.stored_at
    # drill.trend 2: the two before it, oldest first; never itself
    assert [r.run_id for r in third.trend] == [first.run_id, second.run_id]
    assert third.trend[1].objectives_met is True
    md = open(next(p for p in third.stored_at if p.endswith(".md"))).read()
    assert "## Trend: the last 3 drills" in md, md
    assert "2 of 3 drill(s) succeeded; objectives met in 2 of 3" in md
    assert "MISSED restore_point_age" in md and "(this run)" in md
    html = open(next(p for p in third.stored_at if p.endswith(".html"))).read()
    assert "Trend: the last 3 drills" in html and 'class="this-run"' in html

    # `opsflow drill history --json`: the same reading, from the CLI's copy of the inventory (no Temporal needed)
    inv_file = tmp_path / "inventory.yaml"
    inv_file.write_text(yaml.safe_dump(inv.model_dump(mode="json", exclude_none=True)))
    proc = subprocess.run([sys.executable, "-m", "starters.cli", "drill", "history", "--env", str(inv_file), "--last",
                           "5", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert [d["run_id"] for d in shown["drills"]] == [first.run_id, second.run_id, third.run_id]
    assert shown["summary"].startswith("2 of 3 drill(s) succeeded") and shown["read_from"] == inv.reports_dir
    text = subprocess.run([sys.executable, "-m", "starters.cli", "drill", "history", "--env", str(inv_file)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "restore point age" in text and text.count("rds-pitr") == 0 and text.count(" newest ") == 3


async def test_a_mysqldump_drill_restores_verifies_and_removes_in_one_step(drilling, backups, drill_inventory):
    """method s3-mysqldump: the scratch server lives on the worker that restores, so restore, checks and removal
    are one step; the restore point is the dump's time; a failed check fails the drill naming it."""
    inv = drill_inventory.model_copy(deep=True)
    data = inv.drill.model_dump(exclude_none=True)
    data.update(method="s3-mysqldump", mysql={"database": "shop", "source": {"host": "mysql", "user": "ops"}})
    data.pop("scratch_server")
    inv.drill = type(inv.drill).model_validate(data)
    plan = DrillReport.model_validate(await (await start(drilling, inv, dry_run=True)).result())
    assert [s.name for s in plan.steps if s.outcome == "planned"] == ["leftovers", "restore", "cleanup"]

    report = DrillReport.model_validate(await (await start(drilling, inv)).result())
    assert report.status == "succeeded" and report.method == "s3-mysqldump", report.failure
    assert report.restore_point == NOW - timedelta(hours=2) and report.restore_seconds == 42.0
    assert report.latest_point_age_seconds == report.restore_point_age_seconds >= 7200
    assert [s.name for s in report.steps if s.name in ("restore", "restore-wait", "verify", "cleanup")] == [
        "restore", "cleanup"]
    assert "s3://b/mysql/shop.sql.gz" in next(s for s in report.steps if s.name == "restore").detail
    assert report.scratch_deleted is True and [c.name for c in report.checks] == ["orders", "no negative totals"]

    backups.checks_ok = False
    report = await failed(await start(drilling, inv))
    assert report.status == "failed" and "no negative totals: returned 0" in report.failure
    assert report.scratch_deleted is True and "start" not in backups.calls
