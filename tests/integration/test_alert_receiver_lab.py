"""`opsflow alert-receiver` on the lab: Alertmanager's webhook payloads over real HTTP request a failover that waits at
its approval gate, once per firing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration import forked
from tests.integration.conftest import ROOT, wait_for
from tests.integration.test_failover_lab import sql, wait_status
from worker.metrics import free_port

pytestmark = pytest.mark.lab


def webhook(alerts: list[dict], status: str = "firing") -> dict:
    """Alertmanager's webhook body (version 4), as its notifier sends it."""
    return {"version": "4", "groupKey": '{}:{alertname="DatabaseDown"}', "truncatedAlerts": 0, "status": status,
            "receiver": "opsflow", "groupLabels": {"alertname": "DatabaseDown"}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "alerts": alerts}


def alert(name: str, fingerprint: str, status: str = "firing", starts: str = "2026-12-06T03:00:00Z", **labels) -> dict:
    return {
        "status": status,
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} in {labels.get('region', '?')}"},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": fingerprint,
    }


def test_an_alert_requests_a_failover_once_and_changes_nothing_before_approval(lab, worker, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": [
        {"alertname": "DatabaseDown", "match": {"region": "eastus"}, "procedure": "failover", "to": "westeurope"}]}))
    port = free_port()
    receiver = forked.start("starters.cli", ["alert-receiver", "--routes", str(routes), "--as", "alice", "--port",
                                             str(port), "--state", str(tmp_path / "state.json")],
                            lab.env(), ROOT, lab.root / "alert-receiver.log")
    try:
        url = f"http://127.0.0.1:{port}/alerts"

        def up():
            try:
                return httpx.get(url, timeout=2).json()["ok"]
            except httpx.TransportError:
                return False

        wait_for(up, timeout=30, what="the alert receiver")
        firing = alert("DatabaseDown", "a1b2c3d4", region="eastus", severity="critical")
        other = alert("DiskFull", "ffff0000", region="eastus")
        r = httpx.post(url, json=webhook([firing, other]), timeout=60)
        assert r.status_code == 200, r.text
        first, ignored = r.json()["results"]
        assert first["outcome"] == "started" and first["to"] == "westeurope", first
        assert ignored["outcome"] == "ignored"
        wid = first["workflow_id"]

        # It waits at its gate; nothing changed; the on-call is told how to approve.
        report = wait_status(lab, wid, lambda s: (s.get("waiting_for") or "").startswith("approval"),
                             what="approval wait")
        assert report["requester"] == "alice" and "alert DatabaseDown (a1b2c3d4" in report["reason"]
        assert sql(lab.dsn("eastus"), "SELECT pg_is_in_recovery()")[0][0] is False
        assert sql(lab.dsn("westeurope"), "SELECT pg_is_in_recovery()")[0][0] is True
        from lab.receiver import read_notifications

        texts = [json.dumps(n) for n in read_notifications(Path(lab.state["receiver"]["dir"]))]
        assert any("Approval needed" in t and wid in t for t in texts)

        # Alertmanager repeats the firing (repeat_interval, retries): nothing new starts.
        again = httpx.post(url, json=webhook([firing]), timeout=60).json()["results"][0]
        assert again == {"alertname": "DatabaseDown", "fingerprint": "a1b2c3d4", "outcome": "duplicate",
                         "workflow_id": wid}
        assert json.loads((tmp_path / "state.json").read_text()) == {"a1b2c3d4@2026-12-06T03:00:00Z": wid}
        runs = lab.cli_json("list")
        runs = runs if isinstance(runs, list) else runs.get("procedures", runs)
        assert len([p for p in runs if p.get("workflow_id") == wid]) == 1

        # A resolved alert requests nothing; a new firing while the environment is busy is refused, not remembered.
        resolved = httpx.post(url, json=webhook([{**firing, "status": "resolved"}], "resolved"), timeout=60)
        assert resolved.json()["results"][0]["outcome"] == "ignored"
        later = alert("DatabaseDown", "a1b2c3d4", starts="2026-12-06T05:00:00Z", region="eastus")
        busy = httpx.post(url, json=webhook([later]), timeout=60).json()["results"][0]
        assert busy["outcome"] == "refused" and busy["workflow_id"] == wid
        assert len(json.loads((tmp_path / "state.json").read_text())) == 1

        # Not a webhook payload: 400 naming what is wrong.
        bad = httpx.post(url, json={"alerts": [{"labels": {}}]}, timeout=10)
        assert bad.status_code == 400 and "version" in bad.json()["error"]
    finally:
        receiver.kill()
        receiver.wait(10)
    lab.cli("abort", wid, "--as", "alice", "--reason", "test over", check=True)


def test_bad_routes_are_refused_naming_what_is_wrong(lab, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": [{"alertname": "DatabaseDown", "to": "mars"}]}))
    proc = lab.cli("alert-receiver", "--routes", str(routes), "--as", "alice", "--port", str(free_port()))
    assert proc.returncode == 2 and "'mars', not a region" in proc.stderr
    routes.write_text(yaml.safe_dump({"routes": [{"alertname": "DatabaseDown"}]}))
    proc = lab.cli("alert-receiver", "--routes", str(routes), "--as", "alice", "--port", str(free_port()))
    assert proc.returncode == 2 and "exactly one of to" in proc.stderr
