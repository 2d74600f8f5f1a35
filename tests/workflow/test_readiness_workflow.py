"""Readiness: every check of a failover's preflight, changing nothing; not ready names what is not."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError

from opsflow.client import start_procedure
from opsflow.contracts.db import DB_STATUS
from opsflow.contracts.k8s import K8S_STATUS
from opsflow.contracts.traffic import TRAFFIC_STATUS
from opsflow.models import ReadinessReport
from tests.workflow.conftest import worker_holds
from workflows.readiness import ReadinessInput


async def run(env, inventory, **kw) -> ReadinessReport:
    worker_holds(inventory)
    inp = ReadinessInput(inventory=inventory, requester="schedule:ready", **kw)
    handle = await start_procedure(env.client, inventory, "readiness", inp, "test readiness")
    try:
        return ReadinessReport.model_validate(await handle.result())
    except WorkflowFailureError as e:
        return ReadinessReport.model_validate(e.cause.details[0])


def failing(report: ReadinessReport) -> list[tuple[str, str | None]]:
    return [(c.check, c.region) for c in report.checks if not c.ok]


async def test_a_healthy_environment_is_ready_and_nothing_changed(running, world, inventory):
    report = await run(running, inventory)
    assert report.status == "succeeded" and report.ready and report.primary_region == "eastus"
    assert {(c.check, c.region) for c in report.checks} >= {("database", None), ("replica", "westeurope"),
                                                           ("kubernetes", "westeurope"), ("traffic", None),
                                                           ("workers", None)}
    assert world.unchanged and not world.rebuilds
    assert set(world.calls) <= {DB_STATUS.name, K8S_STATUS.name, TRAFFIC_STATUS.name}  # reads only


@pytest.mark.parametrize("breakage, expected", [
    (lambda w: setattr(w, "streaming", False), [("replica", "westeurope")]),
    (lambda w: w.replay.update(westeurope=0), [("replica", "westeurope")]),  # 48 MiB behind, over the limit
    (lambda w: setattr(w, "kube_ready", False), [("kubernetes", "westeurope")]),
    (lambda w: w.reachable.update(westeurope=False), [("database", "westeurope")]),
    # A fenced primary: no writable primary, and the fenced one protects nothing.
    (lambda w: w.fenced.add("eastus"), [("database", None), ("replica", "eastus")]),
    (lambda w: setattr(w, "serving", "westeurope"), [("traffic", None)]),
    (lambda w: w.fail.update({K8S_STATUS.name: "forbidden"}), [("kubernetes", "westeurope")]),
])
async def test_not_ready_names_what_is_not_and_every_check_still_runs(running, world, inventory, breakage, expected):
    breakage(world)
    report = await run(running, inventory)
    assert report.status == "failed" and report.ready is False and report.failure.startswith("not ready: ")
    assert failing(report) == expected
    assert any(c.check == "workers" for c in report.checks)  # the checks after the failing one ran too
    assert world.primary == "eastus" and not world.maintenance and world.promotions == 0


async def test_a_queue_without_worker_is_not_ready(running, world, inventory):
    world.unserved.add(inventory.region_queue("westeurope"))
    report = await run(running, inventory)
    assert failing(report) == [("workers", None)] and inventory.region_queue("westeurope") in report.failure


async def test_dry_run_lists_the_checks(running, world, inventory):
    report = await run(running, inventory, dry_run=True)
    assert report.status == "planned" and world.calls == []
    assert [s.name for s in report.steps] == ["database-eastus", "database-westeurope", "kubernetes-eastus",
                                              "kubernetes-westeurope", "traffic", "workers"]


async def test_each_region_feeds_the_readiness_gauge(running, world, inventory):
    """What `opsflow_readiness_ok{environment,region}` (worker/metrics.py) makes of a run: a region is ready when its
    own checks and the environment's pass."""
    from worker.metrics import OpsMetrics

    metrics = OpsMetrics()
    metrics.record_end(await run(running, inventory))
    env = inventory.environment
    assert [metrics.registry.get_sample_value("opsflow_readiness_ok", {"environment": env, "region": r})
            for r in ("eastus", "westeurope")] == [1, 1]
    world.streaming = False
    metrics.record_end(await run(running, inventory))
    assert [metrics.registry.get_sample_value("opsflow_readiness_ok", {"environment": env, "region": r})
            for r in ("eastus", "westeurope")] == [1, 0]


async def test_the_report_is_kept_like_every_procedures(running, world, inventory):
    report = await run(running, inventory)
    assert sorted(p.rsplit(".", 1)[1] for p in report.stored_at) == ["html", "json", "md"]
    kept = ReadinessReport.model_validate_json(open(next(p for p in report.stored_at if p.endswith(".json"))).read())
    assert kept.workflow_id == report.workflow_id and kept.checks == report.checks
    # The page `opsflow report --html` writes, its signatures checked against the worker's inventory.
    page = open(next(p for p in report.stored_at if p.endswith(".html")), encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "the worker&#x27;s inventory" in page
    assert page.count('class="step ') == len(report.steps)
