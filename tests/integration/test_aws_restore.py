"""Restore drills and failback on the AWS path, for real: boto3 over HTTP against moto (lab/aws_emulator.py) with
the lab's PostgreSQL behind RDS, configured by lab/aws_lab.py as `opsflow lab up --cloud aws` does.

- RDS point-in-time restore: the primary archives WAL and keeps a base backup; RestoreDBInstanceToPointInTime
  makes a new cluster restored to the requested time; the scratch instance's endpoint is that cluster.
- A pg_dump in S3 restored into a scratch database on another server (pg_restore, as the worker runs it).
- Failback: after a real promotion through RDS, the old primary's instance is replaced by a read replica of
  the new primary, and its cluster streams from it.

The tests run in order: the promotion near the end changes the lab for the ones after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import psycopg
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.aws.dump_restore import S3DumpRestore, upload_dump
from activities.aws.rds import RdsInstance
from activities.aws.rds_restore import SCRATCH_TAG, RdsPointInTimeRestore
from activities.postgres.server import sql_status
from activities.restore import restore_leftovers, restore_wait
from lab.aws_emulator import RESTORES_DIR, start_emulator
from lab.aws_lab import (
    DUMPS_BUCKET,
    REPORTS_BUCKET,
    ZONE,
    aws_emulator_config,
    aws_lab_inventory,
    instance_id,
    s3_dump_drill,
    seed_dump,
)
from lab.postgres import Cluster, archive_now, create_replica, drop_cluster, earliest_restorable_time, init_primary
from opsflow.inventory import AwsConnection, DrillPolicy, Inventory
from opsflow.models import RegionTarget, RestoreRequest
from tests.helpers import eventually as wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("fake_aws_credentials")]

EAST, WEST = "eastus", "westeurope"
@pytest.fixture(scope="module")
def workdir():
    # Not pytest's tmp_path: parallel pytest sessions prune /tmp/pytest-of-<user> while our servers run there.
    path = Path(tempfile.mkdtemp(prefix="opsflow-test-aws-restore-"))
    yield path
    if not os.environ.get("OPSFLOW_KEEP_LAB"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def clusters(workdir):
    """The lab's pair (the primary archives WAL and keeps a base backup), plus a server for scratch databases."""
    root = workdir / "pg"
    made: list[Cluster] = []
    try:
        east = init_primary(root, EAST, archive_dir=workdir / "wal-archive")
        made.append(east)
        west = create_replica(east, root, WEST)
        made.append(west)
        scratch = init_primary(root, "scratch")
        made.append(scratch)
        yield {EAST: east, WEST: west, "scratch": scratch}
    finally:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(drop_cluster, made))


@pytest.fixture(scope="module")
def emu(clusters, workdir):
    config = aws_emulator_config({EAST: clusters[EAST], WEST: clusters[WEST]}, workdir)
    config.update(metrics_interval=0, restore_delay=0.5, rebuild_delay=0.5)  # long enough to see `creating`
    emulator = start_emulator(config)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def state(emu, clusters) -> dict:
    """What `lab up --cloud aws` records (lab.json) after start_aws_emulator(), for the parts the inventory uses."""
    return {
        "receiver": {"url": "http://127.0.0.1:9"},
        "regions": {r: {"dsn": clusters[r].dsn} for r in (EAST, WEST)},
        "aws": {
            "endpoint_url": emu.url,
            "hosted_zone_id": emu.info()["hosted_zones"][ZONE],
            "record_name": f"www.{ZONE}",
            "instances": {
                r: {"db_instance_identifier": instance_id(r), "aws_region": a}
                for r, a in (("eastus", "us-east-1"), ("westeurope", "eu-west-1"))
            },
            "buckets": {"reports": REPORTS_BUCKET, "dumps": DUMPS_BUCKET},
        },
    }


@pytest.fixture(scope="module")
def inventory(state, workdir) -> Inventory:
    return Inventory.model_validate(aws_lab_inventory(state, workdir))


def rds_client(emu, region: str = "us-east-1"):
    return boto3.client("rds", region_name=region, endpoint_url=emu.url)


def describe(emu, ident: str, region: str = "us-east-1") -> dict:
    return rds_client(emu, region).describe_db_instances(DBInstanceIdentifier=ident)["DBInstances"][0]


def exists(emu, ident: str, region: str = "us-east-1") -> bool:
    try:
        describe(emu, ident, region)
        return True
    except rds_client(emu, region).exceptions.DBInstanceNotFoundFault:
        return False


