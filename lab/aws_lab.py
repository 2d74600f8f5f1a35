"""The AWS variant of the lab (`opsflow lab up --cloud aws`): moto in server mode with the lab's real PostgreSQL
behind RDS.

The same two clusters as the Azure variant (primary in `eastus`, streaming replica in `westeurope`) become RDS
instances `lab-eastus-pg` (us-east-1) and `lab-westeurope-pg` (eu-west-1, a cross-region read replica);
Route 53 holds a failover record pair for the shop (PRIMARY eastus, SECONDARY westeurope, TCP health checks on
the clusters' ports); S3 holds a bucket for reports and one for dumps. The emulator (lab/aws_emulator.py) runs
as its own process and keeps the data plane real: promotions, replica rebuilds (failback) and point-in-time
restores (restore drills) happen on the clusters.

Functions for lab/manage.py (the runner):

    aws_emulator_config(clusters, root) -> dict        what the emulator serves
    start_aws_emulator(lab, clusters, root) -> dict     spawn `python -m lab.aws_emulator`, wait, fill lab.state["aws"]
    aws_lab_inventory(state, root) -> dict             the inventory (aws-rds, route53, S3 reports, rds-pitr drills)
    worker_env() -> dict                               AWS_* variables a worker needs to talk to moto
    seed_dump(endpoint_url, source, ...) -> dict       pg_dump a cluster into the dumps bucket (the s3-dump drill)
    s3_dump_drill(state, scratch_dsn) -> dict          a drill policy for the s3-dump method
    drop_restored_clusters(root) -> list[str]          for `lab down`: clusters of RDS restores, if the emulator
                                                       was killed
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path
from typing import Any

import boto3
import psycopg
from botocore.exceptions import ClientError

from activities.aws.dump_restore import upload_dump
from lab.aws_emulator import RESTORES_DIR
from lab.inventory import PRIMARY, lab_inventory
from lab.postgres import Cluster, drop_cluster, dump_database
from lab.processes import Lab, pick_port
from opsflow.client import pid_alive
from opsflow.inventory import AwsConnection

AWS_REGIONS = {"eastus": "us-east-1", "westeurope": "eu-west-1"}
ZONE = "shop.lab.example."
RECORD = f"www.{ZONE}"
REPORTS_BUCKET = "opsflow-lab-reports"
DUMPS_BUCKET = "opsflow-lab-dumps"
DUMPS_PREFIX = "postgres/"
INFO_FILE = "aws-info.json"
CONFIG_FILE = "aws.json"
# moto accepts any credentials; boto3 needs some. Never real ones: the lab's clients talk to moto only.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def instance_id(region: str) -> str:
    return f"lab-{region}-pg"


def set_identifier(region: str) -> str:
    """The Route 53 set identifier of a region's failover record (the inventory's traffic_endpoint)."""
    return f"shop-{region}"


def aws_emulator_config(clusters: dict[str, Any], root: Path) -> dict:
    """The emulator's config: an RDS instance per region mapped onto its lab cluster (the first region in
    AWS_REGIONS order that is in `clusters` is the primary, the others cross-region read replicas of it), each
    with a parameter group of its own; the shop's Route 53 failover records with TCP health checks on the
    clusters' ports; the reports and dumps buckets. `root` is the lab directory (unused by the config itself;
    start_aws_emulator writes the config there)."""
    regions = [r for r in AWS_REGIONS if r in clusters] + [r for r in clusters if r not in AWS_REGIONS]
    primary = PRIMARY if PRIMARY in clusters else regions[0]
    instances = []
    for region in sorted(regions, key=lambda r: r != primary):
        spec: dict[str, Any] = {
            "db_instance_identifier": instance_id(region),
            "region": AWS_REGIONS.get(region, "us-east-1"),
            "cluster": clusters[region].to_dict(),
            "parameter_group": f"{instance_id(region)}-params",
        }
        if region != primary:
            spec["replica_of"] = instance_id(primary)
        instances.append(spec)
    failover = []
    for region in sorted(regions, key=lambda r: r != primary):
        failover.append({
            "set_identifier": set_identifier(region),
            "role": "PRIMARY" if region == primary else "SECONDARY",
            "value": f"{region}.shop.lab.example",
            "health_check": {"type": "TCP", "ip": "127.0.0.1", "port": clusters[region].port},
        })
    return {
        "host": "127.0.0.1",
        "metrics_interval": 5,
        "promote_delay": 0.5,
        "rds": {"instances": instances},
        "route53": {"propagation_seconds": 1.0,
                    "zones": [{"name": ZONE, "records": [{"name": RECORD, "type": "CNAME", "failover": failover}]}]},
        "s3": {"buckets": [REPORTS_BUCKET, DUMPS_BUCKET]},
    }


def start_aws_emulator(lab: Lab, clusters: dict[str, Any], root: Path, port: int | None = None,
                       timeout: float = 90) -> dict:
    """Spawn the emulator as a lab process ("aws", `python -m lab.aws_emulator`), wait for its info file, and
    record lab.state["aws"] = {"endpoint_url", "hosted_zone_id", "record_name", "instances", "buckets", "info"}.
    `lab` is lab.processes.Lab (its spawn() keeps the pid and log for `lab down`)."""
    root = Path(root)
    config_file, info_file = root / CONFIG_FILE, root / INFO_FILE
    config_file.write_text(json.dumps(aws_emulator_config(clusters, root), indent=2))
    info_file.unlink(missing_ok=True)
    port = port or pick_port(4566)
    lab.spawn("aws", [sys.executable, "-m", "lab.aws_emulator", "--config", str(config_file), "--port", str(port),
                      "--info-file", str(info_file)], env=FAKE_CREDENTIALS)
    log = Path(lab.state["processes"]["aws"]["log"])
    deadline = time.monotonic() + timeout
    while not info_file.exists():
        if not pid_alive(lab.state["processes"]["aws"]["pid"]) or time.monotonic() > deadline:
            tail = "\n".join(log.read_text().splitlines()[-30:]) if log.exists() else ""
            raise RuntimeError(f"the AWS emulator did not come up within {timeout:.0f}s (log {log}):\n{tail}")
        time.sleep(0.1)
    info = json.loads(info_file.read_text())
    lab.state["aws"] = {
        "endpoint_url": info["url"],
        "hosted_zone_id": info["hosted_zones"][ZONE],
        "record_name": RECORD,
        "instances": {r: {"db_instance_identifier": instance_id(r), "aws_region": AWS_REGIONS.get(r, "us-east-1")}
                      for r in clusters},
        "buckets": {"reports": REPORTS_BUCKET, "dumps": DUMPS_BUCKET},
        "info": info,
    }
    receiver = lab.state.get("receiver")
    lab.state["aws"]["oncall_secret_id"] = (store_webhook_secret(info["url"], f"{receiver['url']}/oncall")
                                            if receiver else None)
    lab.save()
    return lab.state["aws"]


ONCALL_SECRET_ID = "opsflow/lab/oncall-webhook"


def store_webhook_secret(endpoint_url: str, url: str) -> str:
    """The oncall channel's webhook URL as a Secrets Manager secret in moto (the AWS lab's secret store)."""
    sm = boto3.client("secretsmanager", endpoint_url=endpoint_url, region_name=AWS_REGIONS[next(iter(AWS_REGIONS))],
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        sm.create_secret(Name=ONCALL_SECRET_ID, SecretString=url)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "ResourceExistsException":
            raise
        sm.put_secret_value(SecretId=ONCALL_SECRET_ID, SecretString=url)
    return ONCALL_SECRET_ID


def worker_env() -> dict[str, str]:
    """Environment a worker (and anything else running boto3 against the lab) needs: fake credentials."""
    return dict(FAKE_CREDENTIALS)


def aws_lab_inventory(state: dict, root: Path) -> dict:
    """The lab inventory with the AWS providers: per region database provider aws-rds (instance, AWS region,
    the cluster's DSN for lag and checks), traffic route53, aws.endpoint_url (moto), reports also to S3, and
    restore drills by RDS point-in-time restore. Everything else (Kubernetes, smoke URLs, approvals, failover
    policy, notifications, the drill's checks) is the Azure variant's, so the two labs rehearse the same
    procedures."""
    aws = state["aws"]
    base = lab_inventory({**state, "azure": state.get("azure") or {"arm_endpoint": "", "ca_bundle": ""}}, root)
    base.pop("azure", None)
    for region, r in base["regions"].items():
        inst = aws["instances"].get(region) or {"db_instance_identifier": instance_id(region),
                                                "aws_region": AWS_REGIONS.get(region, "us-east-1")}
        r["database"] = {"provider": "aws-rds", **inst, "dsn": state["regions"][region]["dsn"]}
        r["traffic_endpoint"] = set_identifier(region)
    base["traffic"] = {"provider": "route53", "hosted_zone_id": aws["hosted_zone_id"],
                       "record_name": aws["record_name"], "record_type": "CNAME"}
    base["aws"] = {"endpoint_url": aws["endpoint_url"], "default_region": AWS_REGIONS[next(iter(AWS_REGIONS))]}
    for channel in base.get("notifications", []):
        if "azure_key_vault" in channel.get("url_secret", {}):  # the AWS lab keeps that webhook in Secrets Manager
            channel["url_secret"] = {"aws_secrets_manager": {"secret_id": ONCALL_SECRET_ID}}
    base["reports"] = {"s3": {"bucket": aws["buckets"]["reports"], "prefix": "drills"}}
    drill = dict(base.get("drill") or {})
    drill["method"] = "rds-pitr"
    base["drill"] = drill
    return base


def s3_dump_drill(state: dict, scratch_dsn: str, base: dict | None = None) -> dict:
    """A drill policy for method s3-dump: the newest dump under s3://<dumps bucket>/postgres/, restored into a
    scratch database on the PostgreSQL server of `scratch_dsn` (a writable server: not the replica)."""
    policy = dict(base or {})
    policy.update(method="s3-dump", dumps={"bucket": state["aws"]["buckets"]["dumps"], "prefix": DUMPS_PREFIX},
                  scratch_server={"dsn": scratch_dsn})
    return policy


def seed_dump(endpoint_url: str, source, *, bucket: str = DUMPS_BUCKET, prefix: str = DUMPS_PREFIX,
              dbname: str | None = None, key: str | None = None, workdir: Path | None = None) -> dict:
    """pg_dump -Fc of `source` (a lab Cluster or a DSN; its database, or `dbname`) uploaded to S3 with its dump
    time (the server's clock just before pg_dump took its snapshot) as metadata. Returns {"url", "key",
    "dump_time"}. Needs AWS credentials in the environment (worker_env())."""
    dsn = source.dsn if isinstance(source, Cluster) else str(source)
    name = source.name if isinstance(source, Cluster) else "postgres"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        dump_time = conn.execute("select clock_timestamp()").fetchone()[0].astimezone(timezone.utc)
    key = key or f"{prefix.rstrip('/')}/{name}-{dump_time.strftime('%Y%m%dT%H%M%S%fZ')}.dump"
    tmp = Path(tempfile.mkdtemp(prefix="opsflow-dump-", dir=workdir))
    try:
        path = dump_database(dsn, tmp / "db.dump", dbname=dbname)
        url = upload_dump(AwsConnection(endpoint_url=endpoint_url), bucket, key, path, dump_time=dump_time)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"url": url, "key": key, "dump_time": dump_time}


def drop_restored_clusters(root: Path) -> list[str]:
    """Drop the clusters the emulator restored for RDS point-in-time restores under <root>/pg/rds-restores/.
    The emulator drops them itself when it stops (SIGTERM); this is for `lab down` after it was killed."""
    restores = Path(root) / "pg" / RESTORES_DIR
    dropped = []
    if restores.is_dir():
        for home in sorted(p for p in restores.iterdir() if p.is_dir()):
            drop_cluster(Cluster(name=home.name, datadir=home / "data", port=0, logfile=home / "postgres.log"))
            dropped.append(home.name)
    return dropped
