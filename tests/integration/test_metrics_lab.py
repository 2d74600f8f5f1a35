"""The worker's /metrics after real procedures on the lab (README "Running opsflow as a team"): scraped over HTTP,
read back after a restart, and scraped by a real Prometheus."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import explain, printed_report, wait_for
from tests.integration.test_failover_lab import wait_end, wait_status
from worker.metrics import free_port

pytestmark = pytest.mark.lab
PROMETHEUS = Path("/usr/bin/prometheus")
ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample the worker's endpoint serves: {(name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_worker_metrics_after_real_procedures(lab, monkeypatch):
    monkeypatch.setenv("OPSFLOW_METRICS_POLL_SECONDS", "1")
    env = yaml.safe_load(open(lab.inventory))["environment"]
    port = free_port()
    worker = lab.start_worker("--metrics-port", str(port))
    wait_for(lambda: ready(port), timeout=60, what="the worker's /readyz")
    first = scrape(port)
    assert any(name.startswith("temporal_") for name, _ in first), "the SDK's metrics are served next to opsflow's"
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok\n"

    # A planned failover waits at its gate: the gauge says so, with the gate's timeout from the worker's rules.
    timeout = yaml.safe_load(open(lab.inventory)).get("approval", {}).get("timeout")
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    wait_status(lab, wid, lambda r: (r.get("waiting_for") or "").startswith("approval"), what="approval wait")
    gate = dict(procedure="failover", environment=env, gate="approval")
    s = wait_for(lambda: (m := scrape(port)) and value(m, "opsflow_gate_waiting", **gate) == 1 and m,
                 timeout=30, what="opsflow_gate_waiting = 1")
    assert value(s, "opsflow_gate_waiting_seconds", **gate) >= 0
    assert value(s, "opsflow_gate_timeout_seconds", **gate) > 0
    if timeout is None:  # the inventory's default (ApprovalPolicy.timeout)
        assert value(s, "opsflow_gate_timeout_seconds", **gate) == 3600

    lab.cli("approve", wid, "--as", "bob", "--reason", "metrics test", check=True)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    final = lab.cli_json("report", wid)
    s = wait_for(lambda: (m := scrape(port)) and value(m, "opsflow_gate_waiting", **gate) is None and m,
                 timeout=30, what="the gate's gauge gone once approved")
    runs = dict(procedure="failover", environment=env, outcome="succeeded")
    assert value(s, "opsflow_procedure_runs_total", **runs) == 1
    assert value(s, "opsflow_procedure_duration_seconds_count", procedure="failover", environment=env) == 1
    took = ts(final["ended_at"]) - ts(final["started_at"])
    assert value(s, "opsflow_procedure_duration_seconds_sum", procedure="failover", environment=env) == pytest.approx(
        took
    )
    assert value(s, "opsflow_failover_rto_seconds", environment=env) == pytest.approx(final["rto_seconds"])
    assert final["rto_seconds"] > 0 and value(s, "opsflow_failover_rpo_bytes", environment=env) == 0

    # A restore drill: its success time.
    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    drill = printed_report(proc)
    assert drill["status"] == "succeeded", explain(drill)
    s = scrape(port)
    assert value(s, "opsflow_drill_last_success_timestamp_seconds", environment=env) == pytest.approx(
        ts(drill["ended_at"])
    )
    assert value(s, "opsflow_procedure_runs_total", procedure="drill", environment=env, outcome="succeeded") == 1

    # A restart keeps the last figures: read back from Temporal's visibility (the counters start again, as counters do).
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)
    port2 = free_port()
    lab.start_worker("--metrics-port", str(port2))
    wait_for(lambda: ready(port2), timeout=60, what="the restarted worker's /readyz")
    s = wait_for(lambda: (m := scrape(port2)) and value(m, "opsflow_drill_last_success_timestamp_seconds",
                                                        environment=env) is not None and m,
                 timeout=30, what="the last drill read back")
    assert value(s, "opsflow_drill_last_success_timestamp_seconds", environment=env) == pytest.approx(
        ts(drill["ended_at"])
    )
    assert value(s, "opsflow_failover_rto_seconds", environment=env) == pytest.approx(final["rto_seconds"])
    assert value(s, "opsflow_failover_rpo_bytes", environment=env) == 0
    assert value(s, "opsflow_procedure_runs_total", **runs) is None

    # A real Prometheus scrapes the worker.
    if not PROMETHEUS.exists():
        pytest.skip("no /usr/bin/prometheus (Debian package prometheus)")
    folder = lab.root / "prometheus-metrics-test"
    folder.mkdir()
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "opsflow-rules.yml")],
        "scrape_configs": [{"job_name": "opsflow-worker", "static_configs": [{"targets": [f"127.0.0.1:{port2}"]}]}]}))
    prom_port = free_port()
    prom = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={folder}/prometheus.yml",
            f"--storage.tsdb.path={folder}/data",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "w"),
    )
    try:
        def scraped():
            try:
                r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", timeout=5,
                              params={"query": f'opsflow_drill_last_success_timestamp_seconds{{environment="{env}"}}'})
            except httpx.TransportError:
                return None
            result = r.json()["data"]["result"] if r.status_code == 200 else []
            return result and float(result[0]["value"][1])

        assert wait_for(scraped, timeout=60, what="Prometheus to scrape the worker") == pytest.approx(
            ts(drill["ended_at"])
        )
        # The shipped rules load and evaluate against the real figures; every dashboard query runs.
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        rules = wait_for(lambda: [r for g in httpx.get(f"{api}/rules").json()["data"]["groups"] for r in g["rules"]
                                  if r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown"],
                         timeout=30, what="the rules evaluated")
        assert {r["name"]: r["health"] for r in rules} == {r["name"]: "ok" for r in rules} and len(rules) == 6
        dash = json.loads((ROOT / "deploy" / "grafana" / "opsflow-dashboard.json").read_text())
        answers = {}
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$environment", env)
                r = httpx.get(f"{api}/query", params={"query": expr}).json()
                assert r["status"] == "success", (panel["title"], expr, r)
                answers[panel["title"]] = r["data"]["result"]
        [rto] = answers["RTO of the last failover"]
        assert float(rto["value"][1]) == pytest.approx(final["rto_seconds"])
        [days] = answers["Days since the last successful restore drill"]
        assert 0 <= float(days["value"][1]) < 1
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(30)
