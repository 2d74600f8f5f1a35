"""Crash mid-VACUUM, end to end on the lab: the worker running the maintenance window is SIGKILLed while its
VACUUM runs; its backend goes on vacuuming. The retry, on a new worker, waits for that VACUUM (or finds it
finished) instead of starting a second one: the table is vacuumed exactly once (vacuum_count 1)."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.conftest import FAST_RESTART, explain, wait_for
from tests.integration.test_failover_lab import approve, sql, wait_end

pytestmark = pytest.mark.lab

COUNT = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'crashy'"
RUNNING = "SELECT pid FROM pg_stat_progress_vacuum WHERE relid = 'crashy'::regclass"


def test_worker_killed_mid_vacuum_the_retry_waits_for_it_and_the_table_is_vacuumed_once(lab, monkeypatch):
    east = lab.dsn("eastus")
    inv = yaml.safe_load(open(lab.inventory).read())
    inv["maintenance"].update(tasks=[{"kind": "vacuum", "tables": ["public.crashy"]}], heartbeat_timeout="5s",
                              backup={"take": False, "verify": False})
    open(lab.inventory, "w").write(yaml.safe_dump(inv))
    sql(east, "CREATE TABLE crashy (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = off)")
    sql(east, "INSERT INTO crashy SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
    sql(east, "DELETE FROM crashy WHERE id % 2 = 0")
    # The first worker's sessions throttle VACUUM (vacuum_cost_delay, libpq's PGOPTIONS): it is caught midway and
    # outlives the heartbeat timeout. The second worker's are not throttled.
    monkeypatch.setenv("PGOPTIONS", "-c vacuum_cost_delay=5 -c vacuum_cost_limit=1")
    first = lab.start_worker(*FAST_RESTART)
    monkeypatch.delenv("PGOPTIONS")

    wid = lab.cli_json("maintenance", "--requester", "alice", "--reason", "crash test")["workflow_id"]
    approve(lab, wid)
    orphan = wait_for(lambda: sql(east, RUNNING), 120, what="the VACUUM to run")[0][0]
    lab.kill_worker(first)  # SIGKILL mid-VACUUM
    assert sql(east, "SELECT state FROM pg_stat_activity WHERE pid = %s", orphan) == [("active",)]
    lab.start_worker(*FAST_RESTART)

    report = wait_end(lab, wid, timeout=240)
    assert report["status"] == "succeeded", explain(report)
    (done,) = report["items"]
    assert done["outcome"] == "done" and "not run again" in done["detail"], done
    assert f"pid {orphan}" in done["detail"] or "finished after its worker stopped" in done["detail"], done
    assert sql(east, COUNT) == [(1,)]  # one VACUUM, not a second one behind the first's lock
    assert done["before"]["n_dead_tup"] >= 100_000 and done["after"]["last_vacuum"]
    assert not report["maintenance_mode_on"]
