"""Azure point-in-time restore (the restore drill) and the failback replica rebuild, for real: PostgreSQL 15 clusters
(a primary archiving WAL, with a base backup, and a streaming replica) behind the ARM emulator, driven through the
real azure-mgmt SDK over HTTPS.

The emulator restores new clusters from the base backup and the WAL archive (lab.postgres.restore_to_time), and
rebuilds a diverged old primary as a replica (lab.postgres.rebuild_replica); the providers and the drill's own
activities (activities/restore.py) run as the worker runs them, in an activity context that records heartbeats.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from psycopg.conninfo import conninfo_to_dict
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.azure.arm import postgres_client
from activities.azure.flexible_server import AzureFlexibleServer
from activities.azure.restore import AzurePointInTimeRestore
from activities.restore import restore_delete, restore_leftovers, restore_start, restore_wait, verify
from lab.arm_emulator import ArmEmulator, start_emulator
from lab.postgres import Cluster, create_replica, drop_cluster, earliest_restorable_time, init_primary, wait_streaming
from opsflow.inventory import AzureConnection, AzureFlexibleDatabase, DrillPolicy, RowCountCheck, SqlCheck
from opsflow.models import RegionTarget, RestoreRequest, VerifyRequest
from tests.helpers import eventually as wait_for

pytestmark = pytest.mark.lab

SUB = "6f1c1a2e-0000-4000-8000-0000000000d1"
RG = "rg-opsflow-drill"
SERVERS = {"westeurope": "pg-weu", "northeurope": "pg-neu"}
PG = "/providers/Microsoft.DBforPostgreSQL/flexibleServers"


def emulator_config(root: Path, primary: Cluster, replica: Cluster) -> dict:
    return {
        "subscription_id": SUB,
        "tokens": ["opsflow-lab-token"],
        "settings": {"lro_seconds": 0.2},
        "flexible_servers": {
            # Backups spelled out for the primary (the keys lab/inventory.py may pass); derived from the cluster for
            # the replica (it archives to the same place once promoted).
            "pg-weu": {
                "resource_group": RG,
                "location": "westeurope",
                "cluster": primary.to_dict(),
                "role": "Primary",
                "backups": {
                    "archive_dir": str(root / "wal-archive"),
                    "base_backup_dir": str(root / "pg"),
                    "clusters_root": str(root / "pg"),
                    "retention_days": 7,
                },
            },
            "pg-neu": {
                "resource_group": RG,
                "location": "northeurope",
                "cluster": replica.to_dict(),
                "role": "AsyncReplica",
                "source": "pg-weu",
            },
        },
    }


@dataclass
class DrillLab:
    root: Path
    primary: Cluster
    replica: Cluster
    emu: ArmEmulator
    config: dict

    @property
    def conn(self) -> AzureConnection:
        return AzureConnection(
            arm_endpoint=self.emu.url, credential="static-token", ca_bundle=str(self.emu.ca_path), polling_interval=0.1
        )

    @property
    def client(self):
        return postgres_client(self.conn, SUB)

    def target(self, region: str, server_name: str | None = None) -> RegionTarget:
        cluster = self.primary if region == "westeurope" else self.replica
        db = AzureFlexibleDatabase(provider="azure-flexible", dsn=cluster.dsn, subscription_id=SUB, resource_group=RG,
                                   server_name=server_name or SERVERS[region])
        return RegionTarget(environment="lab", region=region, database=db, azure=self.conn)

    def db(self, region: str) -> AzureFlexibleServer:
        return AzureFlexibleServer(self.target(region))

    def request(
        self,
        scratch_name: str,
        point: datetime | None = None,
        drill: DrillPolicy | None = None,
        server_name: str | None = None,
        environment: str = "",
        run_id: str = "",
    ) -> RestoreRequest:
        return RestoreRequest(
            source=self.target("westeurope", server_name),
            drill=drill or DrillPolicy(),
            method="azure-pitr",
            scratch_name=scratch_name,
            point_in_time=point,
            environment=environment,
            run_id=run_id,
        )

    def provider(self, server_name: str | None = None) -> AzurePointInTimeRestore:
        return AzurePointInTimeRestore(self.request("", server_name=server_name))

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.emu.requests() if (method is None or r["method"] == method) and contains in r["path"]]

    def scratch_cluster(self, name: str) -> Cluster:
        found = [c for c in self.emu.created_clusters() if c["name"] == name]
        assert found, f"the emulator maps no cluster to {name}"
        return Cluster.from_dict(found[0])


@pytest.fixture
def lab():
    # Not under pytest's tmp_path: every pytest session started as root chmods /tmp/pytest-of-root back to
    # 0700, which locks the clusters' `postgres` OS user out of its data directories mid-test.
    root = Path(tempfile.mkdtemp(prefix="opsflow-azure-restore-"))
    primary = replica = lab = None
    created: list[dict] = []
    try:
        primary = init_primary(root / "pg", "weu", archive_dir=root / "wal-archive")  # keeps a base backup
        replica = create_replica(primary, root / "pg", "neu")
        config = emulator_config(root, primary, replica)
        lab = DrillLab(root, primary, replica, start_emulator(config, root / "ca"), config)
        yield lab
    finally:
        if lab is not None:
            created = lab.emu.created_clusters()
            lab.emu.stop()
        for c in created:
            drop_cluster(Cluster.from_dict(c))
        for c in (replica, primary):
            if c is not None:
                c.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def in_activity(fn, *args, timeout: float = 120):
    """Run fn in a Temporal activity context (as the worker would) and collect its heartbeats."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        ActivityEnvironment.default_info(), start_to_close_timeout=timedelta(seconds=timeout)
    )
    beats: list = []
    env.on_heartbeat = lambda *details: beats.append(details)
    return env.run(fn, *args), beats


