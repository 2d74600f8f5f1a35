"""Canary and blue-green end to end on the lab's rollout stage, through the CLI as a person runs it: real app
processes, real NGINX splitting real traffic by the HTTPRoute's weights, real Prometheus scraping the apps.

One lab for the module (the rollouts run one after another, as they would on an environment)."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from lab.receiver import read_notifications
from tests.integration.conftest import Lab, module_lab, wait_for
from tests.integration.test_failover_lab import wait_end

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def rollout_lab():
    with module_lab(rollout=True) as lab:
        yield lab


def run_rollout(lab: Lab, *args: str, during=None) -> dict:
    started = lab.cli_json(*args, "--requester", "alice")
    wid = started["workflow_id"]
    wait_for(lambda: lab.status(wid)["current_step"] == "approval", 60, what="the approval gate")
    lab.cli("approve", wid, "--as", "carol", check=True)
    lab.cli("approve", wid, "--as", "dave", check=True)
    if during is not None:  # a look while it runs (e.g. the split at a weight)
        during(wid)

    wait_end(lab, wid, 240, lambda r: r["status"] not in ("running", "waiting", "paused"), "the rollout to end")
    return lab.cli_json("report", wid)


def route_weights(lab: Lab) -> dict:
    url = lab.state["kubernetes"]["eastus"]["url"]
    with urllib.request.urlopen(f"{url}/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web") as r:
        route = json.loads(r.read())
    return {ref["name"]: ref["weight"] for ref in route["spec"]["rules"][0]["backendRefs"]}


def deployments(lab: Lab) -> dict:
    url = lab.state["kubernetes"]["eastus"]["url"]
    with urllib.request.urlopen(f"{url}/apis/apps/v1/namespaces/shop/deployments") as r:
        items = json.loads(r.read())["items"]
    return {
        d["metadata"]["name"]: (d["spec"]["template"]["spec"]["containers"][0]["image"], d["spec"]["replicas"])
        for d in items
    }


def served(lab: Lab, n: int = 30) -> Counter:
    seen = Counter()
    for _ in range(n):
        try:
            with urllib.request.urlopen(lab.state["rollout"]["proxy"] + "/", timeout=5) as r:
                seen[r.headers["X-Version"]] += 1
        except urllib.error.HTTPError as e:
            seen[f"{e.headers['X-Version']}:{e.code}"] += 1
    return seen


def prometheus_total(lab: Lab, deployment: str) -> float:
    # a range, because a deleted deployment's series is stale at once (the canary is gone after promotion)
    q = quote(f'sum(max_over_time(http_requests_total{{deployment="{deployment}"}}[15m]))')
    with urllib.request.urlopen(f"{lab.state['rollout']['prometheus']}/api/v1/query?query={q}") as r:
        result = json.loads(r.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_status_names_the_rollout_stage(rollout_lab):
    s = rollout_lab.cli_json("lab", "status", "--dir", str(rollout_lab.root))
    assert set(s["rollout"]["images"]) >= {"healthy", "faulty", "slow"} and s["rollout"]["app"] == "web"
    assert s["rollout"]["prometheus"].startswith("http://127.0.0.1:")


def test_healthy_image_is_promoted_with_figures_from_prometheus(rollout_lab):
    lab, images = rollout_lab, rollout_lab.state["rollout"]["images"]
    old = lab.state["rollout"]["stable_image"]
    report = run_rollout(
        lab, "canary", "--image", images["healthy"], "--steps", "25,50,100", "--bake", "15s", "--auto-promote"
    )
    assert report["status"] == "succeeded", report.get("failure")
    assert report["previous_image"] == old and report["image"] == images["healthy"] and not report["rolled_back"]
    assert deployments(lab)["web"][0] == images["healthy"] and "web-canary" not in deployments(lab)
    assert route_weights(lab) == {"web": 100}
    judged = [a for a in report["analysis"] if a["kind"] == "judge"]
    assert [a["weight"] for a in judged] == [25, 50] and all(a["verdict"] == "pass" for a in judged)
    # the figures come from Prometheus: real request counts and latencies of the two deployments
    assert judged[0]["canary_requests"] > 20 and prometheus_total(lab, "web-canary") > 20
    # no 5xx so far: the error-rate's series does not exist in Prometheus; `missing: zero` reads it as 0, a pass
    err = next(m for m in judged[0]["metrics"] if m["name"] == "error-rate")
    assert err["verdict"] == "pass" and err["canary"] == 0 and err["canary_samples"] >= 5, err
    # capacity follows weight: ceil(weight x stable's 3 replicas), before the weight moves
    steps = [s["name"] for s in report["steps"]]
    assert steps.index("scale-25") < steps.index("weight-25") < steps.index("scale-50") < steps.index("weight-50")
    details = {s["name"]: s["detail"] for s in report["steps"]}
    assert details["scale-25"] == "web-canary 1 replica(s), stable 3", details
    assert details["scale-50"] == "web-canary 2 replica(s), stable 3", details
    p95 = next(m for m in judged[0]["metrics"] if m["name"] == "p95-latency")
    assert 0.004 < p95["canary"] < 0.1 and 0.004 < p95["baseline"] < 0.1 and p95["canary_samples"] >= 5
    wait_for(
        lambda: served(lab, 10) == Counter({images["healthy"].rsplit(":", 1)[1]: 10}),
        30,
        what="the new stable alone behind the proxy",
    )


def test_faulty_image_is_rolled_back_naming_the_error_rate(rollout_lab):
    lab, images = rollout_lab, rollout_lab.state["rollout"]["images"]
    before = deployments(lab)["web"]
    report = run_rollout(
        lab, "canary", "--image", images["faulty"], "--steps", "25,50,100", "--bake", "15s", "--auto-promote"
    )
    assert report["status"] == "failed" and report["rolled_back"]
    assert "error-rate" in report["rollback_reason"]
    # the look that failed it: a breach of the 5 % limit, or a clear shift from the baseline (the judge), whichever
    # came first; its mean may sit under 15 % (Prometheus drops a new 5xx series' first increment)
    failed = [m for a in report["analysis"] for m in a["metrics"] if m["verdict"] in ("breach", "high")]
    assert failed and {m["name"] for m in failed} == {"error-rate"}, failed
    assert failed[0]["canary"] > 0.02 and failed[0]["baseline"] < 0.01, failed  # faulty: ~15 % 5xx
    # before any traffic Prometheus counted the canary's requests (step scraped); a limit judged only on traffic
    # enough (limit_min_requests: 20 by default), at one of the looks every second of the bake's first interval
    steps = [s["name"] for s in report["steps"]]
    assert steps.index("scale-25") < steps.index("scraped") < steps.index("weight-25"), steps
    assert "requests are counted" in next(s for s in report["steps"] if s["name"] == "scraped")["detail"]
    look = next(a for a in report["analysis"] if a["verdict"] == "fail")
    assert look["kind"] != "interval" or look["canary_requests"] >= 20, look
    assert deployments(lab)["web"] == before and "web-canary" not in deployments(lab)
    assert route_weights(lab) == {"web": 100}
    undo = [s["name"] for s in report["steps"] if s["outcome"] == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary"]  # weight 0 first, then the canary removed


def test_bluegreen_switch_and_automatic_switch_back(rollout_lab):
    lab, images = rollout_lab, rollout_lab.state["rollout"]["images"]
    stable = deployments(lab)["web"][0]
    report = run_rollout(lab, "bluegreen", "--image", images["slow"])
    assert report["status"] == "failed" and report["rolled_back"] and "p95-latency" in report["rollback_reason"]
    names = [s["name"] for s in report["steps"]]
    assert names.index("switch") < names.index("post-analysis") < names.index("undo:k8s.switch_service")
    d = deployments(lab)
    assert d["web"] == (stable, 3) and d["web-green"][1] == 0
    wait_for(lambda: served(lab, 10) == Counter({stable.rsplit(":", 1)[1]: 10}), 30, what="blue alone behind the proxy")


def test_a_webhook_check_that_fails_rolls_a_healthy_canary_back(rollout_lab):
    """The lab's inventory checks every bake over HTTP: a smoke GET through NGINX and the receiver's webhook gate
    (critical). The gate says fail: the healthy image is rolled back at the first look, naming the check.
    (After the blue-green test: a canary re-created within seconds of the faulty one would see that one's last
    5xx in the error rate's 5 s rate window: the lab's queries select by deployment, not by version.)"""
    lab, images = rollout_lab, rollout_lab.state["rollout"]["images"]
    before = deployments(lab)["web"]
    healthy = images["healthy"].rsplit(":", 1)[0] + ":healthy-3"  # another healthy build: no metric breaks
    fail = Path(lab.state["receiver"]["dir"]) / "fail-rollout"
    fail.write_text("the load test saw p99 above 2 s")
    try:
        report = run_rollout(lab, "canary", "--image", healthy, "--steps", "25,100", "--bake", "15s", "--auto-promote")
    finally:
        fail.unlink()
    assert report["status"] == "failed" and report["rolled_back"]
    assert report["rollback_reason"] == (
        "at 25 %: check rollout-gate failed: HTTP 403: fail: the load test saw p99 above 2 s")
    assert report["checks_run"] >= 2 and "rollout-gate" in [f["name"] for f in report["check_failures"]]
    assert deployments(lab)["web"] == before and "web-canary" not in deployments(lab)
    assert route_weights(lab) == {"web": 100}
    gate = [n for n in read_notifications(Path(lab.state["receiver"]["dir"])) if n["path"] == "/gate/rollout"]
    assert gate and gate[-1]["body"]["weight"] == 25 and gate[-1]["body"]["image"] == healthy


def set_stable_image(lab: Lab, image: str) -> None:
    """Put `image` back on the stable deployment, as `kubectl set image` would (a strategic merge patch)."""
    url = lab.state["kubernetes"]["eastus"]["url"]
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}}
    request = urllib.request.Request(f"{url}/apis/apps/v1/namespaces/shop/deployments/web", method="PATCH",
                                     data=json.dumps(patch).encode(),
                                     headers={"Content-Type": "application/strategic-merge-patch+json"})
    with urllib.request.urlopen(request):
        pass


def test_lab_demo_canary_promotes_the_healthy_image_and_rolls_back_the_faulty_one(rollout_lab):
    """`opsflow lab demo --procedure canary`, as the README says, on a lab as it comes up (its stable image the
    first one: the tests above promoted another)."""
    lab, images = rollout_lab, rollout_lab.state["rollout"]["images"]
    stable = lab.state["rollout"]["stable_image"]
    set_stable_image(lab, stable)
    version = stable.rsplit(":", 1)[1]
    wait_for(
        lambda: served(lab, 10) == Counter({version: 10}), 30, what="the first stable image alone behind the proxy"
    )

    demo = lab.cli("lab", "demo", "--procedure", "canary", "--dir", str(lab.root), timeout=400)
    assert demo.returncode == 0, f"stdout:\n{demo.stdout}\nstderr:\n{demo.stderr}"
    assert f"canary of {images['healthy']} started" in demo.stdout
    assert f"canary of {images['faulty']} started" in demo.stdout
    assert "error-rate breach" in demo.stdout  # the faulty image's analysis, printed by the demo
    assert deployments(lab)["web"][0] == images["healthy"] and "web-canary" not in deployments(lab)
    assert route_weights(lab) == {"web": 100}
