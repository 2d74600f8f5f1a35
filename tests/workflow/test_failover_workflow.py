"""The failover procedure's logic on the time-skipping server: gates, refusals, undo, abort, pause, emergency."""

from __future__ import annotations

import asyncio
import threading

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError

from opsflow.client import ProcedureRunning, fetch_report, send_update, start_procedure
from opsflow.contracts.db import DB_DRAIN, DB_FENCE, DB_PROMOTE, DB_UNFENCE, DB_WAIT_CAUGHT_UP
from opsflow.contracts.k8s import K8S_LOWER_AUTOSCALERS, K8S_SCALE_UP
from opsflow.contracts.traffic import TRAFFIC_PREPARE, TRAFFIC_SWITCH
from opsflow.models import FailoverReport
from tests.workflow.conftest import worker_holds
from workflows.failover import FailoverInput
from workflows.procedure import Procedure, Request


async def start(env, inventory, to="westeurope", **kw):
    worker_holds(inventory)
    inp = FailoverInput(inventory=inventory, to_region=to, requester=kw.pop("requester", "alice"), reason="test", **kw)
    return await start_procedure(env.client, inventory, "failover", inp, "test failover")


async def until_waiting(handle, what="approval", timeout=10):
    for _ in range(int(timeout / 0.05)):
        r = FailoverReport.model_validate(await handle.query("progress", result_type=dict))
        if r.waiting_for and r.waiting_for.startswith(what):
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"never waited for {what}: {r}")


async def failed_report(handle) -> FailoverReport:
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    return FailoverReport.model_validate(exc.value.cause.details[0])


async def update_names_in_history(handle) -> list[str]:
    names = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            names.append(event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name)
    return names


async def test_planned_failover_with_approval(running, world, inventory):
    handle = await start(running, inventory)
    await until_waiting(handle)
    assert world.primary == "eastus" and not world.fenced  # nothing changes before approval
    await send_update(handle, Procedure.approve, Request(by="bob", reason="change #42"))
    report = FailoverReport.model_validate(await handle.result())

    assert report.status == "succeeded"
    assert world.primary == "westeurope" and world.serving == "westeurope" and world.promotions == 1
    assert "eastus" in world.fenced and "eastus" in world.maintenance and "westeurope" in world.scaled
    assert report.approval and report.approval.by == "bob" and report.approval.reason == "change #42"
    assert report.from_region == "eastus" and report.rpo_bytes == 0 and report.rpo_proven
    assert report.rto_seconds is not None and report.rto_seconds >= 0
    names = [s.name for s in report.steps]
    # The runbook's order: no new traffic, in-flight work drains, then the fence; catch-up before promotion,
    # promotion before traffic, verify before scale-up. The new region's endpoint is enabled (behind the old one's:
    # no traffic yet) before the fence, so that its probes have passed when the traffic moves.
    order = ["approval", "maintenance", "traffic-warm", "drain", "fence", "catch-up", "promote", "traffic",
             "verify-writes", "verify-routing", "verify-smoke", "scale-up", "notify"]
    assert [n for n in names if n in order] == order
    assert world.prepared == ["westeurope"] and not world.warm  # the switch disabled eastus's endpoint
    kinds = {s.name: s.kind for s in report.steps}  # what the HTML report's timeline draws them as
    assert (kinds["approval"], kinds["drain"], kinds["promote"]) == ("gate", "wait", "action")
    drain = next(s for s in report.steps if s.name == "drain")
    # No session in a transaction: the drain ends at once, not after the configured 60 s.
    assert drain.detail.startswith("sessions idle") and report.drain_ended == "sessions idle"
    assert report.drain_seconds is not None and report.drain_seconds < 1
    assert any("Approval needed" in text for _, text, _ in world.notifications)


async def test_no_traffic_warm_up_when_the_new_endpoint_is_enabled_already(running, world, inventory):
    world.warm = {"westeurope"}  # enabled (behind eastus) before the failover: Traffic Manager probes it already
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.serving == "westeurope"
    assert world.prepared == [] and "traffic-warm" not in [s.name for s in report.steps]


async def test_a_failed_traffic_warm_up_does_not_stop_the_failover(running, world, inventory):
    world.fail[TRAFFIC_PREPARE.name] = "ARM said no"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.serving == "westeurope" and world.primary == "westeurope"
    warm = next(s for s in report.steps if s.name == "traffic-warm")
    assert warm.outcome == "failed" and "ARM said no" in warm.detail  # the traffic step waited for the probes


