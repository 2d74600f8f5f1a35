"""deploy/kubernetes: the per-region workers as a team deploys them. Rendered by the real `kubectl kustomize`
(the Debian package scripts/setup.sh installs), validated offline against the Kubernetes schemas
(kubernetes-validate), and checked against the worker itself: the arguments parse, the probes and the port are the
worker's, the inventory is valid."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
REGIONS = ["eastus", "westeurope"]
K8S_VERSION = "1.30"


def validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}") from None


def render(region: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl is not installed (Debian package kubectl; scripts/setup.sh installs it)")
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / region)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_base_resources_are_valid_kubernetes():
    """Without kubectl too: each base file is a whole resource."""
    base = yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text())
    for name in base["resources"]:
        for doc in yaml.safe_load_all((KUBE / "base" / name).read_text()):
            validate(doc)


def test_the_base_inventory_is_a_valid_inventory():
    from opsflow.inventory import load_inventory

    inv = load_inventory(KUBE / "base" / "inventory.yaml")
    assert set(REGIONS) <= set(inv.regions), "one overlay per region of the inventory"
    assert sorted(p.name for p in (KUBE / "overlays").iterdir()) == sorted(inv.regions)


@pytest.mark.parametrize("region", REGIONS)
def test_each_region_overlay_renders_a_valid_worker_for_its_region(region):
    docs = render(region)
    for doc in docs:
        validate(doc)
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                            "NetworkPolicy"}
    assert all(d["metadata"]["name"].endswith(f"-{region}") or d["kind"] == "ConfigMap" for d in docs)
    dep, cm = by_kind["Deployment"], by_kind["ConfigMap"]
    pod = dep["spec"]["template"]
    [c] = pod["spec"]["containers"]

    # The arguments are the worker's own: they parse, and name this region.
    from worker.main import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(c["args"])
    assert args.region == [region] and not args.no_workflows
    assert args.metrics_address == "0.0.0.0" and args.inventory == ["/etc/opsflow/inventory.yaml"]
    port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert port == args.metrics_port

    # The inventory comes from the generated ConfigMap (a hashed name: a change rolls the pods), mounted read-only.
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "inventory")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and cm["metadata"]["name"].startswith(
        "opsflow-inventory"
    )
    assert yaml.safe_load(cm["data"]["inventory.yaml"])["regions"][region]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "inventory")
    assert mount["readOnly"] and args.inventory[0].startswith(mount["mountPath"] + "/")

    # Probes on the worker's health endpoints; resources; identities per region.
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    sa = by_kind["ServiceAccount"]
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert region in sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"

    # The PDB, the NetworkPolicy and the Service select this region's pods, and only them.
    labels = pod["metadata"]["labels"]
    assert labels["opsflow.io/region"] == region
    for kind, selector in (("PodDisruptionBudget", by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
                           ("NetworkPolicy", by_kind["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]),
                           ("Service", by_kind["Service"]["spec"]["selector"]),
                           ("Deployment", dep["spec"]["selector"]["matchLabels"])):
        assert selector.items() <= labels.items() and selector.get("opsflow.io/region") == region, kind
    ingress_ports = [p["port"] for rule in by_kind["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]]
    assert port in ingress_ports
