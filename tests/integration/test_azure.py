"""The Azure providers against the lab: real PostgreSQL (primary + streaming replica) behind the ARM emulator,
driven through the real azure-mgmt SDK clients over HTTPS (test CA).

Nothing of ours is mocked: the SDK builds the requests, follows the long-running-operation protocol and retries;
the emulator maps the servers onto the clusters and really fences (ALTER SYSTEM) and promotes (pg_promote).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from psycopg import errors as pgerrors
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.azure.arm import postgres_client, traffic_manager_client
from activities.azure.flexible_server import AzureFlexibleServer
from activities.azure.traffic_manager import AzureTrafficManagerRouter
from lab.arm_emulator import ArmEmulator, start_emulator
from lab.postgres import Cluster, create_replica, init_primary, wait_streaming
from opsflow.inventory import AzureConnection, AzureFlexibleDatabase, AzureTrafficManager
from opsflow.models import RegionTarget, TrafficRequest
from tests.helpers import eventually

pytestmark = pytest.mark.lab

SUB = "6f1c1a2e-0000-4000-8000-000000000042"
RG = "rg-opsflow-lab"
SERVERS = {"westeurope": "pg-weu", "northeurope": "pg-neu"}
ENDPOINTS = {"westeurope": "ep-weu", "northeurope": "ep-neu"}
PROFILE = "tm-opsflow-lab"


def emulator_config(primary: Cluster, replica: Cluster) -> dict:
    return {
        "subscription_id": SUB,
        "tokens": ["opsflow-lab-token"],  # what the 'static-token' credential sends by default
        "settings": {"lro_seconds": 0.3, "tm_checking_seconds": 0.6},
        "flexible_servers": {
            "pg-weu": {"resource_group": RG, "location": "westeurope", "cluster": primary.to_dict(), "role": "Primary"},
            "pg-neu": {
                "resource_group": RG,
                "location": "northeurope",
                "cluster": replica.to_dict(),
                "role": "AsyncReplica",
                "source": "pg-weu",
            },
        },
        "traffic_manager_profiles": {
            PROFILE: {
                "resource_group": RG,
                "routing_method": "Priority",
                "endpoints": {
                    "ep-weu": {"region": "westeurope", "target": "weu.app.lab.invalid", "priority": 1},
                    "ep-neu": {
                        "region": "northeurope",
                        "target": "neu.app.lab.invalid",
                        "priority": 2,
                        "status": "Disabled",
                    },
                },
            }
        },
    }


@dataclass
class AzureLab:
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

    def cluster(self, region: str) -> Cluster:
        return self.primary if region == "westeurope" else self.replica

    def target(self, region: str, server_name: str | None = None, conn: AzureConnection | None = None) -> RegionTarget:
        db = AzureFlexibleDatabase(
            provider="azure-flexible",
            dsn=self.cluster(region).dsn,
            subscription_id=SUB,
            resource_group=RG,
            server_name=server_name or SERVERS[region],
        )
        return RegionTarget(environment="lab", region=region, database=db, azure=conn or self.conn)

    def db(self, region: str, **kw) -> AzureFlexibleServer:
        return AzureFlexibleServer(self.target(region, **kw))

    def traffic(self, to_region: str, profile: str = PROFILE) -> AzureTrafficManagerRouter:
        req = TrafficRequest(
            environment="lab",
            traffic=AzureTrafficManager(
                provider="azure-traffic-manager", subscription_id=SUB, resource_group=RG, profile=profile
            ),
            endpoints=dict(ENDPOINTS),
            to_region=to_region,
            azure=self.conn,
        )
        return AzureTrafficManagerRouter(req)

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.emu.requests() if (method is None or r["method"] == method) and contains in r["path"]]


@pytest.fixture
def lab():
    # Not under pytest's tmp_path: every pytest session started as root chmods /tmp/pytest-of-root back to
    # 0700, which locks the clusters' `postgres` OS user out of its data directories mid-test.
    root = Path(tempfile.mkdtemp(prefix="opsflow-azure-test-"))
    primary = replica = emu = lab = None
    try:
        primary = init_primary(root, "weu")
        replica = create_replica(primary, root, "neu")
        config = emulator_config(primary, replica)
        emu = start_emulator(config, root / "ca")
        lab = AzureLab(root, primary, replica, emu, config)
        yield lab
    finally:
        if lab is not None:
            emu = lab.emu  # a test may have restarted it
        if emu is not None:
            emu.stop()
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


def sql(cluster: Cluster, query: str, params=()):
    with psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


# -- flexible servers ------------------------------------------------------------------------------------------


def test_status_shows_sql_and_arm_roles(lab: AzureLab):
    p, r = lab.db("westeurope").status(), lab.db("northeurope").status()
    assert (p.reachable, p.role, p.cloud_role, p.cloud_state) == (True, "primary", "Primary", "Ready")
    assert (r.reachable, r.role, r.cloud_role, r.cloud_state) == (True, "replica", "AsyncReplica", "Ready")
    assert r.streaming and p.timeline == r.timeline == 1
    # plain strings, not SDK enums (they travel in history)
    assert type(p.cloud_state) is str and type(r.cloud_role) is str

    # What ARM says, as the SDK deserializes it.
    client = postgres_client(lab.conn, SUB)
    server = client.servers.get(RG, "pg-neu")
    assert server.properties.replica.role == "AsyncReplica"
    assert server.properties.replica.replication_state == "Active"
    assert server.properties.source_server_resource_id.endswith("/flexibleServers/pg-weu")
    assert server.location == "northeurope" and server.properties.version == "15"
    assert [s.name for s in client.replicas.list_by_server(RG, "pg-weu")] == ["pg-neu"]
    assert sorted(s.name for s in client.servers.list_by_resource_group(RG)) == ["pg-neu", "pg-weu"]


def test_fence_through_arm_configuration_makes_the_cluster_read_only_and_unfence_restores(lab: AzureLab):
    db = lab.db("westeurope")
    sql(lab.primary, "create table orders (id int primary key)")
    victim = psycopg.connect(lab.primary.dsn, autocommit=True)  # an application session open before the fence
    victim.execute("select 1")

    _, beats = in_activity(db.fence)
    st = db.status()
    assert st.read_only and st.role == "primary"
    # A new session cannot write; the session that was open has been ended.
    with pytest.raises(pgerrors.ReadOnlySqlTransaction):
        sql(lab.primary, "insert into orders values (1)")
    with pytest.raises(psycopg.OperationalError):
        victim.execute("select 1")
    victim.close()
    with pytest.raises(ApplicationError) as ei:
        db.check_writable()
    assert ei.value.type == "NotWritable"
    # It went through ARM: a configuration PUT (long-running operation) applied with ALTER SYSTEM.
    assert len(lab.requests("PUT", "/configurations/default_transaction_read_only")) == 1
    assert (
        sql(lab.primary, "select source from pg_settings where name = 'default_transaction_read_only'")[0][0]
        == "configuration file"
    )
    cfg = postgres_client(lab.conn, SUB).configurations.get(RG, "pg-weu", "default_transaction_read_only")
    assert (cfg.properties.value, cfg.properties.source, cfg.properties.data_type) == ("on", "user-override", "Boolean")
    # The replica replays nothing of this: it is a server parameter of the primary only.
    assert lab.db("northeurope").status().read_only is False

    db.fence()  # idempotent: already on, no second PUT
    assert len(lab.requests("PUT", "/configurations/default_transaction_read_only")) == 1

    db.unfence()
    assert db.status().read_only is False
    sql(lab.primary, "insert into orders values (1)")
    db.check_writable()
    assert len(lab.requests("PUT", "/configurations/default_transaction_read_only")) == 2


def test_planned_promotion_really_promotes_and_is_idempotent(lab: AzureLab):
    sql(lab.primary, "create table orders (id int primary key); insert into orders select generate_series(1, 500)")
    lab.db("westeurope").fence()
    lab.emu.configure(lro_seconds=1.5)  # a slow operation: the activity must heartbeat while it polls
    replica = lab.db("northeurope")

    result, beats = in_activity(replica.promote, False)
    assert result.already_primary is False
    assert result.timeline == 2
    assert result.lsn_at_promotion and result.received_lsn
    assert result.seconds >= 1.5
    assert any("promote" in json.dumps(b, default=str) for b in beats), beats

    st = replica.status()
    assert (st.role, st.cloud_role, st.cloud_state, st.timeline) == ("primary", "Primary", "Ready", 2)
    sql(lab.replica, "insert into orders values (501)")
    assert sql(lab.replica, "select count(*) from orders")[0][0] == 501
    replica.check_writable()
    patches = lab.requests("PATCH", "/flexibleServers/pg-neu")
    assert len(patches) == 1
    # The SDK followed the LRO protocol: polled the Azure-AsyncOperation resource, then the final GET.
    assert lab.requests("GET", "/azureAsyncOperation/")

    again = replica.promote(False)
    assert again.already_primary is True and again.timeline == 2
    assert len(lab.requests("PATCH", "/flexibleServers/pg-neu")) == 1  # looked before acting: no second PATCH
    assert [s.name for s in postgres_client(lab.conn, SUB).replicas.list_by_server(RG, "pg-weu")] == []


def test_forced_promotion_with_the_old_primary_stopped(lab: AzureLab):
    sql(lab.primary, "create table orders (id int primary key); insert into orders values (1)")
    time.sleep(0.3)
    lab.primary.kill()  # the region dies
    replica = lab.db("northeurope")
    old = lab.db("westeurope").status()
    assert old.reachable is False and old.cloud_role == "Primary"

    # Planned needs the source: the operation fails, and retrying cannot help.
    with pytest.raises(ApplicationError) as ei:
        replica.promote(False)
    assert ei.value.non_retryable and "PlannedPromotionNotPossible" in ei.value.message
    assert replica.status().role == "replica"

    result = replica.promote(True)
    assert result.already_primary is False and result.timeline == 2
    assert sql(lab.replica, "select count(*) from orders")[0][0] == 1
    sql(lab.replica, "insert into orders values (2)")
    assert replica.status().cloud_role == "Primary"


def test_missing_server_is_a_non_retryable_error_naming_it(lab: AzureLab):
    db = lab.db("westeurope", server_name="pg-does-not-exist")
    with pytest.raises(ApplicationError) as ei:
        db.status()
    assert ei.value.non_retryable and ei.value.type == "AzureResourceNotFound"
    assert "pg-does-not-exist" in ei.value.message and RG in ei.value.message
    with pytest.raises(ApplicationError) as ei:
        db.promote(True)
    assert ei.value.non_retryable and "pg-does-not-exist" in ei.value.message
    with pytest.raises(ApplicationError) as ei:
        lab.traffic("northeurope", profile="tm-nope").status()
    assert ei.value.non_retryable and "tm-nope" in ei.value.message


def test_injected_throttling_and_unavailability_are_retried(lab: AzureLab):
    lab.emu.inject_fault(r"/flexibleServers/pg-neu$", status=429, count=2, retry_after=0.2, method="GET")
    lab.emu.inject_fault(r"/azureAsyncOperation/", status=503, count=1, retry_after=0.2)
    lab.emu.inject_fault(r"/flexibleServers/pg-neu$", status=503, count=1, method="PATCH", retry_after=0.2)
    lab.emu.inject_fault(r"/ExternalEndpoints/ep-neu$", status=503, count=1, method="PATCH", retry_after=0.2)

    result = lab.db("northeurope").promote(True)
    assert result.already_primary is False and result.timeline == 2
    status = lab.traffic("northeurope").switch()
    assert status.serving_region == "northeurope"

    faulted = [(r["method"], r["status"]) for r in lab.emu.requests() if r["fault"]]
    assert sorted(faulted) == sorted([("GET", 429), ("GET", 429), ("GET", 503), ("PATCH", 503), ("PATCH", 503)])
    assert len([r for r in lab.requests("PATCH", "/flexibleServers/pg-neu") if r["status"] == 202]) == 1


def test_persistent_unavailability_is_a_retryable_error(lab: AzureLab):
    lab.emu.inject_fault(r"/flexibleServers/pg-weu$", status=503, count=100, retry_after=0.1)
    st = lab.db("westeurope").status()  # status never raises for a transient failure: it says what it saw
    assert st.reachable and st.cloud_state is None and "control plane" in (st.error or "")
    with pytest.raises(ApplicationError) as ei:
        lab.db("westeurope").promote(False)
    assert not ei.value.non_retryable and ei.value.type == "AzureUnavailable"


def test_emulator_keeps_roles_across_a_restart(lab: AzureLab):
    lab.db("northeurope").promote(True)
    lab.emu.stop()
    lab.emu = start_emulator(lab.config, lab.root / "ca")
    server = postgres_client(lab.conn, SUB).servers.get(RG, "pg-neu")
    assert server.properties.replica.role == "Primary"
    assert lab.db("northeurope").promote(True).already_primary is True


def test_switchover_swaps_roles_for_real(lab: AzureLab):
    """The emulator's Switchover: the replica becomes primary and the old primary follows it."""
    sql(lab.primary, "create table t (id int); insert into t values (1)")
    client = postgres_client(lab.conn, SUB)
    create_virtual_endpoint(lab)
    poller = client.servers.begin_update(
        RG, "pg-neu", {"properties": {"replica": {"promoteMode": "Switchover", "promoteOption": "Planned"}}}
    )
    server = poller.result()
    assert server.properties.replica.role == "Primary"
    old = client.servers.get(RG, "pg-weu")
    assert old.properties.replica.role == "AsyncReplica"
    sql(lab.replica, "insert into t values (2)")
    wait_streaming(lab.primary)
    deadline = time.monotonic() + 10
    while sql(lab.primary, "select count(*) from t")[0][0] != 2:
        assert time.monotonic() < deadline, "the old primary does not replay the new primary's writes"
        time.sleep(0.1)
    assert lab.db("westeurope").status().role == "replica"


