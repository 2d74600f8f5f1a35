"""The maintenance window end to end on the lab, through the CLI a person types: the bloated table vacuumed and
reindexed, maintenance mode on and off again, the status page told in order, the replica still streaming."""

from __future__ import annotations

import psycopg
import pytest
import yaml

from lab.receiver import read_statuspage
from lab.seed import BLOAT_TABLE
from tests.integration.conftest import wait_for
from tests.integration.test_failover_lab import wait_end

pytestmark = pytest.mark.lab


def dead_tuples(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("select n_dead_tup from pg_stat_user_tables where relname = %s", (BLOAT_TABLE,)).fetchone()[0]


def test_maintenance_window_on_the_lab(lab, worker, tmp_path):
    primary = lab.dsn("eastus")
    # a table name that is an injection attempt: refused naming the field, nothing started, nothing run
    inv = yaml.safe_load(open(lab.inventory).read())
    inv["maintenance"]["tasks"][1]["tables"] = ["lab_orders; DROP TABLE lab_orders"]
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(inv))
    refused = lab.cli("maintenance", "--env", str(tmp_path / "evil.yaml"), "--requester", "alice")
    assert (
        refused.returncode == 2
        and "maintenance.tasks.1.tables: " in refused.stderr
        and "is not a table name" in refused.stderr
    )
    with psycopg.connect(primary, autocommit=True) as c:
        assert c.execute("select to_regclass('lab_orders') is not null").fetchone() == (True,)

    # the dry run prints the plan from the same declarations and changes nothing
    plan = lab.cli_json("maintenance", "--dry-run", "--requester", "alice")
    assert plan["status"] == "planned"
    assert [s["name"] for s in plan["steps"] if s["outcome"] == "planned"][:3] == [
        "announce",
        "backup",
        "verify-backup",
    ]
    assert dead_tuples(primary) >= 30_000 and not read_statuspage(lab.root / "receiver")

    wait_for(lambda: dead_tuples(primary) >= 30_000, 30, what="the seeded dead tuples in the statistics")
    started = lab.cli_json("maintenance", "--requester", "alice", "--reason", "weekly")
    wid = started["workflow_id"]
    wait_for(lambda: (lab.status(wid).get("waiting_for") or "").startswith("approval"), 120, what="the approval gate")
    lab.cli("approve", wid, "--as", "bob", "--reason", "go", check=True)
    wait_end(lab, wid, 300, lambda r: r["status"] not in ("running", "waiting"), "the end of the maintenance")
    report = lab.cli_json("report", wid)
    assert report["status"] == "succeeded", (
        report["failure"],
        [(s["name"], s["outcome"], s["detail"]) for s in report["steps"]],
    )

    # the Azure SDK's on-demand backup (the ARM emulator takes a real base backup), verified newer than the start
    assert report["backup"]["method"] == "azure-on-demand" and report["backup"]["id"].endswith(
        report["backup"]["id"].rsplit("/", 1)[-1]
    )
    assert "completed" in report["backup_verified"]
    vacuumed = next(i for i in report["items"] if i["key"] == f"vacuum-analyze:public.{BLOAT_TABLE}")
    assert vacuumed["reason"].startswith("auto: ") and vacuumed["before"]["n_dead_tup"] >= 30_000
    assert vacuumed["after"]["n_dead_tup"] == 0 and vacuumed["after"]["last_vacuum"]
    assert dead_tuples(primary) == 0
    reindexed = next(i for i in report["items"] if i["key"] == f"reindex:public.{BLOAT_TABLE}")
    assert reindexed["outcome"] == "done" and reindexed["after"]["invalid_indexes"] == []
    # pg_repack rebuilt it online: the space VACUUM only freed is given back (the lab's seed created the extension)
    repacked = next(i for i in report["items"] if i["key"] == f"repack:public.{BLOAT_TABLE}")
    assert repacked["outcome"] == "done", repacked
    assert repacked["after"]["table_bytes"] < repacked["before"]["table_bytes"] / 2, repacked
    assert repacked["before"]["table_bloat"] > 0.5 and repacked["after"]["table_bloat"] < 0.2, repacked

    calls = [
        (c["method"], (c["body"] or {}).get("incident", {}).get("status"))
        for c in read_statuspage(lab.root / "receiver")
    ]
    assert [c for c in calls if c[0] != "GET"] == [
        ("POST", "scheduled"),
        ("PATCH", "in_progress"),
        ("PATCH", "completed"),
    ]
    steps = [s["name"] for s in report["steps"]]
    assert (
        steps.index("maintenance-on")
        < steps.index(f"vacuum-analyze:public.{BLOAT_TABLE}")
        < steps.index("maintenance-off")
    )
    with psycopg.connect(lab.dsn("westeurope"), autocommit=True) as c:
        assert c.execute("select status from pg_stat_wal_receiver").fetchone() == ("streaming",)


