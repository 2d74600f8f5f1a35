"""Failback logic on the time-skipping server: rebuild, catch-up, approval, window wait and override, the
child failover, a failure in the child reported by the parent."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError

from opsflow.client import send_update, start_procedure
from opsflow.contracts.db import DB_REBUILD_REPLICA
from opsflow.contracts.k8s import K8S_SCALE_UP
from opsflow.inventory import TimeWindow
from opsflow.models import FailbackReport
from tests.workflow.conftest import worker_holds
from tests.workflow.test_failover_workflow import until_waiting
from workflows.failback import FailbackInput
from workflows.procedure import Procedure, Request


@pytest.fixture
def failed_over(world):
    """The world after a failover to westeurope: eastus's old primary is fenced and diverged."""
    world.primary, world.serving = "westeurope", "westeurope"
    world.fenced.add("eastus")
    world.replay = {"eastus": world.lsn - 65536}
    return world


async def rebuild_heartbeat_timeouts(handle) -> list[float]:
    """The heartbeat timeout each replica rebuild was scheduled with (what a worker lost during it costs)."""
    return [e.activity_task_scheduled_event_attributes.heartbeat_timeout.ToTimedelta().total_seconds()
            async for e in handle.fetch_history_events()
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == DB_REBUILD_REPLICA.name]


async def start(env, inventory, to="eastus", **kw):
    worker_holds(inventory)
    return await start_procedure(
        env.client,
        inventory,
        "failback",
        FailbackInput(inventory=inventory, to_region=to, requester="alice", **kw),
        "test failback",
    )


async def test_failback_asks_before_destroying_then_rebuilds_catches_up_and_fails_over_back(
    running, failed_over, inventory
):
    world = failed_over
    handle = await start(running, inventory)
    await until_waiting(handle)
    assert world.rebuilds == [] and world.primary == "westeurope"  # nothing rebuilt (destroyed) before approval
    await send_update(handle, Procedure.approve, Request(by="bob", reason="eastus is back"))
    report = FailbackReport.model_validate(await handle.result())
    names = [s.name for s in report.steps]
    assert names.index("approval") < names.index("rebuild") < names.index("catch-up") < names.index("failover")
    assert report.status == "succeeded" and report.from_region == "westeurope" and report.rebuild_method == "pg_rewind"
    assert world.primary == "eastus" and world.serving == "eastus" and world.promotions == 1
    assert world.rebuilds == ["eastus", "westeurope"]  # westeurope is the standby again
    child = report.failover
    assert child is not None and child.status == "succeeded" and child.approval.by == "bob"
    assert [s.name for s in child.steps if s.name == "approval"] == ["approval"]  # recorded, not asked again
    catch_up = next(s for s in report.steps if s.name == "catch-up")
    assert "bytes behind" in catch_up.detail
    assert await rebuild_heartbeat_timeouts(handle) == [inventory.failover.heartbeat_timeout * 4] * 2  # the default


async def test_the_rebuild_heartbeat_timeout_is_the_inventorys_when_given(running, failed_over, inventory):
    inv = inventory.model_copy(
        update={"failback": inventory.failback.model_copy(update={"rebuild_heartbeat_timeout": 7.0})}
    )
    handle = await start(running, inv)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    assert FailbackReport.model_validate(await handle.result()).status == "succeeded"
    assert await rebuild_heartbeat_timeouts(handle) == [7.0, 7.0]


async def test_failback_waits_for_the_low_traffic_window(running, failed_over, inventory):
    window = TimeWindow(days=["sun"], start="02:00", end="04:00")
    inv = inventory.model_copy(update={"failback": inventory.failback.model_copy(update={"window": window})})
    handle = await start(running, inv)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailbackReport.model_validate(await handle.result())  # the time-skipping server jumps to Sunday 02:00
    assert report.status == "succeeded"
    step = next(s for s in report.steps if s.name == "window")
    assert step.detail == "window open" and window.next_opening(report.window_opened_at) is None


async def test_a_person_can_override_the_window(running, failed_over, inventory):
    from datetime import timedelta

    # A window that is certainly closed now: two days ahead of the test server's (skipping) clock.
    later = await running.get_current_time() + timedelta(days=2)
    window = TimeWindow(
        days=[["mon", "tue", "wed", "thu", "fri", "sat", "sun"][later.weekday()]], start="02:00", end="03:00"
    )
    inv = inventory.model_copy(update={"failback": inventory.failback.model_copy(update={"window": window})})
    handle = await start(running, inv)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    for _ in range(200):
        r = FailbackReport.model_validate(await handle.query("progress", result_type=dict))
        if (r.waiting_for or "").startswith("the window") or r.status == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert (r.waiting_for or "").startswith("the window"), r
    with pytest.raises(WorkflowUpdateFailedError):
        await send_update(handle, Procedure.override, Request(by="mallory"))
    await send_update(handle, Procedure.override, Request(by="bob", reason="quiet enough now"))
    report = FailbackReport.model_validate(await handle.result())
    step = next(s for s in report.steps if s.name == "window")
    assert report.status == "succeeded" and step.detail == "overridden by bob"


async def test_a_failure_in_the_child_failover_is_reported_by_the_parent(running, failed_over, inventory):
    failed_over.fail[K8S_SCALE_UP.name] = "quota exceeded in eastus"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    report = FailbackReport.model_validate(exc.value.cause.details[0])
    assert (
        report.status == "failed"
        and "failover back to eastus failed" in report.failure
        and "quota exceeded" in report.failure
    )
    assert report.failover is not None and report.failover.status == "failed"
    assert report.remaining and report.remaining[0] == "scale up in eastus"


async def test_failback_refusals(running, world, inventory):
    # eastus is still the writable primary: nothing to fail back.
    handle = await start(running, inventory)
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    report = FailbackReport.model_validate(exc.value.cause.details[0])
    assert report.status == "refused" and "writable primary" in report.failure and world.rebuilds == []
    handle = await start(running, inventory, to="mars")
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    assert "unknown region 'mars'" in exc.value.cause.details[0]["failure"]
