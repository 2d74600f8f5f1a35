"""The traffic-manager router on the lab: a region-level canary whose share is Azure Traffic Manager endpoint
weights (weighted routing), run end to end through the CLI as a person runs it, against the lab's ARM emulator
over HTTPS with the real azure SDK in the worker; the split is read as Traffic Manager answers DNS queries (the
emulator's DNS-answer simulation).

The lab's own profile is the failover's (priority routing); this module's setup creates a Weighted profile beside
it through the SDK (`profiles.create_or_update`, the stable region's endpoint at 100 %, the canary region's
disabled) and points the inventory's app at it; the default lab is unchanged.

Traffic: a region-level canary's clients reach whichever endpoint Traffic Manager's DNS answers name. The lab runs
one region's front door (NGINX following the HTTPRoute, which stays at 100 % stable), so the module's DNS clients
(a thread while a rollout runs) ask the profile for answers and send each request where its answer points: the
stable endpoint to the lab's proxy, the canary endpoint straight to the canary's app process. Prometheus scrapes
both, so the canary is judged on its real figures with the lab's own analysis (min_requests, error rate, p95).

One lab for the module; the rollouts run one after another."""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from activities.azure.arm import traffic_manager_client
from lab.inventory import RESOURCE_GROUP, SUBSCRIPTION
from opsflow.inventory import AzureConnection
from tests.integration.conftest import Lab, module_lab, wait_for
from tests.integration.test_failover_lab import wait_end
from tests.integration.test_rollout_lab import deployments, route_weights, run_rollout

pytestmark = pytest.mark.lab

PROFILE, STABLE, CANARY = "lab-shop-canary", "shop-eastus", "shop-eastus-canary"
QUERIES = 2000


@pytest.fixture(scope="module")
def tm_lab():
    with module_lab(worker=False, rollout=True) as lab:
        azure = lab.state["azure"]
        conn = AzureConnection(arm_endpoint=azure["arm_endpoint"], credential="static-token",
                               ca_bundle=azure["ca_bundle"], polling_interval=0.2)
        traffic_manager_client(conn, SUBSCRIPTION).profiles.create_or_update(RESOURCE_GROUP, PROFILE, {
            "location": "global",
            "properties": {
                "profileStatus": "Enabled", "trafficRoutingMethod": "Weighted",
                "dnsConfig": {"relativeName": PROFILE, "ttl": 30},
                "monitorConfig": {"protocol": "HTTPS", "port": 443, "path": "/healthz"},
                "endpoints": [
                    {"name": STABLE, "type": "Microsoft.Network/trafficManagerProfiles/externalEndpoints",
                     "properties": {"target": "eastus.shop.lab.example", "endpointLocation": "eastus",
                                    "weight": 1000, "endpointStatus": "Enabled"}},
                    {"name": CANARY, "type": "Microsoft.Network/trafficManagerProfiles/externalEndpoints",
                     "properties": {"target": "eastus-canary.shop.lab.example", "endpointLocation": "eastus",
                                    "weight": 1, "endpointStatus": "Disabled"}},
                ]}})
        inv = yaml.safe_load(open(lab.inventory))
        inv["rollout"]["apps"]["web"]["router"] = {
            "kind": "traffic-manager", "subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP,
            "profile": PROFILE, "stable_endpoint": STABLE, "canary_endpoint": CANARY}
        Path(lab.inventory).write_text(yaml.safe_dump(inv, sort_keys=False))
        lab.start_worker()
        yield lab


def dns(lab: Lab, queries: int = QUERIES, seed: int = 0) -> dict[str, int]:
    """Which endpoint each of `queries` DNS queries for the profile gets, as weighted routing answers."""
    azure = lab.state["azure"]
    req = urllib.request.Request(f"{azure['arm_endpoint']}/_emulator/trafficmanagerprofiles/{PROFILE}/dns",
                                 method="POST", data=json.dumps({"queries": queries, "seed": seed}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=azure["ca_bundle"]), timeout=10) as r:
        return json.loads(r.read())["answers"]


def app_port(lab: Lab, deployment: str) -> int | None:
    """The port of `deployment`'s app process, from the Prometheus targets the rollout stage writes."""
    targets = json.loads((lab.root / "rollout" / "prometheus" / "targets.json").read_text() or "[]")
    return next((int(t["targets"][0].rsplit(":", 1)[1]) for t in targets
                 if t["labels"]["lab_deployment"] == deployment), None)


@contextmanager
def dns_clients(lab: Lab) -> Iterator[Counter]:
    """Clients that follow the profile's DNS answers (20 a batch, one after another) while the block runs:
    the stable endpoint is the lab's proxy, the canary endpoint the canary's app process. Yields what they got, by
    endpoint and status."""
    got: Counter = Counter()
    stop = threading.Event()

    def loop() -> None:
        seed = 1
        while not stop.wait(0.05):
            seed += 1
            try:
                answers = dns(lab, 20, seed)
            except OSError:
                continue
            port = app_port(lab, "web-canary")
            urls = {STABLE: lab.state["rollout"]["proxy"] + "/",
                    CANARY: f"http://127.0.0.1:{port}/" if port else None}
            for endpoint, n in answers.items():
                for _ in range(n):
                    if urls[endpoint] is None:
                        got[(endpoint, "no server")] += 1
                        continue
                    try:
                        with urllib.request.urlopen(urls[endpoint], timeout=5) as r:
                            got[(endpoint, r.status)] += 1
                    except urllib.error.HTTPError as e:
                        got[(endpoint, e.code)] += 1
                    except OSError:
                        got[(endpoint, "refused")] += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield got
    finally:
        stop.set()
        t.join(10)