def sql(dsn: str, query: str, params=None):
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def server_now(cluster: Cluster) -> datetime:
    return sql(cluster.dsn, "select clock_timestamp()")[0][0]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def in_activity(fn, *args, timeout: float = 300):
    """Run fn as an activity would (heartbeats recorded, a start-to-close limit of `timeout`)."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, start_to_close_timeout=timedelta(seconds=timeout), heartbeat_timeout=timedelta(seconds=60)
    )
    beats: list = []
    env.on_heartbeat = lambda *details: beats.append(details[0] if details else None)
    return env.run(fn, *args), beats


def request(inventory: Inventory, method: str, name: str = "", point: datetime | None = None, region: str = EAST, *,
            environment: str = "", run_id: str = "", **drill) -> RestoreRequest:
    policy = inventory.drill.model_copy(update={"method": method})
    if drill:
        policy = DrillPolicy.model_validate({**policy.model_dump(exclude_none=True), **drill})
    return RestoreRequest(
        source=RegionTarget.of(inventory, region),
        drill=policy,
        method=method,
        scratch_name=name,
        point_in_time=point,
        environment=environment,
        run_id=run_id,
    )




# -- the lab's configuration ------------------------------------------------------------------------------


def test_lab_inventory_names_the_aws_providers(inventory, emu, clusters):
    east, west = inventory.regions[EAST].database, inventory.regions[WEST].database
    assert (east.provider, east.db_instance_identifier, east.aws_region, east.dsn) == (
        "aws-rds",
        "lab-eastus-pg",
        "us-east-1",
        clusters[EAST].dsn,
    )
    assert (west.provider, west.db_instance_identifier, west.aws_region) == (
        "aws-rds",
        "lab-westeurope-pg",
        "eu-west-1",
    )
    assert inventory.traffic.provider == "route53" and inventory.aws.endpoint_url == emu.url
    assert inventory.reports.s3.bucket == REPORTS_BUCKET and inventory.drill.method == "rds-pitr"
    assert inventory.azure is None
    # The RDS endpoints are the clusters (lab-only rewrite), the replica is cross-region by ARN.
    e, w = describe(emu, "lab-eastus-pg"), describe(emu, "lab-westeurope-pg", "eu-west-1")
    assert e["Endpoint"] == {"Address": "127.0.0.1", "Port": clusters[EAST].port}
    assert w["Endpoint"] == {"Address": "127.0.0.1", "Port": clusters[WEST].port}
    assert w["ReadReplicaSourceDBInstanceIdentifier"] == e["DBInstanceArn"]


# -- RDS point-in-time restore --------------------------------------------------------------------------


def test_rds_pitr_window_follows_the_wal_archive(inventory, clusters, workdir):
    east = clusters[EAST]
    sql(
        east.dsn,
        "create table if not exists orders "
        "(id serial primary key, note text, at timestamptz default clock_timestamp())",
    )
    made_restorable = archive_now(east)
    window = RdsPointInTimeRestore(request(inventory, "rds-pitr")).window()
    assert window.latest >= made_restorable  # the newest archived commit (archive_now's marker)
    assert window.latest <= server_now(east)
    base_backup_end = earliest_restorable_time(workdir / "pg")
    assert window.earliest is not None and base_backup_end <= window.earliest <= window.latest
    assert "retention" in window.detail


def test_rds_pitr_restores_exactly_the_rows_before_the_point(emu, inventory, clusters, workdir, monkeypatch):
    east = clusters[EAST]
    # Still `creating` when restore_wait first looks, however busy the machine is (0.5 s was not, once).
    monkeypatch.setattr(emu, "restore_delay", 3.0)
    sql(east.dsn, "insert into orders (note) select 'before ' || g from generate_series(1, 5) g")
    point = server_now(east)
    sql(east.dsn, "insert into orders (note) select 'after ' || g from generate_series(1, 3) g")
    archive_now(east)  # what RDS does by itself every five minutes: ship the WAL
    before = sql(east.dsn, "select id, note from orders where note like 'before %' order by id")

    name = "opsflow-drill-pitr0001"
    req = request(inventory, "rds-pitr", name, point)
    provider = RdsPointInTimeRestore(req)
    started = provider.start(name, point)
    assert (started.ready, started.method, started.restore_point) == (False, "rds-pitr", point)
    assert describe(emu, name)["DBInstanceStatus"] == "creating"
    assert provider.start(name, point).name == name  # idempotent: the same instance, no second restore
    assert provider.list_scratch("opsflow-drill-") == [name]

    target, beats = in_activity(restore_wait, req)
    assert target.ready and target.dsn and beats and beats[0]["ready"] is False
    inst = describe(emu, name)
    port = inst["Endpoint"]["Port"]
    assert inst["Endpoint"]["Address"] == "127.0.0.1" and port not in (east.port, clusters[WEST].port)
    assert f"port={port}" in target.dsn and "host=127.0.0.1" in target.dsn and "dbname=postgres" in target.dsn
    assert {t["Key"]: t["Value"] for t in inst["TagList"]}[SCRATCH_TAG] == inventory.environment
    assert inst["DBParameterGroups"][0]["DBParameterGroupName"].startswith("default.")  # never the source's group
    assert "ReadReplicaSourceDBInstanceIdentifier" not in inst and not inst.get("ReadReplicaDBInstanceIdentifiers")
    # Exactly what was committed before the point: every 'before' row, no 'after' row.
    assert sql(target.dsn, "select id, note from orders order by id") == before
    assert sql(target.dsn, "select pg_is_in_recovery()")[0][0] is False
    datadir = workdir / "pg" / RESTORES_DIR / name / "data"
    assert datadir.is_dir()

    assert provider.delete(name) is True
    assert not exists(emu, name) and not port_open(port) and not datadir.exists()
    assert provider.delete(name) is False  # idempotent
    assert provider.list_scratch("opsflow-drill-") == []


def test_rds_pitr_through_the_drill_activities(emu, inventory, clusters):
    """The drill's activities in its order, as the workflow runs them: checks verified against the source at the
    point."""
    from activities.restore import restore_delete, restore_start, restore_window, validate_checks, verify
    from opsflow.models import VerifyRequest

    east = clusters[EAST]
    sql(east.dsn, "insert into orders (note) select 'drill ' || g from generate_series(1, 4) g")
    point = server_now(east)
    sql(east.dsn, "insert into orders (note) values ('too late for the drill')")
    archive_now(east)
    drill = {
        "row_counts": [{"table": "orders", "timestamp_column": "at"}],
        "checks": [
            {"name": "no late row", "query": "select count(*) = 0 from orders where note = 'too late for the drill'"}
        ],
        "schema_objects": ["orders"],
    }
    name = "opsflow-drill-pitr0003"
    req = request(inventory, "rds-pitr", name, point, **drill)
    validate_checks(req)
    window = restore_window(req)
    assert window.earliest <= point <= window.latest
    restore_start(req)
    scratch, _ = in_activity(restore_wait, req)
    results = verify(VerifyRequest(source=req.source, scratch=scratch, drill=req.drill, restore_point=point))
    assert [(r.kind, r.name, r.ok) for r in results] == [
        ("row_count", "orders", True),
        ("sql", "no late row", True),
        ("schema", "orders", True),
    ]
    assert (
        results[0].expected
        == results[0].actual
        == sql(east.dsn, "select count(*) from orders where at < %s", (point,))[0][0]
    )
    assert restore_delete(req) is True and not exists(emu, name)


def test_rds_pitr_refuses_a_point_outside_the_window(emu, inventory, clusters):
    provider = RdsPointInTimeRestore(request(inventory, "rds-pitr"))
    window = provider.window()
    for point, word in (
        (window.latest + timedelta(minutes=5), "after"),
        (window.earliest - timedelta(minutes=5), "before"),
    ):
        with pytest.raises(ApplicationError) as e:
            provider.start("opsflow-drill-outside", point)
        assert e.value.non_retryable and e.value.type == "AwsInvalidParameter" and word in e.value.message
        assert not exists(emu, "opsflow-drill-outside")


def test_rds_pitr_leftovers_are_removed_and_only_scratch_instances(emu, inventory, clusters):
    left = "opsflow-drill-crashed1"
    point = RdsPointInTimeRestore(request(inventory, "rds-pitr")).window().latest
    RdsPointInTimeRestore(request(inventory, "rds-pitr", left, point)).start(left, point)
    # An instance with the prefix that no drill made (no scratch tag) is never listed nor deleted.
    rds_client(emu).create_db_instance(
        DBInstanceIdentifier="opsflow-drill-notmine",
        DBInstanceClass="db.t3.micro",
        Engine="postgres",
        MasterUsername="postgres",
        MasterUserPassword="lab-not-a-secret",
        AllocatedStorage=20,
    )
    try:
        found, _ = in_activity(restore_leftovers, request(inventory, "rds-pitr", "opsflow-drill-current", point))
        assert found == [left]
        assert not exists(emu, left) and exists(emu, "opsflow-drill-notmine")
        assert left not in emu.state()["instances"]
        with pytest.raises(ApplicationError) as e:
            RdsPointInTimeRestore(request(inventory, "rds-pitr")).delete("opsflow-drill-notmine")
        assert e.value.non_retryable and "opsflow-drill-notmine" in e.value.message
    finally:
        rds_client(emu).delete_db_instance(DBInstanceIdentifier="opsflow-drill-notmine", SkipFinalSnapshot=True)


# -- a pg_dump in S3, restored into a scratch database ---------------------------------------------------


@pytest.fixture(scope="module")
def dumps(emu, clusters):
    """Two dumps of the primary: the first with the rows so far, the second after more."""
    east = clusters[EAST]
    sql(east.dsn, "create table if not exists items (id int primary key, name text)")
    sql(east.dsn, "insert into items select g, 'first ' || g from generate_series(1, 4) g on conflict do nothing")
    first = seed_dump(emu.url, east)
    time.sleep(1.1)  # S3 LastModified has second precision
    sql(east.dsn, "insert into items select g, 'second ' || g from generate_series(5, 7) g on conflict do nothing")
    second = seed_dump(emu.url, east)
    return first, second


def dump_request(
    inventory, state, clusters, name: str = "", point: datetime | None = None, prefix: str | None = None
) -> RestoreRequest:
    policy = s3_dump_drill(state, clusters["scratch"].dsn)
    if prefix is not None:
        policy["dumps"]["prefix"] = prefix
    policy.pop("method")
    return request(inventory, "s3-dump", name, point, **policy)


def test_s3_dump_window_and_restore(inventory, state, clusters, dumps):
    first, second = dumps
    req = dump_request(inventory, state, clusters)
    window = S3DumpRestore(req).window()
    assert (window.earliest, window.latest) == (first["dump_time"], second["dump_time"])
    assert second["key"] in window.detail and "2 dump(s)" in window.detail

    name = "opsflow-drill-dump0001"
    req = dump_request(inventory, state, clusters, name, window.latest)
    provider = S3DumpRestore(req)
    started = provider.start(name, window.latest)
    assert not started.ready and started.restore_point == second["dump_time"]
    target, beats = in_activity(restore_wait, req)
    assert target.ready and f"dbname={name}" in target.dsn and target.restore_point == second["dump_time"]
    phases = [b.get("phase") for b in beats if isinstance(b, dict)]
    assert "download" in phases and "pg_restore" in phases
    assert sql(target.dsn, "select count(*), max(id) from items")[0] == (7, 7)
    assert sql(target.dsn, "select count(*) from orders")[0][0] >= 5
    assert provider.start(name, window.latest).ready  # idempotent: done is done
    assert provider.status(name).ready
    assert provider.list_scratch("opsflow-drill-") == [name]

    assert provider.delete(name) is True
    assert sql(clusters["scratch"].dsn, "select count(*) from pg_database where datname = %s", (name,))[0][0] == 0
    assert provider.delete(name) is False
    assert provider.list_scratch("opsflow-drill-") == []


def test_s3_dump_point_picks_the_newest_dump_at_or_before_it(inventory, state, clusters, dumps):
    first, second = dumps
    name = "opsflow-drill-dump0002"
    point = first["dump_time"] + (second["dump_time"] - first["dump_time"]) / 2
    provider = S3DumpRestore(dump_request(inventory, state, clusters, name, point))
    try:
        assert provider.start(name, point).restore_point == first["dump_time"]
        target = provider.status(name)
        assert target.ready and sql(target.dsn, "select count(*), max(id) from items")[0] == (4, 4)
        with pytest.raises(ApplicationError) as e:
            provider.start("opsflow-drill-toolate", first["dump_time"] - timedelta(hours=1))
        assert e.value.non_retryable and e.value.type == "RestoreUnavailable"
    finally:
        provider.delete(name)


def test_s3_dump_restore_starts_over_after_a_dead_attempt_and_waits_for_a_live_one(inventory, state, clusters, dumps):
    _, second = dumps
    name = "opsflow-drill-dump0003"
    scratch = clusters["scratch"].dsn
    provider = S3DumpRestore(dump_request(inventory, state, clusters, name, second["dump_time"]))
    try:
        provider.start(name, second["dump_time"])
        # A worker died half-way: some of the restore is there, nothing marks it complete.
        sql(scratch.replace("dbname=postgres", f"dbname={name}"), "create table half_restored (x int)")
        # Another worker restores right now (holds the lock): status waits, and touches nothing.
        with psycopg.connect(scratch, autocommit=True) as other:
            other.execute("select pg_advisory_lock(hashtextextended(%s, 0))", (f"opsflow-restore:{name}",))
            busy = provider.status(name)
            assert not busy.ready and "another worker" in busy.detail
        target = provider.status(name)  # the other worker is gone: this one starts over
        assert target.ready
        tables = {r[0] for r in sql(target.dsn, "select tablename from pg_tables where schemaname = 'public'")}
        assert "half_restored" not in tables and {"items", "orders"} <= tables
    finally:
        provider.delete(name)


def test_s3_dump_that_is_not_a_dump_is_a_clear_error(emu, inventory, state, clusters, workdir):
    junk = workdir / "junk.dump"
    junk.write_bytes(b"this is not a pg_dump archive\n" * 10)
    upload_dump(AwsConnection(endpoint_url=emu.url), DUMPS_BUCKET, "junk/bad.dump", junk)
    name = "opsflow-drill-dump0004"
    provider = S3DumpRestore(dump_request(inventory, state, clusters, name, datetime.now(timezone.utc), prefix="junk/"))
    try:
        provider.start(name, datetime.now(timezone.utc))
        with pytest.raises(ApplicationError) as e:
            provider.status(name)
        assert e.value.non_retryable and e.value.type == "BadInput" and "junk/bad.dump" in e.value.message
    finally:
        provider.delete(name)
    with pytest.raises(ApplicationError) as e:
        S3DumpRestore(dump_request(inventory, state, clusters, prefix="nothing-here/")).window()
    assert e.value.non_retryable and "nothing-here/" in e.value.message


# -- a mysqldump in S3, restored into a scratch MariaDB the worker starts (method s3-mysqldump) -------------------


@pytest.fixture(scope="module")
def mysql_source(workdir):
    """The application's MySQL (a real MariaDB): database shop, orders with a commit-time column, customers."""
    from lab.mysql import start_source

    server = start_source(workdir / "mysql")
    try:
        with server.connect() as conn, conn.cursor() as cur:
            cur.execute("create database shop")
            cur.execute("create table shop.customers (id int primary key, name varchar(40) not null)")
            cur.execute("create table shop.orders (id int auto_increment primary key, customer int not null, "
                        "total decimal(10,2) not null, created_at timestamp(6) not null default current_timestamp(6))")
            cur.execute("insert into shop.customers values (1, 'ada'), (2, 'brian'), (3, 'chen')")
            cur.executemany("insert into shop.orders (customer, total) values (%s, %s)",
                            [(1 + i % 3, 10 + i) for i in range(200)])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mysqldump(emu, mysql_source):
    """One gzip mysqldump of shop in the lab's S3; then more orders, written after the dump."""
    from lab.mysql import seed_mysqldump

    seeded = seed_mysqldump(emu.url, mysql_source, "shop", bucket=DUMPS_BUCKET)
    time.sleep(0.01)
    with mysql_source.connect() as conn, conn.cursor() as cur:
        cur.executemany("insert into shop.orders (customer, total) values (%s, %s)", [(1, 1)] * 25)
    return seeded


