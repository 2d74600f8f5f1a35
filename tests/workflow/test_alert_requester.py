"""The worker binds the alert receiver's name (the inventory's `alerts.requester`) to what an alert may do: request
a planned failover, which waits at its approval gate; an emergency failover, or any other procedure, started under
that name is refused before anything is read or changed."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError

from opsflow.client import send_update
from opsflow.inventory import Inventory
from opsflow.models import ReadinessReport
from tests.workflow.conftest import inventory_dict, worker_holds
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting
from workflows.procedure import Procedure, Request
from workflows.readiness import ReadinessInput
from workflows.scheduled import LaunchInput


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


@pytest.mark.parametrize("by, status", [("alice", "planned"), ("alertbot", "refused")])
async def test_a_schedule_the_alert_requester_created_launches_nothing(running, world, inventory, by, status):
    """A Schedule's launch runs as a child under the creator's name (the launcher's signed record): the receiver's
    key could create one, so the worker refuses every launch of it, even a dry run."""
    worker_holds(inventory)
    arg = ReadinessInput(inventory=inventory, requester="schedule:x", dry_run=True)
    launch = LaunchInput(procedure="readiness", environment=inventory.environment, task_queue=inventory.task_queue,
                         arg=arg.without_rules(inventory).model_dump(mode="json"), schedule_id="x", by=by)
    handle = await running.client.start_workflow("scheduled", launch, id="x-2026-12-06T00:00:00Z",
                                                 task_queue=inventory.task_queue)
    if status == "planned":
        assert (await handle.result())["report"]["status"] == "planned"
    else:
        with pytest.raises(WorkflowFailureError) as exc:
            await handle.result()
        report = ReadinessReport.model_validate(exc.value.cause.details[0])
        assert report.status == "refused" and "a Schedule it created launches nothing" in report.failure
    assert world.unchanged
