"""The traffic-manager router over the wire: the real Azure SDK (azure-mgmt-trafficmanager) against the ARM
emulator over HTTPS, a weighted profile's endpoint weights set for a region-level canary, and the split checked as
Traffic Manager's weighted routing answers DNS queries (the emulator's DNS-answer simulation)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import ssl
import tempfile
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.azure.arm import traffic_manager_client
from activities.routers import router_set_weight, router_status
from lab.arm.world import World
from lab.arm_emulator import start_emulator
from opsflow.inventory import AzureConnection, KubernetesConfig
from opsflow.rollout import RolloutApp, RolloutTarget, WeightRequest

SUB = "6f1c1a2e-0000-4000-8000-000000000077"
RG = "rg-canary"
PROFILE, PRIORITY_PROFILE = "tm-shop", "tm-failover"


@pytest.fixture(scope="module")
def emu():
    root = Path(tempfile.mkdtemp(prefix="opsflow-tm-router-"))
    config = {
        "subscription_id": SUB,
        "tokens": ["opsflow-lab-token"],
        "settings": {"tm_checking_seconds": 0.2},
        "traffic_manager_profiles": {
            PROFILE: {"resource_group": RG, "routing_method": "Weighted", "endpoints": {
                "shop-eastus": {"region": "eastus", "target": "eastus.shop.lab.invalid", "weight": 1000},
                "shop-westus": {"region": "westus", "target": "westus.shop.lab.invalid", "weight": 1,
                                "status": "Disabled"},
            }},
            PRIORITY_PROFILE: {"resource_group": RG, "routing_method": "Priority", "endpoints": {
                "shop-eastus": {"region": "eastus", "target": "eastus.shop.lab.invalid", "priority": 1},
                "shop-westus": {"region": "westus", "target": "westus.shop.lab.invalid", "priority": 2},
            }},
        },
    }
    e = start_emulator(config, root / "ca")
    yield e
    e.stop()
    shutil.rmtree(root, ignore_errors=True)


def target(emu, profile: str = PROFILE, canary: str = "shop-westus") -> RolloutTarget:
    app = RolloutApp.model_validate({
        "region": "eastus", "deployment": "shop", "service": "shop",
        "router": {"kind": "traffic-manager", "subscription_id": SUB, "resource_group": RG, "profile": profile,
                   "stable_endpoint": "shop-eastus", "canary_endpoint": canary}})
    conn = AzureConnection(arm_endpoint=emu.url, credential="static-token", ca_bundle=str(emu.ca_path),
                           polling_interval=0.1)
    return RolloutTarget(environment="lab", region="eastus", kubernetes=KubernetesConfig(), app=app, azure=conn)


def run(fn, *args):
    env = ActivityEnvironment()
    env.info = dataclasses.replace(ActivityEnvironment.default_info(), start_to_close_timeout=timedelta(seconds=60))
    return env.run(fn, *args)


def dns(emu, queries: int = 4000) -> dict[str, int]:
    """What `queries` DNS queries for the profile get, as Traffic Manager's weighted routing answers them."""
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    req = urllib.request.Request(f"{emu.url}/_emulator/trafficmanagerprofiles/{PROFILE}/dns", method="POST",
                                 data=json.dumps({"queries": queries, "seed": 7}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())["answers"]


def patches(emu) -> int:
    return len([r for r in emu.requests() if r["method"] == "PATCH" and "trafficManagerProfiles" in r["path"]])


def test_a_region_level_canary_gets_its_share_of_dns_answers_and_back_to_zero(emu):
    t = target(emu)
    before = run(router_status, t)
    assert before.weights == {"stable": 100, "canary": 0} and dns(emu) == {"shop-eastus": 4000, "shop-westus": 0}

    at_25 = run(router_set_weight, WeightRequest(target=t, canary_weight=25))
    assert at_25.weights == {"stable": 75, "canary": 25} and at_25.kind == "traffic-manager"
    answers = dns(emu)
    assert 0.22 < answers["shop-westus"] / 4000 < 0.28, answers  # about a quarter of the DNS answers
    # weights as Traffic Manager holds them, read back through the SDK by a second status
    assert run(router_status, t).weights == {"stable": 75, "canary": 25}

    sent = patches(emu)
    run(router_set_weight, WeightRequest(target=t, canary_weight=25))  # looks before it acts: nothing to change
    assert patches(emu) == sent

    back = run(router_set_weight, WeightRequest(target=t, canary_weight=0))
    assert back.weights == {"stable": 100, "canary": 0}  # the canary endpoint disabled (weights start at 1)
    assert dns(emu) == {"shop-eastus": 4000, "shop-westus": 0}


def test_a_priority_profile_or_a_missing_endpoint_is_refused_naming_it(emu):
    with pytest.raises(ApplicationError) as exc:
        run(router_status, target(emu, profile=PRIORITY_PROFILE))
    assert exc.value.non_retryable and "routes by Priority, not Weighted" in str(exc.value)
    with pytest.raises(ApplicationError) as exc:
        run(router_set_weight, WeightRequest(target=target(emu, canary="shop-northeu"), canary_weight=5))
    assert exc.value.non_retryable and "no endpoint shop-northeu" in str(exc.value) and "shop-westus" in str(exc.value)


def test_a_weighted_profile_created_through_the_sdk_serves_a_canary(emu):
    """The emulator's PUT of a profile (profiles.create_or_update), as a lab test makes one beside the lab's own."""
    t = target(emu)
    client = traffic_manager_client(t.azure, SUB)
    eps = [{"name": n, "type": "Microsoft.Network/trafficManagerProfiles/externalEndpoints",
            "properties": {"target": f"{n}.lab.invalid", "weight": w, "endpointStatus": s}}
           for n, w, s in (("shop-eastus", 1000, "Enabled"), ("shop-westus", 1, "Disabled"))]
    made = client.profiles.create_or_update(RG, "tm-made", {
        "location": "global", "properties": {"trafficRoutingMethod": "Weighted", "endpoints": eps}})
    assert made.traffic_routing_method == "Weighted" and [e.name for e in made.endpoints] == ["shop-eastus",
                                                                                              "shop-westus"]
    assert run(router_status, target(emu, profile="tm-made")).weights == {"stable": 100, "canary": 0}
    run(router_set_weight, WeightRequest(target=target(emu, profile="tm-made"), canary_weight=25))
    # an emulator restarted on the same state file still has the profile, at its weights
    again = World({"subscription_id": SUB}, emu.world.state_path).profiles["tm-made"]
    assert {n: (e["weight"], e["status"]) for n, e in again["endpoints"].items()} == {
        "shop-eastus": (750, "Enabled"), "shop-westus": (250, "Enabled")}
    with pytest.raises(HttpResponseError) as exc:
        client.profiles.create_or_update(RG, "tm-bad", {"location": "global",
                                                        "properties": {"trafficRoutingMethod": "Random"}})
    assert exc.value.status_code == 400 and "'Random' of trafficRoutingMethod is invalid" in str(exc.value)
