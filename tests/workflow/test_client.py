"""opsflow.client's environment lock on the time-skipping server: refusal, and preemption by an emergency.

Stand-in workflows under the procedures' names hold the lock; what is tested is the client's behaviour
(what it cancels, that it waits for the undo to finish, what it refuses, what it reports)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.worker import Worker

from opsflow.client import ClientError, ProcedureRunning, environment_workflow_id, start_procedure
from opsflow.inventory import Inventory


class Arg(BaseModel):
    requester: str = "alice"
    reason: str = "test"
    undo_seconds: float = 1
    ignore_cancel: bool = False
    preempted: list[str] = []  # an input with this field learns what its start preempted


async def hold_until_cancelled(arg: Arg) -> str:
    try:
        await workflow.wait_condition(lambda: False)
    except asyncio.CancelledError:
        if arg.ignore_cancel:
            await workflow.wait_condition(lambda: False)
        # The kernel undoes on cancellation; an undo takes time, and the emergency must wait for it.
        await workflow.sleep(arg.undo_seconds)
        raise
    return "done"


@workflow.defn(name="maintenance", sandboxed=False)  # a stand-in; the sandbox adds nothing here
class StandInMaintenance:
    @workflow.run
    async def run(self, arg: Arg) -> str:
        return await hold_until_cancelled(arg)


@workflow.defn(name="failover", sandboxed=False)
class StandInFailover:
    @workflow.init
    def __init__(self, arg: Arg) -> None:
        self.arg = arg

    @workflow.query
    def started_with(self) -> Arg:
        return self.arg

    @workflow.run
    async def run(self, arg: Arg) -> str:
        return await hold_until_cancelled(arg)


@pytest.fixture
async def lock_env(env, inventory: Inventory):
    async with Worker(env.client, task_queue=inventory.task_queue, workflows=[StandInMaintenance, StandInFailover]):
        yield env


async def wait_running(handle) -> None:
    for _ in range(200):
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            return
        await asyncio.sleep(0.05)


async def test_a_second_procedure_is_refused_with_exit_code_3(lock_env, inventory):
    first = await start_procedure(lock_env.client, inventory, "maintenance", Arg(), "maintenance")
    assert (
        first.id == environment_workflow_id(inventory) == f"opsflow-{inventory.environment}" and first.preempted == []
    )
    with pytest.raises(ProcedureRunning) as exc:
        await start_procedure(lock_env.client, inventory, "failover", Arg(), "planned failover")
    assert exc.value.code == 3 and exc.value.workflow_id == first.id
    assert "another procedure is running" in str(exc.value) and "(exit 3)" in str(exc.value)
    assert (await first.describe()).status == WorkflowExecutionStatus.RUNNING  # refused, and nothing was touched
    await first.terminate()


async def test_an_emergency_preempts_routine_work_after_its_undo(lock_env, inventory):
    routine = await start_procedure(lock_env.client, inventory, "maintenance", Arg(undo_seconds=1), "maintenance")
    await wait_running(routine)
    emergency = await start_procedure(lock_env.client, inventory, "failover", Arg(), "EMERGENCY failover", preempt=True)
    assert [(p.workflow_id, p.procedure, p.outcome) for p in emergency.preempted] == [
        (routine.id, "maintenance", "canceled")
    ]
    old = await lock_env.client.get_workflow_handle(routine.id, run_id=routine.result_run_id).describe()
    new = await emergency.describe()
    assert old.status == WorkflowExecutionStatus.CANCELED and new.status == WorkflowExecutionStatus.RUNNING
    assert old.close_time <= new.start_time  # the undo finished before the emergency began
    started_with = await emergency.query(StandInFailover.started_with)
    assert started_with.preempted == [f"{routine.id} (maintenance, canceled)"]
    await emergency.terminate()


async def test_an_emergency_never_preempts_a_failover(lock_env, inventory):
    planned = await start_procedure(lock_env.client, inventory, "failover", Arg(), "planned failover")
    await wait_running(planned)
    with pytest.raises(ProcedureRunning, match="does not preempt a failover"):
        await start_procedure(lock_env.client, inventory, "failover", Arg(), "EMERGENCY failover", preempt=True)
    assert (await planned.describe()).status == WorkflowExecutionStatus.RUNNING
    await planned.terminate()


async def test_preemption_is_bounded_when_the_routine_does_not_stop(lock_env, inventory):
    stuck = await start_procedure(lock_env.client, inventory, "maintenance", Arg(ignore_cancel=True), "maintenance")
    await wait_running(stuck)
    with pytest.raises(ClientError, match="still running after") as exc:
        await start_procedure(lock_env.client, inventory, "failover", Arg(), "EMERGENCY failover", preempt=True,
                              preempt_timeout=timedelta(seconds=1))
    assert exc.value.code == 1
    await stuck.terminate()


async def test_a_given_workflow_id_is_still_one_at_a_time(lock_env, inventory):
    wid = f"custom-{uuid.uuid4().hex[:6]}"
    first = await start_procedure(lock_env.client, inventory, "maintenance", Arg(), "m", workflow_id=wid)
    with pytest.raises(ProcedureRunning):
        await start_procedure(lock_env.client, inventory, "maintenance", Arg(), "m", workflow_id=wid)
    await first.terminate()
