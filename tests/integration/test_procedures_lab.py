"""Failback and the restore drill on the lab, for real; the same failover on the AWS variant."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from tests.integration.conftest import explain, printed_report, wait_for
from tests.integration.test_failover_lab import approve, sql, timeline, wait_end, wait_status

pytestmark = pytest.mark.lab


def failover(lab, to: str) -> dict:
    wid = lab.cli_json("failover", "--to", to, "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    return report


def test_failback_returns_to_the_recovered_region(lab, worker):
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE journal (id int PRIMARY KEY, phase text)")
    sql(east, "INSERT INTO journal SELECT g, 'before' FROM generate_series(1, 100) g")
    assert readiness(lab)["ready"] is True
    failover(lab, "westeurope")
    sql(west, "INSERT INTO journal SELECT g, 'on westeurope' FROM generate_series(101, 200) g")
    # Failed over, nothing protects westeurope: eastus is a fenced old primary until the failback (issue 20).
    stranded = readiness(lab)
    assert stranded["ready"] is False and stranded["primary_region"] == "westeurope"
    assert [(c["check"], c["region"]) for c in stranded["checks"] if not c["ok"]] == [("replica", "eastus")]
    assert "opsflow failback --to eastus" in stranded["failure"]
    # The maintenance window finds the new primary and says what the fenced old one needs (issue 22).
    refused = lab.cli("maintenance", "--dry-run", "--requester", "alice", "--json")
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "not streaming" not in said, said
    assert "eastus is the old primary, fenced (read-only) and not yet a replica of westeurope" in said, said
    assert "opsflow failback --to eastus" in said, said

    wid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice", "--reason", "eastus recovered")[
        "workflow_id"
    ]
    wait_status(
        lab,
        wid,
        lambda r: (r.get("waiting_for") or "").startswith("approval"),
        timeout=180,
        what="approval after catch-up",
    )
    sql(west, "INSERT INTO journal SELECT g, 'while waiting' FROM generate_series(201, 250) g")
    lab.cli("approve", wid, "--as", "bob", "--reason", "window is now", check=True)
    report = wait_end(lab, wid, timeout=240)
    assert report["status"] == "succeeded", explain(report)

    # eastus is primary again, westeurope streams from it, and every row of the whole sequence is there.
    assert sql(east, "SELECT pg_is_in_recovery()")[0][0] is False
    sql(east, "INSERT INTO journal VALUES (251, 'after failback')")
    wait_for(lambda: sql(west, "SELECT count(*) FROM journal")[0][0] == 251, what="westeurope replaying from eastus")
    assert sql(west, "SELECT status FROM pg_stat_wal_receiver")[0][0] == "streaming"
    assert sql(east, "SELECT count(*) FROM journal")[0][0] == 251
    assert report["rebuild_method"] in ("azure-replica",) and report["failover"]["status"] == "succeeded"
    assert report["failover"]["approval"]["by"] == "bob" and report["failover"]["rpo_bytes"] == 0
    child = [s["name"] for s in report["failover"]["steps"]]
    assert "promote" in child and "traffic" in child
    assert readiness(lab)["ready"] is True  # protected again


def readiness(lab) -> dict:
    """`opsflow readiness --wait --json`: exit 0 ready, 1 not ready; the report either way."""
    proc = lab.cli("readiness", "--wait", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ready"] else 1), proc.stderr
    assert report["status"] in ("succeeded", "failed") and not [s for s in report["steps"] if s["name"] == "promote"]
    # Every procedure's report is kept where the drill's is (the reports directory; S3 where configured).
    kept = lab.cli_json("report", report["workflow_id"])["stored_at"]
    assert sorted(p.rsplit(".", 1)[1] for p in kept) == ["html", "json", "md"]
    assert json.loads(open(next(p for p in kept if p.endswith(".json"))).read())["procedure"] == "readiness"
    return report


def test_restore_drill_restores_exactly_the_rows_before_the_point(lab, worker):
    east = lab.dsn("eastus")
    sql(east, "CREATE TABLE ledger (id int PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT clock_timestamp())")
    sql(east, "INSERT INTO ledger (id) SELECT generate_series(1, 300)")
    rows_in = sql(east, "SELECT clock_timestamp()")[0][0].astimezone(timezone.utc)
    time.sleep(1.1)
    point = sql(east, "SELECT clock_timestamp()")[0][0].astimezone(timezone.utc)
    time.sleep(1.1)
    sql(east, "INSERT INTO ledger (id) SELECT generate_series(301, 450)")

    # Verify ledger too, as of the restore point: exact because of the commit-time column.
    import yaml

    inv = yaml.safe_load(open(lab.inventory))
    inv["drill"]["row_counts"].append({"table": "ledger", "timestamp_column": "created_at"})
    inventory = lab.inventory  # the lab worker's own file: it reads it again, and runs by it
    open(inventory, "w").write(yaml.safe_dump(inv))
    proc = lab.cli(
        "drill",
        "--env",
        str(inventory),
        "--point-in-time",
        point.isoformat(),
        "--requester",
        "alice",
        "--wait",
        "--json",
        timeout=400,
    )
    report = printed_report(proc)
    assert proc.returncode == 0 and report["status"] == "succeeded", (
        report["failure"],
        [(s["name"], s["outcome"], s["detail"]) for s in report["steps"]],
    )
    ledger = next(c for c in report["checks"] if c["name"] == "ledger")
    assert ledger["ok"] and ledger["actual"] == 300 and ledger["expected"] == 300
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) == 5
    assert report["scratch_deleted"] is True and report["restore_seconds"] > 0
    # The scratch server is gone: from ARM, and its cluster no longer runs.
    from tests.integration.test_crash import arm_admin

    servers = arm_admin(lab, "/_emulator/state")["servers"]
    assert "lab-eastus-pg" in servers and not [name for name in servers if name.startswith("opsflow-drill")]
    restored = [p for p in (lab.root / "pg").rglob("opsflow-drill*") if p.is_dir()]
    assert not restored, f"scratch cluster directories left: {restored}"
    assert any(p.endswith(".md") for p in report["stored_at"])
    md = open(next(p for p in report["stored_at"] if p.endswith(".md"))).read()
    assert "check passed: row_count ledger" in md

    bad = lab.cli("drill", "--point-in-time", "2999-01-01T00:00:00Z", "--requester", "alice")
    assert bad.returncode == 2 and "in the future" in bad.stderr

    # drill.restore_point random (AWS Backup's RANDOM_WITHIN_WINDOW): a point of the restorable window, restored and
    # verified as of that point. The retention is cut to the time since the ledger's first rows, so the window
    # holds them (the lab's backups reach back to before the table existed).
    retention = int((datetime.now(timezone.utc) - rows_in).total_seconds() - 1.5)
    inv["drill"].update(restore_point="random", retention=f"{retention}s",
                        objectives={"restore_time": "10m", "restore_point_age": "1m"})
    open(inventory, "w").write(yaml.safe_dump(inv))
    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    second = printed_report(proc)
    assert proc.returncode == 0 and second["status"] == "succeeded", (
        second["failure"], [(s["name"], s["outcome"], s["detail"]) for s in second["steps"]])
    chosen = datetime.fromisoformat(second["restore_point"])
    earliest, latest = (datetime.fromisoformat(second[k]) for k in ("window_earliest", "window_latest"))
    assert second["restore_point_chosen"] == "random"
    assert max(earliest, latest - timedelta(seconds=retention)) <= chosen <= latest and rows_in < chosen
    ledger = next(c for c in second["checks"] if c["name"] == "ledger")
    committed = sql(east, "SELECT count(*) FROM ledger WHERE created_at < %s", chosen)[0][0]
    assert ledger["ok"] and ledger["actual"] == ledger["expected"] == committed and 300 <= committed <= 450
    assert [(o["name"], o["met"]) for o in second["objectives"]] == [("restore_time", True),
                                                                    ("restore_point_age", True)]
    md = open(next(p for p in second["stored_at"] if p.endswith(".md"))).read()
    assert "restore point chosen at random within the restorable window" in md
    # The trend: the first drill read back from its stored report, beside this one.
    assert [r["run_id"] for r in second["trend"]] == [report["run_id"]]
    assert "## Trend: the last 2 drills" in md and "2 of 2 drill(s) succeeded; objectives met in 1 of 1" in md
    history = lab.cli_json("drill", "history")
    assert [d["run_id"] for d in history["drills"]] == [report["run_id"], second["run_id"]]
    assert [d["restore_point_chosen"] for d in history["drills"]] == ["given", "random"]
    print(f"random restore point {chosen:%H:%M:%S.%f} in {earliest:%H:%M:%S} .. {latest:%H:%M:%S}: {committed} "
          f"ledger rows; restored in {second['restore_seconds']:.1f}s")


def test_failover_on_the_aws_variant(aws_lab):
    aws_lab.start_worker()
    try:
        east, west = aws_lab.dsn("eastus"), aws_lab.dsn("westeurope")
        sql(east, "CREATE TABLE orders (id int PRIMARY KEY)")
        sql(east, "INSERT INTO orders SELECT generate_series(1, 100)")
        report = failover(aws_lab, "westeurope")
        assert sql(west, "SELECT count(*) FROM orders")[0][0] == 100 and timeline(west) == 2
        sql(west, "INSERT INTO orders VALUES (101)")

        import boto3

        endpoint = aws_lab.state["aws"]["endpoint_url"]
        rds = boto3.client("rds", endpoint_url=endpoint, region_name="eu-west-1")
        west_id = aws_lab.state["aws"]["instances"]["westeurope"]["db_instance_identifier"]
        inst = rds.describe_db_instances(DBInstanceIdentifier=west_id)["DBInstances"][0]
        assert not inst.get("ReadReplicaSourceDBInstanceIdentifier")  # promoted: standalone in RDS
        r53 = boto3.client("route53", endpoint_url=endpoint, region_name="us-east-1")
        records = r53.list_resource_record_sets(HostedZoneId=aws_lab.state["aws"]["hosted_zone_id"])[
            "ResourceRecordSets"
        ]
        roles = {r["SetIdentifier"]: r["Failover"] for r in records if r.get("SetIdentifier")}
        assert roles == {"shop-westeurope": "PRIMARY", "shop-eastus": "SECONDARY"}
        assert report["rpo_bytes"] == 0 and report["rpo_proven"] is True
    finally:
        aws_lab.stop_workers()


def test_mysqldump_restore_test_end_to_end_on_the_aws_variant(aws_lab):
    """The Maintenance API guide's monthly recovery test: the application's MySQL (a real MariaDB) dumped with
    mysqldump into the lab's S3; `opsflow drill` restores the newest dump into a scratch MariaDB the worker starts,
    counts rows against the source as of the dump, runs the SQL checks, and removes the server; the report is kept
    in S3, and `opsflow drill history` reads it back from there."""
    import yaml

    from lab.mysql import seed_mysqldump, start_source
    from tests.integration.test_aws_restore import mariadbd_running

    source = start_source(aws_lab.root / "mysql-source")
    try:
        with source.connect() as conn, conn.cursor() as cur:
            cur.execute("create database shop")
            cur.execute("create table shop.orders (id int auto_increment primary key, total decimal(10,2) not null, "
                        "created_at timestamp(6) not null default current_timestamp(6))")
            cur.executemany("insert into shop.orders (total) values (%s)", [(i,) for i in range(1, 301)])
        dumps = aws_lab.state["aws"]["buckets"]["dumps"]
        seeded = seed_mysqldump(aws_lab.state["aws"]["endpoint_url"], source, "shop", bucket=dumps)
        with source.connect() as conn, conn.cursor() as cur:  # written after the dump: not in the restore
            cur.executemany("insert into shop.orders (total) values (%s)", [(1,)] * 40)
        inv = yaml.safe_load(open(aws_lab.inventory))
        inv["drill"] = {
            "method": "s3-mysqldump",
            "dumps": {"bucket": dumps, "prefix": "mysql/"},
            "mysql": {"database": "shop", "source": {"host": "127.0.0.1", "port": source.port, "user": "root"}},
            "row_counts": [{"table": "orders", "timestamp_column": "created_at"}],
            "checks": [{"name": "no negative totals", "query": "select count(*) = 0 from orders where total < 0"}],
            "schema_objects": ["orders"],
            "objectives": {"restore_time": "5m"},
            "heartbeat_timeout": "30s",
        }
        open(aws_lab.inventory, "w").write(yaml.safe_dump(inv))
        aws_lab.start_worker()
        proc = aws_lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
        report = printed_report(proc)
        assert proc.returncode == 0 and report["status"] == "succeeded", explain(report)
        assert report["method"] == "s3-mysqldump" and report["restore_point_chosen"] == "newest"
        assert datetime.fromisoformat(report["restore_point"]) == seeded["dump_time"]
        orders = report["checks"][0]
        assert (orders["name"], orders["ok"], orders["expected"], orders["actual"]) == ("orders", True, 300, 300)
        assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) == 3
        assert [s["name"] for s in report["steps"] if s["name"] in ("leftovers", "restore", "cleanup")] == [
            "leftovers", "restore", "cleanup"]
        assert seeded["key"] in next(s for s in report["steps"] if s["name"] == "restore")["detail"]
        assert report["scratch_deleted"] is True and report["objectives"][0]["met"] is True
        scratch = aws_lab.root / "mysql-scratch"
        assert not (scratch.exists() and any(scratch.iterdir())), list(scratch.iterdir())
        assert not mariadbd_running(scratch / report["scratch_name"] / "data")
        assert any(p.startswith("s3://") and p.endswith(".json") for p in report["stored_at"])
        history = aws_lab.cli_json("drill", "history")
        assert history["read_from"].startswith("s3://") and [d["run_id"] for d in history["drills"]] == [
            report["run_id"]]
        took = datetime.fromisoformat(report["ended_at"]) - datetime.fromisoformat(report["started_at"])
        print(f"mysqldump restore test on the lab: restored in {report['restore_seconds']:.1f}s, the drill took "
              f"{took.total_seconds():.1f}s")
    finally:
        aws_lab.stop_workers()
        source.stop()
