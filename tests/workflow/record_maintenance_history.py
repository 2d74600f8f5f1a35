"""Record the maintenance window's histories for the replay test (tests/workflow/test_replay.py):

    python -m tests.workflow.record_maintenance_history [maintenance | maintenance-fleet]

maintenance: a whole window (announce, backup, approval, a table whose lock is held once and retried, health
checks, maintenance mode off, status page completed); maintenance-fleet: two environments, one at a time;
maintenance_watch-during-repack_worker-rules: a repack task and watch.during, the app judged after each table,
worse after the second (no further table started, the rest deferred, the alert).
Like every recorded history it is never re-recorded (the recorder refuses to overwrite).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
from pathlib import Path

from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.rules import RULEBOOK
from opsflow.procedures import fleet_workflow_id
from opsflow.temporal import DATA_CONVERTER, register_search_attributes
from tests.conftest import venv_binary
from tests.workflow.test_maintenance_workflow import (
    QUEUE,
    WATCHED,
    MaintWorld,
    approve_when_waiting,
    maint_inventory,
)
from workflows.maintenance import FleetInput, MaintenanceFleetWorkflow, MaintenanceInput, MaintenanceWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def record(name: str) -> Path:
    out = HISTORIES / f"{name}.json"
    if out.exists():
        raise SystemExit(f"{out} exists: recorded histories are never re-recorded; record a new one under a new name")
    world = MaintWorld()
    world.lock_held["public.orders"] = 1
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server")
    ) as env:
        await register_search_attributes(env.client)
        now = await env.get_current_time()
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            async with Worker(
                env.client,
                task_queue=QUEUE,
                workflows=[MaintenanceWorkflow, MaintenanceFleetWorkflow],
                activities=world.activities(),
                activity_executor=ex,
            ):
                # Since the worker holds the rules (issue 18): inputs without rules, the worker's answer in the history.
                new_shape = name.endswith("_worker-rules")
                if name.startswith("maintenance_") or name == "maintenance":
                    inv = maint_inventory(now, env="replay")
                    if "watch-during" in name:
                        inv = maint_inventory(now, env="replay", watch=WATCHED, tasks=[
                            {"kind": "vacuum-analyze", "tables": ["public.orders"]},
                            {"kind": "repack", "tables": ["public.events", "public.orders"]},
                        ])
                        world.app_worse_after.add("repack:public.events")
                    RULEBOOK.add(inv)
                    inp = MaintenanceInput(inventory=inv, requester="alice", reason="replay")
                    handle = await env.client.start_workflow(
                        MaintenanceWorkflow.run,
                        inp.without_rules(inv) if new_shape else inp,
                        id="opsflow-replay",
                        task_queue=QUEUE,
                    )
                    await approve_when_waiting(handle)
                else:
                    invs = [maint_inventory(now, env=e) for e in ("replay-a", "replay-b")]
                    for inv in invs:
                        RULEBOOK.add(inv)
                    fleet = FleetInput(inventories=invs, requester="alice", max_concurrency=1)
                    wid = fleet_workflow_id([i.environment for i in invs]) if new_shape else "opsflow-replay"
                    handle = await env.client.start_workflow(
                        MaintenanceFleetWorkflow.run,
                        fleet.without_rules() if new_shape else fleet,
                        id=wid,
                        task_queue=QUEUE,
                    )
                    for inv in invs:
                        child = env.client.get_workflow_handle(f"opsflow-{inv.environment}")
                        while True:  # the fleet starts it once the one before has ended
                            try:
                                await child.describe()
                                break
                            except RPCError:
                                await asyncio.sleep(0.05)
                        await approve_when_waiting(child)
                await handle.result()
                history = await handle.fetch_history()
    out.write_text(json.dumps(json.loads(history.to_json()), indent=1))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or [
        "maintenance",
        "maintenance-fleet",
        "maintenance_worker-rules",
        "maintenance-fleet_worker-rules",
    ]:
        print(f"wrote {asyncio.run(record(arg))}")
