"""Patroni (provider "patroni") on the time-skipping server: a planned failover asks the promotion to demote the old
cluster first (it becomes a standby cluster of the new one), then unfences it and checks it streams; an emergency
only promotes; the failback after a switchover switches back without a rebuild. The lab test
(tests/integration/test_patroni_lab.py) runs the same against real Patroni."""

from __future__ import annotations

import pytest

from opsflow.client import send_update
from opsflow.inventory import Inventory, InventoryError, load_inventory
from opsflow.models import FailbackReport, FailoverReport
from tests.workflow.conftest import with_databases
from tests.workflow.test_failback_workflow import start as start_failback
from tests.workflow.test_failover_switchover import approved
from tests.workflow.test_failover_workflow import start, until_waiting
from workflows.procedure import Procedure, Request


def DATABASES(region: str) -> dict:  # noqa: N802 - the inventory fixture's (tests/workflow/conftest.py)
    return {
        "provider": "patroni",
        "dsn": f"host=pg-{region} dbname=app user=ops",
        "rest_api": [f"https://pg-{region}-1:8008", f"https://pg-{region}-2:8008"],
        "replication_address": f"pg-{region}:5432",
        "scope": f"shop-{region}",
        "rest_username": "opsflow",
        "rest_password": {"env": "PATRONI_REST_PASSWORD"},
    }


def patroni_inventory() -> dict:
    return with_databases(DATABASES)


async def test_planned_failover_demotes_the_old_cluster_then_it_follows(running, world, inventory):
    report = await approved(running, inventory)
    assert report.status == "succeeded" and report.switchover and report.old_primary_replica
    assert world.demoted == [("eastus", "westeurope")]
    assert "eastus" not in world.fenced  # the old-replica step lifted its fence
    names = [s.name for s in report.steps]
    assert names.index("fence") < names.index("catch-up") < names.index("promote") < names.index("old-replica")
    promote = next(s for s in report.steps if s.name == "promote")
    assert "eastus demoted first" in promote.title


async def test_dry_run_plans_the_patroni_switchover(running, world, inventory):
    report = FailoverReport.model_validate(await (await start(running, inventory, dry_run=True)).result())
    plan = {s.name: s for s in report.steps}
    assert "eastus becomes a standby cluster of westeurope" in plan["promote"].detail
    assert plan["old-replica"].outcome == "planned" and world.unchanged


async def test_emergency_promotes_only(running, world, inventory):
    world.reachable["eastus"] = False
    report = FailoverReport.model_validate(await (await start(running, inventory, emergency=True)).result())
    assert report.status == "succeeded" and not report.switchover
    assert world.demoted == []  # the old region may be dead: nothing is asked of it before the promotion
    assert "old-replica" not in [s.name for s in report.steps]


async def test_failback_after_a_patroni_switchover_switches_back(running, world, inventory):
    assert (await approved(running, inventory)).old_primary_replica
    handle = await start_failback(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = FailbackReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.primary == "eastus" and world.rebuilds == []
    assert world.demoted == [("eastus", "westeurope"), ("westeurope", "eastus")]
    assert report.rebuild_method == "none (streaming)"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rest_api": []}, "rest_api"),
        ({"replication_address": "pg-eastus"}, "replication_address"),
        ({"dsn": "host=pg user=ops password=x"}, "must not hold a password"),
        ({"rest_password": "plain"}, "rest_password"),
    ],
)
def test_inventory_names_the_bad_patroni_field(tmp_path, change, message):
    import yaml

    inv = patroni_inventory()
    inv["regions"]["eastus"]["database"].update(change)
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    with pytest.raises(InventoryError) as err:
        load_inventory(str(path))
    assert "regions.eastus.database" in str(err.value) and message in str(err.value)


def stretched_inventory() -> Inventory:
    """Both regions members of ONE Patroni cluster (layout stretched)."""
    inv = patroni_inventory()
    for region, r in inv["regions"].items():
        db = r["database"]
        db.pop("replication_address")
        db.update(layout="stretched", member=f"pg-{region}-1", scope="shop")
    return Inventory.model_validate(inv)


@pytest.mark.parametrize("inventory", [stretched_inventory()], ids=["stretched"])  # the worker's inventory too
async def test_stretched_cluster_plans_patronis_own_switchover(running, world, inventory):
    """One cluster stretched across the regions: the plan names Patroni's POST /switchover; the run is the same
    story (the promotion gets the old region, then the old member's fence is lifted and it is checked to stream)."""
    dry = FailoverReport.model_validate(await (await start(running, inventory, dry_run=True)).result())
    plan = {s.name: s for s in dry.steps}
    assert "POST /switchover in one cluster: westeurope's member leads, eastus's follows it" in plan["promote"].detail
    assert "standby cluster" not in plan["promote"].detail and world.unchanged


@pytest.mark.parametrize("inventory", [stretched_inventory()], ids=["stretched"])
async def test_stretched_cluster_runs_the_same_steps(running, world, inventory):
    report = await approved(running, inventory)
    assert report.status == "succeeded" and report.switchover and report.old_primary_replica
    assert world.demoted == [("eastus", "westeurope")]
