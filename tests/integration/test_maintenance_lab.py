"""The maintenance window's activities against real PostgreSQL (a primary and a streaming replica), the lab's
receiver as the status page. Nothing is mocked: real dead tuples, real locks, real REINDEX CONCURRENTLY."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from activities import maintenance as maint
from activities import statuspage
from activities.postgres.maintenance import table_stats
from lab.postgres import create_replica, init_primary
from lab.receiver import read_statuspage, serve
from lab.seed import BLOAT_TABLE, seed_bloat
from opsflow.inventory import InventoryError, PostgresDatabase, SecretRef, load_inventory
from opsflow.maintenance import BackupPolicy, Guards, MaintenanceTask, StatusPage
from opsflow.maintenance_models import (
    BackupRequest,
    HealthRequest,
    PlanRequest,
    RunItemRequest,
    StatusPageRequest,
    VerifyBackupRequest,
    WatchRequest,
    WorkItem,
)
from opsflow.models import RegionTarget
from tests.helpers import eventually as wait_for

pytestmark = pytest.mark.lab

TABLE = f"public.{BLOAT_TABLE}"


@pytest.fixture(scope="module")
def clusters():
    root = Path(tempfile.mkdtemp(prefix="opsflow-maint-test-"))
    primary = init_primary(root, "primary")
    replica = create_replica(primary, root, "replica")
    try:
        yield primary, replica
    finally:
        for c in (replica, primary):
            try:
                c.stop("fast")
            except Exception:
                c.kill()
        shutil.rmtree(root, ignore_errors=True)


def target(cluster, region: str = "eastus") -> RegionTarget:
    return RegionTarget(
        environment="lab", region=region, database=PostgresDatabase(provider="postgres", dsn=cluster.dsn)
    )


def query(cluster, text: str, params=None):
    with psycopg.connect(cluster.dsn, autocommit=True) as c:
        cur = c.execute(text, params)
        return cur.fetchall() if cur.description else None


def stats(cluster, table: str = TABLE):
    with psycopg.connect(cluster.dsn, autocommit=True) as c:
        return table_stats(c, table)




def settle(primary) -> None:
    """Wait until the replica's hot_standby_feedback no longer holds back the rows just deleted: until then they
    are 'recently dead' and VACUUM must keep them (a real effect of the lab's replica, not of the test)."""
    xid = query(primary, "select txid_current()")[0][0]
    wait_for(
        lambda: query(
            primary,
            "select bool_and(backend_xmin is null or backend_xmin::text::bigint > %s) from pg_stat_replication",
            (xid,),
        )[0][0],
        30,
        "the replica's xmin feedback to pass the deletes",
    )


def item(kind: str, table: str | None = TABLE, **kw) -> WorkItem:
    return WorkItem(task=0, kind=kind, table=table, **kw)


GUARDS = Guards(lock_timeout=1, statement_timeout=60)


def test_auto_picks_the_bloated_table_and_vacuum_really_removes_the_dead_tuples(clusters):
    primary, _ = clusters
    seed_bloat(primary.dsn)
    wait_for(lambda: stats(primary).n_dead_tup >= 30_000, 30, "the statistics to show the dead tuples")
    settle(primary)
    plan = ActivityEnvironment().run(
        maint.plan,
        PlanRequest(
            target=target(primary),
            backup=BackupPolicy(take=False),
            tasks=[
                MaintenanceTask(kind="vacuum-analyze", tables="auto", auto={"min_dead_tuples": 1000, "dead_ratio": 0.2})
            ],
        ),
    )
    assert [i.table for i in plan.items] == [TABLE]
    assert "30000 dead tuples" in plan.items[0].reason and "75%" in plan.items[0].reason

    result = ActivityEnvironment().run(
        maint.run_item, RunItemRequest(target=target(primary), item=plan.items[0], guards=GUARDS)
    )
    assert result.outcome == "done"
    assert result.before.n_dead_tup >= 30_000 and result.before.last_vacuum is None
    assert result.after.n_dead_tup == 0 and result.after.last_vacuum is not None
    assert stats(primary).n_dead_tup == 0


def test_reindex_concurrently_cleans_up_an_invalid_ccnew_index_and_leaves_none(clusters):
    primary, _ = clusters
    seed_bloat(primary.dsn)
    # What an interrupted REINDEX CONCURRENTLY leaves: an invalid <index>_ccnew (here: a failed unique build).
    with pytest.raises(psycopg.errors.UniqueViolation):
        query(primary, f"CREATE UNIQUE INDEX CONCURRENTLY {BLOAT_TABLE}_kind_ccnew ON {BLOAT_TABLE} (kind)")
    assert stats(primary).invalid_indexes == [f"{BLOAT_TABLE}_kind_ccnew"]

    result = ActivityEnvironment().run(
        maint.run_item, RunItemRequest(target=target(primary), item=item("reindex"), guards=GUARDS)
    )
    assert result.outcome == "done"
    assert result.dropped_invalid == [f"public.{BLOAT_TABLE}_kind_ccnew"]
    assert stats(primary).invalid_indexes == []
    assert query(
        primary,
        "select count(*) from pg_index i join pg_class c on c.oid = i.indrelid "
        "where c.relname = %s and not i.indisvalid",
        (BLOAT_TABLE,),
    ) == [(0,)]


def test_lock_timeout_is_honoured_while_another_session_holds_the_lock(clusters):
    primary, _ = clusters
    seed_bloat(primary.dsn)
    with psycopg.connect(primary.dsn) as holder:
        holder.execute(f"LOCK TABLE {BLOAT_TABLE} IN ACCESS EXCLUSIVE MODE")  # held until the transaction ends
        started = time.monotonic()
        result = ActivityEnvironment().run(maint.run_item, RunItemRequest(
            target=target(primary), item=item("vacuum"), guards=Guards(lock_timeout=0.5, statement_timeout=60)))
        took = time.monotonic() - started
        holder.rollback()
    assert result.outcome == "lock-timeout", result
    assert "0.5s" in result.detail
    assert took < 10  # it gave up at the lock timeout instead of waiting for the holder


def test_cutoff_cancels_the_running_statement_with_pg_cancel_backend(clusters):
    primary, _ = clusters
    long = WorkItem(task=0, kind="sql", name="slow cleanup", sql="SELECT pg_sleep(30)")
    started = time.monotonic()
    result = ActivityEnvironment().run(maint.run_item, RunItemRequest(
        target=target(primary), item=long, guards=GUARDS, cancel_at=datetime.now(timezone.utc) + timedelta(seconds=1)))
    assert result.outcome == "cancelled-at-cutoff"
    assert time.monotonic() - started < 15
    assert query(primary, "select count(*) from pg_stat_activity where query = 'SELECT pg_sleep(30)'") == [(0,)]


def test_heartbeat_delivered_cancellation_stops_the_statement_cleanly(clusters):
    primary, _ = clusters
    env = ActivityEnvironment()
    beats: list = []
    env.on_heartbeat = lambda *d: beats.append(d)
    long = WorkItem(task=0, kind="sql", name="slow cleanup", sql="SELECT pg_sleep(31)")
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(env.run(maint.run_item, RunItemRequest(target=target(primary), item=long, guards=GUARDS)))
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: beats, 20, "a progress heartbeat")
    env.cancel()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome[0], CancelledError), outcome
    wait_for(
        lambda: query(primary, "select count(*) from pg_stat_activity where query = 'SELECT pg_sleep(31)'") == [(0,)],
        10,
        "the statement to be cancelled",
    )


