"""The real `kubectl` (Debian package `kubectl`) against the lab's Kubernetes emulator, through the seeds' commands:
`get pods -l`, `scale`, `annotate service`, `rollout status|history|undo|restart`, `get hpa`, `patch hpa`,
`get endpoints`, `logs -l ... --tail`. Each test asserts what kubectl printed and what the command changed, read
back through kubectl as an operator would.

Every test starts its own emulated cluster in-process (milliseconds) with a kubeconfig pointing at it.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lab.k8s_emulator import start_emulator, write_kubeconfig
from tests.helpers import eventually

pytestmark = pytest.mark.lab

SEED = {
    "seconds_per_replica": 0.05,
    "hpa_sync_seconds": 0.1,
    "nodes": ["node-1", "node-2"],
    "deployments": [
        {"name": "web", "namespace": "shop", "replicas": 3, "image": "registry.local/shop:1"},
        {"name": "worker", "namespace": "shop", "replicas": 2},
        {"name": "payments", "namespace": "shop", "replicas": 1, "broken": True},
    ],
    "services": [{"name": "web", "namespace": "shop", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                 {"name": "payments", "namespace": "shop"}],
    "hpas": [{"name": "web", "namespace": "shop", "min": 3, "max": 6}],
}


@pytest.fixture
def kubectl(tmp_path):
    binary = shutil.which("kubectl")
    if not binary:
        pytest.fail("kubectl is not installed (Debian package kubectl; scripts/setup.sh installs it)")
    emu = start_emulator(SEED)
    config = write_kubeconfig(tmp_path / "kubeconfig", {"lab-westeurope": emu.url})

    def run(*args: str, ok: bool = True) -> str:
        cmd = [binary, "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "cache"), "-n", "shop", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if ok:
            assert out.returncode == 0, f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr}"
            return out.stdout
        assert out.returncode != 0, f"kubectl {' '.join(args)} should have failed: {out.stdout}"
        return out.stderr

    yield run
    emu.stop()


def rows(text: str) -> list[list[str]]:
    """A table kubectl printed, without its header, split on whitespace."""
    return [line.split() for line in text.strip().splitlines()[1:]]


def ready_pods(kubectl, app: str) -> list[list[str]]:
    return [r for r in rows(kubectl("get", "pods", "-l", f"app={app}")) if r[1] == "1/1" and r[2] == "Running"]


def test_get_pods_by_label_one_pod_per_replica_owned_by_its_replicaset(kubectl):
    out = kubectl("get", "pods", "-l", "app=web")
    assert out.splitlines()[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    pods = rows(out)
    assert len(pods) == 3 and all(p[1:4] == ["1/1", "Running", "0"] for p in pods), out
    rs = rows(kubectl("get", "rs", "-l", "app=web"))
    assert len(rs) == 1 and rs[0][1:4] == ["3", "3", "3"]
    assert all(p[0].startswith(rs[0][0] + "-") for p in pods)
    listed = json.loads(kubectl("get", "pods", "-l", "app=web", "-o", "json"))["items"]
    owners = {(o["kind"], o["name"], o["controller"]) for p in listed for o in p["metadata"]["ownerReferences"]}
    assert owners == {("ReplicaSet", rs[0][0], True)}
    assert len({p["status"]["podIP"] for p in listed}) == 3
    # a crash-looping deployment's pod is there, not ready
    broken = rows(kubectl("get", "pods", "-l", "app=payments"))
    assert [p[1:3] for p in broken] == [["0/1", "CrashLoopBackOff"]]
    assert rows(kubectl("get", "pods", "-l", "app=nothing")) == []


def test_scale_makes_and_removes_pods(kubectl):
    assert "deployment.apps/worker scaled" in kubectl("scale", "deployment/worker", "--replicas=4")
    eventually(lambda: len(ready_pods(kubectl, "worker")) == 4, timeout=20, what="4 ready worker pods")
    kubectl("scale", "deployment/worker", "--replicas=1")
    eventually(lambda: len(rows(kubectl("get", "pods", "-l", "app=worker"))) == 1, timeout=20, what="1 worker pod")
    assert rows(kubectl("get", "deployment", "worker"))[0][1] == "1/1"


def test_annotate_service(kubectl):
    assert "service/web annotated" in kubectl("annotate", "service", "web", "maintenance=true")
    assert kubectl("get", "service", "web", "-o", "jsonpath={.metadata.annotations.maintenance}") == "true"
    kubectl("annotate", "service", "web", "maintenance-")
    assert "maintenance" not in json.loads(kubectl("get", "service", "web", "-o", "json"))["metadata"].get(
        "annotations", {})


def test_rollout_status_history_undo_restart(kubectl):
    def image() -> str:
        return kubectl("get", "deployment", "web", "-o", "jsonpath={.spec.template.spec.containers[0].image}")

    def revisions() -> list[str]:
        return [r[0] for r in rows(kubectl("rollout", "history", "deployment/web").split("\n", 1)[1])]

    assert revisions() == ["1"]
    kubectl("set", "image", "deployment/web", "web=registry.local/shop:2")
    out = kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    assert 'deployment "web" successfully rolled out' in out
    assert image() == "registry.local/shop:2" and revisions() == ["1", "2"]
    sets = {r[0]: r[1:4] for r in rows(kubectl("get", "rs", "-l", "app=web"))}
    assert sorted(sets.values()) == [["0", "0", "0"], ["3", "3", "3"]], sets
    assert "registry.local/shop:1" in kubectl("rollout", "history", "deployment/web", "--revision=1")

    assert "rolled back" in kubectl("rollout", "undo", "deployment/web")
    assert 'successfully rolled out' in kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    assert image() == "registry.local/shop:1"
    assert revisions() == ["2", "3"]  # revision 1's ReplicaSet is reused as revision 3, as a cluster does
    eventually(lambda: len(ready_pods(kubectl, "web")) == 3 and len(rows(kubectl("get", "pods", "-l", "app=web"))) == 3,
               timeout=20, what="3 pods of the rolled-back template")
    pods_before = {r[0] for r in rows(kubectl("get", "pods", "-l", "app=web"))}

    assert "restarted" in kubectl("rollout", "restart", "deployment/web")
    assert 'successfully rolled out' in kubectl("rollout", "status", "deployment/web", "--timeout=60s")
    assert revisions() == ["2", "3", "4"]
    eventually(lambda: len(ready_pods(kubectl, "web")) == 3, timeout=20, what="3 restarted pods")
    assert not {r[0] for r in rows(kubectl("get", "pods", "-l", "app=web"))} & pods_before
    assert kubectl("get", "deployment", "web", "-o",
                   "jsonpath={.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}")


def test_hpa_keeps_the_deployment_in_its_range_and_patch_moves_it(kubectl):
    out = kubectl("get", "hpa")
    assert out.splitlines()[0].split() == ["NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS", "AGE"]
    assert rows(out)[0][:2] == ["web", "Deployment/web"] and rows(out)[0][4:7] == ["3", "6", "3"]

    def replicas() -> int:
        return int(kubectl("get", "deployment", "web", "-o", "jsonpath={.spec.replicas}"))

    kubectl("scale", "deployment/web", "--replicas=9")  # above the HPA's max: it scales back
    eventually(lambda: replicas() == 6, timeout=20, what="the HPA to scale web back to its max 6")
    kubectl("scale", "deployment/web", "--replicas=1")
    eventually(lambda: replicas() == 3, timeout=20, what="the HPA to scale web up to its min 3")

    assert "patched" in kubectl("patch", "hpa", "web", "-p", '{"spec":{"minReplicas":5}}')
    eventually(lambda: replicas() == 5, timeout=20, what="the HPA to raise web to its new min 5")
    eventually(lambda: rows(kubectl("get", "hpa", "web"))[0][4:7] == ["5", "6", "5"], timeout=20,
               what="get hpa to show min 5, 5 replicas")
    # what the metrics would recommend (the lab has no metrics server): 2, below the min, so the min holds
    kubectl("annotate", "hpa", "web", "lab.opsflow.dev/recommended-replicas=2")

    def limited() -> dict:
        hpa = json.loads(kubectl("get", "hpa", "web", "-o", "json"))
        assert hpa["apiVersion"] == "autoscaling/v2"
        return {c["type"]: c for c in hpa["status"]["conditions"]}["ScalingLimited"]

    eventually(lambda: limited()["reason"] == "TooFewReplicas", timeout=20, what="ScalingLimited: TooFewReplicas")
    assert limited()["status"] == "True" and replicas() == 5
    # the API server's validation, as kubectl shows it
    err = kubectl("patch", "hpa", "web", "-p", '{"spec":{"minReplicas":7}}', ok=False)
    assert "must be greater than or equal to `minReplicas`" in err
    err = kubectl("patch", "hpa", "web", "-p", '{"spec":{"minReplicas":0}}', ok=False)
    assert "spec.minReplicas" in err and "greater than or equal to 1" in err
    # a deployment scaled to zero is left alone
    kubectl("scale", "deployment/web", "--replicas=0")
    eventually(lambda: "ScalingDisabled" in kubectl("get", "hpa", "web", "-o", "jsonpath={.status.conditions}"),
               timeout=20, what="the HPA to say scaling is disabled")
    assert replicas() == 0


def test_endpoints_follow_ready_pods(kubectl):
    def addresses(name: str) -> set[str]:
        cell = rows(kubectl("get", "endpoints", name))[0][1]
        return set() if cell == "<none>" else set(cell.split(","))

    ips = {p["status"]["podIP"] for p in json.loads(kubectl("get", "pods", "-l", "app=web", "-o", "json"))["items"]}
    assert addresses("web") == {f"{ip}:8080" for ip in ips}  # the service's targetPort
    assert addresses("payments") == set()  # its only pod is not ready
    ep = json.loads(kubectl("get", "endpoints", "payments", "-o", "json"))
    assert len(ep["subsets"][0]["notReadyAddresses"]) == 1
    slices = json.loads(kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", "json"))
    assert [e["conditions"]["ready"] for e in slices["items"][0]["endpoints"]] == [True] * 3
    kubectl("scale", "deployment/web", "--replicas=4")  # within the HPA's range
    eventually(lambda: "+ 1 more..." in kubectl("get", "endpoints", "web"), timeout=20, what="a fourth address")
    ep = json.loads(kubectl("get", "endpoints", "web", "-o", "json"))
    assert len(ep["subsets"][0]["addresses"]) == 4 and "notReadyAddresses" not in ep["subsets"][0]


def test_logs_by_label_with_tail(kubectl):
    pods = rows(kubectl("get", "pods", "-l", "app=web"))
    out = kubectl("logs", "-l", "app=web", "--tail=5", "--prefix")
    lines = out.strip().splitlines()
    assert len(lines) == 5 * len(pods) == 15, out
    for pod in pods:
        mine = [line for line in lines if line.startswith(f"[pod/{pod[0]}/web]")]
        assert len(mine) == 5
        assert mine[-1].endswith("readiness probe passed: serving on :8080")
        assert not any("starting web" in line for line in mine)  # the first line is beyond the tail
    full = kubectl("logs", pods[0][0])
    assert full.splitlines()[0].endswith("starting web image=registry.local/shop:1")
    assert "CrashLoopBackOff" not in full
    crashed = kubectl("logs", "-l", "app=payments", "--tail=1")
    assert "panic: lab fault" in crashed
