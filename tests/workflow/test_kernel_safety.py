"""The kernel on a bad night (time-skipping server, activities stood in by name): abort and pause reach a
running step at once, a queue nobody serves is refused or bounded, a failed promotion of a replica is
undone, quorum gates, the emergency's best-effort fence, loud pauses while writes are down."""

from __future__ import annotations

import asyncio
import threading

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowUpdateFailedError

from opsflow.client import send_update
from opsflow.contracts.db import DB_FENCE_CONTROL_PLANE, DB_PROMOTE, DB_WAIT_CAUGHT_UP
from opsflow.contracts.notify import REPORT_STORE
from opsflow.inventory import ApprovalPolicy, Inventory
from opsflow.models import FailoverReport
from tests.workflow.conftest import inventory_dict
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting
from workflows.procedure import Procedure, Request


async def until(handle, predicate, timeout=15):
    for _ in range(int(timeout / 0.05)):
        r = FailoverReport.model_validate(await handle.query("progress", result_type=dict))
        if predicate(r):
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition never met: {r}")


async def refused(update) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await update
    return exc.value.cause.message


def running_step(name):
    return lambda r: any(s.name == name and s.outcome == "running" for s in r.steps)


@pytest.fixture
def inventory() -> Inventory:
    # Heartbeats throttle at 0.8 x the timeout: a short one lets a cancellation reach a stand-in quickly.
    return Inventory.model_validate(
        inventory_dict(failover={"drain": "0s", "heartbeat_timeout": "2s"}, limits={"worker_wait": "30s"})
    )


async def test_abort_during_catch_up_cancels_it_and_undoes(running, world, inventory):
    world.block_catch_up = threading.Event()
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    await until(handle, running_step("catch-up"))
    await send_update(handle, Procedure.abort, Request(by="alice", reason="wrong day"))
    report = await failed_report(handle)
    assert world.cancelled == [DB_WAIT_CAUGHT_UP.name]  # the activity itself stopped; the wait was not sat out
    assert report.status == "aborted" and world.unchanged  # fence lifted, maintenance off
    catch_up = next(s for s in report.steps if s.name == "catch-up")
    assert catch_up.outcome == "failed" and catch_up.detail == "cancelled"


async def test_pause_stops_a_long_step_and_resume_runs_it_again(running, world, inventory):
    world.block_catch_up = threading.Event()
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    await until(handle, running_step("catch-up"))
    said = await send_update(handle, Procedure.pause, Request(by="alice"))
    assert "WRITES ARE DOWN" in said  # the old primary is fenced while we pause
    await until(handle, lambda r: r.status == "paused")
    assert world.cancelled == [DB_WAIT_CAUGHT_UP.name]
    assert any(sev == "critical" and "WRITES ARE DOWN" in text for sev, text, _ in world.notifications)
    world.block_catch_up.set()
    await send_update(handle, Procedure.resume, Request(by="alice"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.catch_up_attempts == 2
    assert [s.outcome for s in report.steps if s.name == "catch-up"] == ["skipped", "ok"]


async def test_a_worker_lost_with_the_report_costs_the_heartbeat_timeout_not_the_bound(running, world, inventory):
    """The report's keeping heartbeats: a worker killed just after it took report.store is noticed within the kernel's
    heartbeat timeout (10 s) and the next attempt keeps the report, not after the 60 s start-to-close."""
    world.lost_first.add(REPORT_STORE.name)
    try:
        handle = await start(running, inventory)
        await until_waiting(handle)
        await send_update(handle, Procedure.approve, Request(by="bob"))
        report = FailoverReport.model_validate(await handle.result())
    finally:
        world.lost_answer.set()
    assert report.status == "succeeded" and report.stored_at  # kept by the second attempt
    events = {}
    async for e in handle.fetch_history_events():
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if e.activity_task_scheduled_event_attributes.activity_type.name == REPORT_STORE.name:
                events["scheduled"] = e
        elif "scheduled" in events and e.event_type in (EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
                                                        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED):
            events.setdefault(e.event_type, e)
    started = events[EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED].activity_task_started_event_attributes
    assert started.attempt == 2
    took = events[EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED].event_time.ToDatetime() \
        - events["scheduled"].event_time.ToDatetime()
    assert took.total_seconds() < 30  # heartbeat timeout + the retry's 1 s; the start-to-close is 60 s


async def test_a_queue_without_worker_is_refused_before_any_change(running, world, inventory):
    world.unserved = {inventory.region_queue("eastus")}
    report = await failed_report(await start(running, inventory))
    assert report.status == "refused" and world.unchanged
    assert f"no worker serves {inventory.region_queue('eastus')}" in report.failure


async def test_a_step_no_worker_picks_up_fails_naming_the_queue(running, world, inventory):
    data = inventory.model_dump()
    data["limits"]["worker_wait"] = 1  # real seconds: the time-skipping server does not skip a schedule-to-start wait
    data["regions"]["westeurope"]["task_queue"] = "nobody-polls-this"
    world.lost = {"nobody-polls-this"}  # served at the preflight, gone by the first step there
    inv = Inventory.model_validate(data)
    report = await failed_report(await start(running, inv))
    assert report.status == "failed" and "no worker serves nobody-polls-this (waited 1s)" in report.failure
    assert world.unchanged


async def test_failed_promotion_of_a_verified_replica_is_undone(running, world, inventory):
    world.fail[DB_PROMOTE.name] = "ARM: 500 InternalServerError"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await failed_report(handle)
    assert report.status == "failed" and "verifiably still a replica" in report.failure
    assert world.unchanged and not report.remaining  # the old primary writes again: no outage left behind
    assert [s.name for s in report.steps if s.outcome == "compensated"] == [
        "undo:db.unfence",
        "undo:traffic.switch",  # the new region's endpoint, enabled behind the old one's (traffic-warm), disabled
        "undo:k8s.set_maintenance",
    ]


async def test_failed_promotion_that_may_have_happened_goes_forward(running, world, inventory):
    world.fail_after[DB_PROMOTE.name] = "timeout reading the response"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await failed_report(handle)
    assert world.primary == "westeurope" and "eastus" in world.fenced  # no undo: it was promoted
    assert report.remaining[:2] == ["promote in westeurope", "move traffic in westeurope"]


async def test_quorum_of_two_roles_each_a_different_person(running, world, inventory):
    roles = ApprovalPolicy(
        approvers={"platform-lead": ["alice", "carol"], "qa": ["bob", "dave"]}, require=["platform-lead", "qa"]
    )
    inv = inventory.model_copy(update={"approval": roles})
    handle = await start(running, inv, requester="erin")
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="alice"))
    r = await until_waiting(handle)
    assert "still needs an approval by role qa" in r.waiting_for and world.unchanged
    assert "already answered" in await refused(send_update(handle, Procedure.approve, Request(by="alice")))
    assert "gate 'promote' is not open" in await refused(
        send_update(handle, Procedure.approve, Request(by="bob", gate="promote"))
    )
    await send_update(handle, Procedure.approve, Request(by="carol"))  # a second lead is not QA
    assert world.unchanged
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    assert [(d.by, d.roles) for d in report.approvals] == [
        ("alice", ["platform-lead"]),
        ("carol", ["platform-lead"]),
        ("bob", ["qa"]),
    ]