def test_replicas_still_stream_after_maintenance_and_health_says_so(clusters):
    primary, replica = clusters
    ActivityEnvironment().run(
        maint.run_item, RunItemRequest(target=target(primary), item=item("vacuum-analyze"), guards=GUARDS)
    )
    health = ActivityEnvironment().run(
        maint.health,
        HealthRequest(
            primary=target(primary),
            replicas=[target(replica, "westeurope")],
            max_lag_bytes=16 * 1024 * 1024,
            lag_wait=30,
        ),
    )
    assert health.ok, health.detail
    assert set(health.lag_bytes) == {"westeurope"}
    assert query(replica, "select status from pg_stat_wal_receiver") == [("streaming",)]


def test_a_table_name_that_is_an_injection_attempt_is_refused_naming_the_field_and_nothing_runs(clusters, tmp_path):
    primary, _ = clusters
    evil = "lab_orders; DROP TABLE lab_orders"
    query(primary, "CREATE TABLE IF NOT EXISTS lab_orders (id int)")
    with pytest.raises(ValidationError, match="is not a table name"):
        MaintenanceTask(kind="vacuum", tables=[evil])
    from tests.workflow.conftest import inventory_dict

    window = {"days": ["sun"], "start": "02:00", "end": "04:00"}
    inv = inventory_dict(maintenance={"window": window, "tasks": [{"kind": "vacuum", "tables": [evil]}]})
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    with pytest.raises(InventoryError, match=r"maintenance\.tasks\.0\.tables: .*is not a table name"):
        load_inventory(path)
    # Even past validation (a hand-built item), the name reaches SQL only as a quoted identifier.
    forged = WorkItem.model_construct(task=0, kind="vacuum", table=evil, name=None, sql=None, reason="forged")
    with pytest.raises(ApplicationError, match="does not exist"):
        ActivityEnvironment().run(
            maint.run_item,
            RunItemRequest.model_construct(target=target(primary), item=forged, guards=GUARDS, cancel_at=None),
        )
    assert query(primary, "select to_regclass('lab_orders') is not null") == [(True,)]


def test_status_page_calls_arrive_in_order_and_a_retried_create_finds_the_incident(tmp_path, monkeypatch):
    server = serve(tmp_path / "receiver")
    monkeypatch.setenv("OPSFLOW_TEST_STATUSPAGE_KEY", "k")
    try:
        page = StatusPage(api_url=f"http://127.0.0.1:{server.server_address[1]}/statuspage/v1", page_id="p1",
                          api_key=SecretRef(env="OPSFLOW_TEST_STATUSPAGE_KEY"))
        now = datetime.now(timezone.utc)
        env = ActivityEnvironment()
        created = env.run(
            statuspage.update,
            StatusPageRequest(
                page=page,
                status="scheduled",
                body="VACUUM tonight",
                scheduled_for=now,
                scheduled_until=now + timedelta(hours=2),
            ),
        )
        again = env.run(statuspage.update, StatusPageRequest(page=page, status="scheduled", body="VACUUM tonight"))
        assert again.incident_id == created.incident_id
        for status in ("in_progress", "completed"):
            env.run(
                statuspage.update,
                StatusPageRequest(page=page, incident_id=created.incident_id, status=status, body=status),
            )
    finally:
        server.shutdown()
    calls = read_statuspage(tmp_path / "receiver")
    assert [(c["method"], (c["body"] or {}).get("incident", {}).get("status")) for c in calls] == [
        ("GET", None), ("POST", "scheduled"), ("GET", None), ("PATCH", "in_progress"), ("PATCH", "completed")]