def mysql_request(inventory, mysql_source, name: str, **drill) -> RestoreRequest:
    policy = {
        "dumps": {"bucket": DUMPS_BUCKET, "prefix": "mysql/"},
        "mysql": {"database": "shop", "source": {"host": "127.0.0.1", "port": mysql_source.port, "user": "root"}},
        "row_counts": [{"table": "orders", "timestamp_column": "created_at"}, {"table": "customers"}],
        "checks": [{"name": "no negative totals", "query": "select count(*) = 0 from orders where total < 0"},
                   {"name": "every order has a customer", "query":
                    "select count(*) = 0 from orders o left join customers c on c.id = o.customer where c.id is null"}],
        "schema_objects": ["orders", "customers"],
        **drill,
    }
    return request(inventory, "s3-mysqldump", name, datetime.now(timezone.utc), **policy)


def mariadbd_running(datadir: Path) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"--datadir={datadir}".encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_mysqldump_restored_into_a_scratch_mariadb_verified_and_removed(inventory, mysql_source, mysqldump,
                                                                        workdir, monkeypatch):
    """The Maintenance API guide's monthly recovery test: the newest mysqldump from S3 into a scratch MariaDB the
    worker starts, row counts against the source as of the dump, SQL checks, and nothing left behind."""
    from activities.mysql import SCRATCH_DIR_ENV
    from activities.restore import restore_mysql_dump, restore_window, validate_checks

    monkeypatch.setenv(SCRATCH_DIR_ENV, str(workdir / "mysql-scratch"))
    req = mysql_request(inventory, mysql_source, "opsflow-drill-my000001")
    validate_checks(req)
    window = restore_window(req)
    assert window.latest == mysqldump["dump_time"] and mysqldump["key"] in window.detail
    started = time.monotonic()
    result, beats = in_activity(restore_mysql_dump, req)
    took = time.monotonic() - started

    assert [(c.kind, c.name, c.ok) for c in result.checks] == [
        ("row_count", "orders", True), ("row_count", "customers", True), ("sql", "no negative totals", True),
        ("sql", "every order has a customer", True), ("schema", "orders", True), ("schema", "customers", True)]
    orders = result.checks[0]
    assert orders.expected == orders.actual == 200  # as of the dump: the 25 orders written after it are not counted
    assert result.scratch.restore_point == mysqldump["dump_time"] and "MariaDB" in result.scratch.detail
    assert 0 < result.restore_seconds <= took and result.cleaned
    phases = [b.get("phase") for b in beats if isinstance(b, dict)]
    assert "download" in phases and "verify" in phases
    scratch = workdir / "mysql-scratch" / "opsflow-drill-my000001"
    assert not scratch.exists() and not mariadbd_running(scratch / "data")
    print(f"mysqldump restore test: restored in {result.restore_seconds:.1f}s, {took:.1f}s with the checks")


