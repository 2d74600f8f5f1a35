"""The lab's world as an inventory: two regions (a primary in `eastus`, a streaming replica in `westeurope`), the
shop's deployments, what the ARM emulator serves for them (arm_emulator_config), and the inventory YAML a worker
and the CLI read (lab_inventory: the Azure variant; lab/aws_lab.py builds the AWS one on it).

    arm_emulator_config(clusters, receiver_port) -> dict   flexible servers on the lab's clusters, one TM profile
    lab_inventory(state, root) -> dict                     the inventory for lab.json's state
    lab_database(state) -> str                             its database flavour: cloud | self-managed | patroni
    lab_maintenance(receiver_url) -> dict                  its maintenance section: a window open whenever the lab runs
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from lab.postgres import SERVER_USER, Cluster, pg_bin
from lab.seed import BLOAT_TABLE

REGIONS = ("eastus", "westeurope")
PRIMARY = "eastus"
SUBSCRIPTION = "00000000-0000-0000-0000-0000000000ab"
RESOURCE_GROUP = "opsflow-lab"
PROFILE = "lab-shop"
DEPLOYMENTS = [{"name": "web", "replicas": 3}, {"name": "worker", "replicas": 2}]
STANDBY_REPLICAS = 1  # the standby region runs warm, one replica per deployment
# HorizontalPodAutoscalers (region role -> (minReplicas, maxReplicas)), as the seeds' clusters run them (CitadelBuy:
# min 3, max 10). The standby's max is below the inventory's replicas: a failover must raise it, or the HPA would
# scale the deployment back.
AUTOSCALERS = {"web": {"primary": (3, 10), "standby": (STANDBY_REPLICAS, 2)}}
LRO_SECONDS = 0.5  # how long the emulated Azure operations of the lab take at the least
VIRTUAL_ENDPOINT = "lab-shop"  # `opsflow lab up --virtual-endpoint`: writer/reader over the two servers

# The receiver's channel URLs reach the worker as a real team's webhook secrets would: from the environment
# (ops), from a secret store (oncall: Key Vault in the Azure lab, Secrets Manager in the AWS lab).
LAB_WEBHOOK_ENV = {"ops": "OPSFLOW_LAB_WEBHOOK_OPS", "oncall": "OPSFLOW_LAB_WEBHOOK_ONCALL"}
ONCALL_SECRET_NAME = "lab-oncall-webhook"
STATUSPAGE_KEY_ENV = "OPSFLOW_LAB_STATUSPAGE_KEY"
# What every lab drill checks on its restore, whichever way it restores.
LAB_DRILL_CHECKS = {
    "row_counts": [{"table": "lab_orders", "timestamp_column": "created_at"}],
    "checks": [{"name": "no negative totals",
                "query": "SELECT NOT EXISTS (SELECT 1 FROM lab_orders WHERE total < 0)"}],
    "schema_objects": ["public.lab_orders", "public.lab_orders_pkey"],
    "retention": "7d",
    "restore_timeout": "10m",
    "heartbeat_timeout": "30s",
}


def arm_emulator_config(clusters: dict, receiver_port: int, virtual_endpoint: str | None = None) -> dict:
    """What the ARM emulator serves: a flexible server per region on the lab's clusters, one TM profile; with
    `virtual_endpoint`, a virtual endpoint on the primary's server whose reader is the replica."""
    servers = {}
    for region, cluster in clusters.items():
        servers[f"lab-{region}-pg"] = {
            "resource_group": RESOURCE_GROUP,
            "location": region,
            "cluster": cluster.to_dict(),
            "role": "Primary" if region == PRIMARY else "AsyncReplica",
            **({} if region == PRIMARY else {"source": f"lab-{PRIMARY}-pg"}),
        }
    endpoints = {}
    if virtual_endpoint:
        replica = next(r for r in clusters if r != PRIMARY)
        endpoints[virtual_endpoint] = {"server": f"lab-{PRIMARY}-pg", "members": [f"lab-{replica}-pg"]}
    return {
        "subscription_id": SUBSCRIPTION,
        "virtual_endpoints": endpoints,
        # The emulator is also the lab's Key Vault: the oncall channel's webhook URL lives there.
        "key_vault_secrets": {ONCALL_SECRET_NAME: f"http://127.0.0.1:{receiver_port}/oncall"},
        "settings": {"lro_seconds": LRO_SECONDS, "tm_checking_seconds": 1.0},
        "flexible_servers": servers,
        "traffic_manager_profiles": {
            PROFILE: {
                "resource_group": RESOURCE_GROUP,
                "routing_method": "Priority",
                "endpoints": {
                    f"shop-{region}": {
                        "type": "externalEndpoints",
                        "region": region,
                        "target": f"{region}.shop.lab.example",
                        "status": "Enabled" if region == PRIMARY else "Disabled",
                        "priority": 1 if region == PRIMARY else 2,
                    }
                    for region in REGIONS
                },
            }
        },
    }


