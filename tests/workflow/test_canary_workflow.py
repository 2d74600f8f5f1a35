"""Canary and blue-green logic on the time-skipping server, activities stood in by name; the judge is the real one.
Updates sent while a bake or a rollback window waits run on a dev server instead (real time, short bakes): the
time-skipping server hangs on an Update during a timer (temporalio/sdk-java#1903, features#551).

The stand-in cluster keeps stable, canary, the route's weights and the blue-green colours; the stand-in
Prometheus answers with figures chosen per test (a healthy canary looks like stable; a faulty one has errors;
a "marginal" one is worse on one non-critical metric)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import CancelledError
from temporalio.worker import Worker

from activities.analysis import judge_step
from activities.reports import store_report
from activities.rules import worker_inventory
from opsflow.client import send_update
from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
from opsflow.contracts.notify import NOTIFY_SEND
from opsflow.contracts.rollout import (
    HTTP_CHECKS,
    K8S_CREATE_CANARY,
    K8S_CREATE_COLOUR,
    K8S_DELETE_CANARY,
    K8S_ROLLOUT_STATUS,
    K8S_SCALE_CANARY,
    K8S_SCALE_DEPLOYMENT,
    K8S_SET_IMAGE,
    K8S_SET_WEIGHT,
    K8S_SWITCH_SERVICE,
    PROMETHEUS_SAMPLES,
    ROUTER_SET_WEIGHT,
    ROUTER_STATUS,
)
from opsflow.inventory import AzureConnection, Inventory
from opsflow.models import NotifyRequest
from opsflow.rollout import (
    CheckResult,
    ChecksRequest,
    DeploymentRequest,
    ImageRequest,
    MetricSamples,
    RolloutState,
    RolloutTarget,
    RouterState,
    Samples,
    SamplesRequest,
    WeightRequest,
)
from opsflow.rollout_report import RolloutReport
from tests.workflow.conftest import inventory_dict, worker_holds
from worker.main import HEARTBEAT_THROTTLE
from workflows.canary import BlueGreenWorkflow, CanaryWorkflow, Rollout, RolloutInput
from workflows.procedure import Procedure, Request

OLD, NEW = "registry/shop:1.0", "registry/shop:1.1"


@dataclass
class Cluster:
    stable_image: str = OLD
    canary_image: str | None = None
    weights: dict = field(default_factory=lambda: {"web": 100})
    selector: str = "web"  # blue-green: the deployment the service selects
    colours: dict = field(default_factory=lambda: {"web": OLD})
    replicas: dict = field(default_factory=lambda: {"web": 3})
    behaviour: str = "healthy"  # healthy | faulty | late-faulty | slow | marginal | quiet
    weight_log: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    notifications: list = field(default_factory=list)
    block: dict = field(default_factory=dict)  # activity name -> threading.Event it waits for (heartbeating)
    started: dict = field(default_factory=dict)  # activity name -> threading.Event set when it starts
    failing_checks: set = field(default_factory=set)  # names of the HTTP checks that fail
    baseline_image: str | None = None  # analysis.baseline: fresh: web-baseline's image
    router_queues: list = field(default_factory=list)  # the queue each router.* activity ran on
    sampled: list = field(default_factory=list)  # (canary, baseline) deployments of each Prometheus query
    router_azure: list = field(default_factory=list)  # the ARM connection each router.set_weight was given
    rps: float | None = None  # the canary's requests a second, counted from the bake's start (analysis.requests)
    unseen: int = 0  # with rps: how many Prometheus queries do not know the canary's series yet
    ran_on: list = field(default_factory=list)  # (activity, task queue) of every call
    unserved: set = field(default_factory=set)  # task queues no worker serves
    asked_queues: list = field(default_factory=list)  # the queues the preflight asked about

    def state(self) -> RolloutState:
        return RolloutState(
            stable="web",
            stable_image=self.stable_image,
            stable_desired=3,
            stable_ready=3,
            stable_done=True,
            canary="web-canary" if self.canary_image else None,
            canary_image=self.canary_image,
            canary_ready=1 if self.canary_image else 0,
            weights=dict(self.weights),
            active=self.selector,
            canary_replicas=self.replicas.get("web-canary", 1) if self.canary_image else 0,
            colours=dict(self.colours),
            replicas=dict(self.replicas),
        )

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        self.ran_on.append((name, activity.info().task_queue))
        self.started.setdefault(name, threading.Event()).set()
        gate = self.block.pop(name, None)  # blocks the first call only (the undo may call it again)
        while gate is not None and not gate.is_set():
            activity.heartbeat()
            if activity.is_cancelled():
                raise CancelledError("cancelled")
            gate.wait(0.05)

    @property
    def stable_at_100(self) -> bool:
        return (self.canary_image is None and self.baseline_image is None and self.weights == {"web": 100}
                and self.stable_image == OLD)

    def figures(self, deployment: str, metric: str, baseline: bool) -> list[float]:
        rng = np.random.default_rng(abs(hash((deployment, metric, baseline))) % 2**32)
        base = {"error-rate": 0.0, "p95-latency": 0.05, "p50-latency": 0.02, "cpu": 0.3}[metric]
        values = [base] * 30 if metric == "error-rate" else list(rng.normal(base, base * 0.05, 30))
        b = self.behaviour
        if not baseline:
            if b == "faulty" and metric == "error-rate":
                values = list(rng.uniform(0.1, 0.2, 30))
            if b == "late-faulty" and metric == "error-rate":  # no 5xx series for 26 steps (filled zeros), then 15 %
                values = [0.0] * 26 + [0.15] * 4
            if b == "slow" and metric == "p95-latency":
                values = [v + 0.3 for v in values]
            if b == "marginal" and metric == "cpu":
                values = [v * 1.6 for v in values]
        return values

    def activities(self):
        c = self

        @K8S_ROLLOUT_STATUS.implementation
        def rollout_status(t: RolloutTarget) -> RolloutState:
            c._enter(K8S_ROLLOUT_STATUS.name)
            return c.state()

        @K8S_CREATE_CANARY.implementation
        def create_canary(r: ImageRequest) -> RolloutState:
            c._enter(K8S_CREATE_CANARY.name)
            if r.target.canary_suffix == "-baseline":
                c.baseline_image = r.image
            else:
                c.canary_image = r.image
            return c.state()

        @K8S_SCALE_CANARY.implementation
        def scale_canary(r: WeightRequest) -> RolloutState:
            c._enter(K8S_SCALE_CANARY.name)
            c.replicas[r.target.canary] = max(1, -(-3 * r.canary_weight // 100))
            return c.state()

        def shares(weights: dict) -> dict:
            return {role: weights.get(svc, 0) for role, svc in
                    (("stable", "web"), ("canary", "web-canary"), ("baseline", "web-baseline"))}

        @ROUTER_STATUS.implementation
        def router_status(t: RolloutTarget) -> RouterState:
            c._enter(ROUTER_STATUS.name)
            c.router_queues.append(activity.info().task_queue)
            return RouterState(kind=t.app.router.kind, router="stand-in", weights=shares(c.weights))

        @ROUTER_SET_WEIGHT.implementation
        def router_set_weight(r: WeightRequest) -> RouterState:
            c._enter(ROUTER_SET_WEIGHT.name)
            c.router_queues.append(activity.info().task_queue)
            c.router_azure.append(r.target.azure)
            want = r.shares()
            c.weights = {svc: want[role] for role, svc in
                         (("stable", "web"), ("canary", "web-canary"), ("baseline", "web-baseline"))
                         if want.get(role) or role == "stable"}
            c.weight_log.append((r.canary_weight, "+baseline") if r.baseline else r.canary_weight)
            return RouterState(kind=r.target.app.router.kind, router="stand-in", weights=shares(c.weights),
                               detail=str(want))

        @K8S_SET_WEIGHT.implementation
        def set_weight(r: WeightRequest) -> RolloutState:
            c._enter(K8S_SET_WEIGHT.name)
            c.weights = {"web": 100 - r.canary_weight, "web-canary": r.canary_weight}
            c.weight_log.append(r.canary_weight)
            return c.state()

        @K8S_DELETE_CANARY.implementation
        def delete_canary(t: RolloutTarget) -> RolloutState:
            c._enter(K8S_DELETE_CANARY.name)
            if t.canary_suffix == "-baseline":
                c.calls[-1] = "delete-baseline"
                c.baseline_image = None
                c.weights.pop("web-baseline", None)
                return c.state()
            c.weights = {"web": 100}
            c.canary_image = None
            return c.state()

        @K8S_SET_IMAGE.implementation
        def set_image(r: ImageRequest) -> RolloutState:
            c._enter(K8S_SET_IMAGE.name)
            c.stable_image = r.image
            return c.state()

        @K8S_CREATE_COLOUR.implementation
        def create_colour(r: ImageRequest) -> RolloutState:
            c._enter(K8S_CREATE_COLOUR.name)
            other = "web-green" if c.selector == "web" else "web"
            c.colours[other], c.replicas[other] = r.image, 3
            return c.state()

        @K8S_SWITCH_SERVICE.implementation
        def switch_service(r: DeploymentRequest) -> RolloutState:
            c._enter(K8S_SWITCH_SERVICE.name)
            c.selector = r.deployment
            return c.state()

        @K8S_SCALE_DEPLOYMENT.implementation
        def scale_deployment(r: DeploymentRequest) -> RolloutState:
            c._enter(K8S_SCALE_DEPLOYMENT.name)
            c.replicas[r.deployment] = r.replicas
            return c.state()

        @PROMETHEUS_SAMPLES.implementation
        def samples(r: SamplesRequest) -> Samples:
            c._enter(PROMETHEUS_SAMPLES.name)
            c.sampled.append((r.canary, r.baseline))
            requests = 5.0 if c.behaviour == "quiet" else 1000.0
            window = (r.end - r.start).total_seconds()
            recent = seen = None
            if c.rps is not None:  # traffic since the weight moved, as Prometheus counts it
                requests, recent = c.rps * window, c.rps * min(window, r.analysis.interval)
                seen, c.unseen = c.unseen <= 0, c.unseen - 1
            return Samples(
                canary_recent_requests=recent,
                canary_seen=seen,
                metrics=[
                    MetricSamples(
                        name=m.name,
                        canary=c.figures(r.canary, m.name, False),
                        baseline=c.figures(r.baseline, m.name, True),
                        canary_filled=26 if c.behaviour == "late-faulty" and m.name == "error-rate" else 0,
                    )
                    for m in r.analysis.metrics
                ],
                canary_requests=requests,
                baseline_requests=requests * 3,
                start=r.start,
                end=r.end,
            )

        @HTTP_CHECKS.implementation
        def checks(r: ChecksRequest) -> list[CheckResult]:
            c._enter(HTTP_CHECKS.name)
            return [CheckResult(name=k.name, ok=k.name not in c.failing_checks, critical=k.critical,
                                status=500 if k.name in c.failing_checks else 200,
                                reason="HTTP 500, expected 200" if k.name in c.failing_checks else "HTTP 200")
                    for k in r.checks]

        @NOTIFY_SEND.implementation
        def notify(r: NotifyRequest) -> None:
            c.notifications.append(r.notification.text)

        @TEMPORAL_UNSERVED_QUEUES.implementation
        def unserved_queues(queues: list[str]) -> list[str]:
            c.asked_queues.extend(queues)
            return [q for q in queues if q in c.unserved]

        return [
            worker_inventory,
            store_report,
            rollout_status,
            create_canary,
            scale_canary,
            set_weight,
            delete_canary,
            set_image,
            create_colour,
            switch_service,
            scale_deployment,
            samples,
            notify,
            judge_step,
            checks,
            router_status,
            router_set_weight,
            unserved_queues,
        ]


ROLLOUT = {
    "apps": {
        "web": {
            "region": "eastus",
            "deployment": "web",
            "container": "web",
            "service": "web",
            "router": {"name": "web"},
        }
    },
    "analysis": {
        "prometheus": "http://prometheus.example:9090",
        "interval": "60s",
        "min_requests": 100,
        "metrics": [
            {
                "name": "error-rate",
                "query": 'errors{deployment="{deployment}"}',
                "max": 0.05,
                "direction": "increase",
                "critical": True,
            },
            {
                "name": "p95-latency",
                "query": 'p95{deployment="{deployment}"}',
                "max": 1.0,
                "direction": "increase",
                "critical": True,
            },
            {"name": "p50-latency", "query": 'p50{deployment="{deployment}"}', "direction": "increase"},
            {"name": "cpu", "query": 'cpu{deployment="{deployment}"}', "direction": "increase"},
        ],
    },
    "steps": [5, 25, 50, 100],
    "bake": "10m",
    "rollback_window": "10m",
    "approval": {
        "approvers": {"platform-lead": ["carol", "erin"], "qa": ["dave"]},
        "require": ["platform-lead", "qa"],
        "timeout": "2h",
    },
}


def make_inventory(**rollout) -> Inventory:
    return Inventory.model_validate(inventory_dict(rollout={**ROLLOUT, **rollout}))


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def workers_for(env, cluster):
    CLOCK["env"] = env
    queue = f"rollout-{uuid.uuid4().hex[:8]}"
    acts = cluster.activities()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        yield (
            queue,
            [
                Worker(
                    env.client,
                    task_queue=q,
                    workflows=[CanaryWorkflow, BlueGreenWorkflow] if q == queue else [],
                    activities=acts,
                    activity_executor=ex,
                    max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                    default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                )  # as opsflow's worker: aborts in seconds
                for q in (queue, f"{queue}-eastus", f"{queue}-westeurope")
            ],
            ex,
        )


@pytest_asyncio.fixture
async def worker(env, cluster):
    made = workers_for(env, cluster)  # Workers are made inside the event loop
    yield next(made)
    made.close()


@pytest_asyncio.fixture
async def dev_worker(dev_env, cluster):
    made = workers_for(dev_env, cluster)
    yield next(made)
    made.close()


async def start(env, worker, inventory: Inventory, procedure="canary", **kw):
    queue, _, _ = worker
    inv = inventory.model_copy(update={"workflow_task_queue": queue})
    for r, region in inv.regions.items():
        region.task_queue = f"{queue}-{r}"
    inp = RolloutInput(
        inventory=inv, image=kw.pop("image", NEW), strategy=procedure, requester=kw.pop("requester", "alice"), **kw
    )
    worker_holds(inv)
    return await env.client.start_workflow(procedure, inp, id=f"opsflow-{inv.environment}", task_queue=queue,
                                           id_conflict_policy=WorkflowIDConflictPolicy.FAIL)


async def progress(handle) -> RolloutReport:
    return RolloutReport.model_validate(await handle.query("progress", result_type=dict))


CLOCK = {}


async def until(handle, predicate, what: str, polls: int = 60) -> RolloutReport:
    """Poll the progress query; between polls let the time-skipping server move on 60 s (bakes are minutes);
    on the dev server poll every 50 ms for up to `polls` seconds."""
    skipping = CLOCK["env"].supports_time_skipping
    for _ in range(polls if skipping else polls * 20):
        r = await progress(handle)
        if predicate(r):
            return r
        await (CLOCK["env"].sleep(60) if skipping else asyncio.sleep(0.05))
    raise AssertionError(f"never reached {what}: status {r.status}, step {r.current_step}, waiting for {r.waiting_for}")


async def approve_quorum(handle) -> None:
    await until(handle, lambda r: r.current_step == "approval" and r.status == "waiting", "the approval gate")
    await send_update(handle, Procedure.approve, Request(by="carol", reason="platform ok"))
    await send_update(handle, Procedure.approve, Request(by="dave", reason="qa ok"))


async def failed(handle) -> RolloutReport:
    with pytest.raises(WorkflowFailureError) as exc:
        await handle.result()
    return RolloutReport.model_validate(exc.value.cause.details[0])


@contextlib.asynccontextmanager
async def serving(worker):
    """The three workers of the `worker`/`dev_worker` fixture, running for the block."""
    _, (for_workflows, eastus, westeurope), _ = worker
    async with for_workflows, eastus, westeurope:
        yield


async def freeze_covering_now(env, name: str) -> dict:
    """A freeze around the test server's clock, which runs decades ahead of the real one once the module's earlier
    tests have skipped time (2056-2096 seen; a fixed freeze ending in 2100 was sometimes already over)."""
    now = await env.get_current_time()
    return {
        "name": name,
        "start": (now - timedelta(days=1)).isoformat(),
        "end": (now + timedelta(days=365)).isoformat(),
    }


# -- canary --------------------------------------------------------------------------------------------------


async def test_healthy_canary_steps_bakes_judges_and_promotes(env, worker, cluster):
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and not report.rolled_back
    assert (
        cluster.weight_log == [5, 25, 50, 0]  # 0: traffic back on stable before the canary is removed
        and cluster.stable_image == NEW
        and cluster.canary_image is None
        and cluster.weights == {"web": 100}
    )
    assert report.previous_image == OLD and report.image == NEW and report.weights == [5, 25, 50, 100]
    judged = [a for a in report.analysis if a.kind == "judge"]
    assert [a.weight for a in judged] == [5, 25, 50] and all(a.verdict == "pass" for a in judged)
    assert {m.name for m in judged[0].metrics} == {"error-rate", "p95-latency", "p50-latency", "cpu"}
    assert all(m.canary is not None and m.baseline is not None for m in judged[0].metrics)
    bakes = [s for s in report.steps if s.name.startswith("bake-")]
    assert [round(s.seconds) for s in bakes] == [600, 600, 600]  # skipped by time, still the configured bake
    assert {d.by for d in report.approvals} == {"carol", "dave"} and {r for d in report.approvals for r in d.roles} == {
        "platform-lead",
        "qa",
    }
    names = [s.name for s in report.steps]
    assert (
        names.index("approval")
        < names.index("create-canary")
        < names.index("weight-5")
        < names.index("promote")
        < names.index("cleanup")
    )


async def test_the_canary_is_sized_for_each_weight_before_the_weight_moves(env, worker, cluster):
    async with serving(worker):
        handle = await start(env, worker, make_inventory(), auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    moves = [c for c in cluster.calls if c in (K8S_SCALE_CANARY.name, ROUTER_SET_WEIGHT.name)]
    assert moves == [K8S_SCALE_CANARY.name, ROUTER_SET_WEIGHT.name] * 3 + [ROUTER_SET_WEIGHT.name]  # capacity first
    names = [s.name for s in report.steps]
    assert [n for n in names if n.startswith(("scale-", "weight-"))] == [
        "scale-5", "weight-5", "scale-25", "weight-25", "scale-50", "weight-50"]
    details = {s.name: s.detail for s in report.steps}
    assert details["scale-5"] == "web-canary 1 replica(s), stable 3"
    assert details["scale-50"] == "web-canary 2 replica(s), stable 3"


async def test_quorum_needs_both_roles_each_by_a_different_person(env, worker, cluster):
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True, requester="alice")
        await until(handle, lambda r: r.current_step == "approval", "the approval gate")
        await send_update(handle, Procedure.approve, Request(by="carol"))
        r = await until(handle, lambda r: "qa" in (r.waiting_for or ""), "the gate asking for qa")
        assert "still needs" in r.waiting_for and cluster.calls == [K8S_ROLLOUT_STATUS.name]
        with pytest.raises(WorkflowUpdateFailedError):  # another platform lead does not make a qa approval
            await send_update(handle, Procedure.approve, Request(by="carol"))
        await send_update(handle, Procedure.approve, Request(by="erin"))
        r = await progress(handle)
        assert r.current_step == "approval" and "qa" in r.waiting_for and K8S_CREATE_CANARY.name not in cluster.calls
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Procedure.approve, Request(by="mallory"))
        assert "may not approve" in str(exc.value.cause)
        await send_update(handle, Procedure.approve, Request(by="dave"))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded"


async def test_faulty_canary_is_rolled_back_weight_zero_first_naming_the_metric(env, worker, cluster):
    cluster.behaviour = "faulty"
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.status == "failed" and report.rolled_back
    assert "error-rate" in report.rollback_reason and "above the limit 0.05" in report.rollback_reason
    assert cluster.weight_log == [5, 0]  # weight 0 first ...
    # ... then removed
    assert cluster.calls.index(K8S_DELETE_CANARY.name) > len(cluster.calls) - 1 - cluster.calls[::-1].index(
        ROUTER_SET_WEIGHT.name
    )
    assert cluster.stable_at_100 and K8S_SET_IMAGE.name not in cluster.calls
    breach = report.analysis[-1]
    assert breach.kind == "interval" and breach.metrics[0].name == "error-rate" and breach.metrics[0].canary > 0.05
    assert any("rolled back" in n for n in cluster.notifications)


async def test_a_limit_is_judged_on_the_recent_samples_not_diluted_by_filled_zeros(env, worker, cluster):
    """Patch "limit-on-recent-samples": the 5xx series appears late (26 filled zeros, then 15 %): the whole
    window's mean (2 %) is under the 5 % limit, the recent samples' is not -- rolled back at the first look."""
    cluster.behaviour = "late-faulty"
    async with serving(worker):
        handle = await start(env, worker, make_inventory(), auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and "above the limit 0.05" in report.rollback_reason
    breach = report.analysis[-1]
    assert breach.kind == "interval" and [(m.name, m.canary, m.canary_samples) for m in breach.metrics] == [
        ("error-rate", 0.15, 4)
    ]


def counted_inventory(**rollout) -> Inventory:
    """Limits that count the canary's requests (`analysis.requests`): looks every 60 s, one sample per 10 s."""
    analysis = {**ROLLOUT["analysis"], "step": "10s", **rollout.pop("analysis", {}),
                "requests": 'sum(increase(req{deployment="{deployment}"}[{interval}]))'}
    return make_inventory(analysis=analysis, **rollout)


