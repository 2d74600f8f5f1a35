"""The inventory's rollout routers (chosen by kind) and the fresh baseline: what is accepted, and what is refused
with a message naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from opsflow.rollout import NginxRouter, RolloutApp, RolloutPolicy, RouterRef, TrafficManagerRouter, WeightRequest

ANALYSIS = {"prometheus": "http://prom:9090", "metrics": [{"name": "errors", "query": "e"}]}
NGINX = {"kind": "nginx", "upstream_file": "/etc/nginx/conf.d/web.conf", "upstream": "web",
         "servers": {"stable": ["10.0.0.1:80"], "canary": ["10.0.0.2:80"]}}
TM = {"kind": "traffic-manager", "subscription_id": "s", "resource_group": "rg", "profile": "p",
      "stable_endpoint": "a", "canary_endpoint": "b"}


def app(router: dict) -> dict:
    return {"region": "eastus", "deployment": "web", "service": "web", "router": router}


def test_the_kind_chooses_the_router_and_httproute_is_the_default():
    assert isinstance(RolloutApp.model_validate(app({"name": "web"})).router, RouterRef)
    assert isinstance(RolloutApp.model_validate(app(NGINX)).router, NginxRouter)
    assert isinstance(RolloutApp.model_validate(app(TM)).router, TrafficManagerRouter)
    with pytest.raises(ValidationError, match="router.kind is one of httproute, nginx, traffic-manager"):
        RolloutApp.model_validate(app({"kind": "haproxy", "name": "web"}))


@pytest.mark.parametrize("change, message", [
    ({"upstream_file": "web.conf"}, "must be an absolute path"),
    ({"servers": {"stable": ["10.0.0.1:80"]}}, "servers.canary names no server"),
    ({"servers": {"stable": ["10.0.0.1:80"], "canary": ["10.0.0.1:80"]}}, "is in servers.stable and servers.canary"),
    ({"reload": []}, "reload"),
])
def test_a_bad_nginx_router_is_refused_naming_the_field(change, message):
    with pytest.raises(ValidationError, match=message):
        RolloutApp.model_validate(app({**NGINX, **change}))


def test_a_fresh_baseline_needs_weights_up_to_50_and_a_three_way_router():
    fresh = {**ANALYSIS, "baseline": "fresh"}
    ok = RolloutPolicy.model_validate({"apps": {"web": app({"name": "web"})}, "analysis": fresh, "steps": [5, 50]})
    assert ok.analysis.baseline == "fresh"
    with pytest.raises(ValidationError, match=r"at most 50 \(not 75\)"):
        RolloutPolicy.model_validate({"apps": {"web": app({"name": "web"})}, "analysis": fresh, "steps": [25, 75]})
    with pytest.raises(ValidationError, match="apps.web: .*traffic-manager router has two endpoints"):
        RolloutPolicy.model_validate({"apps": {"web": app(TM)}, "analysis": fresh, "steps": [5, 25]})
    with pytest.raises(ValidationError, match="needs router.servers.baseline"):
        RolloutPolicy.model_validate({"apps": {"web": app(NGINX)}, "analysis": fresh, "steps": [5, 25]})


def test_shares_by_role():
    t = None
    assert WeightRequest.model_construct(target=t, canary_weight=25, baseline=False).shares() == {
        "stable": 75, "canary": 25}
    assert WeightRequest.model_construct(target=t, canary_weight=25, baseline=True).shares() == {
        "stable": 50, "canary": 25, "baseline": 25}


def test_a_router_queue_is_one_of_the_inventorys_queues():
    policy = RolloutPolicy.model_validate({"apps": {"web": app({**NGINX, "queue": "opsflow-prod-lb1"})},
                                           "analysis": ANALYSIS})
    assert policy.router_queues() == {"opsflow-prod-lb1"}