def lab_database(state: dict) -> str:
    """The lab's database flavour, as `opsflow lab up --database` recorded it (state["database"]): cloud, self-managed
    or patroni. A state file written before that key reads as what it held then (a missing key is the cloud)."""
    return state.get("database") or (
        "patroni" if state.get("patroni") else "self-managed" if state.get("self_managed") else "cloud")


def lab_inventory(state: dict, root: Path) -> dict:
    receiver = state["receiver"]["url"]
    arm = state["azure"]["arm_endpoint"]
    database = lab_database(state)
    self_managed = database == "self-managed" and state.get("cloud", "azure") == "azure"  # host access: Azure's lab
    regions = {}
    for region in REGIONS:
        regions[region] = {
            "database": patroni_database(state, region) if database == "patroni"
            else self_managed_database(state, region) if self_managed else {
                "provider": "azure-flexible",
                "subscription_id": SUBSCRIPTION,
                "resource_group": RESOURCE_GROUP,
                "server_name": f"lab-{region}-pg",
                "dsn": state["regions"][region]["dsn"],
                **({"virtual_endpoint": state["virtual_endpoint"]} if state.get("virtual_endpoint") else {}),
            },
            "traffic_endpoint": f"shop-{region}",
            "kubernetes": {
                "kubeconfig": str(root / "kubeconfig"),
                "context": f"lab-{region}",
                "namespace": "shop",
                "service": "web",
                "deployments": DEPLOYMENTS,
            },
            "smoke_urls": [f"{receiver}/health/{region}"],
        }
    return {
        "environment": "lab",
        "primary_region": PRIMARY,
        "regions": regions,
        "traffic": {"provider": "azure-traffic-manager", "subscription_id": SUBSCRIPTION,
                    "resource_group": RESOURCE_GROUP, "profile": PROFILE},
        "azure": {"arm_endpoint": arm, "credential": "static-token", "ca_bundle": state["azure"]["ca_bundle"],
                  "polling_interval": 0.1},
        "approval": {"approvers": ["alice", "bob"], "require_distinct_approver": True, "timeout": "1h",
                     "on_timeout": "abort", "escalation_channel": "oncall"},
        # A short drain keeps the demo brisk; production inventories keep the 60 s default or more.
        # A short heartbeat timeout lets a new worker take over a crashed one's step within seconds in the lab.
        "failover": {"drain": "3s", "max_planned_lag_bytes": 16 * 1024 * 1024, "catch_up_timeout": "2m",
                     "promote_timeout": "5m", "heartbeat_timeout": "5s"},
        # Webhook URLs are secrets: ops' in the worker's environment (lab.manage.worker_env), oncall's in the
        # emulated Key Vault.
        "notifications": [{"name": "ops", "url_secret": {"env": LAB_WEBHOOK_ENV["ops"]}},
                          {"name": "oncall", "url_secret": {"azure_key_vault": {"vault_url": arm,
                                                                                "name": ONCALL_SECRET_NAME}}}],
        "drill": {"method": "azure-pitr", **LAB_DRILL_CHECKS},
        "reports_dir": str(root / "reports"),
        "maintenance": lab_maintenance(receiver),
    } | ({"drill": self_managed_drill(state, root)} if self_managed or database == "patroni" else {})


def replication_address(r: dict) -> str:
    """What another region's standby cluster streams from: every member of the region's Patroni cluster (lab.state's
    "patroni" region `r`), in libpq's list form; streaming through a slot, it asks for the read-write one."""
    return ",".join(f"127.0.0.1:{p}" for p in [r["port"], *(m["port"] for m in r.get("members") or [])])


