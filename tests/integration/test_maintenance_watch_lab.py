"""The application watched during the maintenance window, end to end on the lab's rollout stage: real app
processes behind NGINX under steady load, scraped every second by the lab's real Prometheus. The window's first
item runs until the test lets it end; meanwhile the app starts failing (its stable deployment gets the faulty
image: ~15 % of answers are 5xx). After that item the canary's judge finds the error rate significantly worse
than in the minutes before the window: no further table is started, the rest is deferred, the alert goes out."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import yaml

from activities.prometheus import query, query_range
from lab.receiver import read_notifications
from lab.rollout import IMAGES
from tests.integration.conftest import Lab, explain, module_lab, wait_for
from tests.integration.test_failover_lab import wait_end

pytestmark = pytest.mark.lab

REQUESTS = 'sum(rate(http_requests_total{deployment="web"}[5s]))'
ERRORS = 'sum(rate(http_requests_total{deployment="web",status=~"5.."}[5s]))'


@pytest.fixture(scope="module")
def rollout_lab():
    with module_lab(worker=False, rollout=True) as lab:
        yield lab


def set_stable_image(lab: Lab, image: str) -> None:
    """`kubectl set image` on the stable deployment (a strategic merge patch to the Kubernetes emulator)."""
    url = lab.state["kubernetes"]["eastus"]["url"]
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}}
    request = urllib.request.Request(f"{url}/apis/apps/v1/namespaces/shop/deployments/web", method="PATCH",
                                     data=json.dumps(patch).encode(),
                                     headers={"Content-Type": "application/strategic-merge-patch+json"})
    with urllib.request.urlopen(request):
        pass


def test_the_app_failing_during_the_window_stops_new_work_and_alerts(rollout_lab):
    lab = rollout_lab
    prometheus = lab.state["rollout"]["prometheus"]
    inv = yaml.safe_load(open(lab.inventory).read())
    inv["maintenance"].update(
        backup={"take": False, "verify": False},
        status_page=None,
        tasks=[
            # the first item runs until the test releases it (a row in maint_release): the app fails meanwhile
            {"kind": "sql", "name": "slow cleanup", "sql": "DO $$ BEGIN WHILE NOT EXISTS (SELECT 1 FROM maint_release) "
                                                          "LOOP PERFORM pg_sleep(0.2); END LOOP; END $$"},
            {"kind": "analyze", "tables": ["public.lab_orders"]},
            {"kind": "vacuum-analyze", "tables": ["public.lab_events"]},
        ],
        watch={"prometheus": prometheus, "duration": "2s", "interval": "1s",
               "queries": [{"name": "error rate", "query": f"{ERRORS} / {REQUESTS}", "missing": "zero"}],
               "during": {"baseline": "20s", "recent": "8s", "step": "1s"}},
    )
    open(lab.inventory, "w").write(yaml.safe_dump(inv))
    with psycopg.connect(lab.dsn("eastus"), autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS maint_release (at timestamptz)")
    lab.start_worker()  # it holds the rules written above

    def history() -> bool:  # 20 s of the healthy app's figures: the baseline before the window
        now = datetime.now(timezone.utc)
        return len(query_range(prometheus, REQUESTS, now - timedelta(seconds=20), now, 1)) >= 18

    wait_for(history, 90, what="20 s of the app's figures in Prometheus")
    wid = lab.cli_json("maintenance", "--requester", "alice", "--reason", "weekly")["workflow_id"]
    wait_for(lambda: (lab.status(wid).get("waiting_for") or "").startswith("approval"), 120, what="the approval")
    lab.cli("approve", wid, "--as", "bob", "--reason", "go", check=True)
    wait_for(lambda: lab.status(wid).get("current_step") == "sql:slow cleanup", 60, what="the first item to run")
    set_stable_image(lab, IMAGES["faulty"])  # the app starts failing while the window works
    try:
        # the last 8 s (what the judge reads) all errors, read as the judge does (missing: zero): no 5xx series,
        # or no rate while the new process has fewer than two scrapes, counts as 0, not as no data
        failing = f"min_over_time((({ERRORS} or vector(0)) / ({REQUESTS} or vector(1)))[8s:1s])"
        wait_for(lambda: (v := query(prometheus, failing)) == v and v > 0.02, 60, what="the app's errors to show")
        with psycopg.connect(lab.dsn("eastus"), autocommit=True) as c:
            c.execute("INSERT INTO maint_release VALUES (now())")  # the first item ends
        report = wait_end(lab, wid, 180, lambda r: r["status"] not in ("running", "waiting"), "the window to end")
    finally:
        set_stable_image(lab, IMAGES["healthy"])
    report = lab.cli_json("report", wid)
    assert report["status"] == "succeeded", explain(report)
    assert [i["key"] for i in report["items"]] == ["sql:slow cleanup"], (json.dumps(report["app"][0]), explain(report))
    assert [d["key"] for d in report["deferred"]] == ["analyze:public.lab_orders", "vacuum-analyze:public.lab_events"]
    assert all("the application worsened during the window" in d["reason"] for d in report["deferred"])
    (judged,) = report["app"]
    metric = judged["metrics"][0]
    print(f"judged after {judged['after']}: {judged['verdict']}: {judged['reason']}")
    assert judged["verdict"] == "fail" and metric["verdict"] == "high", judged
    assert metric["current"] > 0.02 and metric["baseline"] < 0.01, metric  # the faulty image: ~15 % 5xx
    assert report["stopped_by_app"] and not report["maintenance_mode_on"]
    alerts = [n for n in read_notifications(lab.root / "receiver") if "worsened during the window" in json.dumps(n)]
    assert alerts, "no alert reached the receiver"
