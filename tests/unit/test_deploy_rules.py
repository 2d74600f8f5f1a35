"""deploy/prometheus' alert rules (checked and exercised by the real promtool) and deploy/grafana's dashboard: every
metric they name is one the worker exports (worker/metrics.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.metrics import OpsMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "opsflow-dashboard.json"
# Named by the rules, fed by what is not built yet.
PLANNED: set[str] = set()


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: Debian's prometheus package ships it (scripts/setup.sh installs it)")
    return found


def exported() -> set[str]:
    """Every series name the worker's registry serves (a histogram's _bucket/_sum/_count, a counter's _total)."""
    names = set()
    for family in OpsMetrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bopsflow_[a-z_]+", expr))


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES / "opsflow-rules.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout


def test_promtool_runs_the_rule_tests():
    out = subprocess.run([promtool(), "test", "rules", "opsflow-rules.test.yml", "opsflow-drills.test.yml"],
                         capture_output=True, text=True, timeout=120, cwd=RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == 2


def test_the_rules_name_metrics_the_worker_exports():
    rules = yaml.safe_load((RULES / "opsflow-rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"OpsflowDrillOverdue", "OpsflowGateWaitingTooLong", "OpsflowProcedureFailed", "OpsflowReadinessFailing",
            "OpsflowMaintenanceWatchBreached"} <= set(alerts)
    known = exported()
    for name, rule in alerts.items():
        named = metric_names(rule["expr"])
        assert named, name
        assert named - known <= PLANNED, f"{name} names {named - known - PLANNED}, which the worker does not export"


def test_every_dashboard_panel_queries_what_the_worker_exports():
    dash = json.loads(DASHBOARD.read_text())
    known = exported()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"] for p in panels)
    for word in ("Procedures", "RTO", "RPO", "drill", "Gates"):
        assert word in titles
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            named = metric_names(t["expr"])
            assert named, f"{p['title']}: {t['expr']} names no opsflow metric"
            assert named <= known, f"{p['title']} queries {named - known}, which the worker does not export"
    var = dash["templating"]["list"][1]
    assert metric_names(var["query"]["query"]) <= known


# -- deploy/alertmanager: the alert-requested failovers' routing (README "Running opsflow as a team") ------------

ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def amtool(*args: str) -> str:
    found = shutil.which("amtool")
    if not found:
        pytest.fail("amtool is missing: the Debian package prometheus-alertmanager ships it (scripts/setup.sh)")
    out = subprocess.run([found, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_amtool_checks_the_alertmanager_config():
    assert "SUCCESS" in amtool("check-config", str(ALERTMANAGER))


def test_the_alerts_the_example_inventory_routes_reach_the_receiver_and_the_pager():
    from opsflow.inventory import load_inventory

    inv = load_inventory(ROOT / "docs" / "inventory.example.yaml")
    assert inv.alerts is not None
    for route in inv.alerts.routes:
        labels = {"alertname": route.alertname, **route.match, **({route.to_label: "westeurope"} if route.to_label
                                                                  else {})}
        found = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER}",
                       *(f"{k}={v}" for k, v in labels.items())).strip()
        assert found == "opsflow-failover-request,on-call", (labels, found)
    opsflow_alerts = [r["alert"] for g in yaml.safe_load((RULES / "opsflow-rules.yml").read_text())["groups"]
                      for r in g["rules"]]
    for name in opsflow_alerts:  # opsflow's own alerts page people and request nothing
        assert amtool("config", "routes", "test", f"--config.file={ALERTMANAGER}", f"alertname={name}").strip() \
            == "on-call"