def test_mysql_restore_test_cleans_up_after_a_bad_dump_and_a_failed_check(emu, inventory, mysql_source, mysqldump,
                                                                         workdir, monkeypatch):
    from activities.mysql import SCRATCH_DIR_ENV
    from activities.restore import restore_mysql_dump, validate_checks

    monkeypatch.setenv(SCRATCH_DIR_ENV, str(workdir / "mysql-scratch"))
    # A failed check is a result, and the server is removed all the same.
    bad = mysql_request(inventory, mysql_source, "opsflow-drill-my000002",
                        checks=[{"name": "a thousand orders", "query": "select count(*) = 1000 from orders"},
                                {"name": "broken", "query": "select nope from nowhere"}])
    result, _ = in_activity(restore_mysql_dump, bad)
    assert [(c.name, c.ok) for c in result.checks if c.kind == "sql"] == [("a thousand orders", False),
                                                                           ("broken", False)]
    assert "returned 0" in result.checks[2].detail and "nowhere" in result.checks[3].detail
    assert result.cleaned and not (workdir / "mysql-scratch" / "opsflow-drill-my000002").exists()

    # A file that is not a dump: a clear, non-retryable error, and nothing left behind.
    junk = workdir / "junk.sql"
    junk.write_text("this is not SQL at all;\n")
    upload_dump(AwsConnection(endpoint_url=emu.url), DUMPS_BUCKET, "mysql-junk/bad.sql", junk)
    req = mysql_request(inventory, mysql_source, "opsflow-drill-my000003",
                        dumps={"bucket": DUMPS_BUCKET, "prefix": "mysql-junk/"})
    with pytest.raises(ApplicationError) as e:
        in_activity(restore_mysql_dump, req)
    assert e.value.non_retryable and e.value.type == "BadInput" and "syntax" in e.value.message.lower()
    scratch = workdir / "mysql-scratch" / "opsflow-drill-my000003"
    assert not scratch.exists() and not mariadbd_running(scratch / "data")

    # A table the source does not have: refused before anything is created.
    with pytest.raises(ApplicationError) as e:
        validate_checks(mysql_request(inventory, mysql_source, "opsflow-drill-my000004",
                                      row_counts=[{"table": "invoices"}]))
    assert e.value.non_retryable and "'invoices'" in e.value.message


