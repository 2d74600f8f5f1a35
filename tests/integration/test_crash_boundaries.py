"""The crash suite (issue 8): SIGKILL the worker at EVERY activity boundary of planned failover, emergency
failover, failback and drill, in one run per procedure on one lab; each completes, and each side effect happened
exactly once (promotions, replicas built, scratch servers created and deleted: counted at the ARM emulator).
Plus: the Temporal dev server killed and restarted in the middle of a procedure (it persists to a sqlite file).

How: tests/integration/crash_kit.py (the workers, the run that kills them). notify.send, the same step in
every procedure, is killed in the middle only in the drill's run. The test inventory's heartbeat timeout is 5 s and
its workflow task timeout 1 s (conftest.fast_recovery), so a killed step or decision is taken over within seconds."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from lab.inventory import self_managed_database
from lab.postgres import Cluster
from tests.integration.conftest import explain, fast_recovery, wait_for
from tests.integration.crash_kit import Workers, run_killing_at_every_boundary
from tests.integration.test_crash import arm_admin
from tests.integration.test_failover_lab import autoscaler, sql, streams_from, timeline, wait_end, wait_status

pytestmark = [pytest.mark.lab, pytest.mark.crash]

OK = (200, 201, 202)


def arm_writes(lab, method: str, path_end: str) -> int:
    """Accepted ARM requests of one kind: the side effects, counted at the emulator."""
    return sum(1 for r in arm_admin(lab, "/_emulator/requests")["value"]
               if r["method"] == method and r["path"].split("?")[0].endswith(path_end) and r["status"] in OK)


def setup_data(lab) -> None:
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE orders (id int PRIMARY KEY)")
    sql(east, "INSERT INTO orders SELECT generate_series(1, 500)")
    wait_for(lambda: sql(west, "SELECT count(*) FROM pg_class WHERE relname = 'orders'")[0][0] == 1, what="replication")


async def test_planned_failover_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["_boundaries"] >= 8 and report["_kills"]["long_steps"] >= 2, report["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1  # one promotion asked of Azure
    assert timeline(lab.dsn("westeurope")) == 2  # and one happened
    assert report["rpo_bytes"] == 0 and sql(lab.dsn("westeurope"), "SELECT count(*) FROM orders")[0][0] == 500
    # the HPAs followed once, whatever was killed: raised in westeurope, lowered in eastus, the values before kept
    assert [(a["region"], a["min_before"], a["min_after"], a["action"]) for a in report["autoscalers"]] == [
        ("westeurope", 1, 3, "raised"), ("eastus", 3, 1, "lowered")]
    assert autoscaler(lab, "westeurope") == (3, 3, True) and autoscaler(lab, "eastus") == (1, 10, True)


async def test_emergency_failover_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--emergency", "--requester", "alice")[
        "workflow_id"
    ]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False)
    assert report["status"] == "succeeded", explain(report)
    assert report["_boundaries"] >= 5 and report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1
    assert timeline(lab.dsn("westeurope")) == 2


async def test_failback_survives_a_kill_at_every_boundary(lab):
    from tests.integration.test_procedures_lab import failover

    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    failover(lab, "westeurope")  # the setting: eastus was left; no kills here
    builds_before = arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg")
    promotions_before = arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg")
    wid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg") - builds_before == 1  # one replica built
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg") - promotions_before == 1  # one promotion back
    assert sql(lab.dsn("eastus"), "SELECT pg_is_in_recovery()")[0][0] is False
    assert sql(lab.dsn("eastus"), "SELECT count(*) FROM orders")[0][0] == 500
    assert autoscaler(lab, "eastus") == (3, 10, False) and autoscaler(lab, "westeurope") == (1, 2, False)


async def switch_over_and_back(lab) -> tuple[dict, dict]:
    """The failover to westeurope and the failback, on the lab's inventory as it stands, each with a kill at every
    boundary: each a switchover (no replica rebuilt), the old primary following the new one each way, every row
    kept. Returns the two reports."""
    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"], explain(report)
    assert report["_boundaries"] >= 8, report["_kills"]
    assert streams_from(east, west)

    fid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    # its child, the failover back, is not killed here: with it (crash_kit.run_killing_at_every_boundary_with_child)
    # these two tests took 2-5x longer, and the suite's load-sensitive rollout tests failed beside them
    back = await run_killing_at_every_boundary(lab, workers, fid, approve=True)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    assert sql(east, "SELECT count(*) FROM orders")[0][0] == 500
    return report, back


async def test_switchover_failover_and_failback_survive_a_kill_at_every_boundary(lab):
    """Switchover first (issue 20, an Azure virtual endpoint): the failover there and the failback, each with a kill
    at every boundary; one switchover asked of Azure each way, no replica built, every row kept."""
    from tests.integration.test_failover_lab import with_virtual_endpoint

    with_virtual_endpoint(lab)
    _, back = await switch_over_and_back(lab)
    assert back["_boundaries"] >= 5, back["_kills"]
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1  # one switchover asked of Azure
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-eastus-pg") == 1  # one switchover back
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-eastus-pg") == 0  # no replica built
    assert arm_writes(lab, "PUT", "/flexibleServers/lab-westeurope-pg") == 0


async def test_self_managed_switchover_and_failback_survive_a_kill_at_every_boundary(lab):
    """Self-managed switchover (issue 20): the lab's clusters as provider postgres with host access; the failover
    and the failback each with a kill at every boundary, and in the middle of the shutdown and the follow: the old
    primary follows the new one each way, no promotion asked of Azure, no data directory rebuilt, every row kept."""
    raw = yaml.safe_load(open(lab.inventory))
    for region, r in raw["regions"].items():
        r["database"] = self_managed_database(lab.state, region)
    Path(lab.inventory).write_text(yaml.safe_dump(raw))
    await switch_over_and_back(lab)
    assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 0  # nothing asked of Azure's servers
    for region in ("eastus", "westeurope"):
        datadir = Cluster.from_dict(lab.state["postgres"][region]).datadir
        assert not list(datadir.parent.glob(f"{datadir.name}.diverged-*"))


async def test_drill_survives_a_kill_at_every_boundary(lab):
    inventory = fast_recovery(lab)
    setup_data(lab)
    workers = Workers(lab, inventory)
    workers.start_all()
    wid = lab.cli_json("drill", "--env", inventory, "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False, spare=())
    assert report["status"] == "succeeded", explain(report)
    assert report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert report["scratch_deleted"] is True
    name = report["scratch_name"]
    assert arm_writes(lab, "PUT", f"/flexibleServers/{name}") == 1  # one scratch server created
    assert arm_writes(lab, "DELETE", f"/flexibleServers/{name}") == 1  # and deleted once
    assert not [s for s in arm_admin(lab, "/_emulator/state")["servers"] if s.startswith("opsflow-drill")]


def test_failover_completes_across_a_temporal_server_restart(lab):
    """The dev server persists to a sqlite file in the lab: killed in the middle of the catch-up and started again
    on the same file and port, the procedure completes."""
    from tests.integration.test_failover_lab import approve, wait_approval

    setup_data(lab)
    west = lab.dsn("westeurope")
    lab.start_worker()
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    wait_approval(lab, wid)  # the preflight has measured the lag: now pause
    sql(west, "SELECT pg_wal_replay_pause()")  # the catch-up has to wait
    sql(lab.dsn("eastus"), "INSERT INTO orders SELECT generate_series(501, 1000)")
    approve(lab, wid)
    wait_status(lab, wid, lambda r: r["current_step"] == "catch-up", what="the catch-up wait")

    proc = lab.state["processes"]["temporal"]
    import os

    os.kill(proc["pid"], signal.SIGKILL)
    wait_for(
        lambda: subprocess.run(["kill", "-0", str(proc["pid"])], capture_output=True).returncode != 0,
        what="the server gone",
    )
    log = open(lab.root / "temporal-restarted.log", "w")
    restarted = subprocess.Popen(
        proc["argv"], stdout=log, stderr=subprocess.STDOUT, cwd=lab.root, start_new_session=True
    )
    try:
        sql(west, "SELECT pg_wal_replay_resume()")
        report = wait_end(lab, wid, timeout=300)
        assert report["status"] == "succeeded", explain(report)
        assert arm_writes(lab, "PATCH", "/flexibleServers/lab-westeurope-pg") == 1 and timeline(west) == 2
        assert sql(west, "SELECT count(*) FROM orders")[0][0] == 1000
    finally:
        lab.stop_workers()
        restarted.send_signal(signal.SIGTERM)
        try:
            restarted.wait(30)
        except subprocess.TimeoutExpired:
            restarted.kill()