async def test_the_first_look_comes_as_soon_as_the_canary_served_enough_requests(env, worker, cluster):
    """Patch "first-look-sooner": in its first interval (60 s) a bake looks every query step (10 s); a look with
    fewer than limit_min_requests (20) canary requests is no verdict and runs no HTTP check. A faulty canary at
    1 request/s: 10 requests at 10 s (not enough yet), 20 at 20 s: rolled back then, 40 s before the old first
    look."""
    cluster.behaviour, cluster.rps, cluster.unseen = "faulty", 1.0, 2
    inv = counted_inventory(checks=[{"name": "smoke", "url": "http://web.example/health"}])
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and "error-rate breach" in report.rollback_reason and cluster.weight_log == [5, 0]
    # before any traffic: Prometheus scrapes the canary (asked every 10 s: not yet, not yet, yes)
    names = [s.name for s in report.steps]
    assert names.index("scale-5") < names.index("scraped") < names.index("weight-5")
    scraped = next(s for s in report.steps if s.name == "scraped")
    assert scraped.outcome == "ok" and scraped.detail.startswith("web-canary's requests are counted (after ")
    assert float(scraped.detail.rsplit(" ", 1)[1].rstrip("s)")) == pytest.approx(20, abs=1)
    moved = cluster.calls.index(ROUTER_SET_WEIGHT.name)
    assert cluster.calls[moved - 4:moved] == [K8S_SCALE_CANARY.name] + [PROMETHEUS_SAMPLES.name] * 3
    breach = report.analysis[-1]
    assert breach.kind == "interval" and breach.weight == 5 and breach.canary_requests == pytest.approx(20, abs=1)
    assert (breach.end - breach.start).total_seconds() == pytest.approx(20, abs=1)
    baked = cluster.calls[cluster.calls.index(ROUTER_SET_WEIGHT.name) + 1:]
    baked = baked[:baked.index(ROUTER_SET_WEIGHT.name)]  # from the weight's move to its undo
    assert baked == [PROMETHEUS_SAMPLES.name, PROMETHEUS_SAMPLES.name, HTTP_CHECKS.name]