def patroni_database(state: dict, region: str) -> dict:
    """`opsflow lab up --database patroni`: the region's Patroni cluster (lab/patroni.py)."""
    r = state["patroni"]["regions"][region]
    if r.get("member"):  # one cluster stretched across the regions: each region's member, every member's REST API
        others = [o["rest_api"] for n, o in state["patroni"]["regions"].items() if n != region]
        return {"provider": "patroni", "layout": "stretched", "member": r["member"], "scope": r["scope"],
                "dsn": r["dsn"], "rest_api": [r["rest_api"], *others]}
    members = r.get("members") or []  # more than one: SQL goes to whichever member leads (sql_target leader)
    return {"provider": "patroni", "dsn": r["dsn"], "rest_api": [r["rest_api"], *(m["rest_api"] for m in members)],
            "scope": r["scope"], "replication_address": replication_address(r)} | (
        {"sql_target": "leader"} if members else {}) | (
        {"standby_cluster": r["standby_cluster"]} if r.get("standby_cluster") else {})


def self_managed_database(state: dict, region: str) -> dict:
    """`opsflow lab up --database self-managed`: the region's cluster as provider postgres, its host reached on this
    machine (as the postgres OS user when the lab runs as root: pg_ctl refuses root)."""
    cluster = Cluster.from_dict(state["postgres"][region])
    run = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
    return {"provider": "postgres", "dsn": state["regions"][region]["dsn"],
            "host": {"run": run, "data_dir": str(cluster.datadir), "bin_dir": str(Path(pg_bin("pg_ctl")).parent),
                     "log_file": str(cluster.logfile), "command_timeout": "60s"}}


def self_managed_drill(state: dict, root: Path) -> dict:
    """`opsflow lab up --database self-managed` or `patroni`: the drill restores the primary's (the eastus leader's)
    tar base backup (lab/manage.py takes it) and the WAL archive on this machine (method host-pitr), as the postgres
    OS user when the lab runs as root."""
    run = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
    return {
        "method": "host-pitr",
        "host": {"run": run, "base_backups": str(root / "drill" / "base-backups"),
                 "wal_archive": str(root / "wal-archive"), "scratch_dir": str(root / "drill" / "scratch"),
                 "bin_dir": str(Path(pg_bin("pg_ctl")).parent), "command_timeout": "60s"},
        **LAB_DRILL_CHECKS,
    }


def lab_maintenance(receiver: str) -> dict:
    """A maintenance window open whenever the lab runs (it opened an hour ago and lasts 23h59m, every day), the
    bloated table picked by `auto` (then rebuilt online by pg_repack), an on-demand backup (the ARM emulator
    takes a real base backup), a status page on the receiver."""
    opened = datetime.now(timezone.utc) - timedelta(hours=1)
    return {
        "window": {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": f"{opened:%H:%M}",
                   "end": f"{opened - timedelta(minutes=1):%H:%M}", "timezone": "UTC"},
        "cutoff": "10m",
        "on_cutoff": "finish",
        "tasks": [
            {"kind": "vacuum-analyze", "tables": "auto", "auto": {"min_dead_tuples": 1000, "dead_ratio": 0.2}},
            {"kind": "analyze", "tables": ["public.lab_orders"]},
            {"kind": "reindex", "tables": [f"public.{BLOAT_TABLE}"]},
            {"kind": "repack", "tables": [f"public.{BLOAT_TABLE}"]},  # pg_repack: the free space given back online
            {"kind": "sql", "name": "purge negative totals", "sql": "DELETE FROM lab_orders WHERE total < 0"},
        ],
        "guards": {"lock_timeout": "2s", "lock_retries": 1, "statement_timeout": "10m", "max_replication_lag": "16MB",
                   "lag_wait": "60s", "transaction_wait": "5s"},
        "backup": {"take": True, "verify": True},
        "status_page": {"api_url": f"{receiver}/statuspage/v1", "page_id": "lab",
                        "api_key": {"env": STATUSPAGE_KEY_ENV}},
        "maintenance_mode": True,
        "heartbeat_timeout": "10s",
    }