# -- virtual endpoints and the switchover --------------------------------------------------------------------

VE = "ve-lab"


def ve_body(endpoint_type: str, reader: str) -> dict:
    return {"properties": {"endpointType": endpoint_type, "members": [reader]}}


def create_virtual_endpoint(lab: AzureLab, reader: str = "pg-neu", on: str = "pg-weu"):
    client = postgres_client(lab.conn, SUB)
    return client.virtual_endpoints.begin_create(RG, on, VE, ve_body("ReadWrite", reader)).result()


def promotions(lab: AzureLab) -> list[str]:
    """The promotions ARM ran (promoteMode/promoteOption as the emulator received them), oldest first."""
    return [op["kind"] for op in lab.emu.world.snapshot()["operations"] if op["kind"].startswith("promote")]


def with_ve(lab: AzureLab, region: str) -> AzureFlexibleServer:
    target = lab.target(region)
    db = target.database.model_copy(update={"virtual_endpoint": VE})
    return AzureFlexibleServer(target.model_copy(update={"database": db}))


def test_virtual_endpoints_through_the_sdk_like_arm(lab: AzureLab):
    client = postgres_client(lab.conn, SUB)
    with pytest.raises(ResourceNotFoundError):
        client.virtual_endpoints.get(RG, "pg-weu", VE)
    with pytest.raises(HttpResponseError) as exc:  # managed on the primary
        client.virtual_endpoints.begin_create(RG, "pg-neu", VE, ve_body("ReadWrite", "pg-neu"))
    assert exc.value.error.code == "VirtualEndpointOnReplica"
    with pytest.raises(HttpResponseError) as exc:
        client.virtual_endpoints.begin_create(RG, "pg-weu", VE, ve_body("ReadOnly", "pg-neu"))
    assert exc.value.status_code == 400 and "endpointType" in exc.value.error.message

    ve = create_virtual_endpoint(lab)  # a long-running operation (202, Azure-AsyncOperation), then the final GET
    assert lab.requests("PUT", "/virtualendpoints/")
    assert (ve.name, ve.properties.endpoint_type, ve.properties.members) == (VE, "ReadWrite", ["pg-neu"])
    hosts = [f"{VE}.{kind}.postgres.database.azure.com" for kind in ("reader", "writer")]
    assert ve.properties.virtual_endpoints == hosts
    assert ve.type == "Microsoft.DBforPostgreSQL/flexibleServers/virtualEndpoints"
    assert [v.name for v in client.virtual_endpoints.list_by_server(RG, "pg-weu")] == [VE]

    # What the status shows, from either region: the writer on the primary, the reader on the replica.
    p, r = with_ve(lab, "westeurope").status(), with_ve(lab, "northeurope").status()
    for s in (p, r):
        v = s.virtual_endpoint
        assert (v.writer, v.reader, v.error) == ("pg-weu", ["pg-neu"], None)
    missing = lab.target("northeurope")
    missing = missing.model_copy(update={"database": missing.database.model_copy(update={"virtual_endpoint": "nope"})})
    assert "no virtual endpoint 'nope'" in AzureFlexibleServer(missing).status().virtual_endpoint.error

    client.virtual_endpoints.begin_delete(RG, "pg-weu", VE).result()
    with pytest.raises(ResourceNotFoundError):
        client.virtual_endpoints.get(RG, "pg-weu", VE)