async def test_a_healthy_canary_is_looked_at_soon_then_every_interval(env, worker, cluster):
    cluster.rps = 1.0
    async with serving(worker):
        inv = counted_inventory(steps=[50, 100], checks=[{"name": "smoke", "url": "http://web.example/health"}])
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    bake = next(s for s in report.steps if s.name == "bake-50")
    # every 10 s in the first minute (10 requests at 10 s: not enough yet), then every 60 s to 600 s
    assert bake.detail == "15 check(s), no limit broken (1 with not enough traffic yet)"
    baked = cluster.calls[cluster.calls.index(ROUTER_SET_WEIGHT.name) + 1:]
    s, c = PROMETHEUS_SAMPLES.name, HTTP_CHECKS.name  # the checks: at 20 s (the first verdict), then at 60 s
    assert baked[:8] == [s, s, c, s, s, s, s, c] and baked[8:10] == [s, c]
    assert [a.verdict for a in report.analysis] == ["pass"]


async def test_a_burst_of_errors_on_too_little_traffic_is_left_to_a_person(env, worker, cluster):
    """Patch "limit-min-requests": a canary whose error rate is over its limit (judged by the limit alone, not the
    rank test) but that served 6 requests in the whole bake (one error is 17 %) breaks no limit -- every look says
    not enough traffic yet -- and the judge says inconclusive: a person decides (the old arithmetic rolled it back
    at the first look)."""
    cluster.behaviour, cluster.rps = "faulty", 0.01
    metrics = [{**ROLLOUT["analysis"]["metrics"][0], "judge": False}, *ROLLOUT["analysis"]["metrics"][1:]]
    async with serving(worker):
        handle = await start(env, worker, counted_inventory(analysis={"metrics": metrics}), auto_promote=True)
        await approve_quorum(handle)
        r = await until(handle, lambda r: r.current_step == "decide-5" and r.status == "waiting", "the decision at 5 %")
        assert cluster.weights == {"web": 95, "web-canary": 5} and not r.rolled_back
        bake = next(s for s in r.steps if s.name == "bake-5")
        assert bake.outcome == "ok" and "not enough traffic yet" in bake.detail
        judged = r.analysis[-1]
        assert judged.kind == "judge" and judged.verdict == "inconclusive" and not judged.failed_metrics()
        assert "limits not judged (not enough traffic yet: 6 canary request(s) in the last 600s" in judged.reason
        await send_update(handle, Procedure.abort, Request(by="alice", reason="too little traffic to tell"))
        report = await failed(handle)
    assert report.status == "aborted" and report.rolled_back and cluster.stable_at_100