def test_mysql_scratch_server_a_crashed_drill_left_is_stopped_and_removed(inventory, mysql_source, workdir,
                                                                          monkeypatch):
    from activities.mysql import SCRATCH_DIR_ENV, ScratchServer
    from activities.restore import restore_delete

    root = workdir / "mysql-scratch"
    monkeypatch.setenv(SCRATCH_DIR_ENV, str(root))
    left = ScratchServer(root, "opsflow-drill-crashed9")  # a worker died mid-drill: its server runs on
    left.start({"environment": inventory.environment, "run": "crashed9"})
    other = ScratchServer(root, "opsflow-drill-staging1")  # another environment's drill, running now
    other.start({"environment": "staging", "run": "staging1"})
    try:
        found, _ = in_activity(restore_leftovers, mysql_request(inventory, mysql_source, "opsflow-drill-current1",
                                                               ))
        assert found == ["opsflow-drill-crashed9"]
        assert not left.dir.exists() and not mariadbd_running(left.datadir)
        assert other.dir.exists() and mariadbd_running(other.datadir)
        with pytest.raises(ApplicationError) as e:
            restore_delete(mysql_request(inventory, mysql_source, "opsflow-drill-staging1"))
        assert e.value.type == "Refused" and "staging" in e.value.message
        assert restore_delete(mysql_request(inventory, mysql_source, "opsflow-drill-gone0001")) is False
    finally:
        other.stop()
        left.stop()