def test_switchover_needs_a_virtual_endpoint_reading_from_the_replica(lab: AzureLab):
    client = postgres_client(lab.conn, SUB)
    switch = {"properties": {"replica": {"promoteMode": "Switchover", "promoteOption": "Planned"}}}
    with pytest.raises(HttpResponseError) as exc:
        client.servers.begin_update(RG, "pg-neu", switch).result()
    assert exc.value.error.code == "VirtualEndpointRequired"
    create_virtual_endpoint(lab, reader="pg-weu")  # the reader on the primary: not promotable to primary
    with pytest.raises(HttpResponseError) as exc:
        client.servers.begin_update(RG, "pg-neu", switch).result()
    assert exc.value.error.code == "VirtualEndpointRequired" and "reads from 'pg-weu'" in exc.value.error.message
    assert lab.db("northeurope").status().role == "replica"  # nothing happened


def test_planned_switchover_through_the_provider_and_back_without_a_rebuild(lab: AzureLab):
    """promote(force=False) with a virtual endpoint: Switchover/Planned. The old primary (fenced, as a failover
    leaves it) streams from the new one with every row; unfenced, it is switched back the same way."""
    sql(lab.primary, "create table t (id int primary key); insert into t select generate_series(1, 100)")
    create_virtual_endpoint(lab)
    west, north = with_ve(lab, "westeurope"), with_ve(lab, "northeurope")
    west.fence()
    result, beats = in_activity(north.promote, False)
    assert not result.already_primary and result.switchover
    assert (result.old_primary, result.old_primary_role) == ("pg-weu", "AsyncReplica")
    assert promotions(lab) == ["promote switchover/planned"]
    ws = west.status()
    assert (ws.role, ws.streaming, ws.cloud_role) == ("replica", True, "AsyncReplica")
    v = north.status().virtual_endpoint
    assert (v.writer, v.reader) == ("pg-neu", ["pg-weu"])
    sql(lab.replica, "insert into t values (101)")
    west.unfence()  # what the failover does next: the fence parameter must not follow it back to primary
    deadline = time.monotonic() + 10
    while sql(lab.primary, "select count(*) from t")[0][0] != 101:
        assert time.monotonic() < deadline, "the old primary does not replay the new primary's writes"
        time.sleep(0.1)
    assert in_activity(north.promote, False)[0].already_primary  # idempotent: a retry says it is done
    assert in_activity(north.promote, False)[0].switchover

    back, _ = in_activity(west.promote, False)  # the failback: the same call the other way, no rebuild
    assert back.switchover and back.old_primary == "pg-neu"
    west.check_writable()
    assert sql(lab.primary, "select count(*) from t")[0][0] == 101
    ns = north.status()
    assert (ns.role, ns.streaming) == ("replica", True)
    assert not [r for r in lab.requests("DELETE") if "/flexibleServers/" in r["path"]]  # nothing deleted or rebuilt


