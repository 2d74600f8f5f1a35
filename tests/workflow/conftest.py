from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.rules import RULEBOOK
from lab.ports import free_port
from opsflow.inventory import Inventory
from opsflow.procedures import workflow_classes
from opsflow.temporal import DATA_CONVERTER, register_search_attributes
from tests.conftest import dev_server, venv_binary
from tests.workflow.world import World
from worker.main import HEARTBEAT_THROTTLE

WORKFLOWS = workflow_classes()  # what the worker registers (opsflow/procedures.py)


@pytest_asyncio.fixture(scope="module")
async def env():
    """One time-skipping server per test module: skipped time and stray activity attempts stay in it."""
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server"), port=free_port()
    ) as e:
        await register_search_attributes(e.client)
        yield e


@pytest_asyncio.fixture(scope="module")
async def dev_env():
    """A dev server (real time) for what the time-skipping server does not do: Updates while a timer runs
    (temporalio/sdk-java#1903, features#551), DescribeTaskQueue's pollers."""
    async with await dev_server() as e:
        await register_search_attributes(e.client)
        yield e


# Every procedure keeps its report at the end (workflows/kernel/reports.py): the tests' go to a temporary folder.
REPORTS = Path(tempfile.gettempdir()) / "opsflow-test-reports"


def inventory_dict(**overrides) -> dict:
    inv = {
        "environment": f"t{uuid.uuid4().hex[:8]}",
        "primary_region": "eastus",
        "regions": {
            r: {
                "database": {"provider": "postgres", "dsn": f"host=db-{r} dbname=app user=ops"},
                "traffic_endpoint": f"ep-{r}",
                "kubernetes": {"namespace": "shop", "service": "web", "deployments": [{"name": "web", "replicas": 3}]},
                "smoke_urls": [f"http://{r}.example/health"],
            }
            for r in ("eastus", "westeurope")
        },
        "traffic": {
            "provider": "azure-traffic-manager",
            "subscription_id": "sub",
            "resource_group": "rg",
            "profile": "shop",
        },
        "approval": {
            "approvers": ["alice", "bob"],
            "require_distinct_approver": True,
            "timeout": "1h",
            "escalation_channel": "oncall",
        },
        "failover": {"drain": "60s", "max_planned_lag_bytes": 1024 * 1024},
        "reports_dir": str(REPORTS),
        "notifications": [
            {"name": "ops", "url_secret": {"env": "OPSFLOW_TEST_WEBHOOK_OPS"}},
            {"name": "oncall", "url_secret": {"env": "OPSFLOW_TEST_WEBHOOK_ONCALL"}},
        ],
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(inv.get(k), dict):
            inv[k] = {**inv[k], **v}
        else:
            inv[k] = v
    return inv


def with_databases(database: Callable[[str], dict]) -> dict:
    """inventory_dict() whose every region's database is `database(region)` over the default one (another provider,
    the host a self-managed server is reached on...)."""
    inv = inventory_dict()
    for region, r in inv["regions"].items():
        r["database"] = {**r["database"], **database(region)}
    return inv


@pytest.fixture
def inventory(request) -> Inventory:
    """The test inventory; in a module that sets `DATABASES = lambda region: {...}`, with those databases."""
    databases = getattr(request.module, "DATABASES", None)
    return Inventory.model_validate(with_databases(databases) if databases else inventory_dict())


def worker_holds(*inventories: Inventory) -> None:
    """The test worker's rules (README "Who decides the rules"): as a deployed worker loads its inventories."""
    for inv in inventories:
        RULEBOOK.add(inv)


# Heartbeats throttled as opsflow's worker does (2 s), so a cancel reaches a long step within seconds.
HEARTBEATS = dict(max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                  default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE)


def queue_workers(client, inv: Inventory, activities: list, executor, **options) -> list[Worker]:
    """A Temporal worker per task queue of the inventory (its workflow queue first, with the workflows; then one per
    region), each with `activities`: the workers a deployed environment would have, in one process."""
    return [Worker(client, task_queue=q, workflows=WORKFLOWS if q == inv.task_queue else [], activities=activities,
                   activity_executor=executor, **options) for q in inv.all_queues()]


@pytest.fixture
def world() -> World:
    return World()


@pytest_asyncio.fixture
async def running(env, world, inventory):
    """A worker serving every queue of the inventory with the world's stand-in activities."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        workers = queue_workers(env.client, inventory, world.activities(), ex, **HEARTBEATS)
        async with workers[0], workers[1], workers[2]:
            yield env