def test_mysql_scratch_server_dies_with_a_killed_worker_and_its_directory_goes_at_the_next_drill(
        inventory, mysql_source, workdir, monkeypatch):
    """A worker SIGKILLed mid-restore: its scratch server goes with it (PR_SET_PDEATHSIG), no orphan keeps the port
    and the memory; the data directory it left is removed by the next drill's leftovers step."""
    import signal
    import subprocess
    import sys

    from activities.mysql import SCRATCH_DIR_ENV, ScratchServer

    root = workdir / "mysql-scratch"
    monkeypatch.setenv(SCRATCH_DIR_ENV, str(root))
    script = ("import sys, time; from pathlib import Path; from activities.mysql import ScratchServer; "
              "s = ScratchServer(Path(sys.argv[1]), 'opsflow-drill-killed01'); "
              f"s.start({{'environment': {inventory.environment!r}, 'run': 'killed01'}}); "
              "print(s.proc.pid, s.port, flush=True); time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        pid, port = (int(x) for x in worker.stdout.readline().split())
        assert port_open(port)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        def gone() -> bool:
            try:
                return b"mariadbd" not in Path(f"/proc/{pid}/comm").read_bytes()  # a reused pid is another program
            except OSError:
                return True

        wait_until(gone, what="the scratch server to die with its worker")
        assert not port_open(port)
        left = ScratchServer(root, "opsflow-drill-killed01")
        assert left.dir.exists()  # what the dead worker could not remove
        found, _ = in_activity(restore_leftovers, mysql_request(inventory, mysql_source, "opsflow-drill-next0001"))
        assert found == ["opsflow-drill-killed01"] and not left.dir.exists()
    finally:
        if worker.poll() is None:
            worker.kill()


# -- the drill's trend, read back from reports kept in S3 ----------------------------------------------------------


def test_drill_history_reads_the_last_drills_back_from_s3(emu, inventory, tmp_path):
    """restore.history against S3 (report.store writes there, as the workers do): only drills, newest N, oldest
    first, the running drill left out, a report that is not JSON of a report skipped."""
    from activities.reports import drill_history, store_report
    from opsflow.models import DrillHistoryRequest, DrillReport, ObjectiveResult, StoreReportRequest
    from opsflow.report import to_markdown

    env = "trend-s3"
    start = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)

    def keep(report) -> None:
        store_report(StoreReportRequest(environment=env, workflow_id=f"opsflow-{env}-{report.run_id}",
                                        reports_dir=str(tmp_path), store=inventory.reports, aws=inventory.aws,
                                        json_text=report.model_dump_json(), markdown=to_markdown(report)))

    for i in range(4):  # four monthly drills, the third missing its RPO
        keep(DrillReport(workflow_id=f"opsflow-{env}", environment=env, requester="schedule", run_id=f"run-{i}",
                         started_at=start + timedelta(days=30 * i), status="failed" if i == 2 else "succeeded",
                         method="rds-pitr", restore_seconds=100.0 + i, latest_point_age_seconds=60.0 * (i + 1),
                         objectives=[ObjectiveResult(name="restore_point_age", objective_seconds=150,
                                                     measured_seconds=60.0 * (i + 1), met=i < 2)]))
    from opsflow.models import ProcedureReport

    keep(ProcedureReport(procedure="failover", workflow_id=f"opsflow-{env}", environment=env, requester="a",
                         run_id="failover-1", status="succeeded"))
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=emu.url)
    prefix = f"{inventory.reports.s3.prefix.rstrip('/')}/" if inventory.reports.s3.prefix else ""
    s3.put_object(Bucket=inventory.reports.s3.bucket, Key=f"{prefix}{env}/garbage.json", Body=b"{not json")

    request = DrillHistoryRequest(environment=env, reports_dir=str(tmp_path / "elsewhere"), store=inventory.reports,
                                  aws=inventory.aws, limit=3, exclude_run="run-3")
    runs = drill_history(request)
    assert [r.run_id for r in runs] == ["run-0", "run-1", "run-2"]  # S3, not the (empty) local directory
    assert [(r.status, r.objectives_met, r.missed) for r in runs] == [
        ("succeeded", True, []), ("succeeded", True, []), ("failed", False, ["restore_point_age"])]
    assert all(r.stored_at.startswith(f"s3://{inventory.reports.s3.bucket}/") for r in runs)
    assert [r.run_id for r in drill_history(request.model_copy(update={"limit": 2, "exclude_run": ""}))] == [
        "run-2", "run-3"]


