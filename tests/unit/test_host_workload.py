"""The host workload (`workload.kind: host`): what the inventory accepts and refuses, naming the field, and the
start/check/stop protocol run for real through a shell script standing in for the host (a Compose service or a
systemd unit in production; the lab's is lab/host_app.py, tested on the lab)."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError

from activities.host_workload import HostInstances
from opsflow.client import ClientError
from opsflow.rollout import ImageRequest, RolloutApp, RolloutPolicy, RolloutTarget
from worker.main import check_router_queues

NGINX = {"kind": "nginx", "upstream_file": "/etc/nginx/conf.d/web.conf", "upstream": "web",
         "servers": {"stable": ["10.0.0.1:80"], "canary": ["10.0.0.2:80"], "baseline": ["10.0.0.3:80"]},
         "queue": "opsflow-prod-lb1"}
HOST = {"kind": "host", "run": ["ssh", "-o", "BatchMode=yes", "deploy@web1"],
        "start": ["systemctl", "start", "shop@{role}:{version}"], "check": ["/usr/local/bin/shop-check", "{name}"],
        "stop": ["systemctl", "stop", "shop@{role}"]}
ANALYSIS = {"prometheus": "http://prom:9090", "metrics": [{"name": "errors", "query": "e"}]}


def app(**over) -> dict:
    return {"region": "eastus", "deployment": "web", "service": "web", "router": NGINX, "workload": HOST, **over}


def test_a_host_workload_fills_its_commands_behind_the_prefix_and_runs_on_the_routers_queue():
    a = RolloutApp.model_validate(app())
    assert a.workload.command("start", "canary", "web-canary", "registry/shop:2.1") == [
        "ssh", "-o", "BatchMode=yes", "deploy@web1", "systemctl", "start", "shop@canary:2.1"]
    assert a.workload.command("check", "baseline", "web-baseline")[-2:] == ["/usr/local/bin/shop-check",
                                                                            "web-baseline"]
    assert a.workload_queue() == "opsflow-prod-lb1"  # the worker on the NGINX host, unless it names its own
    own = RolloutApp.model_validate(app(workload={**HOST, "queue": "opsflow-prod-web1"}))
    policy = RolloutPolicy.model_validate({"apps": {"web": own}, "analysis": ANALYSIS})
    assert policy.router_queues() == {"opsflow-prod-lb1", "opsflow-prod-web1"}


def test_an_app_without_a_workload_serialises_as_before():
    """`workload` is a late field: inventories that do not set it keep their digest."""
    plain = RolloutApp.model_validate(app(workload=None))
    assert "workload" not in plain.model_dump() and plain.workload_queue() is None
    assert "workload" in RolloutApp.model_validate(app()).model_dump()


@pytest.mark.parametrize("change, message", [
    ({"start": ["systemctl", "start", "shop@{role}; rm -rf /"]}, "start: argument .* a remote shell would split"),
    ({"run": ["ssh", "deploy@web1 sudo"]}, "run: argument"),
    ({"stop": ["systemctl", "stop", "shop@*"]}, "stop: argument .shop@\\*. has characters"),
    ({"check": ["shop-check", "{image}"]}, r"check: \{image\} is not one of \{name\}, \{role\}"),
    ({"start": ["systemctl", "start", "shop@{role}"]}, r"start names neither \{image\} nor \{version\}"),
    ({"stop": []}, "stop"),
    ({"timeout": "2h"}, "timeout"),
])
def test_a_bad_host_workload_is_refused_naming_the_field(change, message):
    with pytest.raises(ValidationError, match=message):
        RolloutApp.model_validate(app(workload={**HOST, **change}))


def test_a_host_workload_needs_the_nginx_router():
    with pytest.raises(ValidationError, match="workload.kind host needs the nginx router"):
        RolloutApp.model_validate(app(router={"name": "web"}))


# -- the protocol, run for real ------------------------------------------------------------------------------------

SCRIPT = """#!/bin/sh
d=$(dirname "$0")
case "$1" in
  start) [ -e "$d/refuse" ] && { echo "pull $3: manifest unknown"; exit 1; }; echo "$3" > "$d/$2.image" ;;
  check) [ -e "$d/$2.image" ] || { echo "$2 does not run"; exit 3; }
         [ -e "$d/unready" ] && { echo "$2 warming up"; exit 1; }; cat "$d/$2.image" ;;
  stop) [ -e "$d/stuck" ] || rm -f "$d/$2.image" ;;
