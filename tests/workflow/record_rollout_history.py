"""Record the rollout procedures' histories for the replay test (tests/workflow/test_replay.py).

    python -m tests.workflow.record_rollout_history canary|bluegreen \
        [healthy|worker-rules|held-checked|nginx-fresh|first-look|host|workers-checked]

As record_history.py: a recorded history is never re-recorded (the recorder refuses to overwrite)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import sys
from datetime import timedelta
from pathlib import Path

from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.rules import RULEBOOK
from opsflow.client import send_update
from opsflow.inventory import Inventory
from opsflow.temporal import DATA_CONVERTER, register_search_attributes
from tests.conftest import venv_binary
from tests.workflow.test_canary_workflow import (
    CHECKS,
    FRESH,
    HOST,
    NEW,
    NGINX,
    Cluster,
    app_with,
    counted_inventory,
    make_inventory,
)
from workflows.canary import BlueGreenWorkflow, CanaryWorkflow, RolloutInput
from workflows.procedure import Procedure, Request

HISTORIES = Path(__file__).parent / "histories"


async def record(name: str, variant: str = "healthy") -> None:
    """variant `healthy`: as recorded first; `worker-rules`: the input without rules, the worker's in the history;
    `held-checked` (issue 21): as worker-rules, plus the canary sized per weight, HTTP checks in every bake and a
    freeze that begins during the run (15 min after the start, for an hour) and holds it; `nginx-fresh` (issue
    21): as worker-rules, the nginx router (router.* activities, route-stable) and a fresh baseline; `first-look`
    (issue 21): as worker-rules, limits that count the canary's requests (`analysis.requests`): the canary waits
    to be scraped (`scraped`), each bake looks every step in its first interval, a look with too few requests is
    no verdict (patches first-look-sooner, limit-min-requests); `host` (issue 21): as nginx-fresh, the app a host
    workload, its activities and the router's on the NGINX host's queue; `workers-checked` (stop 29): as host (a
    blue-green: as worker-rules), the preflight first checks a worker serves each queue the rollout uses, the NGINX
    host's among them (the kernel's check-workers patch)."""
    new_shape = variant in ("worker-rules", "held-checked", "nginx-fresh", "first-look", "host", "workers-checked")
    out = HISTORIES / f"{name}_{variant}.json"
    if out.exists():
        raise SystemExit(f"{out} exists: recorded histories are never re-recorded; record a new one under a new name")
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server")
    ) as env:
        await register_search_attributes(env.client)
        inv = make_inventory()
        if variant == "held-checked":
            now = await env.get_current_time()
            freeze = {"name": "incident", "start": (now + timedelta(minutes=15)).isoformat(),
                      "end": (now + timedelta(minutes=75)).isoformat()}
            inv = make_inventory(freezes=[freeze], checks=CHECKS)
        if variant == "nginx-fresh":
            inv = make_inventory(apps=app_with(NGINX), analysis=FRESH)
        if variant == "first-look":
            inv = counted_inventory(checks=CHECKS)
        if variant == "host" or variant == "workers-checked" and name == "canary":  # blue-green: not on hosts
            web = {**app_with({**NGINX, "queue": "opsflow-replay-lb"})["web"], "workload": HOST}
            inv = make_inventory(apps={"web": web}, analysis=FRESH)
        if new_shape:  # runs under its environment's lock: opsflow-replay
            inv = Inventory.model_validate({**inv.model_dump(mode="json"), "environment": "replay"})
            RULEBOOK.add(inv)
        cluster = Cluster()
        if variant == "first-look":
            cluster.rps, cluster.unseen = 1.0, 1  # 10 requests at the first look: not enough yet
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            queues = [inv.task_queue, *(inv.region_queue(r) for r in inv.regions), *sorted(inv.rollout.router_queues())]
            workers = [
                Worker(
                    env.client,
                    task_queue=q,
                    workflows=[CanaryWorkflow, BlueGreenWorkflow],
                    activities=cluster.activities(),
                    activity_executor=ex,
                )
                for q in queues
            ]
            async with contextlib.AsyncExitStack() as stack:
                for w in workers:
                    await stack.enter_async_context(w)
                inp = RolloutInput(
                    inventory=inv, image=NEW, strategy=name, auto_promote=True, requester="alice", reason="replay"
                )
                handle = await env.client.start_workflow(
                    name, inp.without_rules(inv) if new_shape else inp, id="opsflow-replay", task_queue=inv.task_queue
                )
                while (await handle.query("progress", result_type=dict)).get("current_step") != "approval":
                    await asyncio.sleep(0.05)
                await send_update(handle, Procedure.approve, Request(by="carol", reason="replay"))
                await send_update(handle, Procedure.approve, Request(by="dave", reason="replay"))
                await handle.result()
                history = await handle.fetch_history()
    out.write_text(json.dumps(json.loads(history.to_json()), indent=1))
    print(f"recorded {out} ({len(history.events)} events)")


if __name__ == "__main__":
    asyncio.run(record(*sys.argv[1:3]))
