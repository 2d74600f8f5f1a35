"""The rollout activities against the lab's real parts: the Kubernetes emulator through the real client, and the
rollout stage (app processes, NGINX following the HTTPRoute, Prometheus scraping them, a load generator)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.config import new_client_from_config

from activities.analysis import judge_step
from activities.http_checks import checks
from activities.kubernetes import (
    create_canary,
    create_colour,
    delete_canary,
    rollout_status,
    scale_canary,
    scale_deployment,
    set_image,
    set_weight,
    switch_service,
)
from activities.prometheus import samples
from activities.routers import router_set_weight, router_status
from lab.k8s_emulator import start_emulator, write_kubeconfig
from lab.ports import free_port
from lab.processes import wait_port
from lab.rollout import IMAGES, STABLE_IMAGE, inventory_section, seed_additions
from opsflow.inventory import KubernetesConfig
from opsflow.rollout import (
    AnalysisSpec,
    ChecksRequest,
    DeploymentRequest,
    HttpCheck,
    ImageRequest,
    JudgeRequest,
    RolloutApp,
    RolloutTarget,
    SamplesRequest,
    WeightRequest,
)
from tests.helpers import eventually as wait_for

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster():
    seed = seed_additions({"seconds_per_replica": 0.05, "namespaces": ["shop"],
                           "deployments": [{"name": "web", "namespace": "shop", "replicas": 3}],
                           "services": [{"name": "web", "namespace": "shop"}]})
    handle = start_emulator(seed)
    yield handle
    handle.stop()


@pytest.fixture
def target(tmp_path, cluster) -> RolloutTarget:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"lab-eastus": cluster.url})
    return RolloutTarget(
        environment="lab",
        region="eastus",
        kubernetes=KubernetesConfig(kubeconfig=str(kubeconfig), context="lab-eastus", namespace="shop"),
        app=RolloutApp(
            region="eastus",
            deployment="web",
            container="web",
            service="web",
            router={"kind": "httproute", "name": "web"},
        ),
    )


@pytest.fixture
def stage(tmp_path, cluster):
    proxy, prom = free_port(), free_port()
    log = open(tmp_path / "stage.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab.rollout",
            "--dir",
            str(tmp_path / "stage"),
            "--kube",
            cluster.url,
            "--proxy-port",
            str(proxy),
            "--prometheus-port",
            str(prom),
            "--rps",
            "40",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wait_port(prom, 60, "prometheus", tmp_path / "stage.log", pid=proc.pid)
    wait_port(proxy, 60, "nginx", tmp_path / "stage.log", pid=proc.pid)
    yield {
        "proxy": f"http://127.0.0.1:{proxy}",
        "prometheus": f"http://127.0.0.1:{prom}",
        "log": tmp_path / "stage.log",
    }
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def api(target: RolloutTarget):
    c = new_client_from_config(config_file=target.kubernetes.kubeconfig, context="lab-eastus", persist_config=False)
    return k8s.AppsV1Api(c), k8s.CoreV1Api(c), k8s.CustomObjectsApi(c)




def versions_served(proxy: str, n: int = 60) -> Counter:
    seen = Counter()
    for _ in range(n):
        try:
            with urllib.request.urlopen(proxy + "/", timeout=5) as r:
                seen[r.headers["X-Version"]] += 1
        except urllib.error.HTTPError as e:
            seen[(e.headers["X-Version"] or "proxy") + ":" + str(e.code)] += 1
        except OSError:
            seen["down"] += 1
    return seen


def test_canary_lifecycle_through_the_real_client(target):
    apps, core, custom = api(target)
    st = rollout_status(target)
    assert st.stable_image == STABLE_IMAGE and st.canary is None and st.weights == {"web": 100} and st.active == "web"

    st = create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    assert st.canary == "web-canary" and st.canary_image == IMAGES["healthy"] and st.canary_ready == 1
    canary = apps.read_namespaced_deployment("web-canary", "shop")
    assert canary.spec.selector.match_labels == {"app": "web-canary"}
    assert core.read_namespaced_service("web-canary", "shop").spec.selector == {"app": "web-canary"}
    # stable never selects canary pods
    assert core.read_namespaced_service("web", "shop").spec.selector == {"app": "web"}
    again = create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))  # idempotent
    assert again.canary_ready == 1

    assert set_weight(WeightRequest(target=target, canary_weight=25)).weights == {"web": 75, "web-canary": 25}
    route = custom.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", "shop", "httproutes", "web")
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"name": "web", "port": 80, "weight": 75},
        {"name": "web-canary", "port": 80, "weight": 25},
    ]
    assert set_weight(WeightRequest(target=target, canary_weight=25)).weights == {"web": 75, "web-canary": 25}

    st = delete_canary(target)
    assert st.canary is None and st.weights == {"web": 100}
    assert delete_canary(target).canary is None  # nothing left: still success
    assert apps.read_namespaced_deployment("web", "shop").spec.template.spec.containers[0].image == STABLE_IMAGE

    st = set_image(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    assert st.stable_image == IMAGES["healthy"] and st.stable_done


def test_a_fresh_baseline_through_the_httproute_router_three_ways_and_removed_without_touching_the_canary(target):
    """The router interface on the HTTPRoute: a fresh baseline (a canary copy with suffix -baseline) gets the
    canary's weight; removing it gives its share back to stable and leaves the canary's weight as it was."""
    _, core, custom = api(target)
    baseline = target.baseline_target()
    create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    st = create_canary(ImageRequest(target=baseline, image=STABLE_IMAGE, wait_seconds=30))
    assert st.canary == "web-baseline" and st.canary_image == STABLE_IMAGE and st.canary_ready == 1
    assert core.read_namespaced_service("web-baseline", "shop").spec.selector == {"app": "web-baseline"}
    got = router_set_weight(WeightRequest(target=target, canary_weight=25, baseline=True))
    assert got.weights == {"stable": 50, "canary": 25, "baseline": 25} and got.kind == "httproute"
    assert router_status(target).weights == got.weights
    route = custom.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", "shop", "httproutes", "web")
    assert {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]} == {
        "web": 50, "web-canary": 25, "web-baseline": 25}
    st = delete_canary(baseline)  # an undo that comes before the weight's: the canary keeps its 25 %
    assert st.weights == {"web": 75, "web-canary": 25} and st.canary is None  # the baseline (its target's copy)
    assert rollout_status(target).canary == "web-canary"
    assert router_set_weight(WeightRequest(target=target, canary_weight=0, baseline=True)).weights == {
        "stable": 100, "canary": 0}
    assert delete_canary(target).weights == {"web": 100}


def test_the_canary_follows_its_weight_against_stables_current_replicas(target):
    """ceil(weight x stable's replicas), at least 1, ready before the weight moves; stable is never scaled; a
    stable that grew meanwhile (an autoscaler) is read again at each step."""
    apps, _, _ = api(target)
    create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    sizes = {}
    for w in (5, 25, 50, 75):
        st = scale_canary(WeightRequest(target=target, canary_weight=w))
        assert st.canary_ready == st.canary_replicas  # ready: the weight may move now
        sizes[w] = apps.read_namespaced_deployment("web-canary", "shop").spec.replicas
        assert apps.read_namespaced_deployment("web", "shop").spec.replicas == 3  # stable untouched
    assert sizes == {5: 1, 25: 1, 50: 2, 75: 3}  # stable has 3
    assert scale_canary(WeightRequest(target=target, canary_weight=75)).canary_replicas == 3  # again: no change
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 8}})  # stable grew
    st = scale_canary(WeightRequest(target=target, canary_weight=50))
    assert st.canary_replicas == 4 and st.stable_desired == 8
    # the inventory's canary_replicas is the least size
    floor = target.model_copy(update={"app": target.app.model_copy(update={"canary_replicas": 2})})
    assert scale_canary(WeightRequest(target=floor, canary_weight=5)).canary_replicas == 2
    delete_canary(target)
    with pytest.raises(Exception, match="web-canary"):  # no canary: an error naming it, nothing created
        scale_canary(WeightRequest(target=target, canary_weight=25))
    assert rollout_status(target).canary is None


def test_an_hpa_on_stable_is_copied_for_the_canary_with_bounds_scaled_to_its_weight(target):
    """Stable's HPA (min 2, max 10) gets a copy for the canary, its bounds ceil(weight x stable's), set before the
    canary is scaled so the copy never scales it back; deleted with the canary; stable's is never touched."""
    from kubernetes.config import new_client_from_config

    from lab.k8s.autoscaler import hpa_object

    apps, _, _ = api(target)
    auto = k8s.AutoscalingV2Api(new_client_from_config(config_file=target.kubernetes.kubeconfig, context="lab-eastus",
                                                       persist_config=False))
    auto.create_namespaced_horizontal_pod_autoscaler("shop", hpa_object("web", "shop", "web", 2, 10, cpu=60))
    create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    seen = {}
    for w in (5, 25, 50, 75):
        st = scale_canary(WeightRequest(target=target, canary_weight=w))
        h = auto.read_namespaced_horizontal_pod_autoscaler("web-canary", "shop")
        seen[w] = (h.spec.min_replicas, h.spec.max_replicas, st.canary_replicas)
        assert h.spec.scale_target_ref.name == "web-canary"
        assert h.spec.metrics[0].resource.target.average_utilization == 60  # stable's metrics, copied

        def synced() -> bool:  # the HPA controller has seen the bounds and the canary's size
            x = auto.read_namespaced_horizontal_pod_autoscaler("web-canary", "shop")
            return x.status.observed_generation == x.metadata.generation and \
                x.status.desired_replicas == st.canary_replicas

        wait_for(synced, timeout=10, what=f"the canary's HPA at {w} %")
        assert apps.read_namespaced_deployment("web-canary", "shop").spec.replicas == st.canary_replicas
    assert seen == {5: (1, 1, 1), 25: (1, 3, 1), 50: (1, 5, 2), 75: (2, 8, 3)}
    stable = auto.read_namespaced_horizontal_pod_autoscaler("web", "shop")
    assert (stable.spec.min_replicas, stable.spec.max_replicas) == (2, 10)
    delete_canary(target)
    assert [h.metadata.name for h in auto.list_namespaced_horizontal_pod_autoscaler("shop").items] == ["web"]