# -- failback: the old primary made a read replica of the new one --------------------------------------


def test_rebuild_replica_after_a_real_promotion(emu, inventory, clusters):
    east, west = clusters[EAST], clusters[WEST]
    sql(east.dsn, "insert into orders (note) values ('last write on eastus')")
    primary_lsn = sql_status(RegionTarget.of(inventory, EAST).database, EAST).current_lsn
    wait_until(
        lambda: (sql_status(RegionTarget.of(inventory, WEST).database, WEST).replay_lsn or "") >= primary_lsn,
        what="catch-up",
    )
    RdsInstance(RegionTarget.of(inventory, EAST)).fence()
    promoted, _ = in_activity(RdsInstance(RegionTarget.of(inventory, WEST)).promote, False)
    assert not promoted.already_primary and promoted.timeline == 2
    sql(west.dsn, "insert into orders (note) values ('first write on westeurope')")
    assert sql(east.dsn, "select pg_is_in_recovery()")[0][0] is False  # the old primary, diverging
    # Regions swapped by mistake: the new primary is never deleted to become a replica of the old one.
    with pytest.raises(ApplicationError) as e:
        RdsInstance(RegionTarget.of(inventory, WEST)).rebuild_replica(RegionTarget.of(inventory, EAST))
    assert e.value.non_retryable and e.value.type == "Refused" and "timeline 2" in e.value.message
    assert describe(emu, "lab-westeurope-pg", "eu-west-1")["DBInstanceStatus"] == "available"

    result, beats = in_activity(
        RdsInstance(RegionTarget.of(inventory, EAST)).rebuild_replica, RegionTarget.of(inventory, WEST)
    )

    assert (
        result.method == "rds-read-replica"
        and "lab-westeurope-pg" in result.detail
        and "before-rebuild" in result.detail
    )
    phases = [b["phase"] for b in beats if isinstance(b, dict)]
    assert (
        "deleting the old instance" in phases
        and "creating the read replica" in phases
        and "waiting for the read replica" in phases
    )
    e, w = describe(emu, "lab-eastus-pg"), describe(emu, "lab-westeurope-pg", "eu-west-1")
    assert e["DBInstanceStatus"] == "available" and e["ReadReplicaSourceDBInstanceIdentifier"] == w["DBInstanceArn"]
    # same endpoint: the inventory's DSN still holds
    assert e["Endpoint"] == {
        "Address": "127.0.0.1",
        "Port": east.port,
    }
    assert w["ReadReplicaDBInstanceIdentifiers"] == [e["DBInstanceArn"]]
    snapshots = rds_client(emu).describe_db_snapshots(DBInstanceIdentifier="lab-eastus-pg", SnapshotType="manual")[
        "DBSnapshots"
    ]
    assert any(s["DBSnapshotIdentifier"].startswith("lab-eastus-pg-before-rebuild-") for s in snapshots)
    assert emu.state()["instances"]["lab-eastus-pg"]["rebuilt"]["method"] in ("pg_rewind", "pg_basebackup")

    s = sql_status(RegionTarget.of(inventory, EAST).database, EAST)
    assert (s.role, s.streaming, s.read_only) == ("replica", True, False)  # no fence carried over
    wait_until(lambda: sql(east.dsn, "select count(*) from orders where note = 'first write on westeurope'")[0][0] == 1,
               what="the write on the new primary to reach the rebuilt replica")
    assert sql(east.dsn, "select count(*) from orders where note = 'last write on eastus'")[0][0] == 1

    again, _ = in_activity(
        RdsInstance(RegionTarget.of(inventory, EAST)).rebuild_replica, RegionTarget.of(inventory, WEST)
    )
    assert again.method == "already-replica"
    assert RdsInstance(RegionTarget.of(inventory, EAST)).status().cloud_role == "ReadReplica"