def test_forced_switchover_demotes_the_old_primary_with_a_rewind(lab: AzureLab):
    """Emergency: Switchover/Forced promotes at once; the emulator then makes the old primary a replica."""
    sql(lab.primary, "create table t (id int)")
    create_virtual_endpoint(lab)
    result, _ = in_activity(with_ve(lab, "northeurope").promote, True)
    assert result.switchover and result.old_primary_role == "AsyncReplica"
    assert promotions(lab) == ["promote switchover/forced"]
    wait_streaming(lab.primary)
    assert lab.db("westeurope").status().role == "replica"


# -- traffic manager -----------------------------------------------------------------------------------------


def test_traffic_manager_switch_moves_traffic_and_is_idempotent(lab: AzureLab):
    tm = lab.traffic("northeurope")
    before = tm.status()
    assert before.serving_region == "westeurope"
    assert {e.endpoint: (e.enabled, e.priority, e.monitor_status) for e in before.endpoints} == {
        "ep-weu": (True, 1, "Online"),
        "ep-neu": (False, 2, "Disabled"),
    }

    after, beats = in_activity(tm.switch)
    assert after.serving_region == "northeurope"
    assert {e.endpoint: (e.enabled, e.priority, e.monitor_status) for e in after.endpoints} == {
        "ep-weu": (False, 2, "Disabled"),
        "ep-neu": (True, 1, "Online"),
    }
    assert any("CheckingEndpoint" in json.dumps(b, default=str) for b in beats), beats  # it waited for the probes
    # As ARM reports it, through the SDK.
    profile = traffic_manager_client(lab.conn, SUB).profiles.get(RG, PROFILE)
    eps = {e.name: e.properties for e in profile.properties.endpoints}
    assert (eps["ep-neu"].endpoint_status, eps["ep-neu"].priority, eps["ep-neu"].endpoint_monitor_status) == (
        "Enabled",
        1,
        "Online",
    )
    assert (eps["ep-weu"].endpoint_status, eps["ep-weu"].endpoint_monitor_status) == ("Disabled", "Disabled")
    # The target was enabled before the old endpoint was disabled.
    patches = [r["path"].rsplit("/", 1)[-1] for r in lab.requests("PATCH", "/ExternalEndpoints/")]
    assert patches.index("ep-neu") < len(patches) - 1 and patches[-1] == "ep-weu"

    n = len(lab.requests("PATCH"))
    assert tm.switch().serving_region == "northeurope"
    assert len(lab.requests("PATCH")) == n  # idempotent: nothing to change, nothing changed

    back = lab.traffic("westeurope").switch()
    assert back.serving_region == "westeurope"
    assert {e.endpoint: (e.enabled, e.priority) for e in back.endpoints} == {"ep-weu": (True, 1), "ep-neu": (False, 2)}


