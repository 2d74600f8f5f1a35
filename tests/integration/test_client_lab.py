"""The client API's promises on the lab: one worker process serves several environments, and `opsflow status`
answers without a worker and says which queues nobody polls."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from tests.integration.conftest import ROOT, wait_for
from tests.integration.test_failover_lab import wait_status

pytestmark = pytest.mark.lab


def second_environment(lab, name: str = "lab2") -> str:
    """Another environment on the same lab resources: the lab's inventory under another name (other task queues)."""
    data = yaml.safe_load(open(lab.inventory))
    data["environment"] = name
    path = lab.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_fleet_worker(lab, *inventories: str) -> subprocess.Popen:
    args = [a for inv in inventories for a in ("--env", inv)]
    log = open(lab.root / "fleet-worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.main", *args], stdout=log, stderr=subprocess.STDOUT, env=lab.env(), cwd=ROOT
    )
    lab.workers.append(proc)
    return proc


def test_one_worker_serves_two_environments_and_status_works_without_it(lab):
    other = second_environment(lab)
    fleet = start_fleet_worker(lab, lab.inventory, other)

    # Both environments' dry runs run their preflight on their own region queues, served by the one process.
    for inv, env in ((lab.inventory, "lab"), (other, "lab2")):
        out = lab.cli_json("failover", "--env", inv, "--to", "westeurope", "--requester", "alice", "--dry-run")
        assert out["status"] == "planned" and out["environment"] == env and out["workflow_id"] == f"opsflow-{env}", out
        assert any(s["name"] == "preflight" and s["outcome"] == "ok" for s in out["steps"]), out["steps"]
    log = (lab.root / "fleet-worker.log").read_text()
    assert "environments lab, lab2" in log and "opsflow-lab2-westeurope" in log

    # A real failover waits for approval; with the worker alive, status has the live report and nothing unserved.
    started = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")
    wid = started["workflow_id"]
    live = wait_status(lab, wid, lambda r: (r.get("waiting_for") or "").startswith("approval"), what="approval wait")
    assert live["report_source"] == "query" and live["unserved_queues"] == []

    # Worker killed: status still answers, from Temporal's record, and says nobody polls the procedure's queues.
    fleet.kill()
    fleet.wait(10)
    began = time.monotonic()
    # Each queue's last poll ages on its own: wait for all three, not the first.
    queues = {"opsflow-lab", "opsflow-lab-eastus", "opsflow-lab-westeurope"}
    def unserved() -> dict | None:  # through the CLI: its view without a worker is what this test is about
        r = lab.cli_json("status", wid)
        return r if set(r["unserved_queues"]) == queues else None

    dead = wait_for(unserved, timeout=60, interval=1, what="the dead worker's queues to show as unserved")
    assert dead["temporal_status"] == "running" and dead["report_source"] is None and dead["status"] == "waiting"
    text = lab.cli("status", wid, check=True)
    assert (
        "no worker polls opsflow-lab (workflow queue" in text.stdout
        and "no worker polls opsflow-lab-westeurope" in text.stdout
    )
    assert time.monotonic() - began < 60

    # The lock holds for the other environment's procedures too, and a second start here is refused (exit 3).
    refused = lab.cli("failover", "--to", "westeurope", "--requester", "alice")
    assert refused.returncode == 3 and f"another procedure is running on environment lab: {wid}" in refused.stderr
    wait_for(lambda: lab.cli("status", wid).returncode == 0, timeout=10, what="status to keep answering")