def test_blue_green_starts_the_new_colour_at_the_active_colours_current_size(target):
    apps, _, _ = api(target)
    apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 5}})  # an autoscaler grew it
    st = create_colour(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    assert st.replicas == {"web": 5, "web-green": 5}
    assert apps.read_namespaced_deployment("web-green", "shop").status.ready_replicas == 5


def test_blue_green_copies_the_active_colours_hpa_whole(target):
    """The new colour gets the active colour's HPA (same bounds and metrics): the HPA controller keeps it at the
    active colour's size instead of at the copy's defaults; a second run finds the copy and leaves it."""
    from kubernetes.config import new_client_from_config

    from lab.k8s.autoscaler import hpa_object

    apps, _, _ = api(target)
    auto = k8s.AutoscalingV2Api(new_client_from_config(config_file=target.kubernetes.kubeconfig, context="lab-eastus",
                                                       persist_config=False))
    auto.create_namespaced_horizontal_pod_autoscaler("shop", hpa_object("web", "shop", "web", 4, 9, cpu=65))
    wait_for(lambda: apps.read_namespaced_deployment("web", "shop").spec.replicas == 4, timeout=10,
             what="stable's HPA to raise web to its min 4")
    st = create_colour(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    assert st.replicas == {"web": 4, "web-green": 4}
    green = auto.read_namespaced_horizontal_pod_autoscaler("web-green", "shop")
    assert (green.spec.min_replicas, green.spec.max_replicas) == (4, 9)
    assert green.spec.scale_target_ref.name == "web-green"
    assert green.spec.metrics[0].resource.target.average_utilization == 65

    def synced() -> bool:
        h = auto.read_namespaced_horizontal_pod_autoscaler("web-green", "shop")
        return h.status.observed_generation == h.metadata.generation and h.status.desired_replicas == 4

    wait_for(synced, timeout=10, what="the green HPA to see web-green")
    assert apps.read_namespaced_deployment("web-green", "shop").spec.replicas == 4
    create_colour(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))  # again: nothing new
    assert sorted(h.metadata.name for h in auto.list_namespaced_horizontal_pod_autoscaler("shop").items) == [
        "web", "web-green"]


def test_blue_green_switch_and_back(target):
    st = create_colour(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    assert (
        st.colours == {"web": STABLE_IMAGE, "web-green": IMAGES["healthy"]}
        and st.replicas["web-green"] == 3
        and st.active == "web"
    )
    assert switch_service(DeploymentRequest(target=target, deployment="web-green")).active == "web-green"
    assert switch_service(DeploymentRequest(target=target, deployment="web-green")).active == "web-green"
    assert switch_service(DeploymentRequest(target=target, deployment="web")).active == "web"
    st = scale_deployment(DeploymentRequest(target=target, deployment="web-green", replicas=0))
    assert st.replicas["web-green"] == 0


def test_proxy_follows_the_route_and_prometheus_scrapes_the_apps(target, stage):
    wait_for(lambda: versions_served(stage["proxy"], 5)["healthy-1"] == 5, what="stable behind the proxy")
    create_canary(ImageRequest(target=target, image=IMAGES["faulty"], wait_seconds=30))
    set_weight(WeightRequest(target=target, canary_weight=50))

    def split():
        c = versions_served(stage["proxy"], 80)
        return c if c["faulty-2"] + c["faulty-2:500"] > 20 else None

    seen = wait_for(split, what="traffic split")
    assert seen["healthy-1"] > 20 and seen["faulty-2:500"] > 0  # ~50/50, and the faulty image fails some

    started = datetime.now(timezone.utc)
    analysis = AnalysisSpec.model_validate(
        {
            **inventory_section({"region": "eastus", "route": "web", "prometheus": stage["prometheus"]})["analysis"],
            "min_requests": 10,
        }
    )
    time.sleep(12)  # the bake: real time for real traffic (Prometheus scrapes every second)
    got = samples(
        SamplesRequest(
            analysis=analysis,
            canary="web-canary",
            baseline="web",
            start=started + timedelta(seconds=5),
            end=datetime.now(timezone.utc),
        )
    )
    err = next(m for m in got.metrics if m.name == "error-rate")
    assert len(err.canary) >= 4 and len(err.baseline) >= 4
    assert max(err.baseline) == 0 and sum(err.canary) / len(err.canary) > 0.05
    assert got.canary_requests and got.canary_requests > 50
    # what a limit judges: the canary's requests in the last interval (5 s) of the ~7 s window, counted apart
    assert got.canary_recent_requests is not None and 10 < got.canary_recent_requests < got.canary_requests
    step = judge_step(JudgeRequest(analysis=analysis, samples=got, weight=50))
    assert step.verdict == "fail"
    failed = {m.name: m for m in step.failed_metrics()}
    assert "error-rate" in failed and failed["error-rate"].critical

    delete_canary(target)
    wait_for(
        lambda: versions_served(stage["proxy"], 20) == Counter({"healthy-1": 20}), what="stable alone behind the proxy"
    )


def test_a_series_that_does_not_exist_yet_is_judged_by_the_metrics_missing_policy(target, stage):
    """A healthy canary has served no 5xx: its 5xx series does not exist in Prometheus. `missing: zero` reads
    it as an error rate of 0 on every step of the window (pass); the default says inconclusive; skip leaves it
    out of the score."""
    create_canary(ImageRequest(target=target, image=IMAGES["healthy"], wait_seconds=30))
    set_weight(WeightRequest(target=target, canary_weight=50))
    wait_for(lambda: versions_served(stage["proxy"], 40)["healthy-2"] > 10, what="traffic split")
    started = datetime.now(timezone.utc)
    section = inventory_section({"region": "eastus", "route": "web", "prometheus": stage["prometheus"]})["analysis"]
    zero = AnalysisSpec.model_validate({**section, "min_requests": 10})
    assert zero.metrics[0].name == "error-rate" and zero.metrics[0].missing == "zero"

    def enough():  # real traffic for real scrapes (every second), until the latency has samples enough to judge
        end = datetime.now(timezone.utc)
        got = samples(SamplesRequest(analysis=zero, canary="web-canary", baseline="web", start=started, end=end))
        p95 = next(m for m in got.metrics if m.name == "p95-latency")
        return (end, got) if min(len(p95.canary), len(p95.baseline)) >= zero.min_samples + 1 else None

    end, got = wait_for(enough, what="latency samples enough to judge")

    def series(deployment: str) -> list:
        q = urllib.parse.quote(f'http_requests_total{{deployment="{deployment}",status=~"5.."}}')
        with urllib.request.urlopen(f"{stage['prometheus']}/api/v1/query?query={q}", timeout=5) as r:
            return json.loads(r.read())["data"]["result"]

    assert series("web-canary") == [] and series("web") == []  # no 5xx series at all, not a zero
    window = SamplesRequest(analysis=zero, canary="web-canary", baseline="web", start=started, end=end)
    err = next(m for m in got.metrics if m.name == "error-rate")
    grid = int((end - started).total_seconds() / zero.step) + 1
    assert err.canary == [0.0] * grid and err.baseline == [0.0] * grid  # every step of the window, zero
    assert err.canary_filled == grid and err.baseline_filled == grid  # all filled in: no series had a point
    step = judge_step(JudgeRequest(analysis=zero, samples=got, weight=50))
    assert {m.name: m.verdict for m in step.metrics}["error-rate"] == "pass"
    assert step.verdict == "pass", step.reason

    def policy(missing: str) -> AnalysisSpec:
        return zero.model_copy(update={"metrics": [zero.metrics[0].model_copy(update={"missing": missing}),
                                                   *zero.metrics[1:]]})

    strict = policy("inconclusive")
    got = samples(window.model_copy(update={"analysis": strict}))
    assert next(m for m in got.metrics if m.name == "error-rate").canary == []
    step = judge_step(JudgeRequest(analysis=strict, samples=got, weight=50))
    assert step.verdict == "inconclusive" and "error-rate: no data for the canary" in step.reason
    skip = policy("skip")
    step = judge_step(JudgeRequest(analysis=skip, samples=samples(window.model_copy(update={"analysis": skip})),
                                   weight=50))
    assert {m.name: m.verdict for m in step.metrics}["error-rate"] == "skipped" and step.verdict == "pass", step.reason
    delete_canary(target)


def test_http_checks_smoke_through_the_proxy_and_a_webhook_that_answers_pass_or_fail(target, stage, tmp_path):
    """Smoke URLs through the stage's real NGINX to the real app (status and body), and the lab receiver's
    webhook gate (as Flagger's): a 2xx pass, a 403 with a reason fail; nothing listening is a failed check,
    never an exception."""
    from lab.receiver import read_notifications, serve

    gate = serve(tmp_path / "receiver")
    hook = f"http://127.0.0.1:{gate.server_port}/gate/load-test"
    wait_for(lambda: versions_served(stage["proxy"], 5)["healthy-1"] == 5, what="stable behind the proxy")
    req = ChecksRequest(app="web", image=IMAGES["healthy"], weight=25, checks=[
        HttpCheck(name="home", url=stage["proxy"] + "/", body="web healthy-1 200"),
        HttpCheck(name="wrong-body", url=stage["proxy"] + "/", body="not in it", critical=False),
        HttpCheck(name="missing", url=stage["proxy"] + "/nope", status=404, critical=False),
        HttpCheck(name="load-test", kind="webhook", url=hook),
        HttpCheck(name="nobody", url=f"http://127.0.0.1:{free_port()}/", timeout=2),
    ])
    got = {r.name: r for r in checks(req)}
    assert got["home"].ok and got["home"].status == 200
    assert not got["wrong-body"].ok and "does not contain 'not in it'" in got["wrong-body"].reason
    assert not got["missing"].ok and got["missing"].reason == "HTTP 200, expected 404"  # the app answers any path
    assert got["load-test"].ok and got["load-test"].reason == "HTTP 200: pass"
    assert not got["nobody"].ok and got["nobody"].reason.startswith("no answer") and got["nobody"].critical
    sent = [n for n in read_notifications(tmp_path / "receiver") if n["path"] == "/gate/load-test"]
    assert sent[-1]["body"] == {"check": "load-test", "app": "web", "image": IMAGES["healthy"], "weight": 25,
                                "phase": "bake"}

    (tmp_path / "receiver" / "fail-load-test").write_text("p99 above 2 s under load")
    r = checks(req.model_copy(update={"checks": [req.checks[3]]}))[0]
    assert not r.ok and r.status == 403 and r.reason == "HTTP 403: fail: p99 above 2 s under load"
    gate.shutdown()
