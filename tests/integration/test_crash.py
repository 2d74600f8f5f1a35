"""Crash: SIGKILL the worker in the middle of the procedure (during the catch-up wait, then during the
promotion), start a new one each time; the procedure completes and the promotion happened exactly once."""

from __future__ import annotations

import json
import ssl
import time
import urllib.request

import pytest

from lab.inventory import LRO_SECONDS
from tests.integration.conftest import FAST_RESTART, explain, fast_recovery, wait_for
from tests.integration.test_failover_lab import approve, sql, timeline, wait_approval, wait_end, wait_status

pytestmark = pytest.mark.lab


def arm_admin(lab, path: str, body: dict | None = None):
    """The ARM emulator's admin API (HTTPS with the lab's test CA)."""
    ctx = ssl.create_default_context(cafile=lab.state["azure"]["ca_bundle"])
    req = urllib.request.Request(
        lab.state["azure"]["arm_endpoint"] + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def promotions_requested(lab) -> int:
    log = arm_admin(lab, "/_emulator/requests")
    entries = log["value"]
    return sum(
        1
        for r in entries
        if r.get("method") == "PATCH"
        and r.get("path", "").split("?")[0].endswith("/flexibleServers/lab-westeurope-pg")
        and r.get("status") in (200, 202)
    )


def test_worker_killed_during_catch_up_and_during_promotion(lab):
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    lab.inventory = fast_recovery(lab)
    first = lab.start_worker(*FAST_RESTART)
    sql(east, "CREATE TABLE orders (id int PRIMARY KEY)")
    sql(east, "INSERT INTO orders SELECT generate_series(1, 1000)")
    wait_for(lambda: sql(west, "SELECT count(*) FROM pg_class WHERE relname = 'orders'")[0][0] == 1, what="replication")
    wid = lab.cli_json("failover", "--env", lab.inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    wait_approval(lab, wid)  # the preflight has measured the lag: now pause
    sql(west, "SELECT pg_wal_replay_pause()")  # the replica falls behind: the catch-up wait has to wait
    sql(east, "INSERT INTO orders SELECT generate_series(1001, 2000)")
    approve(lab, wid)
    wait_status(lab, wid, lambda r: r["current_step"] == "catch-up", what="the catch-up wait")
    time.sleep(1)
    lab.kill_worker(first)  # SIGKILL in the middle of the catch-up wait
    second = lab.start_worker(*FAST_RESTART)
    arm_admin(lab, "/_emulator/settings", {"lro_seconds": 8})  # a slow promotion, to crash in the middle of it
    time.sleep(3)
    sql(west, "SELECT pg_wal_replay_resume()")

    wait_status(lab, wid, lambda r: r["current_step"] == "promote", what="the promotion")
    wait_for(lambda: promotions_requested(lab) == 1, what="the promotion request", timeout=30)
    time.sleep(1)
    lab.kill_worker(second)  # SIGKILL while the promotion's long-running operation is under way
    arm_admin(lab, "/_emulator/settings", {"lro_seconds": LRO_SECONDS})  # the rest at the lab's pace
    lab.start_worker(*FAST_RESTART)

    report = wait_end(lab, wid, timeout=240)
    assert report["status"] == "succeeded", explain(report)
    assert promotions_requested(lab) == 1  # exactly one promotion asked of Azure
    assert timeline(west) == 2  # and exactly one happened: one timeline switch
    assert sql(west, "SELECT count(*) FROM orders")[0][0] == 2000
    catch_up = next(s for s in report["steps"] if s["name"] == "catch-up")
    assert catch_up["outcome"] == "ok" and report["rpo_bytes"] == 0


def replica_builds_requested(lab, server: str) -> int:
    entries = arm_admin(lab, "/_emulator/requests")["value"]
    return sum(
        1
        for r in entries
        if r.get("method") == "PUT"
        and r.get("path", "").split("?")[0].endswith(f"/flexibleServers/{server}")
        and r.get("status") in (200, 201, 202)
    )


def test_worker_killed_during_replica_rebuild_and_catch_up_of_a_failback(lab):
    import psycopg

    from tests.integration.test_procedures_lab import failover

    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    # A lag limit of 1 KiB: the failback's catch-up has to wait while westeurope takes writes.
    lab.inventory = fast_recovery(lab, max_planned_lag_bytes=1024)
    worker = lab.start_worker(*FAST_RESTART)
    sql(east, "CREATE TABLE events (id bigserial PRIMARY KEY, body text)")
    failover(lab, "westeurope")

    wid = lab.cli_json("failback", "--env", lab.inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    approve(lab, wid)  # nothing destructive happens before the approval
    wait_status(lab, wid, lambda r: r["current_step"] == "rebuild", what="the rebuild")
    wait_for(
        lambda: replica_builds_requested(lab, "lab-eastus-pg") == 1, what="the replica creation request", timeout=30
    )
    # A slow creation, to crash in the middle of it (the emulator's operations end `lro_seconds` after they began, as
    # set when they are polled: this one runs on for 8 s).
    arm_admin(lab, "/_emulator/settings", {"lro_seconds": 8})
    time.sleep(1)
    lab.kill_worker(worker)  # SIGKILL in the middle of the replica rebuild
    worker = lab.start_worker(*FAST_RESTART)

    def rebuilt_and_streaming() -> bool:
        try:
            return sql(east, "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
        except psycopg.Error:
            return False

    # The moment eastus streams again, hold its replay and write on westeurope: the catch-up has to wait.
    wait_for(rebuilt_and_streaming, timeout=120, interval=0.02, what="eastus streaming from westeurope")
    arm_admin(lab, "/_emulator/settings", {"lro_seconds": LRO_SECONDS})  # the rest at the lab's pace
    sql(east, "SELECT pg_wal_replay_pause()")
    sql(west, "INSERT INTO events (body) SELECT repeat('x', 200) FROM generate_series(1, 2000)")
    wait_status(lab, wid, lambda r: r["current_step"] == "catch-up", timeout=180, what="the catch-up wait")
    time.sleep(2)
    lab.kill_worker(worker)  # SIGKILL during the catch-up wait
    lab.start_worker(*FAST_RESTART)
    time.sleep(2)
    sql(east, "SELECT pg_wal_replay_resume()")
    report = wait_end(lab, wid, timeout=240)
    assert report["status"] == "succeeded", explain(report)
    assert replica_builds_requested(lab, "lab-eastus-pg") == 1  # one replica built, despite the crash
    rows = sql(west, "SELECT count(*) FROM events")[0][0]
    assert sql(east, "SELECT count(*) FROM events")[0][0] == rows > 0
    assert sql(east, "SELECT pg_is_in_recovery()")[0][0] is False