async def test_judge_failure_without_a_broken_limit_rolls_back(env, worker, cluster):
    cluster.behaviour = "slow"  # +300 ms on p95: below its 1 s limit, but clearly worse than stable
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and "p95-latency high" in report.rollback_reason
    verdict = report.analysis[-1]
    assert verdict.kind == "judge" and verdict.verdict == "fail" and verdict.score == 0  # a critical metric failed
    p95 = next(m for m in verdict.metrics if m.name == "p95-latency")
    assert p95.verdict == "high" and p95.estimate == pytest.approx(0.3, abs=0.02)
    assert cluster.stable_at_100


async def test_marginal_pauses_for_a_person_then_promote_goes_on(env, worker, cluster):
    cluster.behaviour = "marginal"  # cpu 60 % higher: 3 of 4 metrics pass -> score 75 -> marginal
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        r = await until(handle, lambda r: r.current_step == "decide-5" and r.status == "waiting", "the decision at 5 %")
        assert r.analysis[-1].verdict == "marginal" and r.analysis[-1].score == 75
        assert cluster.canary_image == NEW and cluster.weights == {"web": 95, "web-canary": 5}  # no automatic rollback
        with pytest.raises(WorkflowUpdateFailedError):
            await send_update(handle, Rollout.promote, Request(by="mallory"))
        await send_update(handle, Rollout.promote, Request(by="alice", reason="cpu is expected to rise"))
        await until(handle, lambda r: r.current_step == "decide-25", "the decision at 25 %")
        await send_update(handle, Rollout.promote, Request(by="alice", full=True))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.stable_image == NEW
    assert cluster.weight_log == [5, 25, 0]  # --full: straight to 100 %
    assert [e.action for e in report.promoted_by] == ["promote", "promote-full"]