def test_a_fleet_of_two_environments_one_at_a_time_through_the_cli(lab, worker, tmp_path):
    # A second environment on the same lab, served by the same worker (its queues are the lab's): a fleet of two.
    inv = yaml.safe_load(open(lab.inventory).read())
    inv["maintenance"]["backup"] = {"take": False, "verify": False}
    second = {**inv, "environment": "lab2", "workflow_task_queue": "opsflow-lab",
              "regions": {r: {**v, "task_queue": f"opsflow-lab-{r}"} for r, v in inv["regions"].items()}}
    (tmp_path / "lab2.yaml").write_text(yaml.safe_dump(second))
    open(lab.inventory, "w").write(yaml.safe_dump(inv))
    # The worker holds both environments' rules (a procedure runs only by its worker's inventory).
    lab.stop_workers()
    lab.start_worker("--env", str(tmp_path / "lab2.yaml"))
    started = lab.cli_json("maintenance", "--env", lab.inventory, "--env", str(tmp_path / "lab2.yaml"),
                           "--max-concurrency", "1", "--requester", "alice")
    fleet = started["workflow_id"]
    for child in ("opsflow-lab", "opsflow-lab2"):
        wait_for(
            lambda: ((lab.status(child, missing_ok=True) or {}).get("waiting_for") or "").startswith("approval"),
            180,
            what=f"{child} to wait for approval",
        )
        assert lab.cli_json("status", fleet)["members"][1 if child == "opsflow-lab" else 0]["status"] in (
            "not-started",
            "succeeded",
        )
        lab.cli("approve", child, "--as", "bob", check=True)
    wait_end(lab, fleet, 300, lambda r: r["status"] not in ("running", "waiting"), "the fleet to end")
    report = lab.cli_json("report", fleet)
    assert report["status"] == "succeeded", report.get("failure")
    assert [(m["environment"], m["status"]) for m in report["members"]] == [("lab", "succeeded"), ("lab2", "succeeded")]
    assert report["peak_concurrency"] == 1


def test_a_table_locked_by_another_session_is_retried_then_skipped_and_the_rest_is_done(lab, worker):
    with psycopg.connect(lab.dsn("eastus")) as holder:
        holder.execute("LOCK TABLE lab_orders IN ACCESS EXCLUSIVE MODE")  # held for the whole window
        wid = lab.cli_json("maintenance", "--requester", "alice")["workflow_id"]
        wait_for(
            lambda: (lab.status(wid).get("waiting_for") or "").startswith("approval"), 120, what="the approval gate"
        )
        lab.cli("approve", wid, "--as", "bob", check=True)
        wait_end(lab, wid, 300, lambda r: r["status"] not in ("running", "waiting"), "the end of the maintenance")
        holder.rollback()
    report = lab.cli_json("report", wid)
    assert report["status"] == "succeeded", report.get("failure")
    skipped = {s["key"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"analyze:public.lab_orders", "sql:purge negative totals", f"repack:public.{BLOAT_TABLE}"}
    assert all("lock not granted within 2s (2 attempt(s))" in r for k, r in skipped.items() if "repack" not in k)
    # pg_repack waits for every older transaction before its swap: the open one holding lab_orders is named, and
    # after transaction_wait (5s) the table is given up, twice, rather than waited for all window long
    assert "for older transactions to finish, held by pid " in skipped[f"repack:public.{BLOAT_TABLE}"]
    assert "(2 attempt(s))" in skipped[f"repack:public.{BLOAT_TABLE}"]
    done = [i["key"] for i in report["items"] if i["outcome"] == "done"]
    assert done == [f"vacuum-analyze:public.{BLOAT_TABLE}", f"reindex:public.{BLOAT_TABLE}"]
    with psycopg.connect(lab.dsn("eastus"), autocommit=True) as c:  # nothing of pg_repack's left on the table
        assert c.execute("select count(*) from pg_trigger where tgname = 'repack_trigger'").fetchone() == (0,)