def test_self_managed_backup_is_a_fresh_base_backup_that_verifies(clusters, tmp_path):
    primary, _ = clusters
    policy = BackupPolicy(directory=str(tmp_path / "backups"))
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    backup = ActivityEnvironment().run(
        maint.take_backup, BackupRequest(target=target(primary), policy=policy, name="maint-test")
    )
    assert backup.method == "pg_basebackup" and backup.size_bytes > 1_000_000
    detail = ActivityEnvironment().run(
        maint.verify_backup,
        VerifyBackupRequest(target=target(primary), policy=policy, backup=backup, not_before=started),
    )
    assert "verified" in detail
    # an old backup does not pass for a fresh one
    with pytest.raises(ApplicationError, match="before this maintenance started"):
        ActivityEnvironment().run(
            maint.verify_backup,
            VerifyBackupRequest(
                target=target(primary),
                policy=policy,
                backup=backup,
                not_before=datetime.now(timezone.utc) + timedelta(minutes=1),
            ),
        )


def test_rds_backup_is_a_manual_snapshot_found_again_on_retry_and_verified(monkeypatch):
    import boto3
    from moto import mock_aws

    from opsflow.inventory import AwsConnection, AwsRdsDatabase

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    with mock_aws():
        boto3.client("rds", region_name="eu-west-1").create_db_instance(
            DBInstanceIdentifier="shop-db", DBInstanceClass="db.t3.micro", Engine="postgres", AllocatedStorage=20,
            MasterUsername="ops", MasterUserPassword="not-a-secret-1")
        rds = RegionTarget(
            environment="lab",
            region="eu",
            database=AwsRdsDatabase(provider="aws-rds", db_instance_identifier="shop-db", aws_region="eu-west-1"),
            aws=AwsConnection(),
        )
        started = datetime.now(timezone.utc) - timedelta(seconds=5)
        request = BackupRequest(target=rds, policy=BackupPolicy(), name="opsflow-maint-test")
        first = ActivityEnvironment().run(maint.take_backup, request)
        again = ActivityEnvironment().run(maint.take_backup, request)  # a retried activity finds the same snapshot
        assert first.method == "rds-snapshot" and again.id == first.id and first.size_bytes > 0
        assert "completed" in ActivityEnvironment().run(
            maint.verify_backup,
            VerifyBackupRequest(target=rds, policy=BackupPolicy(), backup=first, not_before=started),
        )
        snaps = boto3.client("rds", region_name="eu-west-1").describe_db_snapshots(DBInstanceIdentifier="shop-db")[
            "DBSnapshots"
        ]
        assert [s["DBSnapshotIdentifier"] for s in snaps if s["SnapshotType"] == "manual"] == ["opsflow-maint-test"]


@pytest.fixture(scope="module")
def prometheus_url():
    """A real Prometheus (Debian package) scraping itself every second."""
    import subprocess

    from lab.ports import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (scripts/setup.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="opsflow-maint-prom-"))
    port = free_port()
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "self", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        from activities.prometheus import query

        def scraped() -> bool:
            try:
                return query(url, "sum(up)") == 1.0
            except ApplicationError:
                return False

        wait_for(scraped, 60, "Prometheus to scrape itself")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(root, ignore_errors=True)


def test_watch_queries_prometheus_and_a_breach_ends_it_early(prometheus_url):
    from activities.prometheus import query
    from opsflow.maintenance import WatchPolicy

    assert query(prometheus_url, "sum(up)") == 1.0
    # no data: NaN
    assert query(prometheus_url, 'sum(up{job="nothing"})') != query(prometheus_url, 'sum(up{job="nothing"})')
    with pytest.raises(ApplicationError, match="rejected the query"):
        query(prometheus_url, "sum(up")

    calm = WatchPolicy(
        prometheus=prometheus_url,
        duration=3,
        interval=1,
        queries=[{"name": "targets up", "query": "sum(up)", "min": 1}],
    )
    result = ActivityEnvironment().run(maint.watch, WatchRequest(policy=calm, duration=3))
    assert result.ok and result.results[0].samples >= 2 and result.results[0].last == 1.0

    started = time.monotonic()
    alarming = WatchPolicy(
        prometheus=prometheus_url,
        duration=60,
        interval=1,
        queries=[{"name": "targets up", "query": "sum(up)", "max": 0.5}],
    )
    result = ActivityEnvironment().run(maint.watch, WatchRequest(policy=alarming, duration=60))
    assert not result.ok and result.results[0].breached and "above 0.5" in result.results[0].detail
    assert time.monotonic() - started < 30  # the first breach ends the watch: it alerts at once


@pytest.fixture(scope="module")
def aged_cluster():
    """A cluster of this test's own with autovacuum_freeze_max_age at its minimum (100 000; it needs a restart),
    so that a table can be made old for real in a second: 70 000 transactions burnt after it was created."""
    root = Path(tempfile.mkdtemp(prefix="opsflow-maint-xid-"))
    cluster = init_primary(root, "aged")
    try:
        query(cluster, "ALTER SYSTEM SET autovacuum_freeze_max_age = 100000")
        cluster.stop("fast")
        cluster.start(wait=True)
        yield cluster
    finally:
        try:
            cluster.stop("fast")
        except Exception:
            cluster.kill()
        shutil.rmtree(root, ignore_errors=True)


def burn_xids(cluster, n: int) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        c.execute(f"DO $$ BEGIN FOR i IN 1..{int(n)} LOOP PERFORM txid_current(); COMMIT; END LOOP; END $$")


