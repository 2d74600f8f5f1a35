"""Record a procedure's history for the replay test (tests/workflow/test_replay.py).

    python -m tests.workflow.record_history NAME        # NAME: one of RECORDINGS below

A recorded history is evidence that in-flight runs of that day's code keep working: it is never
re-recorded to make a replay pass (the recorder refuses to overwrite). A change to a procedure that would
break it uses `workflow.patched`; a new shape of a procedure gets a NEW recording beside the old ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
from pathlib import Path

from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from activities.rules import RULEBOOK
from opsflow.client import send_update
from opsflow.inventory import Inventory
from opsflow.temporal import DATA_CONVERTER, register_search_attributes
from tests.conftest import venv_binary
from tests.workflow.conftest import inventory_dict, queue_workers
from tests.workflow.world import World
from workflows.procedure import Procedure, Request

HISTORIES = Path(__file__).parent / "histories"


async def waiting_for(handle: WorkflowHandle, what: str) -> None:
    while what not in ((await handle.query("progress", result_type=dict)).get("waiting_for") or ""):
        await asyncio.sleep(0.05)


async def planned(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.failover import FailoverInput

    handle = await start(env, inv, "failover", FailoverInput(inventory=inv, to_region="westeurope", requester="alice"))
    await waiting_for(handle, "approval")
    try:
        await send_update(handle, Procedure.approve, Request(by="alice"))  # refused: never reaches history
    except WorkflowUpdateFailedError:
        pass
    await send_update(handle, Procedure.pause, Request(by="alice"))
    await send_update(handle, Procedure.approve, Request(by="bob", reason="replay"))
    await asyncio.sleep(0.5)
    await send_update(handle, Procedure.resume, Request(by="alice"))
    return handle


async def emergency(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.failover import FailoverInput

    world.reachable["eastus"] = False
    return await start(
        env, inv, "failover", FailoverInput(inventory=inv, to_region="westeurope", emergency=True, requester="alice")
    )


async def failback(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.failback import FailbackInput

    world.primary, world.serving = "westeurope", "westeurope"
    world.fenced.add("eastus")
    world.replay = {"eastus": world.lsn - 65536}
    handle = await start(env, inv, "failback", FailbackInput(inventory=inv, to_region="eastus", requester="alice"))
    await waiting_for(handle, "approval")
    await send_update(handle, Procedure.approve, Request(by="bob", reason="eastus is back"))
    return handle


async def drill(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.drill import DrillInput

    return await start(env, inv, "drill", DrillInput(inventory=inv, requester="schedule:monthly"))


async def scheduled(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.drill import DrillInput
    from workflows.scheduled import LaunchInput

    arg = DrillInput(inventory=inv, requester="schedule:monthly").model_dump(mode="json")
    launch = LaunchInput(procedure="drill", environment=inv.environment, task_queue=inv.task_queue, arg=arg)
    return await env.client.start_workflow("scheduled", launch, id="opsflow-replay-monthly", task_queue=inv.task_queue)


async def cancelled(env, inv: Inventory, world: World) -> WorkflowHandle:
    """A planned failover cancelled through Temporal during the drain: an abort with its undo."""
    from workflows.failover import FailoverInput

    handle = await start(env, inv, "failover", FailoverInput(inventory=inv, to_region="westeurope", requester="alice"))
    await waiting_for(handle, "approval")
    await send_update(handle, Procedure.approve, Request(by="bob", reason="replay"))
    await waiting_for(handle, "Drain")
    await handle.cancel()
    return handle


async def failback_switchover(env, inv: Inventory, world: World) -> WorkflowHandle:
    """A failback after a switchover (issue 20): eastus already streams from westeurope, nothing is rebuilt."""
    from workflows.failback import FailbackInput

    world.primary, world.serving, world.promotions = "westeurope", "westeurope", 1
    world.timelines["eastus"] = 2
    world.replay = {"eastus": world.lsn}
    handle = await start(env, inv, "failback", FailbackInput(inventory=inv, to_region="eastus", requester="alice"))
    await waiting_for(handle, "approval")
    await send_update(handle, Procedure.approve, Request(by="bob", reason="switch back"))
    return handle


async def scheduled_signed(env, inv: Inventory, world: World) -> WorkflowHandle:
    from workflows.drill import DrillInput
    from workflows.scheduled import LaunchInput

    arg = DrillInput(inventory=inv, requester="schedule:monthly").without_rules(inv).model_dump(mode="json")
    launch = LaunchInput(procedure="drill", environment=inv.environment, task_queue=inv.task_queue, arg=arg,
                         schedule_id="opsflow-replay", by="alice")
    return await env.client.start_workflow("scheduled", launch, id="opsflow-replay-monthly", task_queue=inv.task_queue)


async def readiness(env, inv: Inventory, world: World) -> WorkflowHandle:
    """Not ready: the replica stopped streaming (every check still runs; the run fails naming it)."""
    from workflows.readiness import ReadinessInput

    world.streaming = False
    return await start(env, inv, "readiness", ReadinessInput(inventory=inv, requester="schedule:ready"))


RECORDINGS = {
    "failover_planned": planned,
    "failover_emergency": emergency,
    "failback": failback,
    "drill": drill,
    "scheduled": scheduled,
}
# Since the worker holds the rules (issue 18): inputs without rules, the worker's answer in the history.
WORKER_RULES = "-worker-rules"
RECORDINGS.update({f"{k}{WORKER_RULES}": v for k, v in RECORDINGS.items() if k != "scheduled"})
RECORDINGS.update({f"scheduled{WORKER_RULES}": scheduled_signed, f"failover_cancelled{WORKER_RULES}": cancelled,
                   f"readiness{WORKER_RULES}": readiness})
# Switchover first (issue 20): Azure databases under a virtual endpoint; the drain before the fence.
RECORDINGS.update(
    {f"failover_switchover{WORKER_RULES}": planned, f"failback_switchover{WORKER_RULES}": failback_switchover}
)
# The restore test (issue 22): the trend read back at the end (patch drill-trend), whole-run-id report names and
# scratch names by the run id's random part; the MySQL dump restore in one step.
RECORDINGS.update({f"drill_trend{WORKER_RULES}": drill, f"drill_mysqldump{WORKER_RULES}": drill})
# Self-managed switchover and the drain until idle (issue 20): provider postgres whose hosts the worker reaches.
RECORDINGS.update(
    {f"failover_self-managed{WORKER_RULES}": planned, f"failback_self-managed{WORKER_RULES}": failback_switchover}
)


async def planned_autoscalers(env, inv: Inventory, world: World) -> WorkflowHandle:
    """A planned failover where both regions' web has an HPA: raised in the new region, lowered in the old."""
    world.hpas = {"eastus": (3, 10), "westeurope": (1, 2)}
    return await planned(env, inv, world)