async def test_low_traffic_is_inconclusive_never_a_pass(env, worker, cluster):
    cluster.behaviour = "quiet"
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        r = await until(handle, lambda r: r.current_step == "decide-5", "the decision at 5 %")
        assert r.analysis[-1].verdict == "inconclusive" and "only 5 canary requests" in r.analysis[-1].reason
        await send_update(handle, Procedure.abort, Request(by="alice", reason="not enough traffic today"))
        report = await failed(handle)
    assert report.status == "aborted" and report.rolled_back and cluster.stable_at_100


async def test_without_auto_promote_a_person_promotes_at_the_end(env, worker, cluster):
    inv = make_inventory(steps=[50, 100])
    async with serving(worker):
        handle = await start(env, worker, inv)
        await approve_quorum(handle)
        await until(handle, lambda r: r.current_step == "promote-gate", "the promotion gate")
        assert cluster.stable_image == OLD
        await send_update(handle, Rollout.promote, Request(by="bob"))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.stable_image == NEW


@pytest.mark.parametrize("when", ["approval", "bake-5", "bake-25", "decide-5", "promote-gate"])
async def test_abort_at_every_step_leaves_stable_at_100(dev_env, dev_worker, cluster, when):
    """On the dev server: the abort reaches the workflow while a bake (a real 10-minute timer) or a gate waits."""
    if when == "decide-5":
        cluster.behaviour = "marginal"
    # the 5 % bake is passed quickly where the abort is aimed later (a gate waits for it; a bake aimed at lasts 2 s)
    quick = {"bake-25": ("2s", "1s"), "decide-5": ("1s", "0.5s"), "promote-gate": ("1s", "0.5s")}
    bake, interval = quick.get(when, (None, None))
    inv = (
        make_inventory(bake=bake, analysis={**ROLLOUT["analysis"], "interval": interval}) if bake else make_inventory()
    )
    async with serving(dev_worker):
        handle = await start(dev_env, dev_worker, inv, auto_promote=when != "promote-gate")
        if when != "approval":
            await approve_quorum(handle)
        await until(handle, lambda r: r.current_step == when, when)
        await send_update(handle, Procedure.abort, Request(by="alice", reason=f"abort at {when}"))
        report = await failed(handle)
    assert report.status == "aborted"
    assert cluster.stable_at_100, (when, cluster)
    if when != "approval":
        assert report.rolled_back
    aborted = next(e for e in report.events if e.action == "abort")
    assert (report.ended_at - aborted.at).total_seconds() < 10, "rolled back within seconds of the abort"


async def test_freeze_and_window_refuse_before_anything_changes(env, worker, cluster):
    frozen = make_inventory(freezes=[await freeze_covering_now(env, "black friday")])
    async with serving(worker):
        report = await failed(await start(env, worker, frozen))
        assert report.status == "refused" and "black friday" in report.failure and cluster.calls == []
        closed = make_inventory(windows=[{"days": ["mon"], "start": "03:00", "end": "03:01"}])  # open one minute a week
        report = await failed(await start(env, worker, closed))
        assert report.status == "refused" and "outside the deployment windows" in report.failure and cluster.calls == []


async def test_override_by_an_approver_with_a_reason(env, worker, cluster):
    frozen = make_inventory(freezes=[await freeze_covering_now(env, "sale")])
    async with serving(worker):
        handle = await start(env, worker, frozen, override=True, auto_promote=True)
        await until(handle, lambda r: r.current_step == "window" and r.status == "waiting", "the override")
        assert cluster.calls == []
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Procedure.override, Request(by="alice", reason="hotfix"))
        assert "may not override" in str(exc.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Procedure.override, Request(by="carol"))
        assert "needs a reason" in str(exc.value.cause)
        await send_update(handle, Procedure.override, Request(by="carol", reason="security fix CVE-2026-1"))
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded"
    assert [(o.by, o.reason) for o in report.overrides] == [("carol", "security fix CVE-2026-1")]


async def freeze_from(env, name: str, after: timedelta, lasting: timedelta) -> dict:
    now = await env.get_current_time()
    return {"name": name, "start": (now + after).isoformat(), "end": (now + after + lasting).isoformat()}


