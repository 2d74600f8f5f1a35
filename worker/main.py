"""The worker process: serves the inventory's task queues until SIGTERM/SIGINT, then shuts down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from opsflow.inventory import InventoryError, Inventory, load_inventory
from opsflow.temporal import connect_config, data_converter
from worker.registry import GLOBAL_ACTIVITIES, REGION_ACTIVITIES, WORKFLOWS

log = logging.getLogger("opsflow.worker")


def build_workers(client: Client, inv: Inventory, regions: list[str] | None, executor: ThreadPoolExecutor, serve_workflows: bool = True) -> list[Worker]:
    workers = []
    if serve_workflows:
        workers.append(Worker(client, task_queue=inv.task_queue, workflows=WORKFLOWS, activities=GLOBAL_ACTIVITIES, activity_executor=executor,
                              graceful_shutdown_timeout=timedelta(seconds=30)))
    for region in regions if regions is not None else list(inv.regions):
        workers.append(Worker(client, task_queue=inv.region_queue(region), activities=REGION_ACTIVITIES, activity_executor=executor,
                              graceful_shutdown_timeout=timedelta(seconds=30), max_concurrent_activities=50))
    return workers


async def run(inv: Inventory, regions: list[str] | None, serve_workflows: bool, metrics_port: int | None) -> None:
    config = connect_config()
    runtime = None
    if metrics_port:
        runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{metrics_port}")))
    client = await Client.connect(config.pop("target_host"), data_converter=data_converter(), runtime=runtime, **config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="activity") as executor:
        workers = build_workers(client, inv, regions, executor, serve_workflows)
        tasks = [asyncio.create_task(w.run()) for w in workers]
        queues = [w.task_queue for w in workers]
        log.info("worker for %s serving %s", inv.environment, ", ".join(queues))
        print(f"opsflow worker: environment {inv.environment}, task queues {', '.join(queues)}", flush=True)
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and t.exception():
                raise t.exception()  # type: ignore[misc]
        print("opsflow worker: shutting down (finishing running activities)", flush=True)
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsflow worker", description="Run a worker for an inventory's task queues.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", dest="inventory", help="inventory YAML (default: the running lab's)")
    parser.add_argument("--region", action="append", help="serve only this region's activity queue (repeatable)")
    parser.add_argument("--no-workflows", action="store_true", help="do not serve the workflow queue (a region-only worker)")
    parser.add_argument("--metrics-port", type=int, help="expose Prometheus metrics on 127.0.0.1:PORT")


def run_from_args(args: argparse.Namespace) -> int:
    from starters.common import inventory_path

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        inv = load_inventory(inventory_path(args.inventory))
        for r in args.region or []:
            inv.region(r)
    except InventoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from activities import secrets

    secrets.configure(inv)  # secret stores use the inventory's cloud connections
    asyncio.run(run(inv, args.region, not args.no_workflows, args.metrics_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
