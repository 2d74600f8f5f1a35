"""deploy/kubernetes/components/alert-receiver: the alert receiver as a team deploys it, added to one region's
overlay (the repository's eastus overlay plus the `components:` line the component's file says to add), rendered by
the real `kubectl kustomize`, validated against the Kubernetes schemas, and checked against the receiver itself: its
arguments parse, it reads the workers' own inventory ConfigMap (so its copy is the rules' copy), Alertmanager's
example config reaches its Service, and only the monitoring namespace may reach it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from starters.cli import build_parser
from tests.unit.test_deploy_kubernetes import KUBE, validate

ALERTMANAGER = KUBE.parents[0] / "alertmanager" / "alertmanager.yml"


def render_with_receiver(tmp_path, region: str = "eastus") -> list[dict]:
    overlay = yaml.safe_load((KUBE / "overlays" / region / "kustomization.yaml").read_text())
    up = os.path.relpath(KUBE, tmp_path)
    overlay["resources"] = [f"{up}/base"]
    overlay["components"] = [f"{up}/components/alert-receiver"]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl is not installed (Debian package kubectl; scripts/setup.sh installs it)")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_receiver_component_renders_a_valid_receiver_on_the_workers_inventory(tmp_path):
    docs = render_with_receiver(tmp_path)
    for doc in docs:
        validate(doc)
    mine = {d["kind"]: d for d in docs if d["metadata"]["name"].startswith("opsflow-alert-receiver")}
    assert set(mine) == {"Deployment", "Service", "NetworkPolicy"}
    assert all(d["metadata"]["namespace"] == "opsflow" for d in mine.values())
    dep = mine["Deployment"]
    pod = dep["spec"]["template"]
    [c] = pod["spec"]["containers"]

    # The arguments are the CLI's own.
    args = build_parser().parse_args(c["args"])
    assert args.func.__name__ == "run_receiver" and args.address == "0.0.0.0" and args.key and args.token_file
    port = next(p for p in c["ports"] if p["name"] == "webhook")["containerPort"]
    assert port == args.port and dep["spec"]["replicas"] == 1

    # The workers' generated inventory (one ConfigMap in the build): the receiver's copy is the rules' copy.
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "inventory")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert args.env.startswith(next(m for m in c["volumeMounts"] if m["name"] == "inventory")["mountPath"] + "/")
    secret = next(v for v in pod["spec"]["volumes"] if v["name"] == "credentials")["secret"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "credentials")
    assert mount["readOnly"] and args.key.startswith(mount["mountPath"]) and secret["defaultMode"] == 0o400

    # Alertmanager's example posts to this Service; only Alertmanager's pods may reach the port.
    svc = mine["Service"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
    am = yaml.safe_load(ALERTMANAGER.read_text())
    urls = [w["url"] for r in am["receivers"] for w in r.get("webhook_configs", [])]
    assert urls == [f"http://{host}/alerts"]
    policy = mine["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [rule] = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