async def test_emergency_fences_the_old_primary_best_effort(running, world, inventory):
    world.reachable["eastus"] = False
    world.fail[DB_FENCE_CONTROL_PLANE.name] = "eastus control plane unreachable"
    report = FailoverReport.model_validate(await (await start(running, inventory, emergency=True)).result())
    assert report.status == "succeeded" and world.primary == "westeurope"
    assert ("k8s", "eastus") in world.old_fenced
    assert any("fence the old primary in eastus" in r and "unreachable" in r for r in report.remaining)


async def test_an_emergency_is_not_blocked_by_a_dead_old_region_queue(running, world, inventory):
    world.reachable["eastus"] = False
    world.unserved = {inventory.region_queue("eastus")}  # the old region's worker died with it
    report = FailoverReport.model_validate(await (await start(running, inventory, emergency=True)).result())
    assert report.status == "succeeded"


async def test_an_emergency_report_names_what_it_preempted(running, world, inventory):
    world.reachable["eastus"] = False
    handle = await start(running, inventory, emergency=True, preempted=["opsflow-x (maintenance, canceled)"])
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.preempted == ["opsflow-x (maintenance, canceled)"]


async def test_a_busy_worker_is_waited_for_not_reported_missing(dev_env, world, inventory):
    """Two failovers, one westeurope worker with one activity slot: the first holds it (a blocked catch-up), so
    the second's westeurope step is not picked up within `worker_wait`. The worker polls, so it is busy, not
    missing: the step is scheduled again and runs once the slot is free."""
    import concurrent.futures
    import uuid

    from temporalio.worker import Worker

    from tests.workflow.conftest import WORKFLOWS

    data = inventory.model_dump()
    data["limits"]["worker_wait"] = 3
    first = Inventory.model_validate(data)
    second = Inventory.model_validate(
        {
            **data,
            "environment": f"t{uuid.uuid4().hex[:8]}",
            "workflow_task_queue": first.task_queue,  # same queues
            "regions": {r: {**v, "task_queue": first.region_queue(r)} for r, v in data["regions"].items()},
        }
    )
    world.block_catch_up = threading.Event()
    env, acts = dev_env, world.activities()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        async with (
            Worker(env.client, task_queue=first.task_queue, workflows=WORKFLOWS, activities=acts, activity_executor=ex),
            Worker(env.client, task_queue=first.region_queue("eastus"), activities=acts, activity_executor=ex),
            Worker(
                env.client,
                task_queue=first.region_queue("westeurope"),
                activities=acts,
                activity_executor=ex,
                max_concurrent_activities=1,
            ),
        ):
            one = await start(env, first)
            await until_waiting(one)
            await send_update(one, Procedure.approve, Request(by="bob"))
            await until(one, running_step("catch-up"))
            two = await start(env, second)
            r = await until(two, lambda r: any("busy; scheduled again" in s.detail for s in r.steps), timeout=30)
            assert r.status == "running" and r.failure is None
            world.block_catch_up.set()
            assert FailoverReport.model_validate(await one.result()).status == "succeeded"
            await until_waiting(two)
            await send_update(two, Procedure.approve, Request(by="bob"))
            report = FailoverReport.model_validate(await two.result())
    assert report.status == "succeeded"
    busy = [s for s in report.steps if s.outcome == "skipped" and "busy" in s.detail]
    assert busy and f"the worker serving {first.region_queue('westeurope')} is busy" in busy[0].detail
