"""The crash suite (issue 8): SIGKILL the worker at EVERY activity boundary of planned failover, emergency
failover, failback and drill, in one run per procedure on one lab; each completes, and each side effect happened
exactly once (promotions, replicas built, scratch servers created and deleted: counted at the ARM emulator).
Plus: the Temporal dev server killed and restarted in the middle of a procedure (it persists to a sqlite file).

How the boundaries are found: the test watches the workflow's history and its pending activities (the Temporal
client, not sleeps). Two worker processes: one serves the workflow queue, one the region queues. At every
ActivityTaskCompleted the workflow worker is SIGKILLed (the next step must be decided by a fresh worker replaying
the history), and while each heartbeating (long) step is running, the worker running it is SIGKILLed in the
middle of it (the retry must find the world half-changed and finish the job once; notify.send, the same step in
every procedure, only in the drill's run). A pending activity, not the
history, says a step is running: the history records an activity's start only when it closes. Each killed worker
is replaced at once. The test inventory's heartbeat timeout is 5 s and its workflow task timeout 1 s
(conftest.fast_recovery), so a killed step or decision is taken over within seconds."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client

from opsflow.contracts.notify import NOTIFY_SEND
from opsflow.temporal import DATA_CONVERTER
from tests.integration import forked
from tests.integration.conftest import FAST_RESTART, ROOT, explain, fast_recovery, wait_for
from tests.integration.test_crash import arm_admin
from tests.integration.test_failover_lab import autoscaler, sql, timeline, wait_end, wait_status

pytestmark = [pytest.mark.lab, pytest.mark.crash]

OK = (200, 201, 202)
ACTIVITY_CLOSED = {  # the event types that end an activity, and their attributes' field
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
}


class Workers:
    """The workflow worker and the region worker of a lab, each replaced at once after a SIGKILL (forked from a
    process that imported it already: forked.py, so the procedure waits for the server's timeouts, not for a
    Python start)."""

    def __init__(self, lab, inventory: str):
        self.lab, self.inventory, self.n = lab, inventory, 0
        self.procs: dict[str, forked.Forked] = {}
        self.kills = {"workflow": 0, "region": 0}

    def start(self, role: str) -> None:
        flag = "--no-regions" if role == "workflow" else "--no-workflows"
        self.n += 1
        log = self.lab.root / f"worker-{role}-{self.n}.log"
        self.procs[role] = forked.start(
            "worker.main", ["--env", self.inventory, flag, *FAST_RESTART], self.lab.env(), ROOT, log
        )
        self.lab.workers.append(self.procs[role])

    def start_all(self) -> None:
        self.start("workflow")
        self.start("region")

    def role_of(self, identity: str) -> str | None:
        """Which of our workers an activity's `last_worker_identity` (the SDK's default, pid@host) names."""
        pid = identity.split("@")[0]
        return next((role for role, proc in self.procs.items() if str(proc.pid) == pid), None)

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.kills[role] += 1
        self.start(role)


async def run_killing_at_every_boundary(lab, workers: Workers, wid: str, approve: bool, timeout: float = 900,
                                       spare: tuple[str, ...] = (NOTIFY_SEND.name,)) -> dict:
    """Follow the workflow's history until it closes, killing at every activity boundary (see the module doc). The
    history is followed with a long poll, each event as it is written (reading it whole every 50 ms cost the test and
    the server more CPU than the procedure); pending activities are read only while a long step may be running.
    `spare`: long steps not killed in the middle. notify.send is the same step in every procedure (Procedure.notify),
    and a kill in the middle of it costs its 10 s heartbeat timeout: the drill's run kills it, the others spare it."""
    client = await Client.connect(lab.state["temporal"]["address"], data_converter=DATA_CONVERTER)
    handle = client.get_workflow_handle(wid)
    long_steps: dict[int, str] = {}  # scheduled event id -> activity id, of the long steps not yet closed
    killed_running: set[str] = set()
    boundaries = 0
    closed = asyncio.Event()

    async def follow_history() -> None:
        nonlocal boundaries
        async for e in handle.fetch_history_events(wait_new_event=True):
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                scheduled = e.activity_task_scheduled_event_attributes
                if scheduled.heartbeat_timeout.seconds and scheduled.activity_type.name not in spare:
                    long_steps[e.event_id] = scheduled.activity_id
            elif e.event_type in ACTIVITY_CLOSED:
                long_steps.pop(getattr(e, ACTIVITY_CLOSED[e.event_type]).scheduled_event_id, None)
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                    boundaries += 1
                    workers.kill("workflow")  # between two steps
        closed.set()

    async def kill_long_steps_and_approve() -> None:
        approved, next_look = not approve, 0.0
        while not closed.is_set():
            if set(long_steps.values()) - killed_running:
                for act in (await handle.describe()).raw_description.pending_activities:
                    running = act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    if running and act.activity_id in long_steps.values() and act.activity_id not in killed_running:
                        role = workers.role_of(act.last_worker_identity)
                        if role is not None:  # else started by a worker killed since: its retry is killed instead
                            killed_running.add(act.activity_id)
                            workers.kill(role)  # in the middle of a long step
            if not approved and time.monotonic() >= next_look:
                next_look = time.monotonic() + 0.3
                if ((await asyncio.to_thread(lab.status, wid)).get("waiting_for") or "").startswith("approval"):
                    await asyncio.to_thread(
                        lab.cli, "approve", wid, "--as", "bob", "--reason", "crash suite", check=True
                    )
                    approved = True
            try:
                await asyncio.wait_for(closed.wait(), 0.05)
            except TimeoutError:
                pass

    try:
        await asyncio.wait_for(asyncio.gather(follow_history(), kill_long_steps_and_approve()), timeout)
    except TimeoutError:
        raise AssertionError(f"{wid} did not finish in {timeout:.0f}s; kills {workers.kills}") from None
    report = wait_end(lab, wid, timeout=120)
    if report["status"] != "succeeded":  # keep the lab's logs for whoever reads the failure
        import shutil

        keep = Path(tempfile.gettempdir()) / f"opsflow-crash-logs-{wid}-{int(time.time())}"
        shutil.copytree(lab.root, keep, ignore=shutil.ignore_patterns("pg", "*.db*"), dirs_exist_ok=True)
        report["failure"] = f"{report['failure']} (logs kept in {keep})"
    report["_boundaries"] = boundaries
    report["_kills"] = dict(workers.kills, long_steps=len(killed_running))
    return report


