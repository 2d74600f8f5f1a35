"""The worker process: serves the task queues of one or many environments until SIGTERM/SIGINT, then shuts down
gracefully.

A fleet is the normal case: `opsflow worker --env a.yaml --env b.yaml` or `--env DIR` (every *.yaml in it) runs
one process with one Temporal client and one activity thread pool, and a Temporal worker per task queue (the
environment's workflow queue, and one per region). Queues two inventories share are served once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from opsflow.client import ClientError, connect, inventory_paths
from opsflow.inventory import Inventory, InventoryError
from opsflow.procedures import LAUNCHERS, REPORT_TYPES
from opsflow.scrub import ScrubInterceptor
from worker.metrics import Endpoint, MetricsInterceptor, OpsMetrics, free_port, watch

log = logging.getLogger("opsflow.worker")


# A cancellation reaches an activity only in the answer to a heartbeat, and the SDK sends heartbeats at most
# every 80 % of the heartbeat timeout (30 s by default): cap that, so an abort stops a long step within seconds.
HEARTBEAT_THROTTLE = timedelta(seconds=2)


@dataclass
class FleetSettings:
    """How much one process takes on. Defaults suit a few environments; see README "A worker for a fleet"."""

    activity_threads: int = 64  # the one thread pool every sync activity of every environment runs on
    max_concurrent_activities: int = 50  # per task queue
    max_cached_workflows: int = 1000  # per workflow queue: histories kept in memory between workflow tasks
    # long polls per queue and task type; default 5, and 2 (the least) past 4 environments
    polls_per_queue: int | None = None
    # workflow task polls of a workflow queue (a fleet's shared queue wants ~20); default: as above
    workflow_polls: int | None = None
    # Workflow tasks at once per workflow queue (the SDK's default is 100). They run one at a time on the GIL anyway;
    # 100 at once only held memory: 1000 procedures peaked at 541 MB RSS with 100, 298 MB with 20
    # (bench/concurrency.py).
    workflow_tasks: int = 20
    # How long a procedure's next workflow task waits for the worker that ran the last one (which has its history in
    # memory) before any worker takes it and replays the history: what a worker killed mid-procedure costs each of
    # its procedures. The SDK's default; shorter means more replays when a busy worker is merely slow.
    sticky_timeout: int = 10

    def polls(self, environments: int) -> int:
        return max(2, self.polls_per_queue or (5 if environments <= 4 else 2))


def build_workers(
    client: Client,
    inv: Inventory,
    regions: list[str] | None,
    executor: ThreadPoolExecutor,
    serve_workflows: bool = True,
    settings: FleetSettings | None = None,
    skip_queues: set[str] | None = None,
    environments: int = 1,
    metrics: OpsMetrics | None = None,
    router_queues: list[str] | None = None,
) -> list[Worker]:
    """The Temporal workers one environment needs, leaving out queues already served (`skip_queues`); with
    `metrics`, each procedure's end is counted (worker/metrics.py). With `router_queues` (`--router-queue`: the
    worker on the NGINX host) only those of the environment's router/host-workload queues, nothing else."""
    from worker.registry import (
        GLOBAL_ACTIVITIES,
        REGION_ACTIVITIES,
        ROUTER_ACTIVITIES,
        WORKFLOWS,
    )  # every workflow and activity: not for `opsflow --help`
    from worker.trust import trust_interceptor

    s = settings or FleetSettings()
    polls = s.polls(environments)
    workflow_polls = max(2, s.workflow_polls or polls)
    skip = skip_queues if skip_queues is not None else set()
    # The worker's own check of who started and approved a run; no resolved secret in a failure; the metrics.
    interceptors = [trust_interceptor(client), ScrubInterceptor()]
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics, LAUNCHERS))
    common = dict(
        activity_executor=executor,
        graceful_shutdown_timeout=timedelta(seconds=30),
        interceptors=interceptors,
        max_concurrent_activities=min(s.max_concurrent_activities, s.activity_threads),
        max_concurrent_activity_task_polls=polls,
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
    )
    workers = []
    if router_queues is not None:
        mine = inv.rollout.router_queues() if inv.rollout else set()
        for queue in sorted(q for q in router_queues if q in mine and q not in skip):
            skip.add(queue)
            workers.append(Worker(client, task_queue=queue, activities=ROUTER_ACTIVITIES, **common))
        return workers
    if serve_workflows and inv.task_queue not in skip:
        skip.add(inv.task_queue)
        workers.append(
            Worker(
                client,
                task_queue=inv.task_queue,
                workflows=WORKFLOWS,
                activities=GLOBAL_ACTIVITIES,
                max_cached_workflows=s.max_cached_workflows,
                max_concurrent_workflow_task_polls=workflow_polls,
                max_concurrent_workflow_tasks=max(s.workflow_tasks, workflow_polls),
                sticky_queue_schedule_to_start_timeout=timedelta(seconds=s.sticky_timeout),
                **common,
            )
        )
    for region in regions if regions is not None else list(inv.regions):
        queue = inv.region_queue(region)
        if queue in skip:
            continue
        skip.add(queue)
        workers.append(Worker(client, task_queue=queue, activities=REGION_ACTIVITIES, **common))
    # a rollout router's own queue (`router.queue`: the worker on the NGINX host), served by a worker of all regions
    for queue in sorted(inv.rollout.router_queues() if inv.rollout and regions is None else []):
        if queue not in skip:
            skip.add(queue)
            workers.append(Worker(client, task_queue=queue, activities=ROUTER_ACTIVITIES, **common))
    return workers


