"""The crash suite for the rest (issue 21): a canary, a blue-green and a maintenance window, each with the workers
SIGKILLed at its activity boundaries and in the middle of its long steps (tests/integration/crash_kit.py), on one lab
with the rollout stage (real app processes behind a real NGINX, real Prometheus, real PostgreSQL). Each completes
(the faulty canary: rolls back), and each side effect happened once, counted where it lands: the Kubernetes
emulator's request log (one canary created and removed, each weight written once, the promotion once or never;
one colour created, one switch, one scale-down; the
maintenance annotation on once and off once), the receiver (each status-page call once), the ARM emulator (one
backup) and PostgreSQL's own statistics (each table vacuumed/analyzed once).

What is sampled, to keep each procedure near a minute: the workflow worker is killed after the FIRST completion of
each activity type (`each_kind_once`), not after every one — a bake looks at Prometheus and the HTTP checks every
5 s, the same two activities over and over, and a maintenance window runs the same item and health activities per
table. Every kind of boundary is still crossed by a fresh worker replaying the history; which kinds were killed is
asserted. Every long (heartbeating) step is killed in the middle when it is caught running (the region worker), but
the steps whose heartbeat timeout is 60 s (maint.health: a read-only look at lag, retried as a read) and notify.send
(10 s, killed in the drill's run) are spared, and of the maintenance window's three status-page updates only the
first (the create, which must find its incident again rather than open a second) is killed in the middle. Short
bakes (10-15 s), a 10 s rollback window and one canary weight (50 %) keep the waiting down; the 5 s heartbeat of
the maintenance items comes from the test's inventory."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
import yaml

from lab.receiver import read_statuspage
from lab.seed import BLOAT_TABLE
from opsflow.contracts.k8s import K8S_SET_MAINTENANCE
from opsflow.contracts.maintenance import MAINT_HEALTH, MAINT_PLAN, MAINT_RUN_ITEM
from opsflow.contracts.notify import NOTIFY_SEND, STATUSPAGE_UPDATE
from opsflow.contracts.rollout import (
    ANALYSIS_JUDGE,
    HTTP_CHECKS,
    K8S_CREATE_CANARY,
    K8S_CREATE_COLOUR,
    K8S_DELETE_CANARY,
    K8S_ROLLOUT_STATUS,
    K8S_SCALE_CANARY,
    K8S_SCALE_DEPLOYMENT,
    K8S_SET_IMAGE,
    K8S_SWITCH_SERVICE,
    PROMETHEUS_SAMPLES,
    ROUTER_SET_WEIGHT,
)
from tests.integration.conftest import explain, fast_recovery, module_lab, wait_for
from tests.integration.crash_kit import Workers, run_killing_at_every_boundary
from tests.integration.test_crash_boundaries import arm_writes
from tests.integration.test_rollout_lab import deployments, route_weights, served

pytestmark = [pytest.mark.lab, pytest.mark.crash]

OK = (200, 201, 202)
NS = "/namespaces/shop"
APPROVERS = ("carol", "dave")  # the lab's rollout quorum: platform-lead and qa


@pytest.fixture(scope="module")
def crash_lab() -> Iterator[tuple]:
    """The rollout lab, its inventory made quick to recover (fast_recovery; maintenance items heartbeat every 5 s;
    the three table tasks, not the SQL statement), and the two workers the runs kill."""
    with module_lab(worker=False, rollout=True) as lab:
        inventory = fast_recovery(lab)
        inv = yaml.safe_load(open(inventory))
        inv["maintenance"]["heartbeat_timeout"] = "5s"
        inv["maintenance"]["tasks"] = inv["maintenance"]["tasks"][:3]  # vacuum-analyze, analyze, reindex
        open(inventory, "w").write(yaml.safe_dump(inv))
        workers = Workers(lab, inventory)
        workers.start_all()
        yield lab, workers


def kube(lab, path: str, method: str = "GET"):
    url = lab.state["kubernetes"]["eastus"]["url"]
    with urllib.request.urlopen(urllib.request.Request(url + path, method=method)) as r:
        return json.loads(r.read())


def kube_writes(lab) -> list[tuple[str, str]]:
    """The Kubernetes API requests that changed something (method, path), in order, since the log was cleared:
    the side effects, counted at the emulator."""
    return [(r["method"], r["path"].split("?")[0]) for r in kube(lab, "/_emulator/requests")["value"]
            if r["method"] != "GET" and r["status"] in OK and not r["path"].startswith("/_emulator")]


def counted(writes: list[tuple[str, str]], method: str, path_end: str) -> int:
    return sum(1 for m, p in writes if m == method and p.endswith(path_end))


async def test_canary_survives_a_kill_at_every_boundary(crash_lab):
    lab, workers = crash_lab
    image = lab.state["rollout"]["images"]["healthy"]
    kube(lab, "/_emulator/requests", "DELETE")
    wid = lab.cli_json("canary", "--image", image, "--steps", "50,100", "--bake", "10s", "--auto-promote",
                       "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True, approvers=APPROVERS,
                                                 each_kind_once=True, timeout=300)
    assert report["status"] == "succeeded", explain(report)
    assert not report["rolled_back"] and report["image"] == image
    kinds = set(report["_kinds"])
    assert kinds >= {K8S_ROLLOUT_STATUS.name, K8S_CREATE_CANARY.name, K8S_SCALE_CANARY.name, ROUTER_SET_WEIGHT.name,
                     PROMETHEUS_SAMPLES.name, HTTP_CHECKS.name, ANALYSIS_JUDGE.name, K8S_SET_IMAGE.name,
                     K8S_DELETE_CANARY.name}, report["_kinds"]
    assert K8S_CREATE_CANARY.name in report["_long"], report["_long"]  # waits for the canary's readiness

    writes = kube_writes(lab)
    assert counted(writes, "POST", f"{NS}/deployments") == 1, writes  # one canary created
    assert counted(writes, "DELETE", f"{NS}/deployments/web-canary") == 1, writes  # and removed once
    assert counted(writes, "POST", f"{NS}/services") == 1 and counted(writes, "DELETE", f"{NS}/services/web-canary")
    # sized once for 50 %: stable's HPA copied for the canary with its bounds at 50 % (the HPA sizes it), then a
    # scale only if the HPA has not got there yet; the copy deleted with the canary
    assert counted(writes, "POST", f"{NS}/horizontalpodautoscalers") == 1, writes
    assert counted(writes, "DELETE", f"{NS}/horizontalpodautoscalers/web-canary") == 1, writes
    assert counted(writes, "PATCH", f"{NS}/deployments/web-canary/scale") <= 1, writes
    assert counted(writes, "PATCH", f"{NS}/deployments/web") == 1, writes  # promoted once
    # 50/50 once, 100/0 once (route-stable), the canary's backendRef removed once (delete-canary)
    assert counted(writes, "PATCH", f"{NS}/httproutes/web") == 3, writes
    assert route_weights(lab) == {"web": 100}  # weights end 100/0 (the canary's backendRef gone)
    assert deployments(lab)["web"][0] == image and "web-canary" not in deployments(lab)
    version = image.rsplit(":", 1)[1]
    wait_for(lambda: set(served(lab, 10)) == {version}, 30, what="the new stable alone behind the proxy")


async def test_faulty_canary_rolls_back_cleanly_through_a_kill_at_every_boundary(crash_lab):
    """The faulty image (~15 % HTTP 500) with the workers killed: rolled back automatically, once — the weight
    back to 0, then the canary removed —, stable never touched."""
    lab, workers = crash_lab
    stable = deployments(lab)["web"]
    image = lab.state["rollout"]["images"]["faulty"]
    kube(lab, "/_emulator/requests", "DELETE")
    wid = lab.cli_json("canary", "--image", image, "--steps", "50,100", "--bake", "15s", "--auto-promote",
                       "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True, approvers=APPROVERS,
                                                 each_kind_once=True, timeout=300, expected="failed")
    assert report["status"] == "failed" and report["rolled_back"], explain(report)
    assert "error-rate" in report["rollback_reason"], report["rollback_reason"]
    undo = [s["name"] for s in report["steps"] if s["outcome"] == "compensated"]
    assert undo == [f"undo:{ROUTER_SET_WEIGHT.name}", f"undo:{K8S_DELETE_CANARY.name}"], explain(report)
    assert set(report["_kinds"]) >= {K8S_CREATE_CANARY.name, ROUTER_SET_WEIGHT.name, PROMETHEUS_SAMPLES.name,
                                     K8S_DELETE_CANARY.name}, report["_kinds"]

    writes = kube_writes(lab)
    assert counted(writes, "POST", f"{NS}/deployments") == 1, writes  # one canary created
    assert counted(writes, "DELETE", f"{NS}/deployments/web-canary") == 1, writes  # and removed once
    assert counted(writes, "PATCH", f"{NS}/httproutes/web") == 3, writes  # 50/50, 100/0, the canary's ref gone
    assert counted(writes, "PATCH", f"{NS}/deployments/web") == 0, writes  # stable never touched
    assert route_weights(lab) == {"web": 100} and deployments(lab)["web"] == stable
    assert "web-canary" not in deployments(lab)


async def test_bluegreen_survives_a_kill_at_every_boundary(crash_lab):
    lab, workers = crash_lab
    inv = yaml.safe_load(open(workers.inventory))
    inv["rollout"]["rollback_window"] = "10s"
    open(workers.inventory, "w").write(yaml.safe_dump(inv))
    active = deployments(lab)["web"]
    image = lab.state["rollout"]["images"]["healthy"].rsplit(":", 1)[0] + ":healthy-3"
    kube(lab, "/_emulator/requests", "DELETE")
    wid = lab.cli_json("bluegreen", "--image", image, "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True, approvers=APPROVERS,
                                                 each_kind_once=True, timeout=300)
    assert report["status"] == "succeeded", explain(report)
    assert not report["rolled_back"] and report["active"] == "web-green"
    kinds = set(report["_kinds"])
    assert kinds >= {K8S_ROLLOUT_STATUS.name, K8S_CREATE_COLOUR.name, K8S_SWITCH_SERVICE.name,
                     PROMETHEUS_SAMPLES.name, HTTP_CHECKS.name, ANALYSIS_JUDGE.name, K8S_SCALE_DEPLOYMENT.name}, kinds
    assert K8S_CREATE_COLOUR.name in report["_long"], report["_long"]  # waits for the new colour's readiness

    writes = kube_writes(lab)
    assert counted(writes, "POST", f"{NS}/deployments") == 1, writes  # one colour created
    assert counted(writes, "PATCH", f"{NS}/services/web") == 1, writes  # one switch
    assert counted(writes, "PATCH", f"{NS}/deployments/web/scale") == 1, writes  # the old colour down once
    d = deployments(lab)
    assert d["web-green"] == (image, active[1]) and d["web"][1] == 0, d
    wait_for(lambda: set(served(lab, 10)) == {"healthy-3"}, 30, what="green alone behind the proxy")


def stats(dsn: str, table: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = %s",
                         (table,)).fetchone()


async def test_maintenance_window_survives_a_kill_at_every_boundary(crash_lab):
    lab, workers = crash_lab
    east = lab.dsn("eastus")
    wait_for(lambda: lab.cli_json("maintenance", "--dry-run", "--requester", "alice")["planned"], 30,
             what="the bloated table in the statistics")
    before = {t: stats(east, t) for t in (BLOAT_TABLE, "lab_orders")}
    kube(lab, "/_emulator/requests", "DELETE")
    wid = lab.cli_json("maintenance", "--requester", "alice", "--reason", "crash suite")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True, each_kind_once=True,
                                                 spare=(NOTIFY_SEND.name, MAINT_HEALTH.name),
                                                 long_once=(STATUSPAGE_UPDATE.name,), timeout=300)
    assert report["status"] == "succeeded", explain(report)
    assert set(report["_kinds"]) >= {MAINT_PLAN.name, MAINT_RUN_ITEM.name, MAINT_HEALTH.name,
                                     K8S_SET_MAINTENANCE.name}, report["_kinds"]
    assert MAINT_RUN_ITEM.name in report["_long"] and STATUSPAGE_UPDATE.name in report["_long"], report["_long"]
    assert [i["outcome"] for i in report["items"]] == ["done"] * len(report["items"]), report["items"]
    keys = [i["key"] for i in report["items"]]
    assert len(keys) == len(set(keys)) >= 3, keys  # each item once in the report

    # each table processed once: one manual VACUUM of the bloated table, one ANALYZE of each
    after = {t: stats(east, t) for t in (BLOAT_TABLE, "lab_orders")}
    assert after[BLOAT_TABLE][0] - before[BLOAT_TABLE][0] == 1, (before, after)
    assert after["lab_orders"][1] - before["lab_orders"][1] == 1, (before, after)
    # maintenance mode on once and off once, and off at the end
    writes = kube_writes(lab)
    assert counted(writes, "PATCH", "/namespaces/shop/services/web") == 2, writes
    annotations = kube(lab, "/api/v1/namespaces/shop/services/web")["metadata"].get("annotations") or {}
    assert not any("maintenance" in k for k in annotations), annotations
    assert not report["maintenance_mode_on"]
    # the status page told once per state, the backup taken once
    calls = [(c["method"], (c["body"] or {}).get("incident", {}).get("status"))
             for c in read_statuspage(lab.root / "receiver") if c["method"] != "GET"]
    assert calls == [("POST", "scheduled"), ("PATCH", "in_progress"), ("PATCH", "completed")], calls
    backup = report["backup"]["id"].rsplit("/", 1)[-1]
    assert arm_writes(lab, "PUT", f"/backups/{backup}") == 1
