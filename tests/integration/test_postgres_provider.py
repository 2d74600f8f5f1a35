"""The self-managed PostgreSQL provider against real clusters: a primary and streaming replicas on loopback.

Nothing is mocked: real WAL, real lag, real promotion (lab/postgres.py starts the servers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.postgres.connection import connect
from activities.postgres.server import PostgresServer, sql_check_writable, sql_status
from lab.ports import free_port
from lab.postgres import Cluster, PostgresLabError, create_replica, init_primary, pg_bin
from opsflow.inventory import InventoryError, PostgresDatabase, SecretRef, load_inventory
from opsflow.models import RegionTarget, lsn_to_int
from tests.helpers import eventually as wait_for

pytestmark = pytest.mark.lab


class Lab:
    """The clusters of this module; all stopped at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.clusters: list[Cluster] = []
        self._n = 0

    def primary(self, name: str, **kw) -> Cluster:
        c = init_primary(self.root, name, **kw)
        self.clusters.append(c)
        return c

    def replica(self, primary: Cluster, name: str | None = None, **kw) -> Cluster:
        self._n += 1
        c = create_replica(primary, self.root, name or f"replica{self._n}", **kw)
        self.clusters.append(c)
        return c

    def close(self) -> None:
        def stop(c: Cluster) -> None:
            try:
                c.stop("fast")
            except Exception:
                c.kill()

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(stop, self.clusters))


