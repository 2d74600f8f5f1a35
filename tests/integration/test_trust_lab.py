"""The worker holds the rules, on the lab (issue 18): an edited local inventory changes nothing; a Temporal cancel
never leaves the world half-moved. The world is read from PostgreSQL and the Azure SDK, not from our reports."""

from __future__ import annotations

import psycopg
import pytest
import yaml

from tests.integration.conftest import explain
from tests.integration.test_crash import LRO_SECONDS, arm_admin
from tests.integration.test_failover_lab import (
    approve,
    sql,
    traffic_endpoints,
    wait_approval,
    wait_end,
    wait_status,
)

pytestmark = pytest.mark.lab


def cancel(lab, wid: str) -> None:
    """What `temporal workflow cancel` sends: a cancellation request, no signature, no opsflow in between."""
    lab._run(_cancel(lab, wid), timeout=30)


async def _cancel(lab, wid: str) -> None:
    await (await lab._connect()).get_workflow_handle(wid).cancel()


def writable(dsn: str) -> bool:
    try:
        sql(dsn, "CREATE TABLE IF NOT EXISTS trust_probe (id int); INSERT INTO trust_probe VALUES (1)")
        return True
    except psycopg.errors.ReadOnlySqlTransaction:
        return False


def test_an_edited_local_inventory_is_refused_and_changes_nothing(lab, worker, tmp_path):
    mine = yaml.safe_load(open(lab.inventory))
    mine["approval"]["approvers"] = ["mallory"]
    mine["approval"]["require_distinct_approver"] = False
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    proc = lab.cli(
        "failover",
        "--env",
        str(tmp_path / "mine.yaml"),
        "--to",
        "westeurope",
        "--requester",
        "mallory",
        "--wait",
        "--json",
    )
    assert proc.returncode == 1 and '"status": "refused"' in proc.stdout and "approval.approvers" in proc.stdout, (
        proc.stdout
    )
    assert sql(lab.dsn("westeurope"), "SELECT pg_is_in_recovery()")[0][0] is True and writable(lab.dsn("eastus"))
    assert traffic_endpoints(lab)["shop-eastus"]["status"] == "Enabled"


def test_a_cancel_during_the_catch_up_undoes_the_fence(lab, worker):
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    wait_approval(lab, wid)  # the preflight has measured the lag: now pause
    sql(west, "SELECT pg_wal_replay_pause()")  # the catch-up waits: a step in flight to cancel
    sql(east, "CREATE TABLE IF NOT EXISTS filler (id int); INSERT INTO filler SELECT generate_series(1, 100)")
    approve(lab, wid)
    wait_status(lab, wid, lambda r: r.get("current_step") == "catch-up", what="the catch-up")
    assert not writable(east)  # fenced
    cancel(lab, wid)
    report = wait_end(lab, wid)
    sql(west, "SELECT pg_wal_replay_resume()")
    assert report["status"] == "aborted" and "cancelled through Temporal, unsigned" in report["failure"], explain(
        report
    )
    assert writable(east) and sql(west, "SELECT pg_is_in_recovery()")[0][0] is True
    eps = traffic_endpoints(lab)
    assert eps["shop-eastus"]["status"] == "Enabled" and eps["shop-westeurope"]["status"] == "Disabled"


def test_a_cancel_during_the_promotion_goes_forward_and_traffic_follows(lab, worker):
    west = lab.dsn("westeurope")
    arm_admin(lab, "/_emulator/settings", {"lro_seconds": 8})  # a slow promotion, to cancel in the middle of it
    try:
        wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
        approve(lab, wid)
        wait_status(lab, wid, lambda r: r.get("current_step") == "promote", timeout=180, what="the promotion")
        cancel(lab, wid)
        report = wait_end(lab, wid, 300)
    finally:
        arm_admin(lab, "/_emulator/settings", {"lro_seconds": LRO_SECONDS})
    assert report["status"] == "succeeded" and report["remaining"] == [], explain(report)
    assert any(e["action"] == "cancel-refused" for e in report["events"])
    # The world is consistent: the new primary takes writes and traffic goes to it.
    assert sql(west, "SELECT pg_is_in_recovery()")[0][0] is False and writable(west)
    eps = traffic_endpoints(lab)
    assert eps["shop-westeurope"]["status"] == "Enabled" and eps["shop-eastus"]["status"] == "Disabled"