def test_traffic_manager_prepare_enables_the_target_behind_the_serving_endpoint(lab: AzureLab):
    """traffic.prepare (a planned failover's "traffic-warm"): the target's endpoint enabled behind the serving one,
    so Traffic Manager probes it while traffic stays; the switch then finds it Online and does not wait."""
    tm = lab.traffic("northeurope")
    prepared, _ = in_activity(tm.prepare)
    states = {e.endpoint: (e.enabled, e.priority) for e in prepared.endpoints}
    assert states == {"ep-weu": (True, 1), "ep-neu": (True, 2)} and prepared.serving_region == "westeurope"
    n = len(lab.requests("PATCH"))
    assert tm.prepare().serving_region == "westeurope" and len(lab.requests("PATCH")) == n  # idempotent

    def online() -> bool:
        return {e.endpoint: e.monitor_status for e in tm.status().endpoints}["ep-neu"] == "Online"

    eventually(online, timeout=30, what="ep-neu Online (probed while enabled behind ep-weu)")
    assert tm.status().serving_region == "westeurope"  # still behind: no traffic before the switch
    after, beats = in_activity(tm.switch)
    assert after.serving_region == "northeurope"
    assert {e.endpoint: (e.enabled, e.priority) for e in after.endpoints} == {"ep-weu": (False, 2), "ep-neu": (True, 1)}
    assert not any("CheckingEndpoint" in json.dumps(b, default=str) for b in beats), beats  # nothing to wait for

    # Back, the way a failover's undo goes: the old endpoint alone again.
    back = lab.traffic("westeurope").switch()
    assert {e.endpoint: (e.enabled, e.priority) for e in back.endpoints} == {"ep-weu": (True, 1), "ep-neu": (False, 2)}


