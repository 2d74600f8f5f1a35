#!/usr/bin/env python3
"""One worker process for many environments, as `bench/concurrency.py` runs it (a subprocess, so its RSS is its own).

    python bench/fleet_worker.py --inventories DIR [--activity-threads N] [--max-concurrent-activities N]
                                 [--max-cached-workflows N] [--max-concurrent-workflow-tasks N] [--polls N]

Every *.yaml in DIR is an inventory; the process serves each one's workflow queue and region queues with one
Temporal client, one activity thread pool, and one `temporalio.worker.Worker` per task queue (queues two
inventories share are served once). The same shape as `opsflow worker --env a.yaml --env b.yaml` (branch
wt-client); the bench keeps its own copy so it can set every knob. Prints "ready" once all workers run.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from temporalio.worker import Worker  # noqa: E402

from opsflow.client import connect  # noqa: E402
from worker.registry import GLOBAL_ACTIVITIES, REGION_ACTIVITIES, WORKFLOWS  # noqa: E402


async def serve(args: argparse.Namespace) -> None:
    from activities.rules import RULEBOOK  # the worker's rules, as opsflow's worker loads them

    inventories = RULEBOOK.load(sorted(Path(args.inventories).glob("*.yaml")))
    client = await connect()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workflows = WORKFLOWS
    if args.lean_show:
        sys.path.insert(0, str(ROOT / "bench"))
        from lean_workflows import WORKFLOWS as workflows
    common = dict(
        graceful_shutdown_timeout=timedelta(seconds=5),
        max_concurrent_activities=args.max_concurrent_activities,
        max_concurrent_activity_task_polls=args.polls,
    )
    with ThreadPoolExecutor(max_workers=args.activity_threads, thread_name_prefix="activity") as executor:
        served: set[str] = set()
        workers: list[Worker] = []
        for inv in inventories:
            if inv.task_queue not in served:
                served.add(inv.task_queue)
                workers.append(
                    Worker(
                        client,
                        task_queue=inv.task_queue,
                        workflows=workflows,
                        activities=GLOBAL_ACTIVITIES,
                        activity_executor=executor,
                        max_cached_workflows=args.max_cached_workflows,
                        max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
                        max_concurrent_workflow_task_polls=args.workflow_polls or args.polls,
                        **common,
                    )
                )
            for region in inv.regions:
                queue = inv.region_queue(region)
                if queue not in served:
                    served.add(queue)
                    workers.append(
                        Worker(
                            client, task_queue=queue, activities=REGION_ACTIVITIES, activity_executor=executor, **common
                        )
                    )
        tasks = [asyncio.create_task(w.run()) for w in workers]
        print(f"ready: {len(inventories)} environments, {len(workers)} task queues", flush=True)
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and t.exception():
                raise t.exception()  # type: ignore[misc]
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inventories", required=True)
    p.add_argument("--activity-threads", type=int, default=64)
    p.add_argument("--max-concurrent-activities", type=int, default=50, help="per task queue")
    p.add_argument("--max-cached-workflows", type=int, default=1000, help="per workflow queue")
    p.add_argument(
        "--max-concurrent-workflow-tasks", type=int, default=20, help="per workflow queue (default 20; the SDK's 100)"
    )
    p.add_argument("--polls", type=int, default=2, help="long polls per queue and task type (the SDK's least is 2)")
    p.add_argument(
        "--workflow-polls",
        type=int,
        default=None,
        help="workflow task polls per workflow queue (default --polls); "
        "a fifth of them poll the worker's sticky queue, where every cached workflow's next task goes",
    )
    p.add_argument(
        "--lean-show", action="store_true", help="the procedures with the proposed show() fix (bench/lean_workflows.py)"
    )
    asyncio.run(serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