# Autoscalers follow a failover (issue 20): the old region's HPAs lowered (patched "autoscalers-follow").
RECORDINGS[f"failover_autoscalers{WORKER_RULES}"] = planned_autoscalers
NEW_SHAPE = False  # set by record() for the worker-rules recordings


async def start(env, inv: Inventory, procedure: str, arg) -> WorkflowHandle:
    if NEW_SHAPE:
        arg = arg.without_rules(inv)
    return await env.client.start_workflow(procedure, arg, id=f"opsflow-{inv.environment}", task_queue=inv.task_queue,
                                           id_conflict_policy=WorkflowIDConflictPolicy.FAIL)


def recording_inventory(name: str, tmp: Path) -> Inventory:
    data = inventory_dict(environment="replay")
    if name.startswith(("drill", "scheduled")):
        data["reports_dir"] = str(tmp / "reports")
        data["drill"] = {
            "method": "s3-dump",
            "dumps": {"bucket": "b"},
            "scratch_server": {"dsn": "host=scratch dbname=postgres"},
            "row_counts": [{"table": "orders"}],
            "checks": [{"name": "no negative totals", "query": "select true"}],
        }
        if "mysqldump" in name:
            data["drill"].pop("scratch_server")
            data["drill"].update(method="s3-mysqldump",
                                 mysql={"database": "shop", "source": {"host": "m", "user": "o"}})
    if "switchover" in name:
        for region, r in data["regions"].items():
            r["database"] = {"provider": "azure-flexible", "dsn": f"host=db-{region} dbname=app user=ops",
                             "subscription_id": "sub", "resource_group": "rg", "server_name": f"pg-{region}",
                             "virtual_endpoint": "ve-shop"}
    if "self-managed" in name:
        for region, r in data["regions"].items():
            r["database"]["host"] = {"run": ["ssh", f"postgres@db-{region}"], "data_dir": "/var/lib/postgresql/15/main"}
    return Inventory.model_validate(data)


async def record(name: str) -> Path:
    import tempfile

    from tests.workflow.test_drill_workflow import Backups

    out = HISTORIES / f"{name}.json"
    if out.exists():
        raise SystemExit(f"{out} exists: recorded histories are never re-recorded; record a new one under a new name")
    global NEW_SHAPE
    NEW_SHAPE = name.endswith(WORKER_RULES)
    world = World()
    with tempfile.TemporaryDirectory() as tmp:
        inv = recording_inventory(name, Path(tmp))
        RULEBOOK.add(inv)  # the recording worker's rules
        acts = Backups().activities() if name.startswith(("drill", "scheduled")) else world.activities()
        async with await WorkflowEnvironment.start_time_skipping(
            data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server")
        ) as env:
            await register_search_attributes(env.client)
            with concurrent.futures.ThreadPoolExecutor(4) as ex:
                workers = queue_workers(env.client, inv, acts, ex)
                async with workers[0], workers[1], workers[2]:
                    handle = await RECORDINGS[name](env, inv, world)
                    try:
                        await handle.result()
                    except Exception:  # a failed run is a history worth replaying too
                        pass
                    history = await handle.fetch_history()
    out.write_text(json.dumps(json.loads(history.to_json()), indent=1))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or sorted(RECORDINGS):
        print(f"wrote {asyncio.run(record(arg))}")