def test_traffic_manager_prepare_changes_nothing_when_no_endpoint_ahead_is_online(lab: AzureLab):
    """Enabled behind an endpoint that is not Online, the target would take the traffic at once: left alone."""
    lab.emu.set_endpoint_health(PROFILE, "ep-weu", False)
    n = len(lab.requests("PATCH"))
    st = lab.traffic("northeurope").prepare()
    assert {e.endpoint: e.enabled for e in st.endpoints} == {"ep-weu": True, "ep-neu": False}
    assert len(lab.requests("PATCH")) == n


def test_traffic_manager_switch_to_a_degraded_endpoint_fails_clearly_and_leaves_traffic(lab: AzureLab):
    lab.emu.set_endpoint_health(PROFILE, "ep-neu", False)
    with pytest.raises(ApplicationError) as ei:
        lab.traffic("northeurope").switch()
    assert ei.value.type == "EndpointDegraded" and ei.value.non_retryable
    assert "ep-neu" in ei.value.message and "Degraded" in ei.value.message
    st = lab.traffic("northeurope").status()
    states = {e.endpoint: (e.enabled, e.monitor_status) for e in st.endpoints}
    assert states == {"ep-weu": (True, "Online"), "ep-neu": (True, "Degraded")}
    assert st.serving_region == "westeurope"  # the old endpoint was left enabled: traffic did not move