def arm_writes(lab, method: str, path_end: str) -> int:
    """Accepted ARM requests of one kind: the side effects, counted at the emulator."""
    return sum(1 for r in arm_admin(lab, "/_emulator/requests")["value"]
               if r["method"] == method and r["path"].split("?")[0].endswith(path_end) and r["status"] in OK)


def setup_data(lab) -> None:
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE orders (id int PRIMARY KEY)")
    sql(east, "INSERT INTO orders SELECT generate_series(1, 500)")
    wait_for(lambda: sql(west, "SELECT count(*) FROM pg_class WHERE relname = 'orders'")[0][0] == 1, what="replication")


async def test_planned_failover_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["_boundaries"] >= 8 and report["_kills"]["long_steps"] >= 2, report["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1  # one promotion asked of Azure
    assert timeline(lab.dsn("westeurope")) == 2  # and one happened
    assert report["rpo_bytes"] == 0 and sql(lab.dsn("westeurope"), "SELECT count(*) FROM orders")[0][0] == 500
    # the HPAs followed once, whatever was killed: raised in westeurope, lowered in eastus, the values before kept
    assert [(a["region"], a["min_before"], a["min_after"], a["action"]) for a in report["autoscalers"]] == [
        ("westeurope", 1, 3, "raised"), ("eastus", 3, 1, "lowered")]
    assert autoscaler(lab, "westeurope") == (3, 3, True) and autoscaler(lab, "eastus") == (1, 10, True)


async def test_emergency_failover_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--emergency", "--requester", "alice")[
        "workflow_id"
    ]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False)
    assert report["status"] == "succeeded", explain(report)
    assert report["_boundaries"] >= 5 and report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1
    assert timeline(lab.dsn("westeurope")) == 2


async def test_failback_survives_a_kill_at_every_boundary(lab):
    from tests.integration.test_procedures_lab import failover

    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    failover(lab, "westeurope")  # the setting: eastus was left; no kills here
    builds_before = arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg")
    promotions_before = arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg")
    wid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg") - builds_before == 1  # one replica built
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg") - promotions_before == 1  # one promotion back
    assert sql(lab.dsn("eastus"), "SELECT pg_is_in_recovery()")[0][0] is False
    assert sql(lab.dsn("eastus"), "SELECT count(*) FROM orders")[0][0] == 500
    assert autoscaler(lab, "eastus") == (3, 10, False) and autoscaler(lab, "westeurope") == (1, 2, False)