def test_rebuild_waits_for_a_replica_an_earlier_attempt_started(emu, inventory, clusters):
    """After a worker crash: the replica is being created; the retry waits for it and creates nothing."""
    east = clusters[EAST]
    rds_client(emu).delete_db_instance(DBInstanceIdentifier="lab-eastus-pg", SkipFinalSnapshot=True)
    assert not east.is_running()  # RDS deleted the server; the lab keeps its data directory
    arn = describe(emu, "lab-westeurope-pg", "eu-west-1")["DBInstanceArn"]
    rds_client(emu).create_db_instance_read_replica(
        DBInstanceIdentifier="lab-eastus-pg", SourceDBInstanceIdentifier=arn, Port=east.port
    )
    assert describe(emu, "lab-eastus-pg")["DBInstanceStatus"] == "creating"

    result, beats = in_activity(
        RdsInstance(RegionTarget.of(inventory, EAST)).rebuild_replica, RegionTarget.of(inventory, WEST)
    )

    assert result.method == "already-replica"
    phases = {b["phase"] for b in beats if isinstance(b, dict)}
    assert "waiting for the read replica" in phases and "creating the read replica" not in phases
    s = sql_status(RegionTarget.of(inventory, EAST).database, EAST)
    assert (s.role, s.streaming) == ("replica", True)
    assert emu.state()["instances"]["lab-eastus-pg"]["rebuilt"]["method"] in ("pg_rewind", "pg_basebackup")


def test_rebuild_from_a_replica_is_refused(inventory):
    with pytest.raises(ApplicationError) as e:
        RdsInstance(RegionTarget.of(inventory, WEST)).rebuild_replica(RegionTarget.of(inventory, EAST))
    assert e.value.non_retryable and e.value.type == "NotPrimary" and "lab-eastus-pg" in e.value.message


def test_rds_pitr_from_the_new_primary_after_failover(emu, inventory, clusters):
    """The new primary archives into the same WAL archive on its new timeline: a drill after the failover."""
    west = clusters[WEST]
    sql(west.dsn, "insert into orders (note) values ('after failover 1')")
    point = server_now(west)
    sql(west.dsn, "insert into orders (note) values ('after failover 2')")
    archive_now(west)
    name = "opsflow-drill-pitr0002"
    req = request(inventory, "rds-pitr", name, point, region=WEST)
    provider = RdsPointInTimeRestore(req)
    assert provider.window().latest >= point
    provider.start(name, point)
    try:
        target, _ = in_activity(restore_wait, req)
        notes = {r[0] for r in sql(target.dsn, "select note from orders")}
        assert {"after failover 1", "first write on westeurope", "last write on eastus"} <= notes
        assert "after failover 2" not in notes
    finally:
        assert provider.delete(name)


# -- the emulator as the lab runs it -----------------------------------------------------------------------


def test_start_aws_emulator_as_a_lab_process(clusters, workdir):
    from lab.aws_lab import start_aws_emulator
    from lab.processes import Lab

    root = workdir / "lab-process"
    root.mkdir()
    lab = Lab(root)
    try:
        aws = start_aws_emulator(lab, {EAST: clusters[EAST], WEST: clusters[WEST]}, root)
        assert json.loads((root / "lab.json").read_text())["aws"]["endpoint_url"] == aws["endpoint_url"]
        rds = boto3.client("rds", region_name="eu-west-1", endpoint_url=aws["endpoint_url"])
        inst = rds.describe_db_instances(DBInstanceIdentifier="lab-westeurope-pg")["DBInstances"][0]
        assert inst["Endpoint"]["Port"] == clusters[WEST].port
        assert sorted(aws["info"]["buckets"]) == sorted([REPORTS_BUCKET, DUMPS_BUCKET])
    finally:
        lab.stop_process("aws")


def test_rds_leftover_cleanup_spares_another_environment_and_the_current_run(emu, inventory, clusters):
    """Issue 8 item 6: two environments drilling on one account; each cleanup removes only its own crashed runs."""
    point = RdsPointInTimeRestore(request(inventory, "rds-pitr")).window().latest
    other = request(
        inventory, "rds-pitr", "opsflow-drill-staging-aaaa0001", point, environment="staging", run_id="aaaa0001"
    )
    RdsPointInTimeRestore(other).start(other.scratch_name, point)  # staging's drill, running now
    mine_crashed = request(
        inventory, "rds-pitr", "opsflow-drill-prod-bbbb0001", point, environment="prod", run_id="bbbb0001"
    )
    RdsPointInTimeRestore(mine_crashed).start(mine_crashed.scratch_name, point)
    current = request(
        inventory, "rds-pitr", "opsflow-drill-prod-cccc0001", point, environment="prod", run_id="cccc0001"
    )
    RdsPointInTimeRestore(current).start(current.scratch_name, point)  # this run's own target, made before a crash
    try:
        tags = {t["Key"]: t["Value"] for t in describe(emu, other.scratch_name)["TagList"]}
        assert (tags["opsflow-scratch"], tags["opsflow-run"]) == ("staging", "aaaa0001")
        found, _ = in_activity(restore_leftovers, current)
        assert found == [mine_crashed.scratch_name]
        assert exists(emu, other.scratch_name) and exists(emu, current.scratch_name)
        assert not exists(emu, mine_crashed.scratch_name)
        with pytest.raises(ApplicationError) as e:
            RdsPointInTimeRestore(current).delete(other.scratch_name)  # prod's drill never deletes staging's target
        assert e.value.type == "Refused"
    finally:
        for req in (other, current):
            RdsPointInTimeRestore(req).delete(req.scratch_name)