async def test_a_freeze_that_begins_during_the_run_holds_the_weight_until_it_ends(env, worker, cluster):
    """Bakes of 10 minutes: the freeze begins at 15 min, during the bake at 25 %. That bake and its judgement go
    on; then no further step (the weight stays 25 %, the figures are still read) until the freeze ends at 75 min."""
    freeze = await freeze_from(env, "incident", timedelta(minutes=15), timedelta(hours=1))
    async with serving(worker):
        handle = await start(env, worker, make_inventory(freezes=[freeze]), auto_promote=True)
        await approve_quorum(handle)
        held = await until(handle, lambda r: r.held is not None, "the hold", polls=120)
        assert held.current_step == "hold-50" and "incident" in held.held and held.held.startswith("at 25 %")
        assert "opsflow override" in held.waiting_for and cluster.weights == {"web": 75, "web-canary": 25}
        assert held.status == "running"
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.weight_log == [5, 25, 50, 0] and report.held is None
    steps = {s.name: s for s in report.steps}
    hold = steps["hold-50"]
    assert hold.outcome == "ok" and "the calendar opened" in hold.detail and "check(s), no limit broken" in hold.detail
    assert steps["weight-50"].started_at >= datetime.fromisoformat(freeze["end"])  # nothing moved in the freeze
    assert steps["judge-25"].ended_at >= datetime.fromisoformat(freeze["start"])  # the bake went on into it
    assert "hold-5" not in steps and "hold-25" not in steps  # open then: nothing held
    assert any("held at 25 %" in n and "incident" in n for n in cluster.notifications)


async def test_on_freeze_rollback_rolls_back_when_a_freeze_begins_during_a_bake(env, worker, cluster):
    freeze = await freeze_from(env, "incident", timedelta(minutes=15), timedelta(hours=1))
    async with serving(worker):
        handle = await start(env, worker, make_inventory(freezes=[freeze], on_freeze="rollback"), auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.status == "failed" and report.rolled_back and cluster.stable_at_100
    assert "incident" in report.rollback_reason and "on_freeze: rollback" in report.rollback_reason
    bake = next(s for s in report.steps if s.name == "bake-25")
    assert bake.outcome == "failed" and bake.ended_at < datetime.fromisoformat(freeze["start"]) + timedelta(minutes=2)
    assert cluster.weight_log == [5, 25, 0]


async def test_a_hold_ends_by_an_approvers_override_not_by_the_requesters_promote(dev_env, dev_worker, cluster):
    """On the dev server (Updates during a hold's timer): a freeze begins seconds into the run."""
    freeze = await freeze_from(dev_env, "incident", timedelta(seconds=3), timedelta(days=1))
    inv = make_inventory(freezes=[freeze], bake="2s", analysis={**ROLLOUT["analysis"], "interval": "0.5s"})
    async with serving(dev_worker):
        handle = await start(dev_env, dev_worker, inv, auto_promote=True)
        await approve_quorum(handle)
        held = await until(handle, lambda r: r.held is not None, "the hold")
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Rollout.promote, Request(by="alice", reason="please"))
        assert "only an approver may override" in str(exc.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Rollout.promote, Request(by="carol"))
        assert "needs a reason" in str(exc.value.cause)
        await send_update(handle, Procedure.override, Request(by="carol", reason="the fix must ship"))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.stable_image == NEW
    hold = next(s for s in report.steps if s.name == held.current_step)
    assert hold.outcome == "ok" and "overridden by carol" in hold.detail
    assert [(o.by, o.reason) for o in report.overrides] == [("carol", "the fix must ship")]
    assert len([s for s in report.steps if s.name.startswith("hold-")]) == 1  # overridden for the rest of the run


CHECKS = [{"name": "checkout", "url": "http://shop.example/checkout", "body": "ok"},
          {"name": "load-test", "kind": "webhook", "url": "http://loadtester.example/gate", "critical": False}]


async def test_http_checks_run_in_every_bake_and_a_critical_failure_rolls_back(env, worker, cluster):
    cluster.failing_checks = {"checkout"}
    async with serving(worker):
        handle = await start(env, worker, make_inventory(checks=CHECKS), auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and cluster.stable_at_100 and cluster.weight_log == [5, 0]
    assert "check checkout failed: HTTP 500, expected 200" in report.rollback_reason
    bake = next(s for s in report.steps if s.name == "bake-5")
    assert bake.outcome == "failed" and round(bake.seconds) == 60  # at the first look, not at the end of the bake
    assert report.checks_run == 2 and [f.name for f in report.check_failures] == ["checkout"]


async def test_a_non_critical_check_failure_is_counted_and_a_person_decides(env, worker, cluster):
    cluster.failing_checks = {"load-test"}
    async with serving(worker):
        handle = await start(env, worker, make_inventory(checks=CHECKS, steps=[5, 100]), auto_promote=True)
        await approve_quorum(handle)
        r = await until(handle, lambda r: r.current_step == "decide-5" and r.status == "waiting", "the decision")
        judged = r.analysis[-1]
        assert judged.verdict == "marginal" and "10 non-critical HTTP check failure(s)" in judged.reason
        assert "load-test: HTTP 500" in judged.reason
        await send_update(handle, Rollout.promote, Request(by="carol", reason="the load tester is flaky"))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.checks_run == 20 and len(report.check_failures) == 10
    bake = next(s for s in report.steps if s.name == "bake-5")
    assert "10 non-critical HTTP check failure(s)" in bake.detail


async def test_refusals_image_already_running_and_leftover_canary(env, worker, cluster):
    inv = make_inventory()
    async with serving(worker):
        report = await failed(await start(env, worker, inv, image=OLD))
        assert report.status == "refused" and "already runs" in report.failure
        cluster.canary_image = "registry/shop:0.9"
        report = await failed(await start(env, worker, inv))
        assert report.status == "refused" and "left over" in report.failure
    assert cluster.calls == [K8S_ROLLOUT_STATUS.name, K8S_ROLLOUT_STATUS.name]


async def test_dry_run_plans_every_step_and_changes_nothing(env, worker, cluster):
    inv = make_inventory()
    async with serving(worker):
        report = RolloutReport.model_validate(await (await start(env, worker, inv, dry_run=True)).result())
    assert report.status == "planned" and cluster.calls == [K8S_ROLLOUT_STATUS.name]
    planned = [s.name for s in report.steps if s.outcome in ("planned", "skipped")]
    assert planned[:5] == ["approval", "create-canary", "hold-5", "scale-5", "weight-5"]
    assert planned[-5:] == ["promote-gate", "promote", "route-stable", "cleanup", "notify"]
    holds = [s for s in report.steps if s.name.startswith("hold-")]
    assert [s.name for s in holds] == ["hold-5", "hold-25", "hold-50", "hold-promote"]
    assert all(s.outcome == "planned" and "when a freeze begins" in s.detail for s in holds)
    assert "judge-50" in planned and "weight-100" not in planned


# -- blue-green ----------------------------------------------------------------------------------------------


async def test_bluegreen_switches_then_scales_the_old_colour_down(env, worker, cluster):
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, procedure="bluegreen")
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.active == "web-green" and report.previous_image == OLD
    assert cluster.selector == "web-green" and cluster.colours["web-green"] == NEW and cluster.replicas["web"] == 0
    post = [a for a in report.analysis if a.kind == "judge"]
    assert post and post[0].verdict == "pass"


