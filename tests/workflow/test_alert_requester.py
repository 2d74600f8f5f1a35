"""The worker binds the alert receiver's name (the inventory's `alerts.requester`) to what an alert may do: request
a planned failover, which waits at its approval gate; an emergency failover, or any other procedure, started under
that name is refused before anything is read or changed."""

from __future__ import annotations

import pytest

from opsflow.client import send_update
from opsflow.inventory import Inventory
from tests.workflow.conftest import inventory_dict
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting
from workflows.procedure import Procedure, Request


@pytest.fixture
def inventory() -> Inventory:
    return Inventory.model_validate(inventory_dict(
        operators={"failover": ["alice", "alertbot"]},
        alerts={"requester": "alertbot", "routes": [{"alertname": "RegionDegraded", "to": "westeurope"}]}))


async def test_the_alert_requester_may_request_a_planned_failover_and_nothing_else(running, world, inventory):
    handle = await start(running, inventory, requester="alertbot", emergency=True)
    report = await failed_report(handle)
    assert report.status == "refused" and "never start an emergency failover" in report.failure
    assert world.unchanged and world.calls == []

    handle = await start(running, inventory, requester="alertbot")
    waiting = await until_waiting(handle)
    assert waiting.requester == "alertbot" and world.unchanged
    await send_update(handle, Procedure.abort, Request(by="alice", reason="not now"))
    assert (await failed_report(handle)).status == "aborted" and world.unchanged

    # The same inventory's other operators are not bound by it.
    handle = await start(running, inventory, requester="alice", emergency=True)
    assert (await handle.result())["status"] == "succeeded"
