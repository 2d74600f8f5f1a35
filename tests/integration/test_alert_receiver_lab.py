"""An alert may request a failover, never perform one (issue 23), on the lab's alerting stage (lab/alerting.py): a
real Prometheus evaluates a rule on a lab signal, a real Alertmanager (Debian's prometheus-alertmanager) routes the
firing alert by webhook to `opsflow alert-receiver`, which starts the failover the inventory's `alerts:` section
maps it to, signed with the receiver's own operator key; the failover waits at its approval gate, the approvers are
told, and Alertmanager's repeats of the firing start nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from lab.alerting import ALERT, REQUESTER, degrade, restart_receiver
from lab.manage import worker_env
from lab.receiver import read_notifications
from tests.integration.conftest import Lab, lab_root, take_down, wait_for
from tests.integration.test_failover_lab import sql, wait_end, wait_status

pytestmark = pytest.mark.lab


@pytest.fixture
def alert_lab(lab_home):
    from lab.manage import up

    root = lab_root()
    lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, alerts=True))
    yield lab
    lab.stop_workers()
    take_down(root)


def webhook_total(alertmanager: str) -> tuple[float, float]:
    """Alertmanager's own count of webhook notifications: (sent, failed)."""
    text = httpx.get(f"{alertmanager}/metrics", timeout=5).text
    found = dict(re.findall(r'^alertmanager_notifications(_failed)?_total\{integration="webhook"\} (\S+)$', text,
                            re.MULTILINE))
    return float(found.get("", 0)), float(found.get("_failed", 0))


def test_a_real_alert_requests_one_signed_failover_that_waits_for_approval(alert_lab, tmp_path):
    lab, a = alert_lab, alert_lab.state["alerting"]
    state_file = Path(a["dir"]) / "receiver-state.json"
    lab.start_worker()
    assert webhook_total(a["alertmanager"]) == (0, 0)

    degrade(lab.state, "eastus")  # the lab's signal: Prometheus's rule RegionDegraded fires for eastus
    started = wait_for(lambda: state_file.exists() and json.loads(state_file.read_text()), timeout=60,
                       what="Alertmanager's webhook to start a failover")
    [(firing, wid)] = started.items()
    assert wid == "opsflow-lab"

    # It waits at its gate, started by the receiver's name with its own key; nothing changed; the approvers are told.
    report = wait_status(lab, wid, lambda s: (s.get("waiting_for") or "").startswith("approval"), what="approval")
    assert report["requester"] == REQUESTER and f"requested by alert {ALERT}" in report["reason"]
    assert report["start_signature"].startswith("-----BEGIN SSH SIGNATURE-----") and report["start_nonce"]
    assert sql(lab.dsn("eastus"), "SELECT pg_is_in_recovery()")[0][0] is False
    assert sql(lab.dsn("westeurope"), "SELECT pg_is_in_recovery()")[0][0] is True
    # The notice is sent beside the gate (an activity of its own): it may land just after the wait shows.
    wanted = f"Requested by {REQUESTER}: requested by alert {ALERT}"
    wait_for(lambda: any("Approval needed" in t and wid in t and wanted in t for t in map(
        json.dumps, read_notifications(Path(lab.state["receiver"]["dir"])))), timeout=30, what="the approvers' notice")
    alerts = httpx.get(f"{a['prometheus']}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    assert [(x["labels"]["alertname"], x["labels"]["region"], x["state"]) for x in alerts] == [
        (ALERT, "eastus", "firing")]

    # Alertmanager repeats the firing (repeat_interval 2 s): each repeat is delivered and starts nothing.
    wait_for(lambda: webhook_total(a["alertmanager"])[0] >= 3, timeout=60, what="two repeats of the notification")
    assert webhook_total(a["alertmanager"])[1] == 0
    outcomes = httpx.get(a["receiver"], timeout=5).json()["outcomes"]
    assert outcomes["started"] == 1 and outcomes["duplicate"] >= 2, outcomes
    assert json.loads(state_file.read_text()) == {firing: wid}
    listed = lab.cli_json("list")
    runs = [r for r in (listed if isinstance(listed, list) else listed["procedures"]) if r.get("workflow_id") == wid]
    assert len(runs) == 1, runs

    # The receiver restarts without its state file (a rescheduled pod): the next repeat finds the run in Temporal.
    restart_receiver(lab.root, worker_env(lab.state), forget=True)
    assert wait_for(lambda: state_file.exists() and json.loads(state_file.read_text()), timeout=30,
                    what="a repeat after the restart") == {firing: wid}
    outcomes = httpx.get(a["receiver"], timeout=5).json()["outcomes"]
    assert outcomes.get("duplicate", 0) >= 1 and "started" not in outcomes, outcomes

    # The receiver's name may not approve (it is not an approver; the inventory refuses one that is).
    key = a["key"]
    refused = lab.cli("approve", wid, "--as", REQUESTER, "--key", key, "--reason", "an alert approving itself")
    assert refused.returncode != 0 and "may not approve" in refused.stderr + refused.stdout, refused

    # Only Alertmanager (its bearer token) may post; a resolved alert requests nothing; a new firing while the
    # environment is busy is refused, not remembered.
    token = Path(a["token_file"]).read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    fingerprint, since = firing.split("@")
    body = {"version": "4", "status": "resolved", "receiver": "opsflow", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": a["alertmanager"], "groupKey": "{}", "truncatedAlerts": 0,
            "alerts": [{"status": "resolved", "labels": {"alertname": ALERT, "region": "eastus"}, "annotations": {},
                        "startsAt": since, "endsAt": since, "generatorURL": "", "fingerprint": fingerprint}]}
    assert httpx.post(a["receiver"], json=body, timeout=10).status_code == 401
    assert httpx.post(a["receiver"], json=body, headers=auth, timeout=60).json()["results"][0]["outcome"] == "ignored"
    body["alerts"][0].update(status="firing", startsAt="2030-01-01T00:00:00Z")
    busy = httpx.post(a["receiver"], json=body, headers=auth, timeout=60).json()["results"][0]
    assert busy["outcome"] == "refused" and busy["workflow_id"] == wid
    assert json.loads(state_file.read_text()) == {firing: wid}
    bad = httpx.post(a["receiver"], json={"alerts": [{"labels": {}}]}, headers=auth, timeout=10)
    assert bad.status_code == 400 and "version" in bad.json()["error"]

    degrade(lab.state, "eastus", on=False)
    lab.cli("abort", wid, "--as", "alice", "--reason", "test over", check=True)
    assert wait_end(lab, wid)["status"] == "aborted"

    # The worker binds the receiver's name to a planned failover: even signed with its key, an emergency is refused.
    lab.cli("failover", "--to", "westeurope", "--emergency", "--requester", REQUESTER, "--key", key,
            "--reason", "an alert acting", check=True)
    ended = wait_end(lab, wid, ended=lambda r: r["status"] in ("refused", "failed", "succeeded", "aborted")
                     and r.get("run_id") != report.get("run_id"))
    assert ended["status"] == "refused" and "never start an emergency failover" in ended["failure"], ended
    assert sql(lab.dsn("westeurope"), "SELECT pg_is_in_recovery()")[0][0] is True