async def test_bluegreen_rollback_in_the_window_switches_back_keeping_the_old_colour(dev_env, dev_worker, cluster):
    inv = make_inventory()
    async with serving(dev_worker):
        handle = await start(dev_env, dev_worker, inv, procedure="bluegreen")
        await approve_quorum(handle)
        await until(handle, lambda r: r.current_step == "post-analysis", "the rollback window")
        assert cluster.selector == "web-green"
        await send_update(handle, Rollout.rollback, Request(by="alice", reason="customers complain"))
        report = await failed(handle)
    assert report.status == "aborted" and report.rolled_back
    assert cluster.selector == "web" and cluster.replicas["web"] == 3 and cluster.replicas["web-green"] == 0


async def test_bluegreen_holds_the_switch_while_a_freeze_that_began_after_the_start_lasts(env, worker, cluster):
    freeze = await freeze_from(env, "incident", timedelta(minutes=5), timedelta(hours=1))
    async with serving(worker):
        handle = await start(env, worker, make_inventory(freezes=[freeze]), procedure="bluegreen")
        await until(handle, lambda r: r.current_step == "approval" and r.status == "waiting", "the approval gate")
        await env.sleep(600)  # the approvers take ten minutes: the freeze has begun
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.selector == "web-green"
    steps = {s.name: s for s in report.steps}
    assert steps["hold-switch"].outcome == "ok" and "the calendar opened" in steps["hold-switch"].detail
    assert steps["switch"].started_at >= datetime.fromisoformat(freeze["end"])


async def test_bluegreen_failure_in_the_window_switches_back(env, worker, cluster):
    cluster.behaviour = "faulty"
    inv = make_inventory()
    async with serving(worker):
        handle = await start(env, worker, inv, procedure="bluegreen")
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and "error-rate" in report.rollback_reason and cluster.selector == "web"


async def test_bluegreen_promote_ends_the_rollback_window_early(dev_env, dev_worker, cluster):
    inv = make_inventory(rollback_window="2h")
    async with serving(dev_worker):
        handle = await start(dev_env, dev_worker, inv, procedure="bluegreen")
        await approve_quorum(handle)
        await until(handle, lambda r: r.current_step == "post-analysis", "the rollback window")
        await send_update(handle, Rollout.promote, Request(by="alice", reason="looks good"))
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.replicas["web"] == 0 and cluster.selector == "web-green"
    window = next(s for s in report.steps if s.name == "post-analysis")
    assert window.seconds < 7200 and "promoted by alice" in window.detail


async def test_a_rollout_approver_promotes_signed_and_a_replayed_promote_is_refused(env, worker, cluster, tmp_path):
    """carol is the rollout's platform-lead approver, not an approver of the environment: she may promote (issue 18).
    With signatures required, the same signed promote sent again is refused, whatever armor it comes in."""
    from opsflow.signing import Signer
    from tests.helpers import ssh_key_pair

    (carol_key, carol_pub), (dave_key, dave_pub) = ssh_key_pair(tmp_path, "carol"), ssh_key_pair(tmp_path, "dave")
    approval = {
        "approvers": {
            "platform-lead": [{"name": "carol", "ssh_key": carol_pub}],
            "qa": [{"name": "dave", "ssh_key": dave_pub}],
        },
        "require": ["platform-lead", "qa"],
        "timeout": "2h",
        "require_signed": True,
    }
    inv = make_inventory(steps=[50, 100], approval=approval)
    carol, dave = Signer(name="carol", key_path=carol_key), Signer(name="dave", key_path=dave_key)
    async with serving(worker):
        handle = await start(env, worker, inv)
        await until(handle, lambda r: r.current_step == "approval" and r.status == "waiting", "the approval gate")
        run = (await handle.describe()).run_id
        for who in (carol, dave):
            signed = who.sign_request(
                workflow_id=handle.id,
                run_id=run,
                gate_id="approval",
                action="approve",
                reason="ok",
                at=await env.get_current_time(),
            )  # the workflow's clock: the test server skips time
            await send_update(handle, Procedure.approve, Request(by=who.name, reason="ok", **signed))
        await until(handle, lambda r: r.current_step == "promote-gate", "the promotion gate")
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Rollout.promote, Request(by="carol"))  # unsigned
        assert "missing signature" in str(exc.value.cause)
        signed = carol.sign_request(
            workflow_id=handle.id, run_id=run, gate_id=None, action="promote", at=await env.get_current_time()
        )
        await send_update(handle, Rollout.promote, Request(by="carol", **signed))
        again = {**signed, "signature": signed["signature"].replace("\n", "\r\n")}  # the same blob in other text
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(handle, Rollout.promote, Request(by="carol", **again))
        assert "replayed signature" in str(exc.value.cause)
        report = RolloutReport.model_validate(await handle.result())
    assert (
        report.status == "succeeded" and cluster.stable_image == NEW and [e.by for e in report.promoted_by] == ["carol"]
    )


# -- routers (chosen by kind) and the fresh baseline ---------------------------------------------------------

NGINX = {"kind": "nginx", "upstream_file": "/etc/nginx/conf.d/web-upstream.conf", "upstream": "web",
         "servers": {"stable": ["10.0.0.1:8080", "10.0.0.2:8080"], "canary": ["10.0.0.3:8080"],
                     "baseline": ["10.0.0.4:8080"]},
         "reload": ["docker", "exec", "nginx-lb", "nginx", "-s", "reload"]}


def app_with(router: dict) -> dict:
    return {"web": {**ROLLOUT["apps"]["web"], "router": router}}


async def test_an_nginx_router_moves_the_weight_on_its_own_queue_and_routes_stable_before_the_cleanup(
        env, worker, cluster):
    queue, _, _ = worker
    inv = make_inventory(apps=app_with({**NGINX, "queue": f"{queue}-westeurope"}))  # the worker on the NGINX host
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.router == "nginx" and cluster.stable_image == NEW
    assert cluster.weight_log == [5, 25, 50, 0] and K8S_SET_WEIGHT.name not in cluster.calls
    assert cluster.router_queues == [f"{queue}-westeurope"] * 5  # the check, three weights, back to stable
    names = [s.name for s in report.steps]
    assert names.index("router") < names.index("approval") < names.index("weight-5")
    assert names.index("promote") < names.index("route-stable") < names.index("cleanup")
    assert cluster.calls.index(ROUTER_SET_WEIGHT.name, cluster.calls.index(K8S_SET_IMAGE.name)) < cluster.calls.index(
        K8S_DELETE_CANARY.name)  # 0 % through the router, then the canary removed


