"""The worker's metrics interceptor (worker/metrics.py): a procedure's end is counted once, where it happens, from its
report (success and failure alike), and never again when its history is replayed."""

from __future__ import annotations

import concurrent.futures

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.worker import Replayer

from opsflow.client import send_update
from opsflow.procedures import LAUNCHERS
from opsflow.temporal import DATA_CONVERTER
from tests.workflow.conftest import HEARTBEATS, WORKFLOWS, queue_workers
from tests.workflow.test_failover_workflow import start, until_waiting
from worker.metrics import MetricsInterceptor, OpsMetrics
from workflows.procedure import Procedure, Request


def sample(metrics: OpsMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_ends_are_counted_once_and_not_on_replay(env, world, inventory):
    metrics = OpsMetrics()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        workers = queue_workers(env.client, inventory, world.activities(), ex,
                                interceptors=[MetricsInterceptor(metrics, LAUNCHERS)], **HEARTBEATS)
        async with workers[0], workers[1], workers[2]:
            rejected = await start(env, inventory)
            await until_waiting(rejected)
            await send_update(rejected, Procedure.reject, Request(by="bob", reason="not now"))
            with pytest.raises(WorkflowFailureError):
                await rejected.result()
            approved = await start(env, inventory)
            await until_waiting(approved)
            await send_update(approved, Procedure.approve, Request(by="bob", reason="go"))
            report = await approved.result()

    env_name = inventory.environment
    assert sample(metrics, "opsflow_procedure_runs_total", procedure="failover", environment=env_name,
                  outcome="aborted") == 1  # a failure's report rides in its ApplicationError's details
    assert sample(metrics, "opsflow_procedure_runs_total", procedure="failover", environment=env_name,
                  outcome="succeeded") == 1
    assert sample(metrics, "opsflow_procedure_duration_seconds_count", procedure="failover", environment=env_name) == 2
    assert sample(metrics, "opsflow_failover_rto_seconds", environment=env_name) == pytest.approx(report["rto_seconds"])
    assert sample(metrics, "opsflow_failover_rpo_bytes", environment=env_name) == 0

    # Replaying both histories (a worker restart, a query on a closed run) counts nothing.
    again = OpsMetrics()
    replayer = Replayer(workflows=WORKFLOWS, data_converter=DATA_CONVERTER, interceptors=[MetricsInterceptor(again)])
    for handle in (rejected, approved):
        await replayer.replay_workflow(await handle.fetch_history())
    assert sample(again, "opsflow_procedure_runs_total", procedure="failover", environment=env_name,
                  outcome="succeeded") is None
    assert sample(again, "opsflow_failover_rto_seconds", environment=env_name) is None


def test_gates_come_and_go():
    m = OpsMetrics()
    m.set_gates([("failover", "prod", "approval", 12.0, 3600.0)])
    assert sample(m, "opsflow_gate_waiting", procedure="failover", environment="prod", gate="approval") == 1
    assert sample(m, "opsflow_gate_timeout_seconds", procedure="failover", environment="prod", gate="approval") == 3600
    m.set_gates([])
    assert sample(m, "opsflow_gate_waiting", procedure="failover", environment="prod", gate="approval") is None


def test_a_dry_run_and_a_failed_drill_leave_the_last_success_alone():
    m = OpsMetrics()
    base = dict(procedure="drill", environment="prod", started_at="2026-01-01T00:00:00Z")
    m.record_end({**base, "status": "succeeded", "ended_at": "2026-01-01T00:10:00Z"})
    m.record_end({**base, "status": "failed", "ended_at": "2026-02-01T00:10:00Z"})
    m.record_end({**base, "status": "planned", "dry_run": True, "ended_at": "2026-03-01T00:00:00Z"})
    assert sample(m, "opsflow_drill_last_success_timestamp_seconds", environment="prod") == 1767226200
    assert sample(m, "opsflow_procedure_runs_total", procedure="drill", environment="prod", outcome="failed") == 1
    assert sample(m, "opsflow_procedure_duration_seconds_count", procedure="drill", environment="prod") == 2


def test_a_breached_watch_is_counted_for_the_environment_of_its_queue(inventory):
    from tests.workflow.conftest import worker_holds

    worker_holds(inventory)
    m = OpsMetrics()
    m.record_watch(inventory.task_queue, {"ok": False, "results": [
        {"name": "error_rate", "query": "q", "breached": True}, {"name": "p95", "query": "q2", "breached": False}]})
    env = inventory.environment
    assert sample(m, "opsflow_maintenance_watch_breaches_total", environment=env, query="error_rate") == 1
    assert sample(m, "opsflow_maintenance_watch_breaches_total", environment=env, query="p95") is None
