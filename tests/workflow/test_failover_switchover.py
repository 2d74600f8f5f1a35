"""Switchover-first failover on Azure (a virtual endpoint named in the inventory), on the time-skipping server:
the preflight checks the virtual endpoint, the promotion is a switchover, the old primary is unfenced and
checked as a replica; the failback after it switches back without a rebuild."""

from __future__ import annotations

import pytest

from opsflow.client import send_update
from opsflow.contracts.db import DB_UNFENCE
from opsflow.models import FailbackReport, FailoverReport, VirtualEndpointState
from tests.workflow.test_failback_workflow import start as start_failback
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting
from workflows.procedure import Procedure, Request

VE = "ve-shop"




def DATABASES(region: str) -> dict:  # noqa: N802 - the inventory fixture's (tests/workflow/conftest.py)
    """Both regions on Azure flexible servers (pg-eastus, pg-westeurope) under one virtual endpoint."""
    return {"provider": "azure-flexible", "subscription_id": "sub", "resource_group": "rg",
            "server_name": f"pg-{region}", "virtual_endpoint": VE}


async def approved(running, inventory, **kw) -> FailoverReport:
    handle = await start(running, inventory, **kw)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    return FailoverReport.model_validate(await handle.result())


async def switched_back(running, inventory) -> FailbackReport:
    """The failback (approved by bob) after an approved failover that left the old primary a replica."""
    assert (await approved(running, inventory)).old_primary_replica
    handle = await start_failback(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    return FailbackReport.model_validate(await handle.result())


async def test_planned_failover_switches_over_and_the_old_primary_follows(running, world, inventory):
    report = await approved(running, inventory)
    assert report.status == "succeeded" and report.switchover and report.old_primary_replica
    assert world.switchovers == [("eastus", "westeurope", False)]  # Switchover/Planned
    assert "eastus" not in world.fenced  # its fence lifted: a switchover back finds it writable
    names = [s.name for s in report.steps]
    assert (
        names.index("fence")
        < names.index("promote")
        < names.index("scale-up")
        < names.index("old-replica")
        < names.index("notify")
    )
    step = next(s for s in report.steps if s.name == "old-replica")
    assert step.outcome == "ok" and step.detail == "replica, streaming"
    assert any("the old primary is now a replica" in text for _, text, _ in world.notifications)
    assert report.remaining == []


async def test_an_old_primary_left_fenced_is_left_to_a_person_not_a_failure(running, world, inventory):
    world.fail[DB_UNFENCE.name] = "ARM: parameter update refused"
    report = await approved(running, inventory)
    assert report.status == "succeeded" and report.switchover and report.old_primary_replica is False
    assert "check that eastus streams from westeurope" in report.remaining[0]
    assert "ARM: parameter update refused" in report.remaining[0]


async def test_dry_run_plans_the_switchover(running, world, inventory):
    report = FailoverReport.model_validate(await (await start(running, inventory, dry_run=True)).result())
    plan = {s.name: s for s in report.steps}
    assert plan["old-replica"].outcome == "planned"
    assert f"virtual endpoint {VE}" in plan["promote"].detail and "eastus becomes its replica" in plan["promote"].detail


@pytest.mark.parametrize(
    "ve, reason",
    [
        (
            VirtualEndpointState(name=VE, error="server pg-eastus has no virtual endpoint 've-shop'"),
            "has no virtual endpoint",
        ),
        (
            VirtualEndpointState(name=VE, writer="pg-other", reader=["pg-westeurope"]),
            "writes to pg-other, not to pg-eastus",
        ),
        (
            VirtualEndpointState(name=VE, writer="pg-eastus", reader=["pg-eastus"]),
            "reads from pg-eastus, not from pg-westeurope",
        ),
    ],
)
async def test_preflight_refuses_a_virtual_endpoint_that_is_missing_or_points_elsewhere(
    running, world, inventory, ve, reason
):
    world.virtual_endpoint = ve
    report = await failed_report(await start(running, inventory))
    assert report.status == "refused" and reason in report.failure
    assert world.unchanged and world.switchovers == []


async def test_emergency_uses_a_forced_switchover(running, world, inventory):
    world.reachable["eastus"] = False
    report = FailoverReport.model_validate(await (await start(running, inventory, emergency=True)).result())
    assert report.status == "succeeded" and report.switchover
    assert world.switchovers == [("eastus", "westeurope", True)]  # Switchover/Forced
    assert "old-replica" not in [s.name for s in report.steps]  # the old region may be dead: nothing asked of it
    steps = {s.name: s for s in report.steps}
    # Azure made it a replica: no write fence that would follow it back to primary on the failback.
    assert steps["fence-old"].outcome == "skipped" and ("db", "eastus") not in world.old_fenced
    assert steps["scale-down-old"].outcome == "ok"


async def test_failback_after_a_switchover_is_a_switchover_back_without_a_rebuild(running, world, inventory):
    report = await switched_back(running, inventory)
    assert report.status == "succeeded" and world.primary == "eastus"
    assert world.rebuilds == []  # neither region rebuilt
    assert world.switchovers == [("eastus", "westeurope", False), ("westeurope", "eastus", False)]
    steps = {s.name: s for s in report.steps}
    assert steps["rebuild"].outcome == "skipped" and "already streams from westeurope" in steps["rebuild"].detail
    assert steps["restandby"].outcome == "skipped" and "switchover" in steps["restandby"].detail
    assert report.rebuild_method == "none (streaming)" and report.failover.switchover