def sql(where: Cluster | str, query: str, params=()):
    with psycopg.connect(
        where.dsn if isinstance(where, Cluster) else where, autocommit=True, connect_timeout=5
    ) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def ids(where: Cluster | str, table: str) -> list[int]:
    return [r[0] for r in sql(where, f"select id from {table} order by id")]


def server_now(cluster: Cluster) -> datetime:
    return sql(cluster, "select clock_timestamp()")[0][0]




def port_open(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


# -- the restorable window ------------------------------------------------------------------------------------


def test_the_source_server_shows_its_backup_window(lab: DrillLab):
    earliest = earliest_restorable_time(lab.root / "pg")
    weu = lab.client.servers.get(RG, "pg-weu")
    assert weu.properties.backup.earliest_restore_date == earliest  # the end of the base backup init_primary took
    assert weu.properties.backup.backup_retention_days == 7
    assert weu.tags["opsflow-lab-port"] == str(lab.primary.port)
    # A read replica offers no restore of its own (once promoted, it does: see the failback test).
    assert lab.client.servers.get(RG, "pg-neu").properties.backup.earliest_restore_date is None

    before = datetime.now(timezone.utc)
    window = lab.provider().window()
    assert window.earliest == earliest
    # ARM reports no latest restorable time: now less a clock-skew margin, never before the earliest restore date
    # (the base backup can be younger than the margin: the lab was made a moment ago).
    skewed = before - timedelta(seconds=1)
    assert window.latest >= earliest
    assert max(earliest, skewed) - timedelta(seconds=5) <= window.latest <= max(earliest, skewed) + timedelta(seconds=5)
    assert "earliestRestoreDate" in window.detail


# -- point-in-time restore into a scratch server --------------------------------------------------------------------


def test_point_in_time_restore_holds_exactly_the_rows_committed_before_the_point(lab: DrillLab):
    sql(
        lab.primary,
        "create table drill_rows (id int primary key, written_at timestamptz not null default clock_timestamp())",
    )
    for i in range(1, 11):  # one transaction each
        sql(lab.primary, "insert into drill_rows (id) values (%s)", (i,))
    time.sleep(0.02)
    noted = server_now(lab.primary)
    time.sleep(0.02)
    sql(lab.primary, "insert into drill_rows (id) select generate_series(11, 25)")
    name = "opsflow-drill-pitr0001"
    req = lab.request(name, noted)

    started, _ = in_activity(restore_start, req)
    assert (started.name, started.ready, started.method) == (name, False, "azure-pitr")  # ARM goes on; the drill waits
    assert started.restore_point == noted
    assert [r["status"] for r in lab.requests("PUT", f"{PG}/{name}")] == [202]

    target, beats = in_activity(restore_wait, req)
    assert target.ready and target.dsn and beats
    # Exactly the rows committed before the noted time; nothing written after it.
    assert ids(target.dsn, "drill_rows") == list(range(1, 11))
    params = conninfo_to_dict(target.dsn)
    server = lab.client.servers.get(RG, name)
    # As in Azure: the server's FQDN and port 5432 (the lab gives each restored server a loopback address of its own).
    fqdn = server.properties.fully_qualified_domain_name
    assert (params["host"], params["port"], params["user"], params["dbname"]) == (fqdn, "5432", "postgres", "postgres")
    assert fqdn.startswith("127.") and fqdn != "127.0.0.1"  # its own new cluster
    assert (server.properties.state, server.location) == ("Ready", "westeurope")
    assert server.tags["opsflow-scratch"] == "lab" and server.tags["opsflow-source"] == "pg-weu"
    assert sql(target.dsn, "select pg_is_in_recovery()") == [(False,)]  # a standalone, writable server
    assert name in [s.name for s in lab.client.servers.list_by_resource_group(RG)]

    # The drill's own verification against the source at the restore point.
    drill = DrillPolicy(row_counts=[RowCountCheck(table="drill_rows", timestamp_column="written_at")],
                        checks=[SqlCheck(name="ten rows", query="select count(*) = 10 from drill_rows")])
    results, _ = in_activity(verify, VerifyRequest(source=req.source, scratch=target, drill=drill, restore_point=noted))
    assert [(r.name, r.ok, r.expected, r.actual) for r in results] == [
        ("drill_rows", True, 10, 10),
        ("ten rows", True, None, None),
    ]

    # A retried start finds the server: no second restore.
    again = restore_start(req)
    assert again.ready and again.dsn == target.dsn
    assert len(lab.requests("PUT", f"{PG}/{name}")) == 1

    cluster = lab.scratch_cluster(name)
    assert cluster.is_running()
    deleted, _ = in_activity(restore_delete, req)
    assert deleted is True
    assert not cluster.datadir.exists() and not cluster.is_running() and not port_open(cluster.port, cluster.host)
    with pytest.raises(ResourceNotFoundError):
        lab.client.servers.get(RG, name)
    assert restore_delete(req) is False  # idempotent: already gone
    assert lab.provider().list_scratch("opsflow-drill-") == []


def test_leftovers_are_found_and_deleted_even_while_their_restore_runs(lab: DrillLab):
    sql(lab.primary, "create table t (id int); insert into t values (1)")
    p = lab.provider()
    point = p.window().latest
    # A server with the prefix that no drill made (no opsflow-scratch tag): never listed, never deleted.
    weu_id = lab.client.servers.get(RG, "pg-weu").id
    lab.client.servers.begin_create_or_update(RG, "opsflow-drill-manual", {
        "location": "westeurope", "properties": {"createMode": "PointInTimeRestore", "sourceServerResourceId": weu_id,
                                                 "pointInTimeUTC": point.isoformat()}}).result()
    lab.emu.configure(lro_seconds=3.0)  # the restores are still running when the next drill cleans up
    for name in ("opsflow-drill-old00001", "opsflow-drill-old00002"):
        assert p.start(name, point).ready is False
    assert p.list_scratch("opsflow-drill-") == ["opsflow-drill-old00001", "opsflow-drill-old00002"]
    assert lab.client.servers.get(RG, "opsflow-drill-old00001").properties.state == "Provisioning"

    found, beats = in_activity(restore_leftovers, lab.request("opsflow-drill-new00003"))
    assert found == ["opsflow-drill-old00001", "opsflow-drill-old00002"]
    assert any("waiting to delete" in json.dumps(b, default=str) for b in beats), beats  # it waited for the restore
    for name in found:
        with pytest.raises(ResourceNotFoundError):
            lab.client.servers.get(RG, name)
    assert [c["name"] for c in lab.emu.created_clusters()] == ["opsflow-drill-manual"]
    assert p.list_scratch("opsflow-drill-") == []

    with pytest.raises(ApplicationError) as ei:
        p.delete("opsflow-drill-manual")
    assert ei.value.non_retryable and ei.value.type == "Refused" and "opsflow-scratch" in ei.value.message
    with pytest.raises(ApplicationError) as ei:
        p.delete("pg-weu")  # the source itself
    assert ei.value.type == "Refused"
    assert lab.client.servers.get(RG, "opsflow-drill-manual").properties.state == "Ready"


def test_a_point_in_the_future_or_before_the_earliest_restore_date_is_refused(lab: DrillLab):
    p = lab.provider()
    window = p.window()
    with pytest.raises(ApplicationError) as ei:
        restore_start(lab.request("opsflow-drill-future01", datetime.now(timezone.utc) + timedelta(days=1)))
    assert ei.value.non_retryable and ei.value.type == "AzureBadRequest"
    assert "PointInTimeInFuture" in ei.value.message and "in the future" in ei.value.message

    with pytest.raises(ApplicationError) as ei:
        restore_start(lab.request("opsflow-drill-early001", window.earliest - timedelta(minutes=5)))
    assert ei.value.non_retryable and "PointInTimeBeforeEarliestRestoreDate" in ei.value.message
    assert "earliest restore date" in ei.value.message and "pg-weu" in ei.value.message
    assert p.list_scratch("opsflow-drill-") == [] and lab.emu.created_clusters() == []

    # An unknown source server: the provider names it (non-retryable), and so does ARM for a raw request.
    with pytest.raises(ApplicationError) as ei:
        lab.provider(server_name="pg-nope").start("opsflow-drill-nope0001", window.latest)
    assert ei.value.non_retryable and ei.value.type == "AzureResourceNotFound" and "pg-nope" in ei.value.message
    gone = f"/subscriptions/{SUB}/resourceGroups/{RG}{PG}/pg-nope"
    with pytest.raises(HttpResponseError) as ei:
        lab.client.servers.begin_create_or_update(
            RG,
            "opsflow-raw",
            {
                "location": "westeurope",
                "properties": {
                    "createMode": "PointInTimeRestore",
                    "sourceServerResourceId": gone,
                    "pointInTimeUTC": window.latest.isoformat(),
                },
            },
        )
    assert ei.value.status_code == 404 and "pg-nope" in ei.value.error.message
    with pytest.raises(HttpResponseError) as ei:
        lab.client.servers.begin_create_or_update(RG, "opsflow-raw", {"location": "westeurope", "properties": {
            "createMode": "PointInTimeRestore", "sourceServerResourceId": lab.client.servers.get(RG, "pg-weu").id}})
    assert ei.value.status_code == 400 and "pointInTimeUTC" in ei.value.error.message
    with pytest.raises(ApplicationError) as ei:
        restore_start(lab.request("Bad_Name", window.latest))
    assert ei.value.non_retryable and ei.value.type == "BadInput"


def test_a_restore_that_fails_is_a_non_retryable_error_and_is_still_deleted(lab: DrillLab):
    sql(lab.primary, "create table t (id int)")
    point = server_now(lab.primary)
    sql(lab.primary, "insert into t values (1)")
    lab.primary.kill()  # the region dies before this WAL reaches the archive: the point cannot be reached
    name = "opsflow-drill-fail0001"
    req = lab.request(name, point)
    in_activity(restore_start, req)
    with pytest.raises(ApplicationError) as ei:
        in_activity(restore_wait, req)
    assert ei.value.non_retryable and ei.value.type == "RestoreFailed"
    assert name in ei.value.message and "activity log" in ei.value.message
    assert lab.client.servers.get(RG, name).properties.state == "Disabled"
    assert "was not reached" in lab.emu.state()["servers"][name]["failed"]["message"]  # why, for whoever looks
    assert lab.provider().list_scratch("opsflow-drill-") == [name]  # a crashed drill's leftover is found

    assert restore_delete(req) is True
    with pytest.raises(ResourceNotFoundError):
        lab.client.servers.get(RG, name)


def test_scratch_servers_survive_an_emulator_restart(lab: DrillLab):
    sql(lab.primary, "create table t (id int); insert into t values (1), (2)")
    p = lab.provider()
    name = "opsflow-drill-keep0001"
    req = lab.request(name, server_now(lab.primary))  # after the rows (the window's latest is a minute back)
    restore_start(req)
    target, _ = in_activity(restore_wait, req)
    # A brand-new replica server (no cluster of that name yet): a new streaming cluster.
    weu_id = lab.client.servers.get(RG, "pg-weu").id
    created = lab.client.servers.begin_create_or_update(RG, "pg-extra", {
        "location": "westeurope", "properties": {"createMode": "Replica", "sourceServerResourceId": weu_id}}).result()
    assert created.properties.replica.role == "AsyncReplica" and created.tags["opsflow-lab-rebuild"] == "new"
    extra = lab.scratch_cluster("pg-extra")
    wait_streaming(extra)

    lab.emu.stop()
    lab.emu = start_emulator(lab.config, lab.root / "ca")
    p = lab.provider()
    assert p.list_scratch("opsflow-drill-") == [name]
    assert p.status(name).dsn == target.dsn and ids(target.dsn, "t") == [1, 2]
    assert sorted(s.name for s in lab.client.replicas.list_by_server(RG, "pg-weu")) == ["pg-extra", "pg-neu"]

    assert p.delete(name) is True
    lab.client.servers.begin_delete(RG, "pg-extra").result()
    assert lab.emu.created_clusters() == [] and not extra.datadir.exists()
    lab.client.servers.begin_delete(RG, "pg-extra").result()  # 204 for a server that is not there: done at once


# -- failback: the old primary made a replica of the new one ----------------------------------------------------------


def test_rebuild_replica_after_a_real_promotion(lab: DrillLab):
    sql(lab.primary, "create table orders (id int primary key, note text); insert into orders values (1, 'before')")
    wait_for(lambda: sql(lab.replica, "select to_regclass('orders') is not null")[0][0]
             and sql(lab.replica, "select count(*) from orders")[0][0] == 1, 20, "replication of the first row")
    weu, neu = lab.db("westeurope"), lab.db("northeurope")

    # Never from a replica: the server deleted by a rebuild must not be the one serving writes.
    with pytest.raises(ApplicationError) as ei:
        weu.rebuild_replica(lab.target("northeurope"))
    assert ei.value.non_retryable and ei.value.type == "NotPrimary"
    assert lab.requests("DELETE") == [] and lab.primary.is_running()

    old_port = lab.primary.port
    neu.promote(True)  # the emergency: the old primary keeps running and takes writes (split brain)
    sql(lab.replica, "insert into orders values (2, 'on the new primary')")
    sql(lab.primary, "insert into orders select g, 'diverged' from generate_series(100, 200) g")
    # Promoted, it has backups: derived from its cluster, which archives to the primary's archive.
    assert lab.client.servers.get(RG, "pg-neu").properties.backup.earliest_restore_date == earliest_restorable_time(
        lab.root / "pg"
    )

    result, beats = in_activity(weu.rebuild_replica, lab.target("northeurope"))
    assert result.method == "azure-replica"
    assert "deleted the old server" in result.detail, result.detail
    assert lab.emu.state()["servers"]["pg-weu"]["rebuild"]["method"] == "pg_rewind"
    assert beats
    # Azure's way: an on-demand backup of the old server first (what it holds is kept), then the old server
    # deleted, then created again as a replica (same name, so the same DSN).
    assert [(r["method"], r["status"], "/backups/" in r["path"]) for r in lab.requests(contains=f"{PG}/pg-weu")
            if r["method"] in ("PUT", "DELETE")] == [("PUT", 202, True), ("DELETE", 202, False), ("PUT", 202, False)]
    assert result.preserved and "on-demand backup" in result.preserved

    st = weu.status()
    assert (st.role, st.streaming, st.cloud_role, st.cloud_state, st.timeline) == (
        "replica",
        True,
        "AsyncReplica",
        "Ready",
        2,
    )
    assert not st.read_only
    server = lab.client.servers.get(RG, "pg-weu")
    assert server.properties.source_server_resource_id.endswith("/flexibleServers/pg-neu")
    assert server.tags["opsflow-lab-port"] == str(old_port)  # rebuilt on its own port
    assert [s.name for s in lab.client.replicas.list_by_server(RG, "pg-neu")] == ["pg-weu"]
    assert ids(lab.primary, "orders") == [1, 2]  # the diverged rows are gone
    sql(lab.replica, "insert into orders values (3, 'streamed')")
    wait_for(lambda: ids(lab.primary, "orders") == [1, 2, 3], 20, "row 3 on the rebuilt replica")

    n = len(lab.requests("PUT")) + len(lab.requests("DELETE"))
    again = weu.rebuild_replica(lab.target("northeurope"))
    assert again.method == "already-replica"
    assert len(lab.requests("PUT")) + len(lab.requests("DELETE")) == n  # looked before acting


def test_leftover_cleanup_spares_another_environment_and_the_current_run(lab: DrillLab):
    """Issue 8 item 6: scratch servers are tagged with environment and run; a drill's cleanup removes only its own
    environment's servers of other (crashed) runs, never another environment's drill running beside it."""
    sql(lab.primary, "create table t (id int); insert into t values (1)")
    point = lab.provider().window().latest
    other = lab.request("opsflow-drill-staging-aaaa0001", point, environment="staging", run_id="aaaa0001")
    crashed = lab.request("opsflow-drill-prod-bbbb0001", point, environment="prod", run_id="bbbb0001")
    current = lab.request("opsflow-drill-prod-cccc0001", point, environment="prod", run_id="cccc0001")
    for req in (other, crashed, current):
        AzurePointInTimeRestore(req).start(req.scratch_name, point)
    tags = lab.client.servers.get(RG, other.scratch_name).tags
    assert (tags["opsflow-scratch"], tags["opsflow-run"]) == ("staging", "aaaa0001")

    found, _ = in_activity(restore_leftovers, current)
    assert found == [crashed.scratch_name]
    names = {s.name for s in lab.client.servers.list_by_resource_group(RG)}
    assert {other.scratch_name, current.scratch_name} <= names and crashed.scratch_name not in names
    with pytest.raises(ApplicationError) as ei:
        AzurePointInTimeRestore(current).delete(other.scratch_name)
    assert ei.value.type == "Refused"
    for req in (other, current):
        assert AzurePointInTimeRestore(req).delete(req.scratch_name) is True
