"""The Kubernetes activities against the lab's Kubernetes API emulator, through the real `kubernetes` client.

Every test starts its own emulated cluster(s) in-process (milliseconds), writes a
kubeconfig with one `lab-<region>` context per cluster, calls the activity functions
directly (or inside temporalio's ActivityEnvironment where the activity context
matters: heartbeats, timeouts, cancellation) and checks the cluster's state through the
real client, as an operator with kubectl would.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.config import new_client_from_config
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from activities.kubernetes import (
    AUTOSCALER_BEFORE,
    TRANSIENT_RETRIES,
    kube_status,
    lower_autoscalers,
    scale_up,
    scale_up_and_wait,
    set_maintenance,
)
from lab.k8s_emulator import BROKEN_ANNOTATION, NODE_NOT_READY_ANNOTATION, start_emulator, write_kubeconfig
from lab.ports import free_port
from opsflow.contracts.k8s import K8S_SCALE_UP, K8S_SET_MAINTENANCE, K8S_STATUS
from opsflow.inventory import KubernetesConfig
from opsflow.models import MaintenanceRequest, RegionTarget, ScaleRequest
from tests.helpers import eventually as wait_until

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
DB = {"provider": "postgres", "dsn": "host=127.0.0.1 port=5432 user=ops dbname=postgres"}

SEED = {
    "seconds_per_replica": 0.05,
    "nodes": ["node-1", "node-2"],
    "deployments": [
        {"name": "web", "namespace": "shop", "replicas": 1},
        {"name": "worker", "namespace": "shop", "replicas": 2},
        {"name": "payments", "namespace": "shop", "replicas": 1, "broken": True},
    ],
    "services": [{"name": "web", "namespace": "shop", "annotations": {"team": "checkout"}}],
}


# -- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture
def cluster():
    handle = start_emulator(SEED)
    yield handle
    handle.stop()


@pytest.fixture
def kubeconfig(tmp_path, cluster) -> str:
    return str(write_kubeconfig(tmp_path / "kubeconfig", {"lab-westeurope": cluster.url}))


def target(kubeconfig: str, region: str = "westeurope", *, deployments=(("web", 3), ("worker", 2)), service="web",
           namespace="shop", context: str | None = None) -> RegionTarget:
    return RegionTarget(
        environment="lab",
        region=region,
        database=DB,
        kubernetes=KubernetesConfig(
            kubeconfig=kubeconfig,
            context=context or f"lab-{region}",
            namespace=namespace,
            service=service,
            deployments=[{"name": n, "replicas": r} for n, r in deployments],
        ),
    )


def api(kubeconfig: str, context: str = "lab-westeurope") -> k8s.ApiClient:
    return new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)




# -- the emulator speaks the Kubernetes API ----------------------------------------------------------------------


def test_version_nodes_and_discovery(kubeconfig):
    with api(kubeconfig) as c:
        assert k8s.VersionApi(c).get_code().git_version.startswith("v1.")
        nodes = k8s.CoreV1Api(c).list_node().items
        assert [n.metadata.name for n in nodes] == ["node-1", "node-2"]
        assert all({x.type: x.status for x in n.status.conditions}["Ready"] == "True" for n in nodes)
        groups = k8s.ApisApi(c).get_api_versions().groups
        assert "apps" in [g.name for g in groups]


def test_unknown_objects_answer_404_with_a_status_object(kubeconfig, cluster):
    with api(kubeconfig) as c:
        with pytest.raises(k8s.ApiException) as err:
            k8s.AppsV1Api(c).read_namespaced_deployment("nope", "shop")
        assert err.value.status == 404
        status = json.loads(err.value.body)
        assert status["kind"] == "Status" and status["apiVersion"] == "v1"
        assert status["status"] == "Failure" and status["reason"] == "NotFound" and status["code"] == 404
        assert status["message"] == 'deployments.apps "nope" not found'
        assert status["details"] == {"name": "nope", "group": "apps", "kind": "deployments"}

        with pytest.raises(k8s.ApiException) as err:
            k8s.CoreV1Api(c).read_namespaced_service("nope", "shop")
        assert json.loads(err.value.body)["message"] == 'services "nope" not found'

        with pytest.raises(k8s.ApiException) as err:
            k8s.AppsV1Api(c).patch_namespaced_deployment_scale("nope", "shop", {"spec": {"replicas": 2}})
        assert err.value.status == 404
    # An unknown path is a 404 Status too.
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"{cluster.url}/apis/apps/v1/namespaces/shop/widgets/x", timeout=5)
    assert http_err.value.code == 404
    assert json.loads(http_err.value.read())["kind"] == "Status"


def test_generation_observed_generation_and_patch_semantics(kubeconfig):
    with api(kubeconfig) as c:
        apps = k8s.AppsV1Api(c)
        dep = apps.read_namespaced_deployment("web", "shop")
        assert dep.metadata.generation == 1 and dep.status.observed_generation == 1
        # A metadata-only change does not bump the generation.
        dep = apps.patch_namespaced_deployment("web", "shop", {"metadata": {"labels": {"tier": "front"}}})
        assert dep.metadata.generation == 1
        # A spec change does; strategic merge keeps the container's ports (containers merge on name).
        dep = apps.patch_namespaced_deployment(
            "web",
            "shop",
            {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "registry.local/app:2"}]}}}},
        )
        assert dep.metadata.generation == 2
        container = dep.spec.template.spec.containers[0]
        assert container.image == "registry.local/app:2" and container.ports[0].container_port == 8080
        # Status is not writable through the main resource.
        apps.patch_namespaced_deployment(
            "web", "shop", {"status": {"readyReplicas": 99}}, _content_type="application/merge-patch+json"
        )
        done = wait_until(lambda: (d := apps.read_namespaced_deployment("web", "shop")).status.observed_generation == 2
                          and d.status.updated_replicas == 1 and d)
        assert done.status.ready_replicas == 1
        # A stale resourceVersion is a 409 Conflict; an invalid replica count a 422.
        stale = dict(metadata={"resourceVersion": "1"}, spec={"replicas": 2})
        with pytest.raises(k8s.ApiException) as err:
            apps.patch_namespaced_deployment_scale("web", "shop", stale, _content_type="application/merge-patch+json")
        assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
        with pytest.raises(k8s.ApiException) as err:
            apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": -1}})
        assert err.value.status == 422
        # JSON patch works too.
        apps.patch_namespaced_deployment_scale("web", "shop", [{"op": "replace", "path": "/spec/replicas", "value": 2}])
        scale = apps.read_namespaced_deployment_scale("web", "shop")
        assert scale.spec.replicas == 2 and scale.kind == "Scale" and scale.status.selector == "app=web"
        assert apps.read_namespaced_deployment("web", "shop").metadata.generation == 3


def test_controller_moves_status_step_by_step(kubeconfig, cluster):
    cluster.seconds_per_replica = 0.2
    with api(kubeconfig) as c:
        apps = k8s.AppsV1Api(c)
        apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 4}})
        seen = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = apps.read_namespaced_deployment("web", "shop").status
            seen.add(st.ready_replicas or 0)
            if st.ready_replicas == 4:
                break
            time.sleep(0.05)
        assert seen >= {1, 2, 3, 4}, f"ready counts seen: {sorted(seen)}"
        conds = {x.type: x for x in st.conditions}
        assert conds["Available"].status == "True"
        assert conds["Progressing"].reason == "NewReplicaSetAvailable"
        assert st.observed_generation == 2 and st.updated_replicas == 4 and st.available_replicas == 4


# -- k8s.status --------------------------------------------------------------------------------------------------


def test_status_reports_deployments_and_maintenance(kubeconfig):
    status = kube_status(target(kubeconfig, deployments=(("web", 3), ("worker", 2))))
    assert status.region == "westeurope"
    # desired is the CURRENT spec (1), not the inventory's 3: the region is not scaled up yet.
    assert [(d.name, d.desired, d.ready) for d in status.deployments] == [("web", 1, 1), ("worker", 2, 2)]
    assert status.ready is True
    assert status.maintenance is False


def test_status_not_ready_while_a_deployment_is_rolling_out(kubeconfig, cluster):
    cluster.seconds_per_replica = 1.0
    with api(kubeconfig) as c:
        k8s.AppsV1Api(c).patch_namespaced_deployment_scale("worker", "shop", {"spec": {"replicas": 5}})
    status = kube_status(target(kubeconfig))
    worker = next(d for d in status.deployments if d.name == "worker")
    assert worker.desired == 5 and worker.ready < 5
    assert status.ready is False


def test_status_not_ready_when_a_node_is_not_ready(kubeconfig):
    with api(kubeconfig) as c:
        core = k8s.CoreV1Api(c)
        core.patch_node("node-2", {"metadata": {"annotations": {NODE_NOT_READY_ANNOTATION: "true"}}})
        wait_until(lambda: {x.type: x.status for x in core.read_node("node-2").status.conditions}["Ready"] == "False")
    assert kube_status(target(kubeconfig)).ready is False
    with api(kubeconfig) as c:
        k8s.CoreV1Api(c).patch_node("node-2", {"metadata": {"annotations": {NODE_NOT_READY_ANNOTATION: None}}})
    wait_until(lambda: kube_status(target(kubeconfig)).ready)


def test_status_of_a_broken_deployment_is_not_ready(kubeconfig):
    status = kube_status(target(kubeconfig, deployments=(("web", 1), ("payments", 1))))
    assert [(d.name, d.ready) for d in status.deployments] == [("web", 1), ("payments", 0)]
    assert status.ready is False


def test_region_without_kubernetes_is_trivially_ready():
    t = RegionTarget(environment="lab", region="eastus", database=DB)
    assert kube_status(t).ready is True and kube_status(t).deployments == []
    assert set_maintenance(MaintenanceRequest(target=t, on=True)).maintenance is None
    assert scale_up(ScaleRequest(target=t)).ready is True


# -- k8s.set_maintenance -----------------------------------------------------------------------------------------


def test_maintenance_on_and_off_is_idempotent(kubeconfig):
    t = target(kubeconfig)

    def service():
        with api(kubeconfig) as c:
            return k8s.CoreV1Api(c).read_namespaced_service("web", "shop")

    assert set_maintenance(MaintenanceRequest(target=t, on=True)).maintenance is True
    svc = service()
    assert svc.metadata.annotations == {"team": "checkout", "maintenance": "true"}
    version = svc.metadata.resource_version

    assert set_maintenance(MaintenanceRequest(target=t, on=True)).maintenance is True
    assert service().metadata.resource_version == version  # looked, did not write

    assert set_maintenance(MaintenanceRequest(target=t, on=False)).maintenance is False
    svc = service()
    assert svc.metadata.annotations == {"team": "checkout"}  # removed, the other annotation kept
    version = svc.metadata.resource_version

    assert set_maintenance(MaintenanceRequest(target=t, on=False)).maintenance is False
    assert service().metadata.resource_version == version
    assert kube_status(t).maintenance is False


def test_maintenance_without_a_service_has_nothing_to_do(kubeconfig):
    status = set_maintenance(MaintenanceRequest(target=target(kubeconfig, service=None), on=True))
    assert status.maintenance is None and status.ready is True


def test_maintenance_on_a_missing_service_is_non_retryable(kubeconfig):
    with pytest.raises(ApplicationError) as err:
        set_maintenance(MaintenanceRequest(target=target(kubeconfig, service="storefront"), on=True))
    assert err.value.non_retryable and err.value.type == "KubernetesNotFound"
    assert "service shop/storefront" in err.value.message


# -- k8s.scale_up ------------------------------------------------------------------------------------------------


def test_scale_up_moves_the_region_to_ready(kubeconfig, cluster):
    cluster.seconds_per_replica = 0.1
    t = target(kubeconfig, deployments=(("web", 3), ("worker", 4)))
    started = time.monotonic()
    status = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)
    assert time.monotonic() - started >= 0.15  # two pods each, one every 0.1 s: it did wait
    assert status.ready is True
    assert [(d.name, d.desired, d.ready) for d in status.deployments] == [("web", 3, 3), ("worker", 4, 4)]
    with api(kubeconfig) as c:
        dep = k8s.AppsV1Api(c).read_namespaced_deployment("web", "shop")
    assert dep.spec.replicas == 3 and dep.metadata.generation == 2 and dep.status.observed_generation == 2
    assert {x.type: x.status for x in dep.status.conditions}["Available"] == "True"
    assert kube_status(t).ready is True


def test_scale_up_is_idempotent_and_never_scales_down(kubeconfig):
    with api(kubeconfig) as c:
        apps = k8s.AppsV1Api(c)
        apps.patch_namespaced_deployment_scale("web", "shop", {"spec": {"replicas": 5}})  # e.g. an autoscaler
        wait_until(lambda: apps.read_namespaced_deployment("web", "shop").status.ready_replicas == 5)
        generation = apps.read_namespaced_deployment("web", "shop").metadata.generation
        t = target(kubeconfig, deployments=(("web", 3), ("worker", 2)))
        status = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)
        assert [(d.name, d.desired, d.ready) for d in status.deployments] == [("web", 5, 5), ("worker", 2, 2)]
        assert status.ready is True
        dep = apps.read_namespaced_deployment("web", "shop")
        assert dep.spec.replicas == 5 and dep.metadata.generation == generation  # nothing written


def test_scale_up_heartbeats_progress_in_an_activity(kubeconfig, cluster):
    # The registered activity itself, in an activity context: it polls and heartbeats about once a second.
    cluster.seconds_per_replica = 0.5
    beats: list[dict] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        activity_type=K8S_SCALE_UP.name,
        start_to_close_timeout=timedelta(seconds=30),
        heartbeat_timeout=timedelta(seconds=5),
    )
    env.on_heartbeat = lambda *details: beats.append(details[0])
    status = env.run(scale_up, ScaleRequest(target=target(kubeconfig, deployments=(("web", 4),))))
    assert status.ready is True
    assert len(beats) >= 2, beats
    assert all(set(b) >= {"ready", "desired"} for b in beats)
    assert beats[0]["desired"] == 4 and beats[0]["ready"] < 4 and beats[0]["waiting"]
    assert beats[-1] == {"ready": 4, "desired": 4, "waiting": []}
    readies = [b["ready"] for b in beats]
    assert readies == sorted(readies)


def test_activities_take_exactly_one_argument():
    # temporalio decodes arguments with their type hints only when the workflow passes as many
    # arguments as the activity declares; an extra defaulted parameter would hand us a dict.
    for fn in (kube_status, set_maintenance, scale_up):
        params = inspect.signature(fn).parameters
        assert len(params) == 1, f"{fn.__name__} must take exactly one parameter, has {list(params)}"
    names = {activity._Definition.must_from_callable(fn).name for fn in (kube_status, set_maintenance, scale_up)}
    assert names == {K8S_STATUS.name, K8S_SET_MAINTENANCE.name, K8S_SCALE_UP.name}


def test_scale_up_of_a_broken_deployment_gives_up_retryably(kubeconfig):
    t = target(kubeconfig, deployments=(("web", 2), ("payments", 2)))
    started = time.monotonic()
    with pytest.raises(ApplicationError) as err:
        scale_up_and_wait(ScaleRequest(target=t), wait_seconds=1.0, poll_seconds=0.1)
    assert time.monotonic() - started < 5
    assert err.value.type == "DeploymentNotReady" and not err.value.non_retryable
    assert "payments" in err.value.message and "web" not in err.value.message.split("not ready after")[1]
    with api(kubeconfig) as c:
        dep = k8s.AppsV1Api(c).read_namespaced_deployment("payments", "shop")
    assert dep.spec.replicas == 2 and not dep.status.ready_replicas  # scaled, never ready
    assert {x.type: x.status for x in dep.status.conditions}["Available"] == "False"


def test_scale_up_waits_no_longer_than_the_activity_timeout(kubeconfig):
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(seconds=2))
    started = time.monotonic()
    with pytest.raises(ApplicationError) as err:
        env.run(scale_up, ScaleRequest(target=target(kubeconfig, deployments=(("payments", 1),))))
    assert err.value.type == "DeploymentNotReady"
    assert 1.5 <= time.monotonic() - started < 4  # 90% of the 2 s start-to-close timeout


def test_scale_up_past_the_progress_deadline_fails_non_retryably(tmp_path):
    seed = {
        "seconds_per_replica": 0.05,
        "deployments": [
            {"name": "payments", "namespace": "shop", "replicas": 1, "broken": True, "progress_deadline_seconds": 1}
        ],
    }
    with start_emulator(seed) as cl:
        kc = str(write_kubeconfig(tmp_path / "kc", {"lab-westeurope": cl.url}))
        with pytest.raises(ApplicationError) as err:
            scale_up_and_wait(
                ScaleRequest(target=target(kc, deployments=(("payments", 3),), service=None)),
                wait_seconds=30,
                poll_seconds=0.1,
            )
    assert err.value.type == "DeploymentFailed" and err.value.non_retryable
    assert "payments" in err.value.message and "timed out progressing" in err.value.message


def test_scale_up_can_be_cancelled_while_waiting(kubeconfig):
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(seconds=60))
    threading.Timer(0.5, env.cancel).start()
    started = time.monotonic()
    with pytest.raises(CancelledError):
        env.run(scale_up, ScaleRequest(target=target(kubeconfig, deployments=(("payments", 1),))))
    assert time.monotonic() - started < 5


def test_broken_flag_through_the_api(kubeconfig, cluster):
    with api(kubeconfig) as c:
        k8s.AppsV1Api(c).patch_namespaced_deployment(
            "worker", "shop", {"metadata": {"annotations": {BROKEN_ANNOTATION: "true"}}}
        )
    with pytest.raises(ApplicationError) as err:
        scale_up_and_wait(
            ScaleRequest(target=target(kubeconfig, deployments=(("worker", 3),))), wait_seconds=0.6, poll_seconds=0.1
        )
    assert err.value.type == "DeploymentNotReady" and "worker: 2 of 3 replicas ready" in err.value.message
    cluster.set_broken("worker", "shop", broken=False)  # the in-process knob: the crash loop is fixed
    assert scale_up_and_wait(
        ScaleRequest(target=target(kubeconfig, deployments=(("worker", 3),))), poll_seconds=0.1
    ).ready


# -- errors ------------------------------------------------------------------------------------------------------


def test_unknown_deployment_is_non_retryable_and_named(kubeconfig):
    t = target(kubeconfig, deployments=(("web", 1), ("checkout", 2)))
    for call in (lambda: kube_status(t), lambda: scale_up_and_wait(ScaleRequest(target=t), wait_seconds=1)):
        with pytest.raises(ApplicationError) as err:
            call()
        assert err.value.non_retryable and err.value.type == "KubernetesNotFound"
        assert "deployment shop/checkout not found" in err.value.message
        assert 'deployments.apps "checkout" not found' in err.value.message
        assert "westeurope" in err.value.message


def test_unknown_namespace_is_named(kubeconfig):
    with pytest.raises(ApplicationError) as err:
        kube_status(target(kubeconfig, namespace="billing"))
    assert err.value.non_retryable and "namespace billing not found" in err.value.message


def test_unauthorized_and_forbidden_are_non_retryable(tmp_path):
    seed = {**SEED, "auth": {"token": "admin-token", "readonly_token": "viewer-token"}}
    with start_emulator(seed) as cl:
        kc = str(
            write_kubeconfig(
                tmp_path / "kc",
                {"lab-westeurope": cl.url, "lab-viewer": cl.url, "lab-admin": cl.url},
                tokens={"lab-viewer": "viewer-token", "lab-admin": "admin-token"},
            )
        )
        with pytest.raises(ApplicationError) as err:
            kube_status(target(kc))  # no credentials
        assert err.value.non_retryable and err.value.type == "KubernetesUnauthorized"
        assert "deployment shop/web" in err.value.message

        viewer = target(kc, context="lab-viewer")
        assert kube_status(viewer).ready is True  # reading is allowed
        with pytest.raises(ApplicationError) as err:
            set_maintenance(MaintenanceRequest(target=viewer, on=True))
        assert err.value.non_retryable and err.value.type == "KubernetesForbidden"
        assert 'services "web" is forbidden' in err.value.message

        assert set_maintenance(MaintenanceRequest(target=target(kc, context="lab-admin"), on=True)).maintenance is True


def test_server_errors_are_retried_in_the_call_then_retryable(kubeconfig, cluster):
    cluster.inject_fault("/deployments/", status=503, count=2)  # passing: retried by the client (TRANSIENT_RETRIES)
    assert kube_status(target(kubeconfig)).ready is True
    cluster.inject_fault("/deployments/", status=503, count=TRANSIENT_RETRIES.status + 1)  # lasting: the activity's
    with pytest.raises(ApplicationError) as err:
        kube_status(target(kubeconfig))
    assert not err.value.non_retryable and err.value.type == "KubernetesApiError" and "503" in err.value.message
    assert kube_status(target(kubeconfig)).ready is True  # the activity's retry succeeds


def test_unreachable_cluster_is_retryable(kubeconfig, cluster):
    cluster.stop()
    with pytest.raises(ApplicationError) as err:
        kube_status(target(kubeconfig))
    assert not err.value.non_retryable and err.value.type == "KubernetesUnavailable"


def test_missing_kubeconfig_or_context_is_non_retryable(kubeconfig, tmp_path):
    with pytest.raises(ApplicationError) as err:
        kube_status(target(str(tmp_path / "nope")))
    assert err.value.non_retryable and err.value.type == "KubernetesConfigError"
    with pytest.raises(ApplicationError) as err:
        kube_status(target(kubeconfig, context="lab-mars"))
    assert err.value.non_retryable and "lab-mars" in err.value.message


# -- one cluster per region ------------------------------------------------------------------------------------


def test_each_region_talks_to_its_own_cluster(tmp_path):
    with start_emulator(SEED) as west, start_emulator(SEED) as east:
        kc = str(write_kubeconfig(tmp_path / "kc", {"lab-westeurope": west.url, "lab-northeurope": east.url}))
        scale_up_and_wait(ScaleRequest(target=target(kc, "westeurope", deployments=(("web", 3),))), poll_seconds=0.1)
        set_maintenance(MaintenanceRequest(target=target(kc, "northeurope"), on=True))
        west_status = kube_status(target(kc, "westeurope"))
        east_status = kube_status(target(kc, "northeurope"))
    assert west_status.deployments[0].desired == 3 and west_status.maintenance is False
    assert east_status.deployments[0].desired == 1 and east_status.maintenance is True


# -- the emulator as a process ---------------------------------------------------------------------------------


def pods(kubeconfig: str) -> list[tuple[str, str, bool]]:
    """The web pods: name, IP, Ready, as the real client lists them."""
    with api(kubeconfig) as c:
        items = k8s.CoreV1Api(c).list_namespaced_pod("shop", label_selector="app=web").items
    return sorted((p.metadata.name, p.status.pod_ip,
                   any(x.type == "Ready" and x.status == "True" for x in p.status.conditions)) for p in items)


def test_emulator_process_keeps_its_state_across_restarts(tmp_path):
    seed_file = tmp_path / "seed.yaml"
    seed_file.write_text(
        "seconds_per_replica: 0.05\n"
        "deployments:\n  - {name: web, namespace: shop, replicas: 1}\n"
        "services:\n  - {name: web, namespace: shop}\n"
    )
    state = tmp_path / "state.json"
    port = free_port()
    kc = str(write_kubeconfig(tmp_path / "kc", {"lab-westeurope": f"http://127.0.0.1:{port}"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lab.k8s_emulator",
                "--seed",
                str(seed_file),
                "--port",
                str(port),
                "--state-file",
                str(state),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=1).status == 200
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                return False

        wait_until(up, timeout=15)
        return proc

    def stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        return out, err

    proc = start()
    try:
        t = target(kc, deployments=(("web", 3),))
        assert scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1).ready
        set_maintenance(MaintenanceRequest(target=t, on=True))
        pods_before = pods(kc)
        assert len(pods_before) == 3 and all(ready for _, _, ready in pods_before)
    finally:
        out, err = stop(proc)
    assert out == b""  # nothing but logs, and those go to stderr
    assert b"listening on" in err
    assert json.loads(state.read_text())["objects"]

    proc = start()
    try:
        status = kube_status(target(kc, deployments=(("web", 3),)))
        assert status.deployments[0].desired == 3 and status.deployments[0].ready == 3 and status.maintenance is True
        assert pods(kc) == pods_before  # the same pods (names, IPs), still ready: nothing recreated or flipped
    finally:
        stop(proc)


def test_emergency_scale_to_zero_of_the_old_region_is_best_effort(kubeconfig, tmp_path):
    from activities.kubernetes import scale_to_zero

    t = target(kubeconfig, deployments=(("web", 3), ("worker", 2)))
    res = scale_to_zero(t)
    assert res.fenced and res.detail == "scaled deployment shop/web to 0, scaled deployment shop/worker to 0", res
    with api(kubeconfig) as c:
        apps = k8s.AppsV1Api(c)
        assert [apps.read_namespaced_deployment(n, "shop").spec.replicas for n in ("web", "worker")] == [0, 0]

    # A dead region: nothing answers. Not an error: what is left to do, within seconds.
    dead = str(write_kubeconfig(tmp_path / "dead-kubeconfig", {"lab-westeurope": f"http://127.0.0.1:{free_port()}"}))
    started = time.monotonic()
    res = scale_to_zero(target(dead))
    assert not res.fenced and "by hand" in res.detail and "shop/web" in res.detail, res
    assert time.monotonic() - started < 60


# -- autoscalers: a failover raises the new region's HPA floor, lowers the old one's, a failback restores both ----


HPA_SEED = {
    "seconds_per_replica": 0.05,
    "hpa_sync_seconds": 0.1,
    "deployments": [{"name": "web", "namespace": "shop", "replicas": 1}, {"name": "worker", "namespace": "shop"}],
    "services": [{"name": "web", "namespace": "shop"}],
    "hpas": [{"name": "web", "namespace": "shop", "min": 1, "max": 2}],
}


def hpa_bounds(kubeconfig: str, name: str = "web") -> tuple[int, int, str | None]:
    with api(kubeconfig) as c:
        h = k8s.AutoscalingV2Api(c).read_namespaced_horizontal_pod_autoscaler(name, "shop")
    return h.spec.min_replicas, h.spec.max_replicas, (h.metadata.annotations or {}).get(AUTOSCALER_BEFORE)


def test_scale_up_raises_the_hpa_then_lowering_restores_it(tmp_path):
    emu = start_emulator(HPA_SEED)
    try:
        kc = str(write_kubeconfig(tmp_path / "kubeconfig", {"lab-westeurope": emu.url}))
        t = target(kc, deployments=(("web", 3), ("worker", 1)))
        status = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)
        # an HPA with max 2 would have scaled web back from 3: it was raised first, its bounds before kept on it
        assert [(a.name, a.deployment, a.min_before, a.max_before, a.min_after, a.max_after, a.action)
                for a in status.autoscalers] == [("web", "web", 1, 2, 3, 3, "raised")]
        assert hpa_bounds(kc)[:2] == (3, 3) and json.loads(hpa_bounds(kc)[2]) == {
            "minReplicas": 1, "maxReplicas": 2, "by": "raised"}
        assert {d.name: d.ready for d in status.deployments} == {"web": 3, "worker": 1}
        with api(kc) as c:  # once the HPA controller has seen its new bounds, web is still at 3 (not 2)
            auto = k8s.AutoscalingV2Api(c)

            def synced() -> bool:
                h = auto.read_namespaced_horizontal_pod_autoscaler("web", "shop")
                return h.status.observed_generation == h.metadata.generation and h.status.desired_replicas == 3

            wait_until(synced, timeout=10, what="the HPA controller to observe its raised bounds")
            assert k8s.AppsV1Api(c).read_namespaced_deployment_scale("web", "shop").spec.replicas == 3
        again = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)  # a retry: same report, no new write
        assert again.autoscalers == status.autoscalers

        lowered = lower_autoscalers(t)  # a failback makes this the old region: the values before come back
        assert [(a.min_before, a.max_before, a.min_after, a.max_after, a.action) for a in lowered.changes] == [
            (1, 2, 1, 2, "restored")]
        assert hpa_bounds(kc) == (1, 2, None)
    finally:
        emu.stop()


def test_lowering_an_old_region_keeps_its_values_for_the_failback(tmp_path):
    seed = dict(HPA_SEED, hpas=[{"name": "web", "namespace": "shop", "min": 3, "max": 10}],
                deployments=[{"name": "web", "namespace": "shop", "replicas": 3}])
    emu = start_emulator(seed)
    try:
        kc = str(write_kubeconfig(tmp_path / "kubeconfig", {"lab-westeurope": emu.url}))
        t = target(kc, deployments=(("web", 3),))
        first = lower_autoscalers(t)
        assert [(a.min_before, a.max_before, a.min_after, a.max_after, a.action) for a in first.changes] == [
            (3, 10, 1, 10, "lowered")]
        assert lower_autoscalers(t) == first  # idempotent: the kept values are not overwritten by the lowered ones
        assert hpa_bounds(kc)[:2] == (1, 10)
        back = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)  # the failback's scale-up
        assert [(a.min_after, a.max_after, a.action) for a in back.autoscalers] == [(3, 10, "restored")]
        assert hpa_bounds(kc) == (3, 10, None)
    finally:
        emu.stop()


def test_the_old_regions_floor_is_the_inventorys_standby_min_replicas(tmp_path):
    """kubernetes.standby_min_replicas: 2 lowers an HPA at 3/10 to 2 (not 1), kept for the failback; an HPA already
    below the floor (1/2) is left alone, never raised by a lowering."""
    seed = dict(HPA_SEED, hpas=[{"name": "web", "namespace": "shop", "min": 3, "max": 10},
                                {"name": "worker", "namespace": "shop", "min": 1, "max": 2}],
                deployments=[{"name": "web", "namespace": "shop", "replicas": 3},
                             {"name": "worker", "namespace": "shop", "replicas": 1}])
    emu = start_emulator(seed)
    try:
        kc = str(write_kubeconfig(tmp_path / "kubeconfig", {"lab-westeurope": emu.url}))
        t = target(kc, deployments=(("web", 3), ("worker", 1)))
        t.kubernetes.standby_min_replicas = 2
        lowered = lower_autoscalers(t)
        assert [(a.name, a.min_before, a.min_after, a.max_after, a.action) for a in lowered.changes] == [
            ("web", 3, 2, 10, "lowered"), ("worker", 1, 1, 2, "unchanged")]
        assert hpa_bounds(kc)[:2] == (2, 10) and hpa_bounds(kc, "worker") == (1, 2, None)
        back = scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1)  # the failback's scale-up
        assert [(a.name, a.min_after, a.action) for a in back.autoscalers] == [("web", 3, "restored"),
                                                                              ("worker", 1, "unchanged")]
    finally:
        emu.stop()


def test_no_hpa_or_no_permission_to_list_them_is_not_an_error(kubeconfig, tmp_path):
    t = target(kubeconfig, deployments=(("web", 1),))
    assert lower_autoscalers(t).changes == []
    assert scale_up_and_wait(ScaleRequest(target=t), poll_seconds=0.1).autoscalers == []
    emu = start_emulator(HPA_SEED)
    try:
        kc = str(write_kubeconfig(tmp_path / "ro", {"lab-westeurope": emu.url}))
        emu.inject_fault("GET /apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers", status=403)
        assert lower_autoscalers(target(kc, deployments=(("web", 1),))).changes == []
    finally:
        emu.stop()
