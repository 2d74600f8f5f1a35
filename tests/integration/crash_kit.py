"""The crash suites' machinery (test_crash_boundaries: failover, failback, drill; test_crash_rollout: canary,
blue-green, maintenance window): two worker processes replaced at once after a SIGKILL, and a run of a procedure
that kills them at its activity boundaries and in the middle of its long steps.

How the boundaries are found: the runner watches the workflow's history and its pending activities (the Temporal
client, not sleeps). One worker serves the workflow queue, one the region queues. At an ActivityTaskCompleted the
workflow worker is SIGKILLed (the next step must be decided by a fresh worker replaying the history), and while a
heartbeating (long) step is running, the worker running it is SIGKILLed in the middle of it (the retry must find the
world half-changed and finish the job once). A pending activity, not the history, says a step is running: the
history records an activity's start only when it closes. Each killed worker is replaced at once. The test
inventory's heartbeat timeouts are short and its workflow task timeout 1 s (conftest.fast_recovery), so a killed
step or decision is taken over within seconds."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client
from temporalio.service import RPCError

from opsflow.contracts.db import DB_PROMOTE
from opsflow.contracts.notify import NOTIFY_SEND
from opsflow.temporal import DATA_CONVERTER
from tests.helpers import eventually_async
from tests.integration import forked
from tests.integration.conftest import FAST_RESTART, ROOT
from tests.integration.test_failover_lab import wait_end

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
                                       spare: tuple[str, ...] = (NOTIFY_SEND.name,),
                                       approvers: tuple[str, ...] = ("bob",), each_kind_once: bool = False,
                                       long_once: tuple[str, ...] = (), expected: str = "succeeded") -> dict:
    """Follow the workflow's history until it closes, killing at every activity boundary (see the module doc). The
    history is followed with a long poll, each event as it is written (reading it whole every 50 ms cost the test and
    the server more CPU than the procedure); pending activities are read only while a long step may be running.

    `spare`: long steps not killed in the middle. notify.send is the same step in every procedure (Procedure.notify),
    and a kill in the middle of it costs its 10 s heartbeat timeout: the drill's run kills it, the others spare it.
    `approvers`: who approves, one after the other, while the procedure waits for an approval (a quorum).
    `each_kind_once`: kill the workflow worker after the first completion of each activity type only, not after
    every one (a rollout's bake looks at the figures every few seconds: the same two activities, over and over).
    `long_once`: long steps of these types are killed in the middle the first time only (each kill costs the
    heartbeat timeout; a maintenance window updates its status page three times). `expected`: the status the run
    should end with (a faulty canary's is "failed", rolled back); another keeps the lab's logs for the reader.

    The report comes back with `_boundaries` (workflow worker kills between steps), `_kinds` (the activity types
    those kills followed), `_long` (the activity types killed in the middle) and `_kills` (per worker)."""
    client = await Client.connect(lab.state["temporal"]["address"], data_converter=DATA_CONVERTER)
    handle = client.get_workflow_handle(wid)
    scheduled_type: dict[int, str] = {}  # scheduled event id -> activity type
    long_steps: dict[int, str] = {}  # scheduled event id -> activity id, of the long steps not yet closed
    killed_running: set[str] = set()
    kinds: list[str] = []
    long_kinds: list[str] = []
    boundaries = 0
    closed = asyncio.Event()

    async def follow_history() -> None:
        nonlocal boundaries
        async for e in handle.fetch_history_events(wait_new_event=True):
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                scheduled = e.activity_task_scheduled_event_attributes
                scheduled_type[e.event_id] = scheduled.activity_type.name
                kind = scheduled.activity_type.name
                if scheduled.heartbeat_timeout.seconds and kind not in spare and not (
                        kind in long_once and kind in long_kinds):
                    long_steps[e.event_id] = scheduled.activity_id
            elif e.event_type in ACTIVITY_CLOSED:
                scheduled_id = getattr(e, ACTIVITY_CLOSED[e.event_type]).scheduled_event_id
                long_steps.pop(scheduled_id, None)
                kind = scheduled_type.get(scheduled_id, "?")
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and not (
                        each_kind_once and kind in kinds):
                    boundaries += 1
                    kinds.append(kind)
                    workers.kill("workflow")  # between two steps
        closed.set()

    async def kill_long_steps_and_approve() -> None:
        waiting_approval, next_look = list(approvers) if approve else [], 0.0
        approving: asyncio.Task | None = None  # the approval in flight: not awaited here, so a long step that
        # starts at once after it (a canary's creation) is caught running all the same
        while not closed.is_set():
            if set(long_steps.values()) - killed_running:
                for act in (await handle.describe()).raw_description.pending_activities:
                    running = act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    if running and act.activity_id in long_steps.values() and act.activity_id not in killed_running:
                        role = workers.role_of(act.last_worker_identity)
                        if role is not None:  # else started by a worker killed since: its retry is killed instead
                            killed_running.add(act.activity_id)
                            long_kinds.append(act.activity_type.name)
                            workers.kill(role)  # in the middle of a long step
            if approving is not None and approving.done():
                approving.result()  # an approval refused fails the test here
                approving = None
            if waiting_approval and approving is None and time.monotonic() >= next_look:
                next_look = time.monotonic() + 0.3
                if ((await asyncio.to_thread(lab.status, wid)).get("waiting_for") or "").startswith("approval"):
                    approving = asyncio.create_task(asyncio.to_thread(
                        lab.cli, "approve", wid, "--as", waiting_approval.pop(0), "--reason", "crash suite",
                        check=True
                    ))
            try:
                await asyncio.wait_for(closed.wait(), 0.05)
            except TimeoutError:
                pass

    try:
        await asyncio.wait_for(asyncio.gather(follow_history(), kill_long_steps_and_approve()), timeout)
    except TimeoutError:
        raise AssertionError(f"{wid} did not finish in {timeout:.0f}s; kills {workers.kills}") from None
    report = wait_end(lab, wid, timeout=120)
    if report["status"] != expected:  # keep the lab's logs for whoever reads the failure
        import shutil

        keep = Path(tempfile.gettempdir()) / f"opsflow-crash-logs-{wid}-{int(time.time())}"
        shutil.copytree(lab.root, keep, ignore=shutil.ignore_patterns("pg", "*.db*", "data"), dirs_exist_ok=True)
        report["failure"] = f"{report['failure']} (logs kept in {keep})"
    def seconds(step: dict) -> float:
        start, end = step.get("started_at"), step.get("ended_at")
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end else 0

    slow = sorted(((seconds(s), s["name"]) for s in report.get("steps", [])), reverse=True)[:6]
    print(f"{report.get('procedure')} {wid}: {report['status']}; killed after {kinds}, in the middle of {long_kinds};"
          " slowest steps " + ", ".join(f"{name} {secs:.1f}s" for secs, name in slow))  # shown when a test fails
    report["_boundaries"] = boundaries
    report["_kinds"] = kinds
    report["_long"] = long_kinds
    report["_kills"] = dict(workers.kills, long_steps=len(killed_running))
    return report


async def run_killing_at_every_boundary_with_child(lab, workers: Workers, wid: str, approve: bool) -> dict:
    """A failback: run_killing_at_every_boundary on it and, at once, on its child (the planned failover back,
    `<wid>-failover`, started once the failback's own steps before it are done; its steps are in its own history).
    The child's run must succeed with a kill at each of its boundaries, the promotion's among them."""
    client = await Client.connect(lab.state["temporal"]["address"], data_converter=DATA_CONVERTER)
    child_id = f"{wid}-failover"

    async def child() -> dict:
        async def started() -> bool:
            try:
                await client.get_workflow_handle(child_id).describe()
            except RPCError:
                return False
            return True

        await eventually_async(started, timeout=300, what=f"the failback's child {child_id}", interval=0.2)
        return await run_killing_at_every_boundary(lab, workers, child_id, approve=False)

    report, back = await asyncio.gather(run_killing_at_every_boundary(lab, workers, wid, approve=approve), child())
    assert back["status"] == "succeeded" and back["_boundaries"] >= 8, back["_kills"]
    assert DB_PROMOTE.name in back["_kinds"], back["_kinds"]
    report["_child"] = back
    return report