@pytest.fixture(scope="module")
def lab():
    # Our own directory, not pytest's basetemp: other pytest sessions on the machine prune old basetemps,
    # which would pull the data directories from under running servers. OPSFLOW_KEEP_LAB=1 keeps it.
    root = Path(tempfile.mkdtemp(prefix="opsflow-pg-test-"))
    lab = Lab(root)
    try:
        yield lab
    finally:
        lab.close()
        if not os.environ.get("OPSFLOW_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def primary(lab) -> Cluster:
    return lab.primary("primary", archive_dir=lab.root / "archive")


@pytest.fixture(scope="module")
def replica(lab, primary) -> Cluster:
    return lab.replica(primary, "replica", slot="replica")


def db_of(cluster: Cluster) -> PostgresDatabase:
    return PostgresDatabase(provider="postgres", dsn=cluster.dsn)


def server(cluster: Cluster, region: str = "west") -> PostgresServer:
    return PostgresServer(RegionTarget(environment="lab", region=region, database=db_of(cluster)))


def sql(cluster: Cluster, query: str, params=None):
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def primary_lsn(cluster: Cluster) -> int:
    return lsn_to_int(sql(cluster, "select pg_current_wal_lsn()::text")[0][0])




def wait_replayed(replica: Cluster, lsn: int, timeout: float = 20):
    """Wait until the replica has replayed up to lsn; return the status that showed it."""

    def caught_up():
        st = server(replica).status()
        return st if st.replay_lsn and lsn_to_int(st.replay_lsn) >= lsn else None

    return wait_for(caught_up, timeout, f"replay of {lsn:X} on {replica.name}")


# -- status ---------------------------------------------------------------------------------------------


def test_status_of_primary(primary, replica):
    st = server(primary, "west").status()
    assert st.reachable and st.error is None
    assert st.region == "west"
    assert st.role == "primary"
    assert st.timeline == 1
    assert not st.read_only
    assert not st.streaming
    assert lsn_to_int(st.current_lsn) > 0
    assert lsn_to_int(st.current_lsn) <= primary_lsn(primary)


def test_status_of_replica(primary, replica):
    st = server(replica, "east").status()
    assert st.reachable and st.error is None
    assert st.role == "replica"
    assert st.streaming
    assert st.timeline == 1
    assert st.current_lsn and st.replay_lsn
    assert lsn_to_int(st.replay_lsn) <= lsn_to_int(st.current_lsn) <= primary_lsn(primary)
    # the replica streams under its own name
    assert sql(
        primary, "select application_name, state from pg_stat_replication where application_name = 'replica'"
    ) == [("replica", "streaming")]


def test_lag_shows_then_becomes_zero_after_write_is_replayed(primary, replica):
    sql(primary, "create table if not exists lag_rows (id int primary key, note text)")
    sql(primary, "insert into lag_rows values (1, 'before pause') on conflict do nothing")
    wait_replayed(replica, primary_lsn(primary))

    sql(replica, "select pg_wal_replay_pause()")
    try:
        sql(
            primary,
            "insert into lag_rows select g, 'while paused' from generate_series(2, 1000) g on conflict do nothing",
        )
        target = primary_lsn(primary)

        def received_not_replayed():
            st = server(replica).status()
            return st if lsn_to_int(st.current_lsn) >= target else None

        st = wait_for(received_not_replayed, 20, "the replica to receive the write")
        assert lsn_to_int(st.replay_lsn) < lsn_to_int(st.current_lsn)
        assert st.replay_delay_seconds is not None and st.replay_delay_seconds > 0
        assert sql(replica, "select count(*) from lag_rows")[0][0] == 1
    finally:
        sql(replica, "select pg_wal_replay_resume()")

    def no_lag():
        st = server(replica).status()
        ok = st.replay_lsn and lsn_to_int(st.replay_lsn) >= target and st.replay_delay_seconds == 0
        return st if ok else None

    st = wait_for(no_lag, 20, "lag 0 after the replica replayed the write")
    assert st.current_lsn == st.replay_lsn or lsn_to_int(st.current_lsn) <= lsn_to_int(st.replay_lsn)
    assert sql(replica, "select count(*) from lag_rows")[0][0] == 1000


# -- writes and the fence ------------------------------------------------------------------------------


def test_check_writable_on_primary_and_refused_on_replica(primary, replica):
    server(primary, "west").check_writable()
    server(primary, "west").check_writable()  # again: upsert, no duplicate
    assert sql(primary, "select region from opsflow_probe where region = 'west'") == [("west",)]
    with pytest.raises(ApplicationError) as e:
        server(replica, "east").check_writable()
    assert e.value.type == "NotWritable"
    assert "read-only transaction" in e.value.message


def test_fence_refuses_writes_and_ends_open_sessions_then_unfence_restores(primary, replica):
    sql(primary, "create table if not exists fence_rows (id int primary key)")
    victim = psycopg.connect(primary.dsn)  # a client in the middle of a transaction
    victim.execute("insert into fence_rows values (1)")
    p = server(primary)
    try:
        p.fence()
        p.fence()  # idempotent

        st = p.status()
        assert st.role == "primary" and st.read_only
        with pytest.raises(psycopg.OperationalError):  # the open session was ended, its transaction lost
            victim.execute("insert into fence_rows values (2)")
            victim.commit()
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("insert into fence_rows values (3)")
        with pytest.raises(ApplicationError) as e:
            p.check_writable()
        assert e.value.type == "NotWritable"
        assert sql(primary, "select count(*) from fence_rows")[0][0] == 0
        # the walsender was spared: the replica still streams
        assert server(replica).status().streaming
        assert sql(primary, "select count(*) from pg_stat_replication where application_name = 'replica'")[0][0] == 1
    finally:
        victim.close()
        p.unfence()
    p.unfence()  # idempotent
    assert not p.status().read_only
    sql(primary, "insert into fence_rows values (4)")
    p.check_writable()
    assert sql(primary, "select id from fence_rows") == [(4,)]


# -- promotion -----------------------------------------------------------------------------------------


def test_promote_makes_the_replica_a_writable_primary(lab, primary):
    promo = lab.replica(primary)
    sql(primary, "create table if not exists promote_rows (id int primary key)")
    sql(primary, "insert into promote_rows select generate_series(1, 500) on conflict do nothing")
    written = primary_lsn(primary)
    wait_replayed(promo, written)

    result = server(promo, "east").promote(force=False)
    assert not result.already_primary
    assert result.timeline == 2
    assert 0 < result.seconds < 30
    assert lsn_to_int(result.lsn_at_promotion) >= written
    assert lsn_to_int(result.received_lsn) >= lsn_to_int(result.lsn_at_promotion)

    st = server(promo, "east").status()
    assert (st.role, st.timeline, st.read_only) == ("primary", 2, False)
    assert sql(promo, "select count(*) from promote_rows")[0][0] == 500
    sql(promo, "insert into promote_rows values (501)")
    assert sql(promo, "select region from opsflow_probe where region = 'east'") == [("east",)]  # the probe write
    # the old primary is untouched (still timeline 1, still a primary)
    assert server(primary).status().timeline == 1


def test_promote_twice_is_idempotent(lab, primary):
    promo = lab.replica(primary)
    # inside an activity: it heartbeats while it waits
    env = ActivityEnvironment()
    beats = []
    env.on_heartbeat = lambda *details: beats.append(details)
    first = env.run(server(promo).promote, True)
    assert not first.already_primary and first.timeline == 2
    assert beats and beats[0][0]["phase"] == "promoting"
    again = server(promo).promote(force=True)
    assert again.already_primary
    assert again.timeline == 2
    assert again.seconds == 0
    assert server(promo).status().timeline == 2


# -- unreachable servers ---------------------------------------------------------------------------------


def test_nothing_listening_gives_reachable_false():
    db = PostgresDatabase(
        provider="postgres", dsn=f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres connect_timeout=2"
    )
    st = sql_status(db, "west")
    assert not st.reachable
    assert st.role == "unknown"
    assert "Connection refused" in st.error
    with pytest.raises(ApplicationError) as e:
        connect(db)
    assert e.value.type == "DatabaseUnreachable" and not e.value.non_retryable


def test_killed_replica_is_unreachable_and_streams_again_after_restart(lab, primary):
    r = lab.replica(primary)
    r.kill()
    assert not r.is_running() and r.pid() is None
    st = server(r).status()
    assert not st.reachable and st.error
    with pytest.raises(ApplicationError) as e:
        server(r).promote(force=True)
    assert e.value.type == "DatabaseUnreachable" and not e.value.non_retryable
    r.start()
    sql(primary, "create table if not exists after_kill (id int)")
    sql(primary, "insert into after_kill values (1)")
    wait_replayed(r, primary_lsn(primary))
    assert server(r).status().streaming


# -- credentials -----------------------------------------------------------------------------------------

PASSWORD = "s3 cr'et\\pw-4711"


@pytest.fixture(scope="module")
def ops_role(primary):
    """A non-superuser with pg_monitor that must log in with a password (scram), like a real ops account."""
    sql(primary, "create role opsflow_ops login in role pg_monitor")
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("alter role opsflow_ops password {}").format(psycopg.sql.Literal(PASSWORD)))
    hba = primary.datadir / "pg_hba.conf"
    hba.write_text("host all opsflow_ops 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    sql(primary, "select pg_reload_conf()")
    time.sleep(0.2)
    return PostgresDatabase(
        provider="postgres",
        dsn=f"host=127.0.0.1 port={primary.port} user=opsflow_ops dbname=postgres",
        password=SecretRef(env="OPSFLOW_TEST_DB_PASSWORD"),
    )


def test_password_comes_from_the_env_secret(ops_role, replica, monkeypatch):
    monkeypatch.setenv("OPSFLOW_TEST_DB_PASSWORD", PASSWORD)
    with connect(ops_role) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "opsflow_ops"
    st = sql_status(ops_role, "west")
    assert st.reachable and st.role == "primary" and st.timeline == 1


def test_wrong_or_missing_password_fails_without_revealing_it(ops_role, monkeypatch):
    wrong = "not-the-pw-93817"
    monkeypatch.setenv("OPSFLOW_TEST_DB_PASSWORD", wrong)
    with pytest.raises(ApplicationError) as e:
        connect(ops_role)
    assert e.value.non_retryable and e.value.type == "DatabaseAuthFailed"
    assert "password authentication failed" in e.value.message
    assert wrong not in e.value.message and PASSWORD not in e.value.message
    st = sql_status(ops_role, "west")
    assert not st.reachable and wrong not in st.error

    monkeypatch.delenv("OPSFLOW_TEST_DB_PASSWORD")
    for call in (lambda: connect(ops_role), lambda: sql_status(ops_role, "west"), lambda: sql_check_writable(ops_role)):
        with pytest.raises(ApplicationError) as e:
            call()
        assert e.value.type == "SecretMissing" and e.value.non_retryable
        assert "OPSFLOW_TEST_DB_PASSWORD" in e.value.message

    no_secret = ops_role.model_copy(update={"password": None})
    with pytest.raises(ApplicationError) as e:
        connect(no_secret)
    assert e.value.non_retryable and e.value.type == "DatabaseAuthFailed"


@pytest.mark.parametrize(
    "dsn",
    ["host=db port=5432 user=ops password=hunter2 dbname=app", "password = hunter2 host=db", "postgresql://ops:hunter2@db:5432/app"],
)
def test_a_dsn_holding_a_password_is_rejected_by_the_inventory(dsn, lab):
    with pytest.raises(ValidationError, match="must not hold a password"):
        PostgresDatabase(provider="postgres", dsn=dsn)
    inventory = lab.root / "inv.yaml"
    inventory.write_text(
        f"""
environment: lab
primary_region: west
regions:
  west: {{database: {{provider: postgres, dsn: "{dsn}"}}, traffic_endpoint: west}}
  east: {{database: {{provider: postgres, dsn: "host=db2 user=ops"}}, traffic_endpoint: east}}
traffic: {{provider: route53, hosted_zone_id: Z1, record_name: app.example.com}}
approval: {{approvers: [alice]}}
"""
    )
    with pytest.raises(InventoryError) as e:
        load_inventory(inventory)
    assert "regions.west.database.postgres.dsn" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_a_malformed_dsn_is_not_retryable():
    db = PostgresDatabase(provider="postgres", dsn="host=127.0.0.1 bogus")
    with pytest.raises(ApplicationError) as e:
        sql_status(db, "west")
    assert e.value.type == "DatabaseConfig" and e.value.non_retryable


# -- the lab itself --------------------------------------------------------------------------------------


def test_primary_archives_wal(lab, primary):
    walfile = sql(primary, "select pg_walfile_name(pg_current_wal_lsn())")[0][0]
    sql(primary, "create table if not exists archive_rows (id int); insert into archive_rows values (1)")
    sql(primary, "select pg_switch_wal()")
    wait_for(lambda: (lab.root / "archive" / walfile).exists(), 20, f"{walfile} in the archive")
    assert sql(primary, "select failed_count from pg_stat_archiver")[0][0] == 0


def test_cluster_survives_the_state_file_round_trip(primary):
    again = Cluster.from_dict(primary.to_dict())
    assert again == primary
    assert again.is_running() and again.pid() == primary.pid()


def test_lab_errors_are_clear(lab, monkeypatch):
    broken = lab.primary("broken")
    broken.stop()
    assert not broken.is_running()
    with open(broken.datadir / "opsflow.conf", "a") as f:
        f.write("shared_buffers = 'lots'\n")
    with pytest.raises(PostgresLabError) as e:
        broken.start()
    assert "server log" in str(e.value) and "shared_buffers" in str(e.value)

    monkeypatch.setenv("OPSFLOW_PG_BINDIR", "/nonexistent")
    with pytest.raises(PostgresLabError, match="postgresql-15"):
        pg_bin("initdb")


# -- the host: a switchover without a rebuild; the drain ---------------------------------------------------


def with_host(cluster: Cluster, region: str) -> RegionTarget:
    """The cluster as provider postgres whose host is this machine (as the postgres OS user when we are root)."""
    from lab.inventory import self_managed_database

    state = {"postgres": {region: cluster.to_dict()}, "regions": {region: {"dsn": cluster.dsn}}}
    return RegionTarget(environment="lab", region=region,
                        database=PostgresDatabase.model_validate(self_managed_database(state, region)))


@pytest.fixture(scope="module")
def pair(lab) -> tuple[Cluster, Cluster]:
    p = lab.primary("sw-primary")
    return p, lab.replica(p, "sw-replica")


def test_switchover_not_proven_starts_the_old_primary_again_fenced(pair):
    from activities.postgres.host import shut_down_for_switchover
    from activities.postgres.server import sql_fence, sql_unfence

    p, r = pair
    old, new = with_host(p, "east"), with_host(r, "west")
    sql_fence(old.database)
    sql(r, "select pg_wal_replay_pause()")  # it receives the shutdown checkpoint but does not replay it
    try:
        result = shut_down_for_switchover(old, new, timeout=1)
    finally:
        sql(r, "select pg_wal_replay_resume()")
    assert not result.proven and result.checkpoint_lsn
    assert f"did not replay past the shutdown checkpoint {result.checkpoint_lsn} of east within 1s" in result.detail
    status = sql_status(old.database, "east")  # running again: the primary, still fenced (today's path)
    assert status.role == "primary" and status.read_only
    sql_unfence(old.database)
    wait_replayed(r, primary_lsn(p))  # and the replica goes on streaming from it


def test_switchover_proven_then_the_old_primary_follows_without_a_rewind(lab, pair):
    from activities.postgres.host import follow, shut_down_for_switchover
    from activities.postgres.server import sql_fence

    p, r = pair
    old, new = with_host(p, "east"), with_host(r, "west")
    sql(p, "create table handover (id int primary key)")
    sql(p, "insert into handover select generate_series(1, 1000)")
    sql_fence(old.database)
    result = shut_down_for_switchover(old, new, timeout=20)
    assert result.proven and lsn_to_int(result.replay_lsn) > lsn_to_int(result.checkpoint_lsn)
    assert not p.is_running()
    server(r).promote(force=False)
    status = follow(old, new, timeout=30)
    assert status.role == "replica" and status.streaming and not status.read_only
    assert not list(p.datadir.parent.glob(f"{p.datadir.name}.diverged-*"))  # the same data directory, no rewind
    sql(r, "insert into handover values (1001)")
    wait_for(lambda: sql(p, "select count(*) from handover")[0][0] == 1001, 20, "the old primary replaying")
    assert follow(old, new, timeout=5).streaming  # idempotent: already streaming, only checked
    with pytest.raises(ApplicationError) as e:  # a standby is not the primary to shut down
        shut_down_for_switchover(old, new, timeout=1)
    assert e.value.type == "NotPrimary" and e.value.non_retryable


def test_follow_refuses_a_running_primary(lab):
    from activities.postgres.host import follow

    alone = lab.primary("sw-alone")
    with pytest.raises(ApplicationError) as e:
        follow(with_host(alone, "east"), with_host(alone, "west"), timeout=1)
    assert e.value.type == "FollowRefused" and "runs as a primary" in e.value.message


def test_drain_ends_when_the_sessions_are_idle_or_at_its_limit(primary):
    from activities.postgres.drain import sql_drain

    db = db_of(primary)
    with psycopg.connect(primary.dsn, autocommit=False, application_name="shop") as app:
        app.execute("select 1")  # a transaction in progress
        busy = sql_drain(db, 0.5)
        assert not busy.idle and busy.busy_sessions == 1 and busy.waited_seconds >= 0.5
        assert busy.detail.startswith("drain limit reached, 1 session(s)")
        app.commit()  # idle now
        t0 = time.monotonic()
        idle = sql_drain(db, 30)
        assert idle.idle and idle.busy_sessions == 0 and idle.detail == "sessions idle"
        assert time.monotonic() - t0 < 5


def test_host_commands_with_the_configuration_elsewhere(lab):
    """Debian's layout: postgresql.conf in a configuration directory apart from the data directory (config_dir):
    pg_ctl is pointed at it, pg_controldata at the data directory."""
    from activities.postgres.host import controldata, server_running, start_server, stop_server
    from lab.postgres import _give_to_server_user

    c = lab.primary("sw-debian")
    c.stop()
    etc = lab.root / "sw-debian-etc"
    etc.mkdir()
    (etc / "postgresql.conf").write_text(
        f"data_directory = '{c.datadir}'\nhba_file = '{c.datadir}/pg_hba.conf'\n"
        f"ident_file = '{c.datadir}/pg_ident.conf'\ninclude '{c.datadir}/postgresql.conf'\n")
    _give_to_server_user(etc)
    _give_to_server_user(etc / "postgresql.conf")
    target = with_host(c, "east")
    host = target.database.host.model_copy(update={"config_dir": str(etc)})
    (c.datadir / "postgresql.conf").rename(c.datadir / "postgresql.conf.moved")  # only the copy under etc is read
    (etc / "postgresql.conf").write_text((etc / "postgresql.conf").read_text().replace(
        f"{c.datadir}/postgresql.conf", f"{c.datadir}/postgresql.conf.moved"))
    assert not server_running(host)
    start_server(host)
    assert server_running(host) and sql(c, "select current_setting('config_file')")[0][0] == f"{etc}/postgresql.conf"
    stop_server(host)
    assert not server_running(host) and controldata(host)["Database cluster state"] == "shut down"
