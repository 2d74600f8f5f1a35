"""Restores and rebuilds on real PostgreSQL 15 clusters: point-in-time recovery from the lab's base backup and
WAL archive, a diverged former primary made a replica again (pg_rewind, or a fresh base backup), logical dumps,
and the SQL integrity checks the restore drill runs on the restored server. Nothing is mocked."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.postgres.integrity import (
    missing_objects,
    require_tables,
    row_counts,
    row_counts_at,
    run_checks,
    table_exists,
)
from activities.postgres.server import PostgresServer, sql_check_writable, sql_fence, sql_promote, sql_status
from lab.postgres import (
    Cluster,
    PostgresLabError,
    archive_now,
    create_replica,
    drop_cluster,
    dump_database,
    earliest_restorable_time,
    ensure_base_backup,
    init_primary,
    latest_base_backup,
    latest_restorable_time,
    read_base_backup,
    rebuild_replica,
    restore_dump,
    restore_to_time,
    wait_streaming,
)
from opsflow.inventory import PostgresDatabase
from opsflow.models import RegionTarget
from tests.helpers import eventually as wait_for

pytestmark = pytest.mark.lab


class Lab:
    def __init__(self, root: Path):
        self.root = root
        self.pg = root / "pg"
        self.archive = root / "archive"
        self.clusters: list[Cluster] = []

    def keep(self, cluster: Cluster) -> Cluster:
        self.clusters.append(cluster)
        return cluster

    def pair(self, prefix: str) -> tuple[Cluster, Cluster]:
        primary = self.keep(init_primary(self.pg, f"{prefix}-east"))
        return primary, self.keep(create_replica(primary, self.pg, f"{prefix}-west"))

    def restore(self, name: str, target: datetime | None) -> Cluster:
        return self.keep(restore_to_time(latest_base_backup(self.pg), self.archive, self.pg, name, target))

    def close(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(drop_cluster, self.clusters))


@pytest.fixture(scope="module")
def lab():
    # Our own directory (not pytest's basetemp, which parallel sessions prune). OPSFLOW_KEEP_LAB=1 keeps it.
    root = Path(tempfile.mkdtemp(prefix="opsflow-pg-restore-"))
    lab = Lab(root)
    try:
        yield lab
    finally:
        lab.close()
        if not os.environ.get("OPSFLOW_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def source(lab) -> Cluster:
    """The primary that archives WAL; init_primary keeps a base backup of it under pg/base-backups."""
    return lab.keep(init_primary(lab.pg, "source", archive_dir=lab.archive))


def db_of(cluster: Cluster | str) -> PostgresDatabase:
    return PostgresDatabase(provider="postgres", dsn=cluster.dsn if isinstance(cluster, Cluster) else cluster)


def target_of(cluster: Cluster, region: str) -> RegionTarget:
    return RegionTarget(environment="lab", region=region, database=db_of(cluster))


def sql(cluster: Cluster | str, query: str, params=None):
    with psycopg.connect(cluster.dsn if isinstance(cluster, Cluster) else cluster, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def ids(cluster: Cluster, table: str) -> list[int]:
    return [r[0] for r in sql(cluster, f"select id from {table} order by id")]


def server_now(cluster: Cluster) -> datetime:
    return sql(cluster, "select clock_timestamp()")[0][0]




# -- base backups and point-in-time restores -------------------------------------------------------------


def test_an_archiving_primary_keeps_a_base_backup(lab, source):
    backup = latest_base_backup(lab.pg)
    assert backup is not None and backup.parent == lab.pg / "base-backups"
    info = read_base_backup(backup)
    assert (backup / "data" / "backup_label").is_file()
    assert info["start_time"] <= info["end_time"] <= server_now(source)
    assert info["start_lsn"] and info["end_lsn"] and info["timeline"] == 1
    assert info["source"] == {"name": "source", "port": source.port}
    assert earliest_restorable_time(lab.pg) == info["end_time"]
    assert ensure_base_backup(source, lab.pg) == backup  # idempotent: one backup of this system is enough


def test_restore_to_a_time_holds_exactly_the_rows_committed_before_it(lab, source):
    sql(
        source,
        "create table drill_rows (id int primary key, written_at timestamptz not null default clock_timestamp())",
    )
    for i in range(1, 11):  # one transaction each
        sql(source, "insert into drill_rows (id) values (%s)", (i,))
    sql(source, "insert into drill_rows (id) select generate_series(11, 20)")
    time.sleep(0.02)
    noted = server_now(source)
    time.sleep(0.02)
    sql(source, "insert into drill_rows (id) select generate_series(21, 40)")
    sql(source, "delete from drill_rows where id = 1")  # after the point in time: still there in the restore
    archive_now(source)  # recovery replays archived WAL only

    t0 = time.monotonic()
    restored = lab.restore("pitr", noted)
    assert time.monotonic() - t0 < 30

    assert ids(restored, "drill_rows") == list(range(1, 21))
    assert row_counts(db_of(restored), ["drill_rows"]) == {"drill_rows": 20}
    assert row_counts_at(db_of(source), "drill_rows", "written_at", noted) == 19  # id 1 deleted at the source since
    # Its own writable primary: not the source's port, no archiving into the source's archive.
    assert restored.port != source.port
    assert sql(restored, "select pg_is_in_recovery(), current_setting('archive_mode')") == [(False, "off")]
    sql_check_writable(db_of(restored))
    assert "recovery_target_time" not in (restored.datadir / "opsflow.conf").read_text()

    drop_cluster(restored)
    assert not restored.datadir.parent.exists() and not restored.is_running()
    drop_cluster(restored)  # idempotent


def test_restore_to_the_latest_restorable_time_and_to_the_end_of_the_archive(lab, source):
    sql(source, "create table latest_rows (id int primary key)")
    sql(source, "insert into latest_rows select generate_series(1, 5)")
    latest = latest_restorable_time(source)  # archives now, returns the point that covers every commit so far
    assert latest <= server_now(source)
    assert latest_restorable_time(lab.archive) >= latest  # the archive's newest commit is the marker

    assert ids(lab.restore("latest", latest), "latest_rows") == [1, 2, 3, 4, 5]

    sql(source, "insert into latest_rows values (6)")
    archive_now(source)
    assert ids(lab.restore("end", None), "latest_rows") == [1, 2, 3, 4, 5, 6]


def test_a_point_in_time_outside_the_archive_is_a_clear_error(lab, source):
    before = earliest_restorable_time(lab.pg) - timedelta(minutes=5)
    with pytest.raises(PostgresLabError, match="is before the base backup"):
        lab.restore("too-early", before)
    assert not (lab.pg / "too-early" / "data").exists()

    future = datetime.now(timezone.utc) + timedelta(days=1)
    with pytest.raises(PostgresLabError) as e:
        lab.restore("too-late", future)
    message = str(e.value)
    assert "was not reached" in message and "archive_now" in message
    assert "recovery ended before configured recovery target was reached" in message  # the server log's tail
    assert not (lab.pg / "too-late" / "data").exists()  # the half-restored cluster is removed


# -- rebuilding a former primary as a replica --------------------------------------------------------------


def test_a_fenced_diverged_old_primary_is_rewound_into_a_replica_on_its_own_port(lab):
    old, new = lab.pair("rw")
    sql(old, "create table accounts (id int primary key, note text)")
    sql(old, "insert into accounts values (1, 'before the failover')")
    wait_for(lambda: sql(new, "select count(*) from pg_class where relname = 'accounts'")[0][0]
             and sql(new, "select count(*) from accounts")[0][0] == 1, 20, "replication of the first row")

    sql_fence(db_of(old))
    sql_promote(db_of(new), 30)
    sql(new, "insert into accounts values (2, 'on the new primary')")
    with psycopg.connect(old.dsn) as conn:  # the fence is soft: an explicit read-write transaction diverges it
        conn.execute("set transaction read write")
        conn.execute("insert into accounts select g, 'diverged' from generate_series(100, 3000) g")
        conn.commit()

    # The provider for a self-managed server reaches it over SQL only: it says what to run on the host.
    with pytest.raises(ApplicationError) as e:
        PostgresServer(target_of(old, "east")).rebuild_replica(target_of(new, "west"))
    assert e.value.type == "RebuildNotSupported" and e.value.non_retryable and "pg_rewind" in e.value.message

    rebuilt = rebuild_replica(new, old, lab.pg)
    assert rebuilt.rebuild.method == "pg_rewind", rebuilt.rebuild
    assert rebuilt == old  # same name, data directory, port and log file
    wait_streaming(rebuilt)
    st = sql_status(db_of(rebuilt), "east")
    assert st.role == "replica" and st.streaming and st.timeline == 2
    assert not st.read_only  # the fence did not survive into the replica
    assert "default_transaction_read_only" not in (rebuilt.datadir / "postgresql.auto.conf").read_text()
    assert sql(rebuilt, "select id, note from accounts order by id") == [
        (1, "before the failover"),
        (2, "on the new primary"),
    ]
    sql(new, "insert into accounts values (3, 'streamed')")
    wait_for(
        lambda: sql(rebuilt, "select count(*) from accounts where id = 3")[0][0] == 1,
        20,
        "row 3 on the rebuilt replica",
    )

    assert rebuild_replica(new, rebuilt, lab.pg).rebuild.method == "already-streaming"  # idempotent
    assert (
        PostgresServer(target_of(rebuilt, "east")).rebuild_replica(target_of(new, "west")).method == "already-streaming"
    )

    # A later promotion of the rebuilt replica (the failback) gives a writable primary: no fence leaked.
    sql_promote(db_of(rebuilt), 30)
    sql_check_writable(db_of(rebuilt))


def test_a_killed_old_primary_is_rebuilt(lab):
    old, new = lab.pair("kill")
    sql(old, "create table orders (id int primary key)")
    sql(old, "insert into orders values (1)")
    wait_for(lambda: sql(new, "select to_regclass('orders') is not null")[0][0]
             and sql(new, "select count(*) from orders")[0][0] == 1, 20, "replication of the first row")
    sql_promote(db_of(new), 30)
    sql(new, "insert into orders values (2)")
    sql(old, "insert into orders select generate_series(100, 200)")  # split brain: both took writes
    old.kill()

    rebuilt = rebuild_replica(new, old, lab.pg)
    assert rebuilt.rebuild.method == "pg_rewind", rebuilt.rebuild
    assert rebuilt.port == old.port and rebuilt.is_running()
    wait_streaming(rebuilt)
    assert ids(rebuilt, "orders") == [1, 2]


def test_a_replica_that_cannot_be_rewound_is_rebuilt_from_a_fresh_base_backup(lab):
    primary = lab.keep(init_primary(lab.pg, "fb-primary"))
    sql(primary, "create table things (id int primary key)")
    sql(primary, "insert into things select generate_series(1, 3)")
    stranger = lab.keep(init_primary(lab.pg, "fb-stranger"))  # another initdb: pg_rewind refuses it
    sql(stranger, "create table stray (id int)")

    rebuilt = rebuild_replica(primary, stranger, lab.pg)
    info = rebuilt.rebuild
    assert info.method == "pg_basebackup"
    assert "different systems" in info.fallback_reason
    # The old data directory is kept aside, never reused.
    assert info.moved_aside.parent == stranger.datadir.parent and (info.moved_aside / "PG_VERSION").is_file()
    assert rebuilt.port == stranger.port and rebuilt.datadir == stranger.datadir
    wait_streaming(rebuilt)
    assert ids(rebuilt, "things") == [1, 2, 3]
    assert sql(rebuilt, "select to_regclass('stray')") == [(None,)]


# -- logical dumps ---------------------------------------------------------------------------------------


def test_dump_and_restore_round_trip(lab, source):
    sql(source, "create database shop")
    shop = psycopg.conninfo.make_conninfo(source.dsn, dbname="shop")
    sql(shop, "create table items (id int primary key, name text); create index items_name on items (name);"
              "create view cheap as select * from items where id < 10;"
              "insert into items select g, 'item ' || g from generate_series(1, 500) g")
    dump = dump_database(source, lab.root / "dumps" / "shop.dump", dbname="shop")
    assert dump.is_file() and dump.read_bytes()[:5] == b"PGDMP"  # the custom format

    scratch = lab.keep(init_primary(lab.pg, "dump-scratch"))
    dsn = restore_dump(dump, scratch.dsn, "shop_restored")
    assert "dbname=shop_restored" in dsn
    assert row_counts(db_of(dsn), ["items", "cheap"]) == {"items": 500, "cheap": 9}
    assert missing_objects(db_of(dsn), ["public.items", "public.items_name", "public.cheap"]) == []

    with pytest.raises(PostgresLabError, match="already exists"):
        restore_dump(dump, scratch.dsn, "shop_restored")
    restore_dump(dump, scratch.dsn, "shop_restored", replace=True)
    assert row_counts(db_of(dsn), ["items"]) == {"items": 500}


# -- integrity verification over SQL ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verify_db(source) -> PostgresDatabase:
    sql(source, """
        create schema verify;
        create table verify.orders (id int primary key, placed_at timestamptz not null, total numeric not null);
        create table verify."Order Lines" (id int);
        create index orders_placed on verify.orders (placed_at);
        create view verify.big_orders as select * from verify.orders where total > 100;
        create function verify.total(int) returns numeric language sql as 'select 1';
        create function verify.total(text) returns numeric language sql as 'select 2';
        insert into verify.orders select g, timestamptz '2024-01-01 00:00+00' + g * interval '1 hour', g * 10
          from generate_series(1, 48) g;
    """)
    return db_of(source)


def test_row_counts_and_counts_at_a_point_in_time(verify_db):
    assert row_counts(verify_db, ["verify.orders", 'verify."Order Lines"', "verify.big_orders"]) == {
        "verify.orders": 48, 'verify."Order Lines"': 0, "verify.big_orders": 38}
    noon = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    assert row_counts_at(verify_db, "verify.orders", "placed_at", noon) == 11  # strictly before: 01:00 .. 11:00
    assert row_counts_at(verify_db, "verify.orders", "placed_at", noon.replace(tzinfo=None)) == 11  # naive = UTC
    assert row_counts(verify_db, ["verify.orders", "verify.gone"], missing_ok=True) == {
        "verify.orders": 48,
        "verify.gone": None,
    }
    assert table_exists(verify_db, "verify.orders") and not table_exists(verify_db, "verify.gone")


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda db: row_counts(db, ["verify.orders", "verify.no_such_table"]), "verify.no_such_table"),
        (lambda db: row_counts(db, ["verify.orders_placed"]), "is an index"),
        (lambda db: row_counts(db, ["a.b.c.d"]), "not a valid table name"),
        (lambda db: row_counts_at(db, "verify.orders", "no_such_column", datetime.now(timezone.utc)), "no_such_column"),
        (lambda db: row_counts_at(db, "verify.orders", "total", datetime.now(timezone.utc)), "not a timestamp"),
        (lambda db: row_counts_at(db, "verify.nope", "placed_at", datetime.now(timezone.utc)), "verify.nope"),
        (lambda db: require_tables(db, ["verify.orders", "verify.x", "verify.y"]), "verify.y"),
        (lambda db: require_tables(db, ["verify.orders"], {"verify.orders": "nope"}), "no column 'nope'"),
    ],
)
def test_an_unknown_table_or_column_is_bad_input(verify_db, call, named):
    with pytest.raises(ApplicationError) as e:
        call(verify_db)
    assert e.value.type == "BadInput" and e.value.non_retryable
    assert named in e.value.message


def test_checks_pass_only_on_a_single_true_and_errors_are_failed_checks(verify_db, source):
    checks = [
        ("all orders", "select count(*) = 48 from verify.orders"),
        ("percent sign", "select 'a%' like 'a%'"),
        ("false", "select count(*) = 0 from verify.orders"),
        ("null", "select null::boolean"),
        ("no rows", "select true where false"),
        ("two rows", "select true from generate_series(1, 2)"),
        ("not boolean", "select 1"),
        ("unknown table", "select count(*) > 0 from verify.missing"),
        ("write", "with d as (delete from verify.orders returning 1) select true"),
        ("two statements", "commit; delete from verify.orders"),
        ("slow", "select pg_sleep(5) is not null"),
        ("after all that", "select true"),
    ]
    t0 = time.monotonic()
    results = ActivityEnvironment().run(run_checks, verify_db, checks, statement_timeout=0.5)
    assert time.monotonic() - t0 < 5
    got = {name: (ok, detail) for name, ok, detail in results}
    assert [r[0] for r in results] == [c[0] for c in checks]
    assert (
        got["all orders"] == (True, "true")
        and got["percent sign"] == (True, "true")
        and got["after all that"] == (True, "true")
    )
    assert got["false"] == (False, "returned false")
    assert got["null"] == (False, "returned NULL")
    assert got["no rows"][1].startswith("returned no rows")
    assert got["two rows"][1].startswith("returned more than one row")
    assert "not a boolean" in got["not boolean"][1]
    assert got["unknown table"] == (False, 'error: relation "verify.missing" does not exist [42P01]')
    assert "read-only transaction" in got["write"][1]
    assert "multiple commands" in got["two statements"][1]
    assert "statement timeout" in got["slow"][1]
    assert sql(source, "select count(*) from verify.orders") == [(48,)]  # nothing was written


def test_missing_objects(verify_db):
    wanted = [
        "verify.orders",
        "verify.orders_placed",
        "verify.big_orders",
        'verify."Order Lines"',
        "verify.total",
        "verify.total(int)",
        "verify.total(boolean)",
        "verify.gone",
        "verify.gone_function(int)",
        "pg_catalog.now",
    ]
    assert missing_objects(verify_db, wanted) == ["verify.total(boolean)", "verify.gone", "verify.gone_function(int)"]
    with pytest.raises(ApplicationError) as e:
        missing_objects(verify_db, ["a.b.c.d"])
    assert e.value.type == "BadInput" and "a.b.c.d" in e.value.message
