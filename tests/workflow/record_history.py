"""Record the history of a planned failover (with a rejected approval attempt, a pause and a resume) for the
replay test. Re-run after an intended change to the workflow's commands:
    python -m tests.workflow.record_history
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path

from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from opsflow.inventory import Inventory
from opsflow.temporal import DATA_CONVERTER, register_search_attributes
from opsflow.client import start_procedure
from tests.conftest import venv_binary
from tests.workflow.conftest import inventory_dict
from tests.workflow.world import World
from workflows.failover import FailoverInput, FailoverWorkflow
from workflows.procedure import Request

OUT = Path(__file__).parent / "histories" / "failover_planned.json"


async def record() -> None:
    inv = Inventory.model_validate(inventory_dict(environment="replay"))
    world = World()
    async with await WorkflowEnvironment.start_time_skipping(data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server")) as env:
        await register_search_attributes(env.client)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            acts = world.activities()
            workers = [Worker(env.client, task_queue=q, workflows=[FailoverWorkflow] if q == inv.task_queue else [], activities=acts, activity_executor=ex) for q in inv.all_queues()]
            async with workers[0], workers[1], workers[2]:
                handle = await start_procedure(env.client, inv, "failover", FailoverInput(inventory=inv, to_region="westeurope", requester="alice"), "replay")
                while "approval" not in ((await handle.query("progress", result_type=dict)).get("waiting_for") or ""):
                    await asyncio.sleep(0.05)
                try:
                    await handle.execute_update("approve", Request(by="alice"))
                except WorkflowUpdateFailedError:
                    pass
                await handle.execute_update("pause", Request(by="alice"))
                await handle.execute_update("approve", Request(by="bob", reason="replay"))
                await asyncio.sleep(0.5)
                await handle.execute_update("resume", Request(by="alice"))
                await handle.result()
                history = await handle.fetch_history()
    OUT.write_text(json.dumps(json.loads(history.to_json()), indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    asyncio.run(record())
