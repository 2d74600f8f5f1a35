"""The AWS providers through boto3 over HTTP against moto (lab/aws_emulator.py), with real PostgreSQL behind RDS.

A primary (RDS orders-east, us-east-1) and a streaming replica (orders-west, us-west-2) run on loopback;
promoting orders-west through the RDS API really promotes the replica cluster. Route 53 holds a pair of
failover records with TCP health checks on the clusters' ports; S3 a bucket for reports.

The tests of this module run in order: the promotion in the middle changes the lab for the ones after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import psycopg
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.aws.rds import RdsInstance
from activities.aws.reports import store_report_s3
from activities.aws.route53 import Route53Router
from activities.postgres.server import sql_status
from lab.aws_emulator import start_emulator
from lab.postgres import Cluster, create_replica, init_primary, wait_streaming
from opsflow.inventory import AwsConnection, Inventory
from opsflow.models import RegionTarget, TrafficRequest
from tests.helpers import eventually as wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("fake_aws_credentials")]

ZONE = "lab.opsflow.test."
RECORD = f"db.{ZONE}"
BUCKET = "opsflow-reports"
@pytest.fixture(scope="module")
def workdir():
    # Not pytest's tmp_path: another pytest session on the same machine prunes old /tmp/pytest-of-<user>
    # directories while ours still runs servers in them.
    path = Path(tempfile.mkdtemp(prefix="opsflow-test-aws-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def clusters(workdir):
    root = workdir / "pg"
    made: list[Cluster] = []
    try:
        east = init_primary(root, "east")
        made.append(east)
        west = create_replica(east, root, "west")
        made.append(west)
        yield east, west
    finally:
        def stop(c: Cluster) -> None:
            try:
                c.stop("fast")
            except Exception:
                c.kill()

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(stop, made))


@pytest.fixture(scope="module")
def emu(clusters, fake_aws_credentials):
    east, west = clusters
    config = {
        "metrics_interval": 0.5,
        "promote_delay": 1.0,  # RDS takes a while; lets the test see "modifying"
        "rds": {
            "instances": [
                {"db_instance_identifier": "orders-east", "region": "us-east-1", "cluster": east.to_dict(),
                 "parameter_group": "orders-east-params"},
                {"db_instance_identifier": "orders-west", "region": "us-west-2", "replica_of": "orders-east",
                 "cluster": west.to_dict(), "parameter_group": "orders-west-params"},
            ]
        },
        "route53": {
            "propagation_seconds": 1.0,
            "zones": [{
                "name": ZONE,
                "records": [{
                    "name": RECORD,
                    "type": "CNAME",
                    "failover": [
                        {"set_identifier": "east", "role": "PRIMARY", "value": f"orders-east.{ZONE}",
                         "health_check": {"type": "TCP", "ip": "127.0.0.1", "port": east.port}},
                        {"set_identifier": "west", "role": "SECONDARY", "value": f"orders-west.{ZONE}",
                         "health_check": {"type": "TCP", "ip": "127.0.0.1", "port": west.port}},
                    ],
                }],
            }],
        },
        "s3": {"buckets": [BUCKET]},
    }
    emulator = start_emulator(config)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def inventory(emu, clusters) -> Inventory:
    east, west = clusters
    return Inventory.model_validate(
        {
            "environment": "lab",
            "primary_region": "east",
            "regions": {
                "east": {
                    "database": {
                        "provider": "aws-rds",
                        "db_instance_identifier": "orders-east",
                        "aws_region": "us-east-1",
                        "dsn": east.dsn,
                    },
                    "traffic_endpoint": "east",
                },
                "west": {
                    "database": {
                        "provider": "aws-rds",
                        "db_instance_identifier": "orders-west",
                        "aws_region": "us-west-2",
                        "dsn": west.dsn,
                    },
                    "traffic_endpoint": "west",
                },
            },
            "traffic": {
                "provider": "route53",
                "hosted_zone_id": emu.info()["hosted_zones"][ZONE],
                "record_name": RECORD,
            },
            "approval": {"approvers": ["alice"]},
            "aws": {"endpoint_url": emu.url},
        }
    )


def rds(inventory: Inventory, region: str, **changes) -> RdsInstance:
    target = RegionTarget.of(inventory, region)
    if changes:
        target = target.model_copy(update={"database": target.database.model_copy(update=changes)})
    return RdsInstance(target)


def client(emu, service: str, region: str = "us-east-1"):
    return boto3.client(service, region_name=region, endpoint_url=emu.url)


def describe(emu, ident: str, region: str) -> dict:
    return client(emu, "rds", region).describe_db_instances(DBInstanceIdentifier=ident)["DBInstances"][0]


def run_in_activity(fn, *args):
    """Run fn as a Temporal activity would (activity context, heartbeats recorded)."""
    env = ActivityEnvironment()
    beats: list = []
    env.on_heartbeat = lambda *details: beats.append(details[0] if details else None)
    return env.run(fn, *args), beats


def write_row(cluster: Cluster, value: str) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True) as c:
        c.execute("create table if not exists orders (id serial primary key, note text)")
        c.execute("insert into orders (note) values (%s)", (value,))




# -- status ---------------------------------------------------------------------------------------------


def test_status_combines_sql_and_rds(inventory, clusters):
    east, _ = clusters
    write_row(east, "before any failover")
    p = rds(inventory, "east").status()
    assert (p.reachable, p.role, p.cloud_state, p.cloud_role) == (True, "primary", "available", "Primary")
    assert p.current_lsn and p.timeline == 1 and not p.read_only

    def caught_up():
        r = rds(inventory, "west").status()
        return r if r.replay_lsn and r.replay_lsn >= p.current_lsn else None

    r = wait_until(caught_up, what="the replica to replay the primary's WAL")
    assert (r.reachable, r.role, r.streaming, r.cloud_state, r.cloud_role) == (
        True,
        "replica",
        True,
        "available",
        "ReadReplica",
    )


def test_status_without_dsn_uses_rds_and_cloudwatch(inventory):
    provider = rds(inventory, "west", dsn=None)
    s = wait_until(
        lambda: (st := provider.status()).replay_delay_seconds is not None and st, what="a ReplicaLag datapoint"
    )
    assert (s.reachable, s.role, s.cloud_state, s.cloud_role) == (True, "replica", "available", "ReadReplica")
    assert 0 <= s.replay_delay_seconds < 60
    assert s.current_lsn is None  # only SQL knows LSNs

    p = rds(inventory, "east", dsn=None).status()
    assert (p.reachable, p.role, p.replay_delay_seconds) == (True, "primary", None)


def test_status_with_unreachable_dsn_reports_the_control_plane(inventory):
    s = rds(inventory, "west", dsn="host=127.0.0.1 port=1 user=postgres dbname=postgres").status()
    assert not s.reachable and s.error
    assert (s.role, s.cloud_state, s.cloud_role) == ("replica", "available", "ReadReplica")


def test_unknown_instance_is_non_retryable_and_named(inventory):
    provider = rds(inventory, "west", db_instance_identifier="orders-nowhere")
    for call in (provider.status, lambda: provider.promote(False), provider.fence):
        with pytest.raises(ApplicationError) as e:
            call()
        assert e.value.non_retryable and e.value.type == "AwsNotFound"
        assert "orders-nowhere" in e.value.message


def test_throttling_and_5xx_are_retryable(emu, inventory):
    provider = rds(inventory, "east")
    emu.inject_fault(r"^rds DescribeDBInstances$", status=400, code="Throttling", count=10)
    try:
        with pytest.raises(ApplicationError) as e:
            provider.promote(False)
        assert not e.value.non_retryable and e.value.type == "AwsThrottled" and "orders-east" in e.value.message
    finally:
        emu.clear_faults()
    emu.inject_fault(r"^route53 ChangeResourceRecordSets$", status=503, code="ServiceUnavailable", count=10)
    try:
        with pytest.raises(ApplicationError) as e:
            Route53Router(TrafficRequest.of(inventory, "west")).switch()
        assert not e.value.non_retryable and e.value.type == "AwsUnavailable"
    finally:
        emu.clear_faults()
    # A throttle botocore rides out by itself is no error at all.
    emu.inject_fault(r"^rds DescribeDBInstances$", status=400, code="Throttling", count=1)
    assert provider.status().cloud_state == "available"


def test_access_denied_is_non_retryable(emu, inventory):
    emu.inject_fault(r"^s3 PutObject$", status=403, code="AccessDenied", count=1)
    with pytest.raises(ApplicationError) as e:
        store_report_s3(inventory.aws, BUCKET, "denied.json", "{}", "application/json")
    assert (
        e.value.non_retryable and e.value.type == "AwsAccessDenied" and f"s3://{BUCKET}/denied.json" in e.value.message
    )


# -- fence ----------------------------------------------------------------------------------------------


def test_fence_through_the_parameter_group(emu, inventory, clusters):
    east, _ = clusters
    provider = rds(inventory, "east")
    provider.parameter_group = "orders-east-params"
    provider.fence()
    assert sql_status(provider.db, "east").read_only
    params = client(emu, "rds").describe_db_parameters(DBParameterGroupName="orders-east-params")["Parameters"]
    assert {"ParameterName": "default_transaction_read_only", "ParameterValue": "1"}.items() <= params[0].items()
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        write_row(east, "while fenced")
    provider.fence()  # idempotent
    provider.unfence()
    assert not sql_status(provider.db, "east").read_only
    provider.check_writable()


def test_fence_refuses_a_shared_parameter_group(emu, inventory):
    east_rds = client(emu, "rds")
    east_rds.create_db_instance(DBInstanceIdentifier="orders-east-2", DBInstanceClass="db.t3.micro", Engine="postgres",
                                MasterUsername="postgres", MasterUserPassword="lab-not-a-secret", AllocatedStorage=20,
                                DBParameterGroupName="orders-east-params")
    try:
        provider = rds(inventory, "east")
        provider.parameter_group = "orders-east-params"
        with pytest.raises(ApplicationError) as e:
            provider.fence()
        assert e.value.non_retryable and "orders-east-2" in e.value.message
        assert not provider.status().read_only
    finally:
        east_rds.delete_db_instance(DBInstanceIdentifier="orders-east-2", SkipFinalSnapshot=True)


def test_fence_over_sql_without_a_parameter_group(inventory):
    provider = rds(inventory, "east")
    assert provider.parameter_group is None
    provider.fence()
    assert provider.status().read_only
    provider.unfence()
    assert not provider.status().read_only


def test_status_when_the_rds_api_is_down_still_answers_over_sql(inventory):
    down = inventory.model_copy(update={"aws": AwsConnection(endpoint_url="http://127.0.0.1:1")})
    s = rds(down, "west").status()
    assert (s.reachable, s.role, s.cloud_state) == (True, "replica", None)
    assert "RDS API" in s.error


# -- promote --------------------------------------------------------------------------------------------


def test_promote_of_a_dead_replica_fails_retryably_and_rds_rolls_back(emu, inventory, clusters):
    _, west = clusters
    west.stop("fast")
    try:
        with pytest.raises(ApplicationError) as e:
            rds(inventory, "west").promote(False)
        assert not e.value.non_retryable and e.value.type == "PromoteFailed" and "orders-west" in e.value.message
        w = describe(emu, "orders-west", "us-west-2")
        assert w["DBInstanceStatus"] == "available" and w["ReadReplicaSourceDBInstanceIdentifier"].endswith(
            ":db:orders-east"
        )
        assert emu.state()["instances"]["orders-west"]["promotion"] == "failed"
    finally:
        west.start()
        wait_streaming(west)


def test_promote_promotes_the_cluster_and_rds_shows_it_standalone(emu, inventory, clusters, monkeypatch):
    east, west = clusters
    # `modifying` long enough to be seen however busy the machine is (a describe took 3 s once, under 6 test processes),
    # within a limit that leaves room for it (the activity environment's own leaves 5 s).
    monkeypatch.setattr(emu, "promote_delay", 4.0)
    west_rds = RdsInstance(RegionTarget.of(inventory, "west"), promote_timeout=60)
    write_row(east, "last write before the promotion")
    primary_lsn = rds(inventory, "east").status().current_lsn
    wait_until(lambda: (rds(inventory, "west").status().replay_lsn or "") >= primary_lsn, what="catch-up")

    result, beats = run_in_activity(west_rds.promote, False)

    assert not result.already_primary and result.timeline == 2 and result.seconds > 0
    assert result.lsn_at_promotion and result.received_lsn
    assert any(b.get("rds_status") == "modifying" for b in beats if isinstance(b, dict)), beats
    with psycopg.connect(west.dsn) as c:
        assert c.execute("select pg_is_in_recovery()").fetchone()[0] is False
        assert (
            c.execute("select count(*) from orders where note = 'last write before the promotion'").fetchone()[0] == 1
        )
    w = describe(emu, "orders-west", "us-west-2")
    assert w["DBInstanceStatus"] == "available" and "ReadReplicaSourceDBInstanceIdentifier" not in w
    assert not describe(emu, "orders-east", "us-east-1").get("ReadReplicaDBInstanceIdentifiers")
    s = rds(inventory, "west").status()
    assert (s.role, s.cloud_role, s.timeline) == ("primary", "Primary", 2)
    rds(inventory, "west").check_writable()
    assert emu.state()["instances"]["orders-west"]["promotion"] == "done"


def test_promote_again_is_idempotent(emu, inventory):
    again = rds(inventory, "west").promote(force=True)
    assert again.already_primary and again.timeline == 2
    # RDS itself refuses to promote a standalone instance, as the real service does.
    with pytest.raises(Exception) as e:
        client(emu, "rds", "us-west-2").promote_read_replica(DBInstanceIdentifier="orders-west")
    assert "InvalidDBInstanceState" in str(e.value)


def test_promote_of_an_old_primary_is_already_primary(inventory):
    assert rds(inventory, "east").promote(False).already_primary


# -- Route 53 -------------------------------------------------------------------------------------------


def test_route53_status(inventory):
    s = Route53Router(TrafficRequest.of(inventory, "west")).status()
    assert s.serving_region == "east"
    by_region = {e.region: e for e in s.endpoints}
    assert (by_region["east"].enabled, by_region["east"].priority, by_region["east"].monitor_status) == (
        True,
        1,
        "Healthy",
    )
    assert (by_region["west"].enabled, by_region["west"].priority, by_region["west"].monitor_status) == (
        False,
        2,
        "Healthy",
    )


def test_route53_switch_flips_primary_and_waits_insync(emu, inventory, monkeypatch):
    monkeypatch.setattr(emu, "propagation_seconds", 4.0)  # PENDING at the first look, however busy the machine is
    router = Route53Router(TrafficRequest.of(inventory, "west"))
    status, beats = run_in_activity(router.switch)
    assert status.serving_region == "west"
    assert {e.region: e.priority for e in status.endpoints} == {"west": 1, "east": 2}
    states = [b["status"] for b in beats]
    assert states[0] == "PENDING" and states[-1] == "INSYNC", states
    change_id = beats[-1]["change_id"]

    rrsets = client(emu, "route53").list_resource_record_sets(HostedZoneId=router.zone_id)["ResourceRecordSets"]
    failover = {r["SetIdentifier"]: r for r in rrsets if r.get("SetIdentifier")}
    assert (failover["west"]["Failover"], failover["east"]["Failover"]) == ("PRIMARY", "SECONDARY")
    assert failover["west"]["ResourceRecords"] == [{"Value": f"orders-west.{ZONE}"}] and failover["west"].get(
        "HealthCheckId"
    )

    # Idempotent: nothing to change, no new change batch.
    again, beats = run_in_activity(router.switch)
    assert again.serving_region == "west" and beats == []
    # A retry after a crash waits for the change its previous attempt heartbeated.
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, heartbeat_details=[{"change_id": change_id, "status": "PENDING"}])
    seen: list = []
    env.on_heartbeat = lambda *d: seen.append(d[0])
    assert env.run(router.switch).serving_region == "west"
    assert seen and seen[-1] == {
        "change_id": change_id,
        "status": "INSYNC",
        "waited_seconds": seen[-1]["waited_seconds"],
    }


def test_route53_health_check_sees_a_dead_region(inventory, clusters):
    east, _ = clusters
    east.stop("immediate")
    try:
        s = Route53Router(TrafficRequest.of(inventory, "east")).status()
        assert {e.region: e.monitor_status for e in s.endpoints} == {"east": "Unhealthy", "west": "Healthy"}
        # RDS status with the dsn down: the control plane still answers.
        d = rds(inventory, "east").status()
        assert not d.reachable and d.cloud_state == "available"
    finally:
        east.start()


def test_route53_unknown_zone_is_non_retryable(inventory):
    request = TrafficRequest.of(inventory, "west")
    request = request.model_copy(
        update={"traffic": request.traffic.model_copy(update={"hosted_zone_id": "ZNOSUCHZONE"})}
    )
    with pytest.raises(ApplicationError) as e:
        Route53Router(request).status()
    assert e.value.non_retryable and "ZNOSUCHZONE" in e.value.message


# -- S3 -------------------------------------------------------------------------------------------------


def test_s3_report_is_stored_and_readable(emu, inventory):
    body = json.dumps({"procedure": "failover", "rto_seconds": 12.5, "note": "ünïcode"})
    url = store_report_s3(inventory.aws, BUCKET, "lab/failover/report.json", body, "application/json")
    assert url == f"s3://{BUCKET}/lab/failover/report.json"
    obj = client(emu, "s3").get_object(Bucket=BUCKET, Key="lab/failover/report.json")
    assert obj["ContentType"] == "application/json" and obj["Body"].read().decode() == body


def test_s3_missing_bucket_is_non_retryable(inventory):
    with pytest.raises(ApplicationError) as e:
        store_report_s3(inventory.aws, "no-such-bucket", "r.json", "{}", "application/json")
    assert e.value.non_retryable and e.value.type == "AwsNotFound" and "no-such-bucket" in e.value.message


# -- the emulator as a process ---------------------------------------------------------------------------


def test_emulator_runs_as_a_process(workdir):
    tmp_path = workdir / "cli"
    tmp_path.mkdir()
    config = tmp_path / "aws.yaml"
    config.write_text("s3:\n  buckets: [cli-bucket]\nroute53:\n  zones:\n    - name: cli.test.\n")
    info_file = tmp_path / "info.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab.aws_emulator",
            "--config",
            str(config),
            "--port",
            "0",
            "--info-file",
            str(info_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        info = json.loads(proc.stdout.readline())
        assert json.loads(info_file.read_text()) == info and "cli.test." in info["hosted_zones"]
        conn = AwsConnection(endpoint_url=info["url"])
        assert store_report_s3(conn, "cli-bucket", "k.txt", "hello", "text/plain") == "s3://cli-bucket/k.txt"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