async def test_non_approver_and_self_approval_are_rejected_before_history(running, world, inventory):
    handle = await start(running, inventory, requester="alice")
    await until_waiting(handle)
    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await send_update(handle, Procedure.approve, Request(by="mallory"))
    assert "may not approve" in str(exc.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await send_update(handle, Procedure.approve, Request(by="alice"))
    assert "requested this procedure" in str(exc.value.cause)
    assert await update_names_in_history(handle) == []
    assert world.unchanged
    await send_update(handle, Procedure.approve, Request(by="bob"))
    await handle.result()
    assert await update_names_in_history(handle) == ["approve"]


async def test_approval_timeout_escalates_then_aborts_with_nothing_changed(running, world, inventory):
    handle = await start(running, inventory)
    report = await failed_report(handle)  # the time-skipping server jumps over the hour
    assert report.status == "aborted" and "no approval" in report.failure
    escalations = [n for n in world.notifications if n[1].startswith("ESCALATION")]
    assert escalations and escalations[0][0] == "critical" and escalations[0][2] == ["oncall"]
    assert world.unchanged


async def test_failure_before_promotion_undoes_what_was_done(running, world, inventory):
    world.fail[DB_WAIT_CAUGHT_UP.name] = "replica stuck"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await failed_report(handle)
    assert report.status == "failed" and "replica stuck" in report.failure
    assert world.unchanged  # fence lifted, westeurope's endpoint out again, maintenance annotation removed
    compensated = [s.title for s in report.steps if s.outcome == "compensated"]
    assert compensated == ["Lift the write fence on eastus", "Traffic to eastus only again",
                           "Maintenance mode off in eastus"]
    assert world.prepared == ["westeurope"]  # its endpoint was enabled behind eastus's before the fence


async def test_failure_after_promotion_goes_forward_and_lists_what_is_left(running, world, inventory):
    world.fail[K8S_SCALE_UP.name] = "quota exceeded"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await failed_report(handle)
    assert report.status == "failed" and "quota exceeded" in report.failure
    # no undo past promotion
    assert world.primary == "westeurope" and world.serving == "westeurope" and "eastus" in world.fenced
    assert report.remaining[0] == "scale up in westeurope"


async def test_abort_while_waiting_for_approval(running, world, inventory):
    handle = await start(running, inventory)
    await until_waiting(handle)
    with pytest.raises(WorkflowUpdateFailedError):
        await send_update(handle, Procedure.abort, Request(by="mallory"))
    await send_update(handle, Procedure.abort, Request(by="alice", reason="wrong day"))
    report = await failed_report(handle)
    assert report.status == "aborted" and "wrong day" in report.failure
    assert world.unchanged


async def test_abort_during_drain_compensates(running, world, inventory):
    world.busy_sessions, world.block_drain = 2, threading.Event()
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    await until_waiting(handle, "Drain")
    # Draining: no new traffic (maintenance mode), but the old primary still takes in-flight writes.
    assert "eastus" in world.maintenance and "eastus" not in world.fenced and DB_FENCE.name not in world.calls
    await send_update(handle, Procedure.abort, Request(by="bob", reason="traffic spike"))
    report = await failed_report(handle)
    assert report.status == "aborted"
    assert world.unchanged
    assert DB_FENCE.name not in world.calls and DB_UNFENCE.name not in world.calls  # never fenced, nothing to lift
    assert DB_DRAIN.name in world.cancelled  # the drain stopped on the abort
    assert [s.title for s in report.steps if s.outcome == "compensated"] == ["Traffic to eastus only again",
                                                                               "Maintenance mode off in eastus"]


async def test_pause_holds_at_the_next_step_boundary_and_resume_continues(running, world, inventory):
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.pause, Request(by="alice", reason="check dashboards"))
    with pytest.raises(WorkflowUpdateFailedError):
        await send_update(handle, Procedure.pause, Request(by="alice"))
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await until_waiting(handle, "resume")
    assert report.status == "paused" and "eastus" not in world.maintenance  # held before the first change
    await send_update(handle, Procedure.resume, Request(by="alice"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    assert [e.action for e in report.events] == ["pause", "resume"]


async def test_abort_refused_past_the_point_of_no_return(running, world, inventory):

    world.block_promote = threading.Event()
    # Queries do not skip time: no drain, so the procedure reaches the promotion while we poll.
    inventory = inventory.model_copy(update={"failover": inventory.failover.model_copy(update={"drain": 0})})
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    for _ in range(400):
        r = FailoverReport.model_validate(await handle.query("progress", result_type=dict))
        if r.current_step == "promote":
            break
        await asyncio.sleep(0.05)
    assert r.current_step == "promote"
    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await send_update(handle, Procedure.abort, Request(by="bob"))
    assert "point of no return" in str(exc.value.cause)
    world.block_promote.set()
    assert (await handle.result())["status"] == "succeeded"


async def test_emergency_failover_with_dead_primary(running, world, inventory):
    world.reachable["eastus"] = False
    world.replay["westeurope"] = world.lsn - 4096  # the replica had not replayed the last 4 KiB
    handle = await start(running, inventory, emergency=True)
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.emergency and report.approval is None
    names = [s.name for s in report.steps]
    assert names.index("traffic") < names.index("promote")  # traffic off the dead region first
    assert "drain" not in names and "catch-up" not in names and "fence" not in names
    assert world.primary == "westeurope" and world.serving == "westeurope"
    assert report.rpo_bytes == 4096 and not report.rpo_proven
    assert any(sev == "critical" and "EMERGENCY" in text for sev, text, _ in world.notifications)


async def test_emergency_waits_for_approval_when_the_inventory_asks(running, world, inventory):
    inv = inventory.model_copy(
        update={"approval": inventory.approval.model_copy(update={"emergency_requires_approval": True})}
    )
    world.reachable["eastus"] = False
    handle = await start(running, inv, emergency=True)
    await until_waiting(handle)
    assert world.primary == "eastus"
    await send_update(handle, Procedure.approve, Request(by="bob"))
    assert (await handle.result())["status"] == "succeeded"


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda w: setattr(w, "primary", "westeurope"), "already the primary"),
        (lambda w: setattr(w, "streaming", False), "not streaming"),
        (lambda w: w.replay.update(westeurope=w.lsn - 8 * 1024 * 1024), "above the limit"),
        (lambda w: w.reachable.update(eastus=False), "use --emergency"),
        (lambda w: setattr(w, "kube_ready", False), "not ready"),
    ],
)
async def test_refusals_change_nothing(running, world, inventory, setup, reason):
    setup(world)
    before = (world.primary, set(world.fenced), world.serving)
    handle = await start(running, inventory)
    report = await failed_report(handle)
    assert report.status == "refused" and reason in report.failure
    assert (world.primary, world.fenced, world.serving) == before and not world.maintenance and world.promotions == 0