async def run(inventories: list[Inventory], regions: list[str] | None, serve_workflows: bool, metrics_port: int | None,
              settings: FleetSettings | None = None, metrics_address: str = "127.0.0.1",
              router_queues: list[str] | None = None) -> None:
    settings = settings or FleetSettings()
    runtime = None
    metrics = endpoint = None
    if metrics_port:
        # The SDK's exporter on an internal loopback port; ours serves both, with /healthz and /readyz, on the given
        # one.
        sdk_port = free_port()
        runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{sdk_port}")))
        metrics = OpsMetrics()
        metrics.serve([inv.environment for inv in inventories], sorted(REPORT_TYPES))
        endpoint = Endpoint(metrics, metrics_address, metrics_port, sdk_port)
        endpoint.start()
    client = await connect(runtime=runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(max_workers=settings.activity_threads, thread_name_prefix="activity") as executor:
        served: set[str] = set()
        workers = []
        for inv in inventories:
            workers += build_workers(
                client, inv, regions, executor, serve_workflows, settings, served, len(inventories), metrics,
                router_queues,
            )
        tasks = [asyncio.create_task(w.run()) for w in workers]
        queues = [w.task_queue for w in workers]
        watcher = None
        if metrics is not None:
            poll = float(os.environ.get("OPSFLOW_METRICS_POLL_SECONDS") or 15)
            watcher = asyncio.create_task(
                watch(
                    client, metrics, endpoint, {inv.environment for inv in inventories}, queues, poll, serve_workflows
                )
            )
        envs = ", ".join(inv.environment for inv in inventories)
        log.info("worker for %s serving %s", envs, ", ".join(queues))
        print(
            f"opsflow worker: environment{'s' if len(inventories) > 1 else ''} {envs}, task queues {', '.join(queues)}",
            flush=True,
        )
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and t.exception():
                raise t.exception()  # type: ignore[misc]
        print("opsflow worker: shutting down (finishing running activities)", flush=True)
        if watcher is not None:
            watcher.cancel()
            endpoint.ready, endpoint.ready_detail = False, "shutting down"
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        if endpoint is not None:
            endpoint.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="opsflow worker", description="Run a worker for one or many inventories' task queues."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FleetSettings()
    parser.add_argument("--env", dest="inventory", action="append",
                        help="inventory YAML, or a directory of them (repeatable; default: the running lab's)")
    parser.add_argument("--region", action="append", help="serve only this region's activity queue (repeatable)")
    parser.add_argument(
        "--no-workflows", action="store_true", help="do not serve the workflow queue (a region-only worker)"
    )
    parser.add_argument(
        "--no-regions", action="store_true", help="serve only the workflow queue (workflows, notifications, reports)"
    )
    parser.add_argument("--router-queue", action="append", metavar="QUEUE",
                        help="serve only this router's queue (router.queue / workload.queue in the inventory): the "
                        "worker on the NGINX host, running the router's and the host workload's activities "
                        "(repeatable; no workflows, no regions)")
    parser.add_argument("--metrics-port", type=int, default=_env_int("OPSFLOW_WORKER_METRICS_PORT", 0) or None,
                        help="serve /metrics (opsflow's and the SDK's), /healthz and /readyz on PORT")
    parser.add_argument("--metrics-address", default=os.environ.get("OPSFLOW_WORKER_METRICS_ADDRESS") or "127.0.0.1",
                        help="the address the metrics port binds (default 127.0.0.1; 0.0.0.0 in a pod)")
    fleet = parser.add_argument_group("fleet settings (also OPSFLOW_WORKER_* environment variables)")
    fleet.add_argument(
        "--activity-threads",
        type=int,
        default=_env_int("OPSFLOW_WORKER_ACTIVITY_THREADS", d.activity_threads),
        help=f"threads shared by all environments' activities (default {d.activity_threads})",
    )
    fleet.add_argument("--max-concurrent-activities", type=int,
                       default=_env_int("OPSFLOW_WORKER_MAX_CONCURRENT_ACTIVITIES", d.max_concurrent_activities),
                       help=f"activities at once per task queue (default {d.max_concurrent_activities})")
    fleet.add_argument(
        "--max-cached-workflows",
        type=int,
        default=_env_int("OPSFLOW_WORKER_MAX_CACHED_WORKFLOWS", d.max_cached_workflows),
        help=f"workflows kept in memory per environment (default {d.max_cached_workflows})",
    )
    fleet.add_argument("--polls-per-queue", type=int, default=_env_int("OPSFLOW_WORKER_POLLS_PER_QUEUE", 0) or None,
                       help="long polls per task queue and type (default 5; 2 when serving more than 4 environments)")
    fleet.add_argument(
        "--workflow-polls",
        type=int,
        default=_env_int("OPSFLOW_WORKER_WORKFLOW_POLLS", 0) or None,
        help="workflow task polls per workflow queue (default: --polls-per-queue's); ~20 for a fleet's shared queue",
    )
    fleet.add_argument(
        "--workflow-tasks",
        type=int,
        default=_env_int("OPSFLOW_WORKER_WORKFLOW_TASKS", d.workflow_tasks),
        help=f"workflow tasks at once per workflow queue (default {d.workflow_tasks}; at least --workflow-polls)",
    )
    fleet.add_argument(
        "--sticky-timeout",
        type=int,
        default=_env_int("OPSFLOW_WORKER_STICKY_TIMEOUT", d.sticky_timeout),
        metavar="SECONDS",
        help=f"how long a procedure's next step waits for the worker that ran its last one before another takes it "
        f"(default {d.sticky_timeout}: what a killed worker costs each of its procedures)",
    )


def load_inventories(given: list[str] | None, regions: list[str] | None) -> list[Inventory]:
    from activities.rules import RULEBOOK  # the worker's inventories are the rules its procedures run by

    inventories = RULEBOOK.load(inventory_paths(given))
    names = [inv.environment for inv in inventories]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ClientError(f"two inventories describe the same environment: {', '.join(dup)}")
    for inv in inventories:
        for r in regions or []:
            inv.region(r)
    return inventories


def check_router_queues(inventories: list[Inventory], queues: list[str], args: argparse.Namespace) -> None:
    """`--router-queue`: each queue one an inventory's router or host workload names; alone (no region flags)."""
    if args.region or getattr(args, "no_regions", False) or args.no_workflows:
        raise ClientError("--router-queue serves only router queues: leave out --region, --no-regions and "
                          "--no-workflows")
    have = {q for inv in inventories for q in (inv.rollout.router_queues() if inv.rollout else set())}
    for q in queues:
        if q not in have:
            raise ClientError(f"--router-queue {q}: no router.queue or workload.queue of "
                              f"{', '.join(inv.environment for inv in inventories)} names it (they name: "
                              f"{', '.join(sorted(have)) or 'none'})")


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router_queues = getattr(args, "router_queue", None)
    try:
        inventories = load_inventories(args.inventory, args.region)
        if router_queues:
            check_router_queues(inventories, router_queues, args)
    except (InventoryError, ClientError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    from activities import secrets

    # Secret stores use one set of cloud connections per process: a fleet's inventories must agree on them.
    connections = {
        (inv.aws.model_dump_json() if inv.aws else None, inv.azure.model_dump_json() if inv.azure else None)
        for inv in inventories
    }
    if len(connections) > 1:
        log.warning(
            "inventories name different aws/azure connections; secret stores use those of %s",
            inventories[0].environment,
        )
    secrets.configure(inventories[0])
    settings = FleetSettings(
        activity_threads=args.activity_threads,
        max_concurrent_activities=args.max_concurrent_activities,
        max_cached_workflows=args.max_cached_workflows,
        polls_per_queue=args.polls_per_queue,
        workflow_polls=args.workflow_polls,
        workflow_tasks=args.workflow_tasks,
        sticky_timeout=args.sticky_timeout,
    )
    regions = [] if getattr(args, "no_regions", False) else args.region
    asyncio.run(run(inventories, regions, not args.no_workflows and not router_queues, args.metrics_port, settings,
                    getattr(args, "metrics_address", "127.0.0.1"), router_queues or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