async def test_a_router_queue_without_a_worker_is_named_before_any_change(env, worker, cluster):
    """The NGINX host's worker is down: the preflight names its queue at once (the router check would otherwise wait
    out its timeout on a queue nobody polls), nothing is asked of the cluster or the router."""
    queue, _, _ = worker
    router_queue = f"{queue}-nginx-host"
    cluster.unserved = {router_queue}
    inv = make_inventory(apps=app_with({**NGINX, "queue": router_queue}))
    async with serving(worker):
        report = await failed(await start(env, worker, inv))
    assert report.status == "refused" and f"no worker serves {router_queue}" in (report.failure or ""), report.failure
    assert set(cluster.asked_queues) == {queue, f"{queue}-eastus", router_queue}
    assert cluster.calls == [] and cluster.router_queues == [] and cluster.stable_at_100


async def test_a_router_that_does_not_send_everything_to_stable_is_refused_before_any_change(env, worker, cluster):
    cluster.weights = {"web": 75, "web-canary": 25}  # a canary left over in the upstream file
    async with serving(worker):
        report = await failed(await start(env, worker, make_inventory(apps=app_with(NGINX))))
    assert report.status == "refused" and "does not send 100 % to stable" in report.failure
    assert cluster.calls == [K8S_ROLLOUT_STATUS.name, ROUTER_STATUS.name]


FRESH = {**ROLLOUT["analysis"], "baseline": "fresh"}


async def test_a_fresh_baseline_is_started_with_the_canary_weighted_alike_judged_against_and_removed(
        env, worker, cluster):
    async with serving(worker):
        handle = await start(env, worker, make_inventory(analysis=FRESH, steps=[5, 25, 50, 100]), auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.baseline == "web-baseline"
    names = [s.name for s in report.steps]
    assert names.index("create-canary") < names.index("create-baseline") < names.index("scale-5")
    assert names.index("scale-5") < names.index("scale-baseline-5") < names.index("weight-5")
    assert names.index("route-stable") < names.index("remove-baseline") < names.index("cleanup")
    assert cluster.weight_log == [(5, "+baseline"), (25, "+baseline"), (50, "+baseline"), (0, "+baseline")]
    assert cluster.replicas["web-baseline"] == cluster.replicas["web-canary"] == 2  # as big as the canary at 50 %
    assert set(cluster.sampled) == {("web-canary", "web-baseline")}  # judged against the baseline, not stable
    assert cluster.baseline_image is None and cluster.canary_image is None and cluster.weights == {"web": 100}
    details = {s.name: s.detail for s in report.steps}
    assert details["weight-50"] == str({"stable": 0, "canary": 50, "baseline": 50})


async def test_a_faulty_canary_against_a_fresh_baseline_rolls_back_removing_both(env, worker, cluster):
    cluster.behaviour = "faulty"
    async with serving(worker):
        handle = await start(env, worker, make_inventory(analysis=FRESH), auto_promote=True)
        await approve_quorum(handle)
        report = await failed(handle)
    assert report.rolled_back and "error-rate" in report.rollback_reason
    assert cluster.weight_log == [(5, "+baseline"), (0, "+baseline")]
    undo = [s.name for s in report.steps if s.outcome == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary", "undo:k8s.delete_canary"]  # 0 %, then both
    assert cluster.calls[-3:] == [ROUTER_SET_WEIGHT.name, "delete-baseline", K8S_DELETE_CANARY.name]
    assert cluster.stable_at_100


async def test_a_fresh_baseline_refuses_weights_above_50_before_any_change(env, worker, cluster):
    async with serving(worker):
        report = await failed(await start(env, worker, make_inventory(analysis=FRESH), steps=[25, 75, 100]))
    assert report.status == "refused" and "at most 50 (not 75)" in report.failure
    assert cluster.calls == [K8S_ROLLOUT_STATUS.name]


TM = {"kind": "traffic-manager", "subscription_id": "sub", "resource_group": "rg-global", "profile": "tm-shop",
      "stable_endpoint": "shop-eastus", "canary_endpoint": "shop-westus"}


async def test_a_traffic_manager_canary_is_weighted_through_arm_as_the_inventory_connects(env, worker, cluster):
    arm = AzureConnection(arm_endpoint="https://arm.example.test", credential="default")
    inv = make_inventory(apps=app_with(TM)).model_copy(update={"azure": arm})
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True, steps=[10, 100])
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.router == "traffic-manager"
    assert cluster.weight_log == [10, 0] and cluster.router_azure == [arm, arm]
    assert "traffic manager tm-shop (shop-eastus / shop-westus)" in next(
        s.title for s in report.steps if s.name == "router")


# -- a host workload (outside Kubernetes), its activities on the NGINX host's queue ------------------------------

HOST = {"kind": "host", "run": ["ssh", "deploy@web1"], "start": ["shop-instance", "start", "{role}", "{image}"],
        "check": ["shop-instance", "check", "{role}"], "stop": ["shop-instance", "stop", "{role}"]}


async def test_a_host_workloads_activities_run_on_the_nginx_hosts_queue_with_the_router(env, worker, cluster):
    """The same declared activities (k8s.*, chosen by kind on the worker); only their queue differs: the router's."""
    queue, _, _ = worker
    lb = f"{queue}-westeurope"  # the worker on the NGINX host (app region: eastus)
    inv = make_inventory(apps={"web": {**app_with({**NGINX, "queue": lb})["web"], "workload": HOST}},
                         analysis={**ROLLOUT["analysis"], "baseline": "fresh"}, steps=[5, 25, 50, 100])
    inv.regions["eastus"].kubernetes = None  # a region without a cluster serves a host workload
    async with serving(worker):
        handle = await start(env, worker, inv, auto_promote=True)
        await approve_quorum(handle)
        report = RolloutReport.model_validate(await handle.result())
    assert report.status == "succeeded" and cluster.stable_image == NEW and report.baseline == "web-baseline"
    own = {name: q for name, q in cluster.ran_on if name.startswith(("k8s.", "router."))}
    assert set(own) >= {K8S_ROLLOUT_STATUS.name, K8S_CREATE_CANARY.name, K8S_SCALE_CANARY.name, K8S_SET_IMAGE.name,
                        K8S_DELETE_CANARY.name, ROUTER_SET_WEIGHT.name} and set(own.values()) == {lb}, own
    others = {q for name, q in cluster.ran_on if not name.startswith(("k8s.", "router."))}
    assert others == {f"{queue}-eastus"}, others  # Prometheus and the judge: the app's region


async def test_a_host_workload_refuses_bluegreen_before_any_change(env, worker, cluster):
    inv = make_inventory(apps={"web": {**app_with(NGINX)["web"], "workload": HOST}})
    async with serving(worker):
        report = await failed(await start(env, worker, inv, procedure="bluegreen"))
    assert report.status == "refused" and "workload.kind host" in report.failure and cluster.calls == []