esac
"""


@pytest.fixture
def host(tmp_path):
    script = tmp_path / "instance"
    script.write_text(SCRIPT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "stable.image").write_text("shop:1\n")
    workload = {"kind": "host", "run": [], "timeout": 1, **{verb: [str(script), verb, "{role}"] for verb in
                                                            ("check", "stop")},
                "start": [str(script), "start", "{role}", "{image}"]}
    target = RolloutTarget(environment="prod", region="eastus", app=RolloutApp.model_validate(app(workload=workload)))
    return tmp_path, target


def test_create_size_and_remove_a_host_canary_then_promote(host):
    d, target = host
    inst = HostInstances(target)
    s = inst.state()
    assert (s.stable_image, s.stable_done, s.canary) == ("shop:1", True, None)
    s = inst.create("registry.example/shop:2")
    assert (s.canary, s.canary_image, s.canary_ready, s.canary_replicas) == ("web-canary", "registry.example/shop:2",
                                                                              1, 1)
    assert inst.size().canary_ready == 1
    assert inst.create("registry.example/shop:2").canary_image == "registry.example/shop:2"  # again: a retry
    baseline = HostInstances(target.baseline_target())
    assert baseline.create("shop:1").canary == "web-baseline" and (d / "baseline.image").exists()
    s = inst.remove()
    assert s.canary is None and not (d / "canary.image").exists() and (d / "baseline.image").exists()
    assert inst.remove().canary is None  # nothing to remove: success
    assert inst.promote("registry.example/shop:2").stable_image == "registry.example/shop:2"


def test_a_host_command_that_fails_or_never_gets_ready_is_named(host):
    d, target = host
    inst = HostInstances(target)
    with pytest.raises(ApplicationError, match="image 'shop:2;reboot' has characters") as e:
        inst.create("shop:2;reboot")
    assert e.value.non_retryable and not (d / "canary.image").exists()
    (d / "refuse").touch()
    with pytest.raises(ApplicationError, match="start web-canary .shop:2.: exit 1: pull shop:2: manifest unknown"):
        inst.create("shop:2")
    os.remove(d / "refuse")
    (d / "unready").touch()
    with pytest.raises(ApplicationError, match=r"web-canary not ready with shop:2 after 1s \(check: exit 1: canary "
                                               "warming up"):
        inst.create("shop:2")
    with pytest.raises(ApplicationError, match="web-canary is not ready"):
        inst.size()
    assert inst.state().canary == "web-canary"  # running, not ready: still a canary (a leftover for the preflight)
    (d / "stuck").touch()
    with pytest.raises(ApplicationError, match="stop web-canary: check still answers exit 1"):
        inst.remove()


def test_a_router_queue_worker_serves_only_the_inventorys_router_queues():
    class Inv:
        environment = "prod"
        rollout = RolloutPolicy.model_validate({"apps": {"web": app()}, "analysis": ANALYSIS})

    args = argparse.Namespace(region=None, no_regions=False, no_workflows=False)
    check_router_queues([Inv()], ["opsflow-prod-lb1"], args)
    with pytest.raises(ClientError, match="--router-queue opsflow-prod-lb2: no router.queue or workload.queue of prod "
                                          r"names it \(they name: opsflow-prod-lb1\)"):
        check_router_queues([Inv()], ["opsflow-prod-lb2"], args)
    with pytest.raises(ClientError, match="leave out --region"):
        check_router_queues([Inv()], ["opsflow-prod-lb1"], argparse.Namespace(region=["eastus"], no_regions=False,
                                                                             no_workflows=False))


def test_a_run_cannot_bring_a_host_command_of_its_own(host):
    """The worker runs only the commands its own inventory gives an app: a run's copy with another `start` is
    refused before anything runs on the host."""
    from types import SimpleNamespace

    from activities import workloads
    from activities.rules import RULEBOOK

    d, target = host
    mine = RolloutPolicy.model_validate({"apps": {"web": target.app}, "analysis": ANALYSIS})
    RULEBOOK.add(SimpleNamespace(environment=target.environment, rollout=mine))
    try:
        assert workloads.rollout_status(target).stable_image == "shop:1"  # the worker's own: runs
        evil = target.model_copy(deep=True)
        evil.app.workload.start = ["/bin/sh", "-c", "{image}"]
        with pytest.raises(ApplicationError, match="is not one of prod's inventory on this worker") as e:
            workloads.create_canary(ImageRequest(target=evil, image="shop:2"))
        assert e.value.type == "NotTrusted" and not (d / "canary.image").exists()
    finally:
        RULEBOOK._inventories.pop(target.environment, None)