async def test_unknown_region_is_refused(running, world, inventory):
    handle = await start(running, inventory, to="mars")
    report = await failed_report(handle)
    assert report.status == "refused" and "unknown region 'mars'" in report.failure


async def test_second_procedure_on_the_same_environment_is_refused(running, world, inventory):
    first = await start(running, inventory)
    await until_waiting(first)
    with pytest.raises(ProcedureRunning) as exc:
        await start(running, inventory)
    assert exc.value.code == 3 and "another procedure is running" in str(exc.value)
    await send_update(first, Procedure.abort, Request(by="alice"))
    await failed_report(first)


async def test_dry_run_plans_exactly_the_steps_a_real_run_takes(running, world, inventory):
    report = FailoverReport.model_validate(await (await start(running, inventory, dry_run=True)).result())
    assert report.status == "planned" and world.unchanged
    assert not set(world.calls) & {DB_FENCE.name, DB_PROMOTE.name, TRAFFIC_SWITCH.name, K8S_SCALE_UP.name}
    planned = [s.name for s in report.steps if s.outcome == "planned"]
    # only if a promotion fails
    assert [s.name for s in report.steps if s.outcome == "skipped"] == ["verify-not-promoted"]

    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    real = FailoverReport.model_validate(await handle.result())
    names = [s.name for s in real.steps]
    assert names[names.index("approval"):] == planned


async def test_report_is_readable_after_a_failure(running, world, inventory):
    world.primary = "westeurope"
    handle = await start(running, inventory)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    report = await fetch_report(handle)
    assert report.status == "refused"


async def test_autoscalers_raised_in_the_new_region_lowered_in_the_old(running, world, inventory):
    world.hpas = {"eastus": (3, 10), "westeurope": (1, 2)}
    handle = await start(running, inventory)
    await until_waiting(handle)
    assert world.hpas == {"eastus": (3, 10), "westeurope": (1, 2)}  # nothing before approval
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    assert world.hpas == {"eastus": (1, 10), "westeurope": (3, 3)}
    names = [s.name for s in report.steps]
    assert names.index("scale-up") < names.index("autoscalers-old") < names.index("notify")
    assert [(a.region, a.min_before, a.max_before, a.min_after, a.max_after, a.action) for a in report.autoscalers] == [
        ("westeurope", 1, 2, 3, 3, "raised"), ("eastus", 3, 10, 1, 10, "lowered")]
    step = {s.name: s for s in report.steps}
    assert "HPA web min 1->3, max 2->3" in step["scale-up"].detail
    assert step["autoscalers-old"].detail == "HPA web lowered: min 3->1, max 10->10"


async def test_lowering_the_old_autoscalers_never_fails_the_failover(running, world, inventory):
    world.hpas = {"eastus": (3, 10), "westeurope": (1, 2)}
    world.fail[K8S_LOWER_AUTOSCALERS.name] = "forbidden: cannot patch horizontalpodautoscalers"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.primary == "westeurope"
    assert world.hpas["westeurope"] == (3, 3) and world.hpas["eastus"] == (3, 10)
    assert any("lower the HPAs of eastus's deployments by hand" in r and "forbidden" in r for r in report.remaining)
    assert {s.name: s.outcome for s in report.steps}["autoscalers-old"] == "failed"


async def test_emergency_leaves_the_old_autoscalers_alone(running, world, inventory):
    """An emergency scales the old region's deployments to zero (an HPA leaves those alone); the old region may not
    answer: no step for its HPAs."""
    world.hpas = {"eastus": (3, 10), "westeurope": (1, 2)}
    world.reachable["eastus"] = False
    report = FailoverReport.model_validate(await (await start(running, inventory, emergency=True)).result())
    assert report.status == "succeeded" and "autoscalers-old" not in [s.name for s in report.steps]
    assert K8S_LOWER_AUTOSCALERS.name not in world.calls
    assert world.hpas == {"eastus": (3, 10), "westeurope": (3, 3)}