def test_a_table_near_wraparound_is_picked_first_frozen_and_its_xid_age_reported_before_and_after(aged_cluster):
    db = aged_cluster
    assert query(db, "show autovacuum_freeze_max_age") == [("100000",)]
    query(db, "CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    query(db, "INSERT INTO ledger SELECT g, repeat('x', 3000) FROM generate_series(1, 50) g")  # a TOAST table too
    burn_xids(db, 70_000)
    # a young table with many dead tuples, created after the burn: picked for its dead tuples, after the old one
    query(db, "CREATE TABLE churn (id int PRIMARY KEY) WITH (autovacuum_enabled = off)")
    query(db, "INSERT INTO churn SELECT generate_series(1, 20000)")
    query(db, "DELETE FROM churn WHERE id <= 15000")
    wait_for(lambda: stats(db, "public.churn").n_dead_tup >= 15_000, 30, "the statistics to show the dead tuples")
    old = stats(db, "public.ledger")
    assert old.xid_age >= 70_000 and stats(db, "public.churn").xid_age < 1_000

    task = MaintenanceTask(kind="vacuum-analyze", tables="auto", auto={"min_dead_tuples": 1000, "dead_ratio": 0.2})
    plan = ActivityEnvironment().run(maint.plan, PlanRequest(target=target(db), backup=BackupPolicy(take=False),
                                                             tasks=[task]))
    assert [(i.kind, i.table) for i in plan.items] == [("vacuum-freeze", "public.ledger"),
                                                       ("vacuum-analyze", "public.churn")]
    assert "of autovacuum_freeze_max_age 100000" in plan.items[0].reason and "7" in plan.items[0].reason
    assert "15000 dead tuples" in plan.items[1].reason

    # freeze_ratio above the table's share: not picked for its age (the threshold is honoured, not just a sort)
    strict = MaintenanceTask(kind="vacuum", tables="auto", auto={"freeze_ratio": 0.9, "min_dead_tuples": 10**9})
    assert ActivityEnvironment().run(maint.plan, PlanRequest(target=target(db), backup=BackupPolicy(take=False),
                                                             tasks=[strict])).items == []

    result = ActivityEnvironment().run(maint.run_item, RunItemRequest(target=target(db), item=plan.items[0],
                                                                      guards=GUARDS))
    assert result.outcome == "done", result
    assert result.before.xid_age >= 70_000 and result.after.xid_age < 100, (result.before, result.after)
    assert result.after.last_analyze is not None  # FREEZE with ANALYZE
    assert stats(db, "public.ledger").xid_age < 1_000
    # every row frozen: the visibility map says all-frozen for every page of the table
    assert query(db, "CREATE EXTENSION IF NOT EXISTS pg_visibility") is None
    assert query(db, "SELECT bool_and(all_frozen) FROM pg_visibility_map('ledger')") == [(True,)]
    from opsflow.maintenance_models import ItemResult, MaintenanceReport  # the report says it to a person
    line = next(x for x in MaintenanceReport(workflow_id="w", environment="lab", requester="a", items=[
        ItemResult.model_validate(result.model_dump())]).figure_lines() if x.startswith("vacuum-freeze:"))
    assert f"XID age {result.before.xid_age} -> {result.after.xid_age}" in line


CRASHING_WORKER = """
import sys
from temporalio.testing import ActivityEnvironment
from activities import maintenance as maint
from opsflow.maintenance_models import RunItemRequest
ActivityEnvironment().run(maint.run_item, RunItemRequest.model_validate_json(sys.argv[1]))
"""


def test_a_retry_after_a_worker_died_mid_vacuum_waits_for_the_vacuum_still_running(aged_cluster):
    """The first attempt runs in a process of its own (a worker), killed with SIGKILL mid-VACUUM: its backend goes
    on vacuuming. The retry finds it, waits for it, and does not start a second VACUUM (vacuum_count ends at 1)."""
    import os
    import signal
    import subprocess
    import sys

    db = aged_cluster
    query(db, "CREATE TABLE crashy (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = off)")
    query(db, "INSERT INTO crashy SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
    query(db, "DELETE FROM crashy WHERE id % 2 = 0")
    request = RunItemRequest(target=target(db), item=item("vacuum", "public.crashy"), guards=GUARDS)
    # the first worker's VACUUM is throttled (vacuum_cost_delay, for that session only) so that it is caught midway
    env = {**os.environ, "PGOPTIONS": "-c vacuum_cost_delay=2 -c vacuum_cost_limit=1"}
    worker = subprocess.Popen([sys.executable, "-c", CRASHING_WORKER, request.model_dump_json()], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        running = "select pid from pg_stat_progress_vacuum where relid = 'crashy'::regclass"
        wait_for(lambda: query(db, running), 60, "the first worker's VACUUM to run")
        orphan = query(db, running)[0][0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert query(db, "select state from pg_stat_activity where pid = %s", (orphan,)) == [("active",)]  # goes on
    assert query(db, "select vacuum_count from pg_stat_user_tables where relname = 'crashy'") == [(0,)]

    env = ActivityEnvironment()
    beats: list = []
    env.on_heartbeat = lambda *d: beats.append(d)
    result = env.run(maint.run_item, request)  # the retry, on another worker
    assert result.outcome == "done", result
    assert f"already running (pid {orphan})" in result.detail and "not run again" in result.detail
    assert any(f"(pid {orphan})" in b[0]["progress"] for b in beats)  # it said what it was waiting for
    assert query(db, "select vacuum_count from pg_stat_user_tables where relname = 'crashy'") == [(1,)]
    assert result.before.n_dead_tup >= 50_000 and result.after.n_dead_tup == 0 and result.after.last_vacuum
    assert query(db, "select count(*) from pg_stat_activity where query like 'VACUUM %%crashy%%'") == [(0,)]


def test_reindex_is_picked_by_measured_index_bloat_and_the_bloat_is_reported_before_and_after(clusters):
    from activities.postgres.bloat import index_bloat

    primary, _ = clusters
    query(primary, "CREATE TABLE IF NOT EXISTS sparse (id int PRIMARY KEY, k int) WITH (autovacuum_enabled = off)")
    query(primary, "CREATE INDEX IF NOT EXISTS sparse_k ON sparse (k)")
    query(primary, "CREATE TABLE IF NOT EXISTS dense (id int PRIMARY KEY)")  # well-packed: never picked
    query(primary, "INSERT INTO dense SELECT generate_series(1, 100000) ON CONFLICT DO NOTHING")
    query(primary, "INSERT INTO sparse SELECT g, g FROM generate_series(1, 200000) g ON CONFLICT DO NOTHING")
    query(primary, "DELETE FROM sparse WHERE id % 10 < 7")  # 70% gone, spread over every leaf page
    settle(primary)
    query(primary, "VACUUM (ANALYZE) sparse")  # the dead entries go; the leaf pages stay, a third full
    query(primary, "ANALYZE dense")
    task = MaintenanceTask(kind="reindex", tables="auto", auto={"min_index_bloat": 0.4, "min_index_bytes": "256kB"})
    request = PlanRequest(target=target(primary), backup=BackupPolicy(take=False), tasks=[task])

    # without pgstattuple: the catalogue estimate
    query(primary, "DROP EXTENSION IF EXISTS pgstattuple")
    picked = {i.table: i for i in ActivityEnvironment().run(maint.plan, request).items}  # (other tests' too)
    assert "public.sparse" in picked and "public.dense" not in picked, picked
    assert picked["public.sparse"].kind == "reindex"
    assert "index public.sparse_k " in picked["public.sparse"].reason and "(estimate:" in picked["public.sparse"].reason

    # with pgstattuple: measured (average leaf density against the fillfactor)
    query(primary, "CREATE EXTENSION pgstattuple")
    picked = {i.table: i for i in ActivityEnvironment().run(maint.plan, request).items}
    assert "public.sparse" in picked and "public.dense" not in picked, picked
    assert "(pgstattuple: average leaf density" in picked["public.sparse"].reason
    with psycopg.connect(primary.dsn, autocommit=True) as c:
        measured = {b.name: b for b in index_bloat(c, "public", "sparse")}
        estimated = {b.name: b for b in index_bloat(c, "public", "sparse", measured=False)}
    for name in ("public.sparse_k", "public.sparse_pkey"):  # the two methods agree to within 15 points
        assert measured[name].bloat > 0.5 and abs(measured[name].bloat - estimated[name].bloat) < 0.15, (
            measured[name], estimated[name])

    result = ActivityEnvironment().run(maint.run_item, RunItemRequest(target=target(primary),
                                                                      item=picked["public.sparse"], guards=GUARDS))
    assert result.outcome == "done"
    before = {b.name: b for b in result.before.indexes}
    after = {b.name: b for b in result.after.indexes}
    assert before["public.sparse_k"].bloat > 0.5 and after["public.sparse_k"].bloat < 0.1, (before, after)
    assert after["public.sparse_k"].bytes < before["public.sparse_k"].bytes / 2
    assert result.after.bloat_method == "pgstattuple" and result.after.table_bloat is not None
    from opsflow.maintenance_models import ItemResult, MaintenanceReport

    lines = MaintenanceReport(workflow_id="w", environment="lab", requester="a",
                              items=[ItemResult.model_validate(result.model_dump())]).figure_lines()
    assert any("index public.sparse_k bloat" in line for line in lines), lines
    assert "public.sparse" not in {i.table for i in ActivityEnvironment().run(maint.plan, request).items}


def test_a_retry_after_the_dead_workers_vacuum_already_finished_does_not_vacuum_again(aged_cluster):
    """The previous attempt's last heartbeat carries the statistics before; its VACUUM finished after the worker
    died (last_vacuum moved): the retry reports it done, and vacuum_count stays 1."""
    import dataclasses

    db = aged_cluster
    query(db, "CREATE TABLE finished (id int PRIMARY KEY) WITH (autovacuum_enabled = off)")
    query(db, "INSERT INTO finished SELECT generate_series(1, 10000)")
    query(db, "DELETE FROM finished WHERE id <= 5000")
    wait_for(lambda: stats(db, "public.finished").n_dead_tup >= 5000, 30, "the statistics to show the dead tuples")
    before = stats(db, "public.finished")
    query(db, "VACUUM public.finished")  # what the dead worker's backend did on its own
    count = "select vacuum_count from pg_stat_user_tables where relname = 'finished'"
    wait_for(lambda: query(db, count) == [(1,)], 10, "the VACUUM in the statistics")

    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[
        {"item": "vacuum:public.finished", "progress": "scanning heap", "before": before.model_dump(mode="json")}])
    result = env.run(maint.run_item, RunItemRequest(target=target(db), item=item("vacuum", "public.finished"),
                                                    guards=GUARDS))
    assert result.outcome == "done" and "finished after its worker stopped: not run again" in result.detail, result
    assert result.before.n_dead_tup >= 5000 and result.after.n_dead_tup == 0  # the report's before is the first's
    assert query(db, count) == [(1,)]
    # a first attempt (no heartbeat details) vacuums, as always
    again = ActivityEnvironment().run(maint.run_item, RunItemRequest(target=target(db),
                                                                     item=item("vacuum", "public.finished"),
                                                                     guards=GUARDS))
    assert again.outcome == "done" and again.detail == ""
    assert query(db, count) == [(2,)]


def test_a_retry_whose_dead_attempt_never_heartbeated_goes_by_when_the_step_was_scheduled(aged_cluster):
    """A worker killed before its first heartbeat reached the server leaves no statistics before; its VACUUM went
    on alone. The retry takes a VACUUM since the step was first scheduled as that attempt's work (vacuum_count
    stays 1); one from before the step was scheduled is not (the table is vacuumed again)."""
    import dataclasses
    from datetime import datetime, timedelta, timezone

    db = aged_cluster
    query(db, "CREATE TABLE unbeaten (id int PRIMARY KEY) WITH (autovacuum_enabled = off)")
    query(db, "INSERT INTO unbeaten SELECT generate_series(1, 1000)")
    scheduled = datetime.now(timezone.utc) - timedelta(seconds=1)
    query(db, "VACUUM public.unbeaten")  # what the dead worker's backend did on its own
    count = "select vacuum_count from pg_stat_user_tables where relname = 'unbeaten'"
    wait_for(lambda: query(db, count) == [(1,)], 10, "the VACUUM in the statistics")

    def retry(at: datetime):
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[], scheduled_time=at)
        return env.run(maint.run_item, RunItemRequest(target=target(db), item=item("vacuum", "public.unbeaten"),
                                                      guards=GUARDS))

    result = retry(scheduled)
    assert result.outcome == "done" and "finished after its worker stopped: not run again" in result.detail, result
    assert query(db, count) == [(1,)]
    result = retry(datetime.now(timezone.utc) + timedelta(seconds=5))  # scheduled after that VACUUM
    assert result.outcome == "done" and "not run again" not in result.detail, result
    wait_for(lambda: query(db, count) == [(2,)], 10, "the second VACUUM in the statistics")


def test_repack_rebuilds_a_bloated_table_online_while_a_writer_keeps_writing(clusters):
    """The real pg_repack (Debian postgresql-15-repack) on a table bloated for real, picked by its measured bloat:
    skipped with the command that installs it while the extension is missing; then rebuilt, the table more than
    halved, while a concurrent writer inserts and updates without one error, and every row it wrote is there."""
    from activities.postgres.repack import client_binary

    if client_binary() is None:
        pytest.skip("pg_repack is not installed (scripts/setup.sh installs postgresql-15-repack)")
    primary, _ = clusters
    query(primary, "DROP TABLE IF EXISTS rp")
    query(primary, "CREATE TABLE rp (id bigint PRIMARY KEY, v int NOT NULL, payload text NOT NULL) "
                   "WITH (autovacuum_enabled = off)")
    query(primary, "INSERT INTO rp SELECT g, 0, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g")
    query(primary, "DELETE FROM rp WHERE id % 4 <> 0")  # three quarters dead, spread over every page
    settle(primary)
    query(primary, "VACUUM (ANALYZE) rp")  # dead space becomes free space: only a rewrite gives it back
    query(primary, "DROP EXTENSION IF EXISTS pg_repack")
    task = MaintenanceTask(kind="repack", tables="auto", auto={"min_table_bloat": 0.5, "min_table_bytes": "4MB"})
    planned = PlanRequest(target=target(primary), tasks=[task], backup=BackupPolicy(take=False))
    picked = {i.table: i for i in ActivityEnvironment().run(maint.plan, planned).items}
    assert picked["public.rp"].kind == "repack" and "table bloat" in picked["public.rp"].reason, picked
    guards = Guards(lock_timeout=1, statement_timeout=120, lag_wait=5)
    request = RunItemRequest(target=target(primary), item=picked["public.rp"], guards=guards)

    skipped = ActivityEnvironment().run(maint.run_item, request)
    assert skipped.outcome == "skipped" and "CREATE EXTENSION pg_repack" in skipped.detail, skipped
    query(primary, "CREATE EXTENSION pg_repack")

    written: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(primary.dsn, autocommit=True) as c:
            n = 1_000_000
            while not stop.is_set():
                n += 1
                try:
                    c.execute("INSERT INTO rp VALUES (%s, 1, 'during')", (n,))
                    c.execute("UPDATE rp SET v = v + 1 WHERE id = %s", ((n % 100_000) * 4,))
                    written.append(n)
                except psycopg.Error as e:
                    errors.append(str(e))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(written) > 50, 20, "the writer to write")
        before_rebuild = len(written)
        result = ActivityEnvironment().run(maint.run_item, request)
        during = len(written) - before_rebuild  # writes made while pg_repack ran
        after_rebuild = len(written)
        wait_for(lambda: len(written) > after_rebuild + 50, 20, "the writer to write after the rebuild")
    finally:
        stop.set()
        thread.join(20)
    assert result.outcome == "done", result
    b, a = result.before, result.after
    print(f"repack: {b.table_bytes} -> {a.table_bytes} table bytes, bloat {b.table_bloat} -> {a.table_bloat} "
          f"({a.bloat_method}) in {result.seconds:.1f}s; writer {during} writes during it, {len(errors)} errors")
    assert errors == [] and during > 10
    assert a.table_bytes < b.table_bytes / 2 and b.table_bloat > 0.5 and a.table_bloat < 0.2, (b, a)
    assert query(primary, "select count(*) from rp where id > 1000000")[0][0] == len(written)  # none lost
    assert query(primary, "select count(*) from rp where id <= 400000")[0][0] == 100_000
    assert query(primary, "select count(*) from pg_trigger where tgname = 'repack_trigger'") == [(0,)]
    assert "public.rp" not in {i.table for i in ActivityEnvironment().run(maint.plan, planned).items}


def test_repack_guards_a_held_lock_gives_up_without_killing_and_a_lagging_replica_is_waited_for(clusters):
    """--wait-timeout/--no-kill-backend: a session holding the table keeps its lock and its transaction (outcome
    lock-timeout, retried later by the workflow); a replica whose replay is paused lags beyond the guard: the
    rebuild does not start (skipped, the lag said) -- and starts once the replica catches up."""
    from activities.postgres.repack import client_binary

    if client_binary() is None:
        pytest.skip("pg_repack is not installed (scripts/setup.sh installs postgresql-15-repack)")
    primary, replica = clusters
    query(primary, "CREATE EXTENSION IF NOT EXISTS pg_repack")
    query(primary, "DROP TABLE IF EXISTS rp_guarded")
    query(primary, "CREATE TABLE rp_guarded (id bigint PRIMARY KEY, payload text)")
    query(primary, "INSERT INTO rp_guarded SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    request = RunItemRequest(target=target(primary), item=item("repack", "public.rp_guarded"),
                             guards=Guards(lock_timeout=1, statement_timeout=60, lag_wait=2,
                                           max_replication_lag=64 * 1024))
    holder = psycopg.connect(primary.dsn)
    try:
        holder.execute("LOCK TABLE rp_guarded IN ACCESS SHARE MODE")
        result = ActivityEnvironment().run(maint.run_item, request)
        assert result.outcome == "lock-timeout" and "--no-kill-backend" in result.detail, result
        assert holder.execute("select count(*) from rp_guarded").fetchone() == (20000,)  # not cancelled
    finally:
        holder.rollback()
        holder.close()

    # a transaction left open on another table: pg_repack would wait for it before its swap, without end
    idle = psycopg.connect(primary.dsn)
    try:
        idle.execute("select txid_current()")  # a transaction open, idle, holding no lock on the table
        started = time.monotonic()
        result = ActivityEnvironment().run(maint.run_item, request.model_copy(
            update={"guards": request.guards.model_copy(update={"transaction_wait": 2})}))
        assert result.outcome == "lock-timeout", result
        assert f"held by pid {idle.info.backend_pid} " in result.detail and "idle in transaction" in result.detail
        assert time.monotonic() - started < 30
        assert query(primary, "select count(*) from pg_trigger where tgname = 'repack_trigger'") == [(0,)]
        assert idle.execute("select 1").fetchone() == (1,)  # its transaction was left alone
    finally:
        idle.rollback()
        idle.close()

    query(replica, "select pg_wal_replay_pause()")
    try:
        query(primary, "CREATE TABLE IF NOT EXISTS lag_filler (payload text)")
        query(primary, "INSERT INTO lag_filler SELECT repeat(md5(g::text), 8) FROM generate_series(1, 5000) g")
        result = ActivityEnvironment().run(maint.run_item, request)
        assert result.outcome == "skipped" and "replication lag above 65536 bytes" in result.detail, result
    finally:
        query(replica, "select pg_wal_replay_resume()")
    result = ActivityEnvironment().run(maint.run_item, request)
    assert result.outcome == "done", result


def test_the_app_is_judged_against_before_the_window_on_real_prometheus(prometheus_url):
    """watch.judge on a real Prometheus: the request rate of its own query endpoint (what it scrapes of itself)
    stands for the app's error rate. Quiet before the work and after it began: no worsening (pass). Then a
    burst of requests, as an app failing would raise its errors: the canary's judge finds it significantly
    higher than before the window, a fail (what stops new work), figures given."""
    from datetime import datetime, timezone

    import httpx

    from activities.prometheus import query_range
    from opsflow.maintenance import WatchPolicy
    from opsflow.maintenance_models import AppJudgeRequest

    metric = 'sum(rate(prometheus_http_requests_total{handler="/api/v1/query"}[3s]))'
    policy = WatchPolicy(prometheus=prometheus_url, duration=60, interval=1,
                         queries=[{"name": "query rate", "query": metric, "missing": "zero"}],
                         during={"baseline": "20s", "recent": "8s", "step": "1s", "min_samples": 5})

    def history() -> datetime | None:
        now = datetime.now(timezone.utc)
        return now if len(query_range(prometheus_url, metric, now - timedelta(seconds=20), now, 1)) >= 15 else None

    began = wait_for(history, 60, "20 s of Prometheus's own figures before the work begins", interval=1)

    def judged():
        j = ActivityEnvironment().run(maint.judge_app, AppJudgeRequest(
            policy=policy, after="vacuum:public.t", since=began, baseline_end=began,
            baseline_start=began - timedelta(seconds=20)))
        return j if j.verdict != "inconclusive" else None  # inconclusive until 5 values since the work began

    steady = wait_for(judged, 30, "a conclusive judgement of the quiet app", interval=1)
    assert steady.verdict == "pass" and not steady.worse, steady

    stop = threading.Event()

    def burst() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                client.get(f"{prometheus_url}/api/v1/query", params={"query": "1"})

    threads = [threading.Thread(target=burst, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        worse = wait_for(lambda: (j := judged()) is not None and j.worse and j, 40, "the judge to find it worse",
                         interval=1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    m = worse.metrics[0]
    print(f"judged: steady {steady.verdict} ({steady.reason}); burst {worse.verdict}: {worse.reason}")
    assert worse.verdict == "fail" and m.verdict == "high" and m.current > 5 * (m.baseline or 0.01), worse
    assert "higher" in worse.reason and "window mean" in worse.reason, worse.reason


def half_deleted_for_repack(cluster, table: str, rows: int, options: str = "") -> str:
    """The pg_repack client (the test is skipped without it), its extension in the database, and a new `table` of
    `rows` rows with a primary key, every other one deleted. Returns the client's path."""
    from activities.postgres.repack import client_binary

    binary = client_binary()
    if binary is None:
        pytest.skip("pg_repack is not installed (scripts/setup.sh installs postgresql-15-repack)")
    query(cluster, "CREATE EXTENSION IF NOT EXISTS pg_repack")
    query(cluster, f"DROP TABLE IF EXISTS {table}")
    query(cluster, f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload text){options}")
    query(cluster, f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, {rows}) g")
    query(cluster, f"DELETE FROM {table} WHERE id % 2 = 0")
    return binary


def test_a_retry_waits_for_the_pg_repack_a_dead_worker_left_running_and_does_not_rebuild_twice(clusters):
    """A worker that died mid-rebuild leaves its pg_repack client running (its own session). The retry finds it by
    pg_repack's advisory lock on the table, waits for it, and reports the rebuild it finished: one rebuild."""
    import subprocess

    from activities.postgres.repack import client_env

    primary, _ = clusters
    binary = half_deleted_for_repack(primary, "rp_orphan", 40000)
    node = "select relfilenode from pg_class where relname = 'rp_orphan'"
    (before,) = query(primary, node)[0]
    # The dead worker's pg_repack, held before its swap by a transaction open elsewhere (so the retry meets it)
    idle = psycopg.connect(primary.dsn)
    idle.execute("select txid_current()")
    orphan = subprocess.Popen([binary, "--table", "public.rp_orphan", "--no-kill-backend"],
                              env=client_env(PostgresDatabase(provider="postgres", dsn=primary.dsn)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: query(primary, "select 1 from pg_locks where locktype = 'advisory' and classid = 16185446"),
                 30, "the orphaned pg_repack to take its lock on the table")
        beats: list = []

        def beat(*details) -> None:
            beats.append(details)
            if "already rebuilding" in details[0]["progress"]:  # the retry waits for it: the old transaction ends,
                idle.rollback()  # the orphan swaps and finishes

        env = ActivityEnvironment()
        env.on_heartbeat = beat
        result = env.run(maint.run_item, RunItemRequest(target=target(primary), item=item("repack", "public.rp_orphan"),
                                                        guards=Guards(lock_timeout=1, statement_timeout=60)))
        assert orphan.wait(30) == 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
        idle.close()
    assert result.outcome == "done" and "not run again" in result.detail, result
    assert "(pid " in result.detail and any("already rebuilding public.rp_orphan" in b[0]["progress"] for b in beats)
    (after,) = query(primary, node)[0]
    assert after != before and result.after.table_bytes < result.before.table_bytes, (result.before, result.after)
    assert query(primary, "select count(*) from rp_orphan") == [(20000,)]


def test_a_retry_after_the_dead_workers_pg_repack_already_finished_does_not_rebuild_twice(clusters):
    """A worker that died mid-rebuild; its pg_repack went on and finished before the retry looked. The retry tells by
    the table, as a VACUUM's retry does (activities/postgres/maintenance.finished_before): with the statistics that
    attempt heartbeated, by the table's new file; without (it died before its first heartbeat), by pg_repack's
    ANALYZE since the step was first scheduled. Either way: done, not rebuilt again. Scheduled after it: rebuilt."""
    import dataclasses
    import subprocess
    from datetime import datetime, timedelta, timezone

    from activities.postgres.repack import client_env

    primary, _ = clusters
    binary = half_deleted_for_repack(primary, "rp_gone", 20000, " WITH (autovacuum_enabled = off)")
    before = stats(primary, "public.rp_gone")
    scheduled = datetime.now(timezone.utc) - timedelta(seconds=1)
    subprocess.run([binary, "--table", "public.rp_gone", "--no-kill-backend"], check=True, timeout=60,
                   env=client_env(PostgresDatabase(provider="postgres", dsn=primary.dsn)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # what the dead worker's client did alone
    rebuilt = stats(primary, "public.rp_gone")
    assert rebuilt.relfilenode != before.relfilenode
    wait_for(lambda: stats(primary, "public.rp_gone").last_analyze, 10, "pg_repack's ANALYZE in the statistics")

    def retry(details: list, at: datetime | None = None):
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=details,
                                       scheduled_time=at or env.info.scheduled_time)
        return env.run(maint.run_item, RunItemRequest(target=target(primary), item=item("repack", "public.rp_gone"),
                                                      guards=GUARDS))

    heartbeated = [{"item": "repack:public.rp_gone", "progress": "pg_repack: running",
                    "before": before.model_dump(mode="json")}]
    for result in (retry(heartbeated), retry([], scheduled)):
        assert result.outcome == "done" and "finished after its worker stopped: not run again" in result.detail, \
            result
        assert stats(primary, "public.rp_gone").relfilenode == rebuilt.relfilenode  # not rebuilt again
    assert retry(heartbeated).before.table_bytes == before.table_bytes  # the report's before is the first attempt's
    result = retry([], datetime.now(timezone.utc) + timedelta(seconds=5))  # scheduled after that rebuild
    assert result.outcome == "done" and "not run again" not in (result.detail or ""), result
    assert stats(primary, "public.rp_gone").relfilenode != rebuilt.relfilenode