def test_emulator_validates_bodies_like_arm(lab: AzureLab):
    client = traffic_manager_client(lab.conn, SUB)
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError) as ei:  # priorities are unique in a profile
        client.endpoints.update(RG, PROFILE, "ExternalEndpoints", "ep-neu", {"properties": {"priority": 1}})
    assert ei.value.status_code == 400 and "priority" in ei.value.error.message
    with pytest.raises(HttpResponseError) as ei:
        client.endpoints.update(
            RG, PROFILE, "ExternalEndpoints", "ep-neu", {"properties": {"endpointStatus": "Sideways"}}
        )
    assert ei.value.status_code == 400
    pg = postgres_client(lab.conn, SUB)
    with pytest.raises(HttpResponseError) as ei:
        pg.servers.begin_update(
            RG, "pg-weu", {"properties": {"replica": {"promoteMode": "Standalone", "promoteOption": "Forced"}}}
        )
    assert ei.value.status_code == 400 and ei.value.error.code == "ReplicaPromotionNotAllowed"
    with pytest.raises(HttpResponseError) as ei:
        pg.configurations.begin_put(RG, "pg-weu", "default_transaction_read_only", {"properties": {"value": "maybe"}})
    assert ei.value.status_code == 400
    with pytest.raises(HttpResponseError) as ei:
        pg.configurations.get(RG, "pg-weu", "no_such_parameter")
    assert ei.value.status_code == 404


# -- authentication and transport ----------------------------------------------------------------------------


def _https_get(url: str, ca: Path, headers: dict | None = None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_requests_without_a_valid_token_are_refused(lab: AzureLab, monkeypatch):
    url = (
        f"{lab.emu.url}/subscriptions/{SUB}/resourceGroups/{RG}"
        "/providers/Microsoft.DBforPostgreSQL/flexibleServers/pg-weu?api-version=2026-10-01"
    )
    status, body = _https_get(url, lab.emu.ca_path)
    assert (
        status == 401
        and body["error"]["code"] == "AuthenticationFailed"
        and "Authorization" in body["error"]["message"]
    )
    status, body = _https_get(url, lab.emu.ca_path, {"Authorization": "Bearer opsflow-lab-token"})
    assert status == 200 and body["properties"]["replica"]["role"] == "Primary"

    monkeypatch.setenv("OPSFLOW_AZURE_STATIC_TOKEN", "stolen-or-expired")
    with pytest.raises(ApplicationError) as ei:
        lab.db("westeurope").status()
    assert ei.value.type == "AzureAuthFailed" and ei.value.non_retryable and "pg-weu" in ei.value.message


def test_plain_http_is_never_used(lab: AzureLab):
    # The SDK refuses to send a bearer token over plain HTTP; that is a configuration error, not a retry.
    http_conn = lab.conn.model_copy(update={"arm_endpoint": lab.emu.url.replace("https://", "http://")})
    with pytest.raises(ApplicationError) as ei:
        lab.db("westeurope", conn=http_conn).status()
    assert ei.value.non_retryable and ei.value.type == "AzureConfig"
    # The emulator has no plain-HTTP listener: an HTTP request gets no HTTP answer.
    with pytest.raises((urllib.error.URLError, ConnectionError, socket.error, http_client_errors())):
        urllib.request.urlopen(f"http://127.0.0.1:{lab.emu.port}/_emulator/health", timeout=5).read()
    # A client that does not trust the lab CA refuses the emulator's certificate.
    untrusted = lab.conn.model_copy(update={"ca_bundle": None})
    with pytest.raises(ApplicationError) as ei:
        lab.db("westeurope", conn=untrusted).status()
    assert ei.value.non_retryable and ei.value.type == "AzureTlsError"


def http_client_errors():
    import http.client

    return http.client.HTTPException