def test_region_level_canary_takes_its_share_of_dns_answers_at_each_step_then_is_promoted(tm_lab):
    lab, images = tm_lab, tm_lab.state["rollout"]["images"]
    assert dns(lab) == {STABLE: QUERIES, CANARY: 0}
    split: dict[int, dict[str, int]] = {}

    def at_each_step(wid: str) -> None:  # during each bake: what DNS clients of the profile get
        for w in (25, 50):
            wait_for(lambda w=w: lab.status(wid)["current_step"] == f"bake-{w}", 90, what=f"the bake at {w} %")
            split[w] = dns(lab)

    with dns_clients(lab) as got:
        report = run_rollout(lab, "canary", "--image", images["healthy"], "--steps", "25,50,100", "--bake", "15s",
                             "--auto-promote", during=at_each_step)
    print(f"traffic-manager router: DNS clients got {dict(got)}")
    assert report["status"] == "succeeded", report.get("failure")
    assert report["router"] == "traffic-manager" and deployments(lab)["web"][0] == images["healthy"]
    for w, answers in split.items():
        print(f"traffic-manager router at {w} %: {answers[CANARY]} of {QUERIES} DNS answers to {CANARY}")
        assert sum(answers.values()) == QUERIES and abs(answers[CANARY] / QUERIES - w / 100) < 0.04, (w, answers)
    details = {st["name"]: st["detail"] for st in report["steps"]}
    assert details["router"] == f"Traffic Manager profile {PROFILE} (resource group " \
        f"{RESOURCE_GROUP}, subscription {SUBSCRIPTION}): stable 100%, canary 0%", details
    assert details["weight-25"] == "stable 75%, canary 25%" and details["weight-50"] == "stable 50%, canary 50%"
    assert details["route-stable"] == "stable 100%, canary 0%", details
    judged = [a for a in report["analysis"] if a["kind"] == "judge"]
    assert [a["weight"] for a in judged] == [25, 50] and all(a["verdict"] == "pass" for a in judged), judged
    # judged on the canary's own figures: the requests the DNS clients sent to the canary region
    assert all(a["canary_requests"] >= 20 for a in judged), judged
    # no 5xx from the canary; a batch answered just before the canary endpoint was disabled may find its process
    # gone. Stable's processes are replaced by the promotion (the lab's stage swaps each on its port, whatever the
    # router): NGINX answers requests in flight then with a 502 (CI saw 2 and 19 of ~560 under the full suite's
    # load), which is the lab's stage, not the Traffic Manager split this test is about.
    assert got[(CANARY, 200)] >= 40 and got[(CANARY, 502)] == 0, got
    assert not [k for k in got if k[1] not in (200, "refused", "no server") and (k[0], k[1]) != (STABLE, 502)], got
    assert report["checks_run"] >= 4  # smoke + webhook gate at each of the two bakes
    # at the end: stable's endpoint alone answers, the canary's disabled; the canary deployment removed
    assert dns(lab) == {STABLE: QUERIES, CANARY: 0}
    assert "web-canary" not in deployments(lab) and route_weights(lab) == {"web": 100}


def test_an_abort_during_a_bake_disables_the_canary_endpoint(tm_lab):
    lab, images = tm_lab, tm_lab.state["rollout"]["images"]
    before = deployments(lab)["web"]
    healthy = images["healthy"].rsplit(":", 1)[0] + ":healthy-4"  # another build than the one now stable

    def abort_in_bake(wid: str) -> None:
        wait_for(lambda: lab.status(wid)["current_step"] == "bake-25", 90, what="the bake at 25 %")
        answers = dns(lab)
        assert 0.21 < answers[CANARY] / QUERIES < 0.29, answers
        sent = time.monotonic()
        lab.cli("abort", wid, "--as", "alice", "--reason", "region canary stopped by hand", check=True)
        wait_for(lambda: dns(lab, 200)[CANARY] == 0, 30, what="no DNS answer to the canary")
        print(f"traffic-manager router: abort during the bake at 25 %: no DNS answer to {CANARY} "
              f"{time.monotonic() - sent:.1f} s after `opsflow abort` was run")
        wait_end(lab, wid, 60, lambda r: r["status"] not in ("running", "waiting", "paused"), "the abort")

    with dns_clients(lab):
        report = run_rollout(lab, "canary", "--image", healthy, "--steps", "25,100", "--bake", "60s",
                             "--auto-promote", during=abort_in_bake)
    assert report["status"] == "aborted" and report["rolled_back"], report
    undo = [st["name"] for st in report["steps"] if st["outcome"] == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary"], undo
    assert dns(lab) == {STABLE: QUERIES, CANARY: 0}  # no DNS answer sends a client to the canary region
    assert deployments(lab)["web"] == before and "web-canary" not in deployments(lab)


def test_a_faulty_canary_region_is_rolled_back_on_its_error_rate(tm_lab):
    lab, images = tm_lab, tm_lab.state["rollout"]["images"]
    before = deployments(lab)["web"]
    with dns_clients(lab) as got:
        report = run_rollout(lab, "canary", "--image", images["faulty"], "--steps", "25,50,100", "--bake", "15s",
                             "--auto-promote")
    print(f"traffic-manager router, faulty canary: DNS clients got {dict(got)}; {report.get('rollback_reason')}")
    assert report["status"] == "failed" and report["rolled_back"] and "error-rate" in report["rollback_reason"]
    assert got[(CANARY, 500)] > 0 and not [k for k in got if k[0] == STABLE and k[1] != 200], got
    undo = [st["name"] for st in report["steps"] if st["outcome"] == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary"], undo
    assert dns(lab) == {STABLE: QUERIES, CANARY: 0}
    assert deployments(lab)["web"] == before and "web-canary" not in deployments(lab)