async def test_switchover_failover_and_failback_survive_a_kill_at_every_boundary(lab):
    """Switchover first (issue 20, an Azure virtual endpoint): the failover there and the failback, each with a kill
    at every boundary; one switchover asked of Azure each way, no replica built, every row kept."""
    from tests.integration.test_failover_lab import streams_from, with_virtual_endpoint

    with_virtual_endpoint(lab)
    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"], explain(report)
    assert report["_boundaries"] >= 8, report["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1  # one switchover asked of Azure
    assert streams_from(east, west)

    fid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    back = await run_killing_at_every_boundary(lab, workers, fid, approve=True)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    assert back["_boundaries"] >= 5, back["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg") == 1  # one switchover back
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg") == 0  # no replica built
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-westeurope-pg") == 0
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    assert sql(east, "SELECT count(*) FROM orders")[0][0] == 500


async def test_self_managed_switchover_and_failback_survive_a_kill_at_every_boundary(lab):
    """Self-managed switchover (issue 20): the lab's clusters as provider postgres with host access; the failover
    and the failback each with a kill at every boundary, and in the middle of the shutdown and the follow: the old
    primary follows the new one each way, no promotion asked of Azure, no data directory rebuilt, every row kept."""
    import yaml

    from lab.inventory import self_managed_database
    from lab.postgres import Cluster
    from tests.integration.test_failover_lab import streams_from

    raw = yaml.safe_load(open(lab.inventory))
    for region, r in raw["regions"].items():
        r["database"] = self_managed_database(lab.state, region)
    Path(lab.inventory).write_text(yaml.safe_dump(raw))
    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"], explain(report)
    assert report["_boundaries"] >= 8, report["_kills"]
    assert streams_from(east, west)

    fid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    back = await run_killing_at_every_boundary(lab, workers, fid, approve=True)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    assert sql(east, "SELECT count(*) FROM orders")[0][0] == 500
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 0  # nothing asked of Azure's servers
    for region in ("eastus", "westeurope"):
        datadir = Cluster.from_dict(lab.state["postgres"][region]).datadir
        assert not list(datadir.parent.glob(f"{datadir.name}.diverged-*"))


async def test_drill_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("drill", "--env", inventory, "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False, spare=())
    assert report["status"] == "succeeded", explain(report)
    assert report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert report["scratch_deleted"] is True
    name = report["scratch_name"]
    assert arm_writes(lab, "PUT", f"/flexibleServers/{name}") == 1  # one scratch server created
    assert arm_writes(lab, "DELETE", f"/flexibleServers/{name}") == 1  # and deleted once
    assert not [s for s in arm_admin(lab, "/_emulator/state")["servers"] if s.startswith("opsflow-drill")]


def test_failover_completes_across_a_temporal_server_restart(lab):
    """The dev server persists to a sqlite file in the lab: killed in the middle of the catch-up and started again
    on the same file and port, the procedure completes."""
    from tests.integration.test_failover_lab import approve

    setup_data(lab)
    west = lab.dsn("westeurope")
    lab.start_worker()
    sql(west, "SELECT pg_wal_replay_pause()")  # the catch-up has to wait
    sql(lab.dsn("eastus"), "INSERT INTO orders SELECT generate_series(501, 1000)")
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    wait_status(lab, wid, lambda r: r["current_step"] == "catch-up", what="the catch-up wait")

    proc = lab.state["processes"]["temporal"]
    import os

    os.kill(proc["pid"], signal.SIGKILL)
    wait_for(
        lambda: subprocess.run(["kill", "-0", str(proc["pid"])], capture_output=True).returncode != 0,
        what="the server gone",
    )
    log = open(lab.root / "temporal-restarted.log", "w")
    restarted = subprocess.Popen(
        proc["argv"], stdout=log, stderr=subprocess.STDOUT, cwd=lab.root, start_new_session=True
    )
    try:
        sql(west, "SELECT pg_wal_replay_resume()")
        report = wait_end(lab, wid, timeout=300)
        assert report["status"] == "succeeded", explain(report)
        assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1 and timeline(west) == 2
        assert sql(west, "SELECT count(*) FROM orders")[0][0] == 1000
    finally:
        lab.stop_workers()
        restarted.send_signal(signal.SIGTERM)
        try:
            restarted.wait(30)
        except subprocess.TimeoutExpired:
            restarted.kill()
