"""A local Azure Resource Manager emulator for the lab: the real azure-mgmt SDK clients talk to it over HTTPS.

What it serves (the shapes of the ARM REST API; any api-version of the form YYYY-MM-DD[-preview] is accepted,
the installed SDKs send 2026-10-01 for PostgreSQL and 2026-09-01 for Traffic Manager):

  Microsoft.DBforPostgreSQL/flexibleServers
    GET    .../flexibleServers                       list (resource group)
    GET    .../flexibleServers/{server}              properties.state, replicationRole, replica{role,replicationState},
                                                     backup.earliestRestoreDate (servers with backups, below)
    PUT    .../flexibleServers/{server}              202 long-running operation creating a server; createMode
                                                     PointInTimeRestore (sourceServerResourceId, pointInTimeUTC):
                                                     REALLY restores a new lab cluster from the source's base
                                                     backup and WAL archive to that time (lab.postgres
                                                     restore_to_time); Replica (sourceServerResourceId): makes the
                                                     server a streaming replica of the source: a server that maps
                                                     to a lab cluster, even one just deleted (the old, diverged
                                                     primary of a failback), is rebuilt on its own port
                                                     (lab.postgres.rebuild_replica: pg_rewind, else a fresh base
                                                     backup); otherwise a new replica cluster is created.
                                                     Repeating the same create is idempotent (202, the running or a
                                                     no-op operation).
    DELETE .../flexibleServers/{server}              202 long-running operation (204 when there is no such server,
                                                     as ARM answers): a server the emulator created loses its
                                                     cluster (lab.postgres.drop_cluster); a configured server's
                                                     cluster is stopped and kept for a Replica re-create
    PATCH  .../flexibleServers/{server}              202 long-running operation; with
                                                     properties.replica {promoteMode Standalone|Switchover,
                                                     promoteOption Planned|Forced} it REALLY promotes the lab
                                                     cluster mapped to the server (pg_promote over SQL)
    GET    .../flexibleServers/{server}/replicas
    GET    .../flexibleServers/{server}/configurations[/{name}]   read from the cluster's pg_settings
    PUT|PATCH .../configurations/{name}              202 long-running operation: ALTER SYSTEM + pg_reload_conf
                                                     on the mapped cluster (how Azure fences writes:
                                                     default_transaction_read_only, no superuser needed)
    GET    /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/azureAsyncOperation/{id}
    GET    /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/operationResults/{id}

  Microsoft.Network/trafficManagerProfiles
    GET    .../trafficmanagerprofiles[/{profile}]    endpoints with endpointMonitorStatus computed the way
                                                     Traffic Manager does: Disabled when disabled,
                                                     CheckingEndpoint for a while after enabling, then Online
                                                     (Degraded when the emulator is told it is unhealthy),
                                                     Inactive when the profile is disabled
    GET|PATCH|PUT .../trafficmanagerprofiles/{profile}/{AzureEndpoints|ExternalEndpoints}/{endpoint}
                                                     endpointStatus, priority (1..1000, unique in the profile),
                                                     weight, target

Errors have ARM's shape {"error": {"code", "message"}}: 401 without a bearer token, 404 ResourceNotFound /
ResourceGroupNotFound / SubscriptionNotFound, 400 for bad bodies, 409 AnotherOperationInProgress.

Long-running operations follow the ARM protocol the SDK's ARMPolling expects: 202 with Azure-AsyncOperation
and Location headers, an operation resource going InProgress -> Succeeded | Failed, then the SDK's final GET
of the resource. They last at least `lro_seconds` (slow operations for tests).

The admin API (no token needed; loopback lab only) under /_emulator/:
    GET    /_emulator/health
    GET    /_emulator/state                          servers, profiles, operations, settings
    GET    /_emulator/requests                       the request log (method, path, status, fault), the last 5000
    GET    /_emulator/counts                         {"requests": {"<METHOD> <path>": n}, "random_faults": {...}}: every
                                                     API request since the start (side effects counted exactly once)
    POST   /_emulator/faults   {"match": "<regex on the path>", "status": 429|503|..., "count": N,
                                "retry_after": s, "method": "GET", "delay": s, "drop": false}
    GET|DELETE /_emulator/faults
    POST   /_emulator/settings {"lro_seconds": s, "tm_checking_seconds": s, "planned_sync_timeout": s,
                                "lro_retry_after": s|null, "fault_rate": 0.2}   (fault_rate: a fraction of API requests
                                answered 429 + Retry-After, 503 or a dropped connection; default $OPSFLOW_LAB_FAULTS)
    POST   /_emulator/trafficmanagerprofiles/{profile}/endpoints/{endpoint}  {"healthy": false}
    POST   /_emulator/flexibleServers/{server}       {"state": "Stopped"|null}  (override the reported state)

Config (JSON):

    {
      "subscription_id": "00000000-0000-0000-0000-000000000000",
      "tokens": ["lab-token"],              # optional: accepted bearer tokens (default: any bearer token)
      "settings": {"lro_seconds": 1, "tm_checking_seconds": 2},
      "flexible_servers": {
        "pg-westeurope":  {"resource_group": "rg-lab", "location": "westeurope",
                           "cluster": {<lab.postgres.Cluster.to_dict()>}, "role": "Primary"},
        "pg-northeurope": {"resource_group": "rg-lab", "location": "northeurope",
                           "cluster": {...}, "role": "AsyncReplica", "source": "pg-westeurope"}
      },
      "traffic_manager_profiles": {
        "tm-lab": {"resource_group": "rg-lab", "routing_method": "Priority",
                   "endpoints": {
                     "ep-westeurope":  {"region": "westeurope",  "target": "weu.app.example", "priority": 1},
                     "ep-northeurope": {"region": "northeurope", "target": "neu.app.example", "priority": 2,
                                        "status": "Disabled", "type": "externalEndpoints"}}}
      }
    }

A server maps to a lab cluster ("cluster": Cluster.to_dict()) or to any PostgreSQL ("dsn": "host=... user=...").
Roles, sources, configuration overrides, endpoint states and the servers created through the API (scratch
restores, replicas) live in memory and are saved to a state file (default: next to the config file,
<config>.state.json) on every change, so a restarted emulator keeps them. created_clusters(state_file) names
the clusters the emulator created, for a lab teardown.

Backups (point-in-time restore). A server whose lab cluster archives WAL (init_primary(archive_dir=...)) has
backups (a read replica has none until it is promoted); nothing needs configuring, everything is derived from
the cluster (lab.postgres.archive_dir_of, cluster_root). An optional per-server "backups" object overrides the derivation ("backups": false: none):

    "backups": {"archive_dir": "<labdir>/wal-archive",      # where the cluster archives WAL
                "base_backup_dir": "<labdir>/pg",           # holds base-backups/ (lab.postgres.ensure_base_backup)
                "clusters_root": "<labdir>/pg",             # where restored / new replica clusters are created
                "retention_days": 7}                        # backup.backupRetentionDays

earliestRestoreDate is the end of the oldest base backup (not older than the retention). A restore first
makes everything committed on a running source primary restorable (lab.postgres.archive_now), as Azure's
continuous WAL archiving does, so any point up to now can be restored. A point in the future or before
earliestRestoreDate is refused at once (400 PointInTimeInFuture / PointInTimeBeforeEarliestRestoreDate); an
unknown source is 404 ResourceNotFound; a restore that fails later fails its operation and leaves the server
in state "Disabled" (a state of the API's enumeration: it will never become usable) until it is deleted.

Restored servers listen on PostgreSQL's port 5432 at a loopback address of their own (127.x.y.z, all of
127.0.0.0/8 is loopback on Linux), which is their fullyQualifiedDomainName: clients reach them the way they reach
Azure's servers, with no lab-only mapping.

Lab-only tags (computed on every read, never stored; informative only, opsflow's activities never read them):
    opsflow-lab-port            the mapped cluster's port
    opsflow-lab-latest-restore  the latest point in time a restore of this server can reach (ISO, UTC)
    opsflow-lab-rebuild         how the last Replica create rebuilt the server (pg_rewind | pg_basebackup | new)
    opsflow-lab-error           why the server's creation failed

Run it:  python -m lab.arm_emulator --config FILE --port N --ca-dir DIR
In-process: start_emulator(config, ca_dir, port=0) -> EmulatorHandle (.url, .ca_path, .stop(), .inject_fault()).
The test CA (trustme) is kept in ca_dir (ca.pem, ca.key) and reused across restarts; clients pass ca.pem as
`connection_verify` (the SDK refuses bearer tokens over plain HTTP, so there is no HTTP listener at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("opsflow.lab.arm_emulator")

DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
PG_NS = "Microsoft.DBforPostgreSQL"
PG_TYPE = f"{PG_NS}/flexibleServers"
TM_NS = "Microsoft.Network"
TM_TYPE = f"{TM_NS}/trafficManagerProfiles"
ENDPOINT_TYPES = {"azureendpoints": "azureEndpoints", "externalendpoints": "externalEndpoints", "nestedendpoints": "nestedEndpoints"}
ROLES = {"primary": "Primary", "asyncreplica": "AsyncReplica", "geoasyncreplica": "GeoAsyncReplica", "none": "None"}
REPLICA_ROLES = ("AsyncReplica", "GeoAsyncReplica")
DEFAULT_SETTINGS: dict[str, Any] = {
    "lro_seconds": 1.0,  # minimum duration of a long-running operation
    "tm_checking_seconds": 2.0,  # how long an endpoint stays CheckingEndpoint after it is enabled
    "planned_sync_timeout": 60.0,  # Planned promotion: how long to wait for the replica to catch up
    "promote_timeout": 60,  # pg_promote(wait_seconds)
    "lro_retry_after": None,  # Retry-After (seconds) on operation status answers; None: let the client pick
    "fault_rate": None,  # fraction of API requests answered 429/503/dropped at random (lab.faults); None: $OPSFLOW_LAB_FAULTS
}
AZURE_PG_PORT = 5432  # every flexible server listens there, at its FQDN
LAB_TAG_PREFIX = "opsflow-lab-"
TAG_PORT = "opsflow-lab-port"
TAG_LATEST_RESTORE = "opsflow-lab-latest-restore"
TAG_REBUILD = "opsflow-lab-rebuild"
TAG_ERROR = "opsflow-lab-error"
BACKUP_KEYS = ("archive_dir", "base_backup_dir", "clusters_root", "retention_days")
# Azure's rule for flexible server names (they become DNS names).
_SERVER_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_ERROR_CODES = {
    400: "BadRequest",
    401: "AuthenticationFailed",
    403: "AuthorizationFailed",
    404: "ResourceNotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class ArmError(Exception):
    """An ARM error answer: HTTP status + {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _bad_request(message: str, code: str = "BadRequest") -> ArmError:
    return ArmError(400, code, message)


def _not_found_resource(rtype: str, name: str, rg: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{rtype}/{name}' under resource group '{rg}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def _dsn_of(server_cfg: dict) -> str:
    if server_cfg.get("dsn"):
        return server_cfg["dsn"]
    cluster = server_cfg.get("cluster")
    if not cluster:
        raise ValueError("a flexible server needs 'cluster' (lab.postgres.Cluster.to_dict()) or 'dsn'")
    from lab.postgres import Cluster

    return Cluster.from_dict(cluster).dsn


def _lifecycle_fields(origin: str) -> dict:
    """What a server's create/delete life adds to its record (all persisted)."""
    return {
        "origin": origin,  # "config": from the config file; "api": created through PUT (its cluster is ours)
        "deleted": False,  # a configured server deleted through the API (404 now; its cluster kept, stopped)
        "provisioning": False,  # a create operation runs
        "dropping": False,  # a delete operation runs
        "failed": None,  # {"code", "message"}: the create failed
        "create": None,  # how it was created: {"mode", "source", "point"}
        "rebuild": None,  # the last Replica create: {"method", "seconds", "fallback_reason"}
        "on_demand_backups": {},  # name -> {"name", "completedTime", "path"}: Backups - Create (kept after a delete)
    }


def _backups_config(name: str, b: Any) -> dict | None | bool:
    """The optional "backups" object of a server: None = derive from its cluster, False = no backups."""
    if b is None or b is True:
        return None
    if b is False:
        return False
    if not isinstance(b, dict):
        raise ValueError(f"flexible server {name}: 'backups' must be an object ({', '.join(BACKUP_KEYS)}) or false")
    unknown = set(b) - set(BACKUP_KEYS)
    if unknown:
        raise ValueError(f"flexible server {name}: unknown backups keys {', '.join(sorted(unknown))} (known: {', '.join(BACKUP_KEYS)})")
    out: dict[str, Any] = {k: (str(b[k]) if b.get(k) is not None else None) for k in BACKUP_KEYS if k != "retention_days"}
    out["retention_days"] = int(b.get("retention_days", 7))
    return out


def _user_tags(tags: dict) -> dict:
    """Tags as stored: the lab's computed tags (opsflow-lab-*) are never stored, even when a client writes back
    what it read."""
    return {k: v for k, v in tags.items() if not k.lower().startswith(LAB_TAG_PREFIX)}


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("not a date-time string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Azure sends up to 7 fractional digits; Python takes 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    t = datetime.fromisoformat(text)
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _first_line(e: BaseException | str, limit: int = 2000) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _pg_connect(dsn: str, timeout: int = 3):
    import psycopg

    return psycopg.connect(dsn, connect_timeout=max(2, int(timeout)), autocommit=True, application_name="arm-emulator")


def _lsn(text: str | None) -> int:
    if not text:
        return 0
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


# ---------------------------------------------------------------------------------------------------------------
# the emulated world
# ---------------------------------------------------------------------------------------------------------------


# What the state file keeps of a server: what changes (every server), and what a server created through the
# API was created with (its record is rebuilt from the state file after a restart).
_MUTABLE_FIELDS = ("role", "source", "configurations", "tags", "state_override", "deleted", "provisioning", "dropping",
                   "failed", "create", "rebuild", "on_demand_backups")
_FIXED_FIELDS = ("origin", "name", "resource_group", "location", "dsn", "version", "sku", "fqdn", "administrator_login",
                 "created", "backups")


class World:
    """All emulated resources, their state, faults and operations. Thread-safe (one lock)."""

    def __init__(self, config: dict, state_path: Path | None = None):
        self.lock = threading.RLock()
        self.subscription = str(config.get("subscription_id") or DEFAULT_SUBSCRIPTION)
        self.tokens = set(config.get("tokens") or [])
        unknown = set(config.get("settings", {})) - set(DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"unknown emulator settings: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_SETTINGS)})")
        self.settings: dict[str, Any] = {**DEFAULT_SETTINGS, **config.get("settings", {})}
        self.state_path = Path(state_path) if state_path else None
        self.servers: dict[str, dict] = {}
        self.profiles: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.faults: list[dict] = []
        from lab.faults import RandomFaults, rate_from_env

        self._env_fault_rate = rate_from_env()
        self.random_faults = RandomFaults(self._env_fault_rate)
        self.request_log: deque[dict] = deque(maxlen=5000)
        self.request_counts: dict[str, int] = {}  # "GET /subscriptions/.../flexibleServers/x": API requests since the start
        self._probe_cache: dict[str, tuple[float, dict]] = {}
        self.resource_groups: set[str] = {rg.lower() for rg in config.get("resource_groups", [])}
        self.vault_secrets: dict[str, str] = dict(config.get("key_vault_secrets") or {})

        for name, s in (config.get("flexible_servers") or {}).items():
            role = ROLES.get(str(s.get("role", "Primary")).lower())
            if role is None:
                raise ValueError(f"flexible server {name}: role must be one of {', '.join(ROLES.values())}")
            if role in REPLICA_ROLES and not s.get("source"):
                raise ValueError(f"flexible server {name}: a replica needs 'source' (the server it replicates from)")
            rg = s.get("resource_group") or "rg-lab"
            self.resource_groups.add(rg.lower())
            self.servers[name.lower()] = {
                "name": name,
                "resource_group": rg,
                "location": s.get("location", "westeurope"),
                "dsn": _dsn_of(s),
                "role": role,
                "source": s.get("source"),
                "version": str(s["version"]) if s.get("version") else None,
                "sku": s.get("sku") or {"name": "Standard_D2ds_v5", "tier": "GeneralPurpose"},
                "fqdn": s.get("fqdn") or "127.0.0.1",
                "administrator_login": s.get("administrator_login", "postgres"),
                "tags": dict(s.get("tags") or {}),
                "configurations": {},  # name -> value set through ARM
                "state_override": None,
                "busy_op": None,
                "created": _now_iso(),
                "_cluster": s.get("cluster"),  # lab.postgres.Cluster dict (switchovers stop/start it)
                **_lifecycle_fields("config"),
                "backups": _backups_config(name, s.get("backups")),
            }
        for name, srv in self.servers.items():
            if srv["source"] and srv["source"].lower() not in self.servers:
                raise ValueError(f"flexible server {srv['name']}: source {srv['source']!r} is not a configured server")
        for name, p in (config.get("traffic_manager_profiles") or {}).items():
            rg = p.get("resource_group") or "rg-lab"
            self.resource_groups.add(rg.lower())
            endpoints = {}
            for ep_name, e in (p.get("endpoints") or {}).items():
                etype = ENDPOINT_TYPES.get(str(e.get("type", "externalEndpoints")).lower())
                if etype is None:
                    raise ValueError(f"profile {name} endpoint {ep_name}: type must be azureEndpoints or externalEndpoints")
                status = str(e.get("status", "Enabled")).capitalize()
                if status not in ("Enabled", "Disabled"):
                    raise ValueError(f"profile {name} endpoint {ep_name}: status must be Enabled or Disabled")
                endpoints[ep_name.lower()] = {
                    "name": ep_name,
                    "type": etype,
                    "location": e.get("region") or e.get("location"),
                    "target": e.get("target") or f"{ep_name}.lab.invalid",
                    "target_resource_id": e.get("target_resource_id"),
                    "priority": e.get("priority"),
                    "weight": e.get("weight", 1),
                    "status": status,
                    "healthy": bool(e.get("healthy", True)),
                    "enabled_at": 0.0,  # long ago: an endpoint enabled in the config is Online at start
                }
            prios = [e["priority"] for e in endpoints.values() if e["priority"] is not None]
            if len(prios) != len(set(prios)):
                raise ValueError(f"profile {name}: endpoint priorities must be unique")
            self.profiles[name.lower()] = {
                "name": name,
                "resource_group": rg,
                "routing_method": p.get("routing_method", "Priority"),
                "status": p.get("status", "Enabled"),
                "relative_name": p.get("relative_name", name.lower()),
                "ttl": int(p.get("ttl", 30)),
                "monitor": p.get("monitor")
                or {"protocol": "HTTPS", "port": 443, "path": "/healthz", "intervalInSeconds": 30, "timeoutInSeconds": 10, "toleratedNumberOfFailures": 3},
                "endpoints": endpoints,
            }
        self._load_state()

    # -- persistence -----------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if not self.state_path or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable emulator state %s: %s", self.state_path, e)
            return
        for key, s in (data.get("servers") or {}).items():
            srv = self.servers.get(key)
            if srv is None:
                if s.get("origin") != "api":
                    continue  # a configured server no longer in the config
                try:
                    srv = self._server_from_state(s)
                except (KeyError, TypeError, ValueError) as e:
                    log.warning("ignoring unreadable server %s in the emulator state: %s", key, e)
                    continue
                self.servers[key] = srv
            for f in _MUTABLE_FIELDS:
                if f in s:
                    srv[f] = s[f]
            if srv.get("origin") == "config" and s.get("cluster"):
                srv["_cluster"] = s["cluster"]  # a Replica re-create may have rebuilt it (same port)
                srv["dsn"] = s.get("dsn") or srv["dsn"]
            if srv["provisioning"]:
                # The emulator stopped while the server was being created: its cluster may be half made.
                srv["provisioning"] = False
                srv["failed"] = {"code": "InternalServerError", "message": "the ARM emulator restarted while the server was being created; delete it and create it again"}
            srv["dropping"] = False
        for key, p in (data.get("profiles") or {}).items():
            prof = self.profiles.get(key)
            if prof is None:
                continue
            prof["status"] = p.get("status", prof["status"])
            for ek, e in (p.get("endpoints") or {}).items():
                ep = prof["endpoints"].get(ek)
                if ep is None:
                    continue
                for f in ("status", "priority", "weight", "target", "healthy", "enabled_at", "location"):
                    if f in e:
                        ep[f] = e[f]
        for op_id, op in (data.get("operations") or {}).items():
            if op.get("status") == "InProgress":
                # The emulator stopped while this ran: its outcome is unknown to ARM.
                op.update(status="Failed", endTime=_now_iso(), error={"code": "InternalServerError", "message": "the ARM emulator restarted while the operation ran; look at the resource"})
            self.operations[op_id] = op
        log.info("loaded emulator state from %s", self.state_path)

    def persist(self) -> None:
        if not self.state_path:
            return
        with self.lock:
            data = {
                "saved_at": _now_iso(),
                "servers": {k: self._server_state(s) for k, s in self.servers.items()},
                "profiles": {
                    k: {
                        "status": p["status"],
                        "endpoints": {
                            ek: {f: e[f] for f in ("status", "priority", "weight", "target", "healthy", "enabled_at", "location")}
                            for ek, e in p["endpoints"].items()
                        },
                    }
                    for k, p in self.profiles.items()
                },
                "operations": {k: {f: v for f, v in op.items() if not f.startswith("_")} for k, op in list(self.operations.items())[-200:]},
            }
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.state_path)

    @staticmethod
    def _server_state(srv: dict) -> dict:
        data = {f: srv[f] for f in _MUTABLE_FIELDS}
        data["cluster"] = srv.get("_cluster")
        for f in _FIXED_FIELDS:
            data[f] = srv[f]
        return data

    @staticmethod
    def _server_from_state(s: dict) -> dict:
        srv = {f: s[f] for f in _FIXED_FIELDS}
        srv.update({f: s.get(f) for f in _MUTABLE_FIELDS})
        srv["configurations"] = dict(srv.get("configurations") or {})
        srv["tags"] = dict(srv.get("tags") or {})
        srv["on_demand_backups"] = dict(srv.get("on_demand_backups") or {})
        srv["_cluster"] = s.get("cluster")
        srv["busy_op"] = None
        return srv

    # -- auth, faults, log -----------------------------------------------------------------------------------
    def key_vault(self, method: str, path: str, auth: str | None, origin: str) -> tuple[int, Any, dict]:
        """Key Vault's data plane, get-secret only (GET /secrets/{name}[/{version}]), served on the emulator's
        own address. Like the real vault it first answers 401 with a bearer challenge naming the resource
        the token is for; the SDK then asks its credential for that scope and retries."""
        if not auth or not auth.lower().startswith("bearer ") or not auth[7:].strip():
            challenge = f'Bearer authorization="https://login.microsoftonline.com/common", resource="{origin}"'
            return 401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}}, {"WWW-Authenticate": challenge}
        if self.tokens and auth[7:].strip() not in self.tokens:
            return 401, {"error": {"code": "Unauthorized", "message": "AKV10032: Invalid issuer."}}, {}
        segs = [unquote(x) for x in path.strip("/").split("/")]
        if method != "GET" or len(segs) not in (2, 3):
            return 405, {"error": {"code": "BadParameter", "message": "the emulated vault serves GET /secrets/{name}[/{version}] only"}}, {}
        with self.lock:
            value = self.vault_secrets.get(segs[1])
        if value is None:
            msg = f"A secret with (name/id) {segs[1]} was not found in this key vault."
            return 404, {"error": {"code": "SecretNotFound", "message": msg}}, {}
        version = segs[2] if len(segs) == 3 and segs[2] else "0" * 32
        stamp = int(time.time())
        return 200, {"value": value, "id": f"{origin}/secrets/{segs[1]}/{version}",
                     "attributes": {"enabled": True, "created": stamp, "updated": stamp, "recoveryLevel": "Recoverable+Purgeable"}}, {}

    def check_auth(self, header: str | None) -> None:
        challenge = 'Bearer authorization_uri="https://login.microsoftonline.com/common", error="invalid_token", error_description="{}"'
        if not header:
            msg = "Authentication failed. The 'Authorization' header is missing."
            raise ArmError(401, "AuthenticationFailed", msg, {"WWW-Authenticate": challenge.format(msg)})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            msg = "Authentication failed. The 'Authorization' header is provided in an invalid format."
            raise ArmError(401, "AuthenticationFailed", msg, {"WWW-Authenticate": challenge.format(msg)})
        if self.tokens and token.strip() not in self.tokens:
            msg = "The access token is invalid."
            raise ArmError(401, "InvalidAuthenticationToken", msg, {"WWW-Authenticate": challenge.format(msg)})

    def add_fault(self, spec: dict) -> dict:
        if not isinstance(spec, dict) or not isinstance(spec.get("match"), str):
            raise _bad_request("a fault needs 'match': a regular expression on the request path")
        try:
            rx = re.compile(spec["match"], re.IGNORECASE)
        except re.error as e:
            raise _bad_request(f"fault 'match' is not a regular expression: {e}") from None
        status = spec.get("status")
        drop = bool(spec.get("drop", False))
        delay = float(spec.get("delay") or 0)
        if status is None and not drop and not delay:
            raise _bad_request("a fault needs 'status' (e.g. 429, 503), 'drop': true or 'delay': seconds")
        if status is not None and not (isinstance(status, int) and 400 <= status <= 599):
            raise _bad_request("fault 'status' must be an HTTP error status (400..599)")
        fault = {
            "id": uuid.uuid4().hex[:12],
            "match": spec["match"],
            "method": (spec.get("method") or "").upper() or None,
            "status": status,
            "code": spec.get("code") or (_ERROR_CODES.get(status, "EmulatedFault") if status else None),
            "count": int(spec.get("count", 1)),
            "retry_after": spec.get("retry_after"),
            "delay": delay,
            "drop": drop,
            "hits": 0,
            "_rx": rx,
        }
        with self.lock:
            self.faults.append(fault)
        return self._public_fault(fault)

    @staticmethod
    def _public_fault(f: dict) -> dict:
        return {k: v for k, v in f.items() if not k.startswith("_")}

    def take_fault(self, method: str, path: str) -> dict | None:
        rate = self.settings.get("fault_rate")
        self.random_faults.rate = self._env_fault_rate if rate is None else float(rate)
        kind = self.random_faults.pick()
        if kind is not None:
            return {"id": f"random-{kind}", "delay": 0, "drop": kind == "drop", "retry_after": 1 if kind == "throttle" else None,
                    "status": {"throttle": 429, "unavailable": 503}.get(kind), "code": {"throttle": "TooManyRequests",
                                                                                      "unavailable": "ServiceUnavailable"}.get(kind)}
        with self.lock:
            for f in self.faults:
                if f["count"] <= 0:
                    continue
                if f["method"] and f["method"] != method:
                    continue
                if f["_rx"].search(path):
                    f["count"] -= 1
                    f["hits"] += 1
                    return dict(f)
        return None

    def log_request(self, method: str, path: str, status: int, fault: bool = False) -> None:
        self.request_log.append({"t": time.time(), "method": method, "path": path, "status": status, "fault": fault})
        if not path.startswith("/_emulator"):
            key = f"{method} {path.split('?')[0]}"
            with self.lock:
                self.request_counts[key] = self.request_counts.get(key, 0) + 1

    # -- SQL against the mapped clusters ---------------------------------------------------------------------
    def probe(self, srv: dict, max_age: float = 0.5) -> dict:
        """What the cluster says about itself (cached briefly); {'reachable': False, ...} when it is down."""
        key = srv["name"].lower()
        cached = self._probe_cache.get(key)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        info: dict[str, Any]
        try:
            with _pg_connect(srv["dsn"], timeout=2) as conn:
                row = conn.execute(
                    "select pg_is_in_recovery(), current_setting('server_version'), "
                    "(select status from pg_stat_wal_receiver), "
                    "case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text else pg_current_wal_lsn()::text end"
                ).fetchone()
            info = {"reachable": True, "in_recovery": row[0], "version": row[1], "receiver": row[2], "lsn": row[3]}
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable" here
            info = {"reachable": False, "error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}
        self._probe_cache[key] = (time.monotonic(), info)
        return info

    # -- flexible servers: bodies ----------------------------------------------------------------------------
    def server_id(self, srv: dict) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{srv['resource_group']}/providers/{PG_TYPE}/{srv['name']}"

    def server_state(self, srv: dict) -> str:
        with self.lock:
            if srv["state_override"]:
                return srv["state_override"]
            if srv["provisioning"]:
                return "Provisioning"
            if srv["dropping"]:
                return "Dropping"
            if srv["failed"]:
                # The API has no provisioning state on servers; a server that will never become usable shows a
                # state of the real enumeration ("Disabled"), and why is in the emulator's state (admin API).
                return "Disabled"
            return "Updating" if srv["busy_op"] is not None else "Ready"

    def server_body(self, srv: dict) -> dict:
        with self.lock:
            role, source = srv["role"], srv["source"]
            busy = srv["busy_op"] is not None
            settled = not (srv["provisioning"] or srv["dropping"] or srv["failed"])
        state = self.server_state(srv)
        # A server being created (or whose creation failed) has no cluster to ask yet.
        probe = self.probe(srv) if settled else {"reachable": False}
        version = srv["version"]
        minor = None
        if probe.get("version"):
            parts = probe["version"].split()[0].split(".")
            version, minor = version or parts[0], parts[1] if len(parts) > 1 else None
        replica: dict[str, Any] = {"role": role, "capacity": 0 if role in REPLICA_ROLES else 5}
        props: dict[str, Any] = {
            "administratorLogin": srv["administrator_login"],
            "version": version or "15",
            "minorVersion": minor,
            "state": state,
            "fullyQualifiedDomainName": srv["fqdn"],
            "storage": {"storageSizeGB": 128, "autoGrow": "Disabled", "tier": "P10", "iops": 500, "type": ""},
            "authConfig": {"activeDirectoryAuth": "Disabled", "passwordAuth": "Enabled"},
            "dataEncryption": {"type": "SystemManaged"},
            "backup": self._backup_body(srv, settled),
            "network": {"publicNetworkAccess": "Enabled"},
            "highAvailability": {"mode": "Disabled", "state": "NotEnabled"},
            "maintenanceWindow": {"customWindow": "Disabled", "dayOfWeek": 0, "startHour": 0, "startMinute": 0},
            "availabilityZone": "1",
            "replicationRole": role,
            "replicaCapacity": replica["capacity"],
            "replica": replica,
        }
        if minor is None:
            del props["minorVersion"]
        if role in REPLICA_ROLES:
            if srv["provisioning"]:
                rstate = "Provisioning"
            elif busy:
                rstate = "Updating"
            elif not probe.get("reachable") or not probe.get("in_recovery"):
                rstate = "Broken"
            elif probe.get("receiver") == "streaming":
                rstate = "Active"
            else:
                rstate = "Reconfiguring" if probe.get("receiver") else "Broken"
            replica["replicationState"] = rstate
            src = self.servers.get((source or "").lower())
            if src is not None:
                props["sourceServerResourceId"] = self.server_id(src)
        return {
            "sku": dict(srv["sku"]),
            "systemData": {"createdAt": srv["created"]},
            "properties": props,
            "location": srv["location"],
            "tags": {**srv["tags"], **self._lab_tags(srv, settled, probe)},
            "id": self.server_id(srv),
            "name": srv["name"],
            "type": PG_TYPE,
        }

    # -- flexible servers: backups -------------------------------------------------------------------------
    def backup_paths(self, srv: dict) -> dict | None:
        """{archive_dir, base_backup_dir, clusters_root (Paths), retention_days} of a server with backups, else None."""
        cfg = srv.get("backups")
        if cfg is False or srv["role"] in REPLICA_ROLES:
            # A read replica offers no restore of its own here (once promoted it does): the emulator's choice,
            # which also keeps the replica's frequent status reads free of archive scans.
            return None
        cfg = cfg or {}
        cluster = srv.get("_cluster")
        archive, base, root = cfg.get("archive_dir"), cfg.get("base_backup_dir"), cfg.get("clusters_root")
        if cluster and not (archive and base and root):
            from lab.postgres import Cluster, archive_dir_of, cluster_root

            c = Cluster.from_dict(cluster)
            archive = archive or archive_dir_of(c)
            base = base or cluster_root(c)
            root = root or cluster_root(c)
        if not archive or not base:
            return None
        return {"archive_dir": Path(archive), "base_backup_dir": Path(base), "clusters_root": Path(root or base),
                "retention_days": int(cfg.get("retention_days") or 7)}

    def earliest_restore(self, srv: dict) -> datetime | None:
        paths = self.backup_paths(srv)
        if paths is None:
            return None
        from lab.postgres import PostgresLabError, earliest_restorable_time

        try:
            earliest = earliest_restorable_time(paths["base_backup_dir"])
        except (PostgresLabError, OSError) as e:
            log.warning("server %s: cannot read its base backups: %s", srv["name"], _first_line(e))
            return None
        if earliest is None:
            return None
        retention = datetime.now(timezone.utc).timestamp() - paths["retention_days"] * 86400
        return max(earliest, datetime.fromtimestamp(retention, timezone.utc))

    def latest_restore(self, srv: dict, probe: dict | None = None) -> datetime | None:
        """Now for a running source primary (a restore archives its WAL first); else the newest archived commit."""
        paths = self.backup_paths(srv)
        if paths is None:
            return None
        probe = probe if probe is not None else self.probe(srv)
        if probe.get("reachable") and probe.get("in_recovery") is False:
            return datetime.now(timezone.utc)
        key = f"latest:{paths['archive_dir']}"
        cached = self._probe_cache.get(key)
        if cached and time.monotonic() - cached[0] < 10:
            return cached[1]
        from lab.postgres import PostgresLabError, last_archived_commit_time

        try:
            latest = last_archived_commit_time(paths["archive_dir"])
        except (PostgresLabError, OSError, subprocess.SubprocessError):
            latest = None
        self._probe_cache[key] = (time.monotonic(), latest)
        return latest

    def _backup_body(self, srv: dict, settled: bool) -> dict:
        paths = self.backup_paths(srv) if settled else None
        body: dict[str, Any] = {"backupRetentionDays": paths["retention_days"] if paths else 7, "geoRedundantBackup": "Disabled"}
        earliest = self.earliest_restore(srv) if paths else None
        if earliest is not None:
            body["earliestRestoreDate"] = _iso(earliest)
        return body

    def _lab_tags(self, srv: dict, settled: bool, probe: dict) -> dict:
        tags: dict[str, str] = {}
        cluster = srv.get("_cluster")
        if cluster and not srv.get("failed"):
            tags[TAG_PORT] = str(cluster["port"])
        if settled and self.backup_paths(srv) is not None:
            latest = self.latest_restore(srv, probe)
            if latest is not None:
                tags[TAG_LATEST_RESTORE] = _iso(latest)
        rebuild = srv.get("rebuild")
        if rebuild:
            text = rebuild["method"] + (f" (pg_rewind not used: {rebuild['fallback_reason']})" if rebuild.get("fallback_reason") else "")
            tags[TAG_REBUILD] = text[:256]  # Azure's limit on a tag value
        if srv.get("failed"):
            tags[TAG_ERROR] = f"{srv['failed']['code']}: {srv['failed']['message']}"[:256]
        return tags

    # -- flexible servers: configurations ------------------------------------------------------------------
    _SETTINGS_SQL = (
        "select name, setting, unit, boot_val, vartype, enumvals, min_val, max_val, context, short_desc, pending_restart "
        "from pg_settings"
    )

    def _config_body(self, srv: dict, row: tuple) -> dict:
        name, setting, unit, boot_val, vartype, enumvals, min_val, max_val, context, desc, pending = row
        data_type = {"bool": "Boolean", "integer": "Integer", "real": "Numeric", "enum": "Enumeration", "string": "String"}.get(vartype, "String")
        if vartype == "bool":
            allowed = "on,off"
        elif vartype == "enum":
            allowed = ",".join(enumvals or [])
        elif vartype in ("integer", "real"):
            allowed = f"{min_val}-{max_val}"
        else:
            allowed = ".*"
        with self.lock:
            overridden = name in srv["configurations"]
        return {
            "properties": {
                "value": setting,
                "description": desc,
                "defaultValue": boot_val,
                "dataType": data_type,
                "allowedValues": allowed,
                "source": "user-override" if overridden else "system-default",
                "isDynamicConfig": context not in ("postmaster", "internal"),
                "isReadOnly": context == "internal",
                "isConfigPendingRestart": bool(pending),
                "unit": unit,
                "documentationLink": f"https://www.postgresql.org/docs/15/runtime-config.html#GUC-{name.upper().replace('_', '-')}",
            },
            "id": f"{self.server_id(srv)}/configurations/{name}",
            "name": name,
            "type": f"{PG_TYPE}/configurations",
        }

    def _settings_rows(self, srv: dict, name: str | None = None) -> list[tuple]:
        try:
            with _pg_connect(srv["dsn"]) as conn:
                if name is None:
                    return conn.execute(self._SETTINGS_SQL + " order by name").fetchall()
                return conn.execute(self._SETTINGS_SQL + " where name = %s", (name,)).fetchall()
        except Exception as e:  # noqa: BLE001
            import psycopg

            if isinstance(e, psycopg.OperationalError):
                raise ArmError(409, "ServerNotReady", f"Server '{srv['name']}' is not reachable: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
            raise

    def get_configuration(self, srv: dict, name: str) -> dict:
        rows = self._settings_rows(srv, name)
        if not rows:
            raise ArmError(404, "ResourceNotFound", f"The configuration '{name}' does not exist for server '{srv['name']}'.")
        return self._config_body(srv, rows[0])

    @staticmethod
    def _validate_setting(name: str, value: str, row: tuple) -> str:
        _, _, _, _, vartype, enumvals, min_val, max_val, context, _, _ = row
        if context == "internal":
            raise _bad_request(f"The configuration '{name}' is read-only.", "ConfigurationIsReadOnly")
        bad = _bad_request(f"The value '{value}' for configuration '{name}' is not valid.", "InvalidParameterValue")
        if vartype == "bool":
            v = value.strip().lower()
            if v in ("on", "true", "yes", "1"):
                return "on"
            if v in ("off", "false", "no", "0"):
                return "off"
            raise bad
        if vartype == "enum":
            if value.lower() not in [e.lower() for e in (enumvals or [])]:
                raise bad
            return value.lower()
        if vartype in ("integer", "real"):
            try:
                num = float(value)
            except ValueError:
                raise bad from None
            if vartype == "integer" and num != int(num):
                raise bad
            if (min_val is not None and num < float(min_val)) or (max_val is not None and num > float(max_val)):
                raise bad
            return str(int(num)) if vartype == "integer" else value
        return value

    def put_configuration(self, srv: dict, name: str, body: Any, base: str, api_version: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict):
            raise _bad_request("The request content was invalid and could not be deserialized: the body must be a JSON object.", "InvalidRequestContent")
        props = body.get("properties")
        if not isinstance(props, dict):
            raise _bad_request("The request content was invalid: 'properties' (an object with 'value' and 'source') is required.", "InvalidRequestContent")
        value, source = props.get("value"), props.get("source")
        if value is not None and not isinstance(value, str):
            raise _bad_request("The configuration value must be a string.", "InvalidRequestContent")
        reset = value is None or (isinstance(source, str) and source.lower() == "system-default" and value in (None, ""))
        if value is None and not reset:
            raise _bad_request("The configuration value is required.", "InvalidRequestContent")
        rows = self._settings_rows(srv, name)
        if not rows:
            raise ArmError(404, "ResourceNotFound", f"The configuration '{name}' does not exist for server '{srv['name']}'.")
        normalized = None if reset else self._validate_setting(name, value, rows[0])

        def work(op: dict) -> None:
            quoted_name = name  # validated against pg_settings: a real parameter name
            with _pg_connect(srv["dsn"]) as conn:
                if normalized is None:
                    conn.execute(f"alter system reset {quoted_name}")
                else:
                    from psycopg import sql

                    conn.execute(sql.SQL("alter system set {} = {}").format(sql.Identifier(quoted_name), sql.Literal(normalized)))
                conn.execute("select pg_reload_conf()")
            # pg_reload_conf only signals the postmaster: wait until new sessions see the value (a loaded machine
            # running several labs can take seconds).
            deadline = time.monotonic() + 30
            want = normalized if normalized is not None else rows[0][3]
            while True:
                with _pg_connect(srv["dsn"]) as conn:
                    row = conn.execute("select setting, context from pg_settings where name = %s", (name,)).fetchone()
                if row is None or row[1] == "postmaster" or want is None or str(row[0]).lower() == str(want).lower():
                    break
                if time.monotonic() > deadline:
                    raise ArmError(500, "InternalServerError", f"configuration '{name}' did not take effect after reload (value {row[0]!r})")
                time.sleep(0.05)
            with self.lock:
                if normalized is None:
                    srv["configurations"].pop(name, None)
                else:
                    srv["configurations"][name] = normalized

        path = f"{self.server_id(srv)}/configurations/{name}"
        return self.start_operation(srv, f"configuration {name}", work, path, base, api_version)

    # -- flexible servers: promotion -------------------------------------------------------------------------
    def patch_server(self, srv: dict, body: Any, base: str, api_version: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict):
            raise _bad_request("The request content was invalid and could not be deserialized: the body must be a JSON object.", "InvalidRequestContent")
        props = body.get("properties", {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise _bad_request("'properties' must be an object.", "InvalidRequestContent")
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
            raise _bad_request("'tags' must be an object of strings.", "InvalidRequestContent")
        replica = props.get("replica")
        mode = option = None
        if replica is not None:
            if not isinstance(replica, dict):
                raise _bad_request("'properties.replica' must be an object.", "InvalidRequestContent")
            if replica.get("promoteMode") is not None or replica.get("promoteOption") is not None:
                mode = str(replica.get("promoteMode") or "").lower()
                option = str(replica.get("promoteOption") or "planned").lower()
                if mode not in ("standalone", "switchover"):
                    raise _bad_request(f"The value '{replica.get('promoteMode')}' of promoteMode is invalid; use Standalone or Switchover.", "InvalidParameterValue")
                if option not in ("planned", "forced"):
                    raise _bad_request(f"The value '{replica.get('promoteOption')}' of promoteOption is invalid; use Planned or Forced.", "InvalidParameterValue")
        with self.lock:
            if mode is not None and srv["role"] not in REPLICA_ROLES:
                raise _bad_request(
                    f"Server '{srv['name']}' is not a read replica (replication role {srv['role']}); only a read replica can be promoted.",
                    "ReplicaPromotionNotAllowed",
                )
            source = self.servers.get((srv["source"] or "").lower()) if mode is not None else None

        def work(op: dict) -> None:
            if tags is not None:
                with self.lock:
                    srv["tags"] = _user_tags(tags)
            if mode is not None:
                self._promote(srv, source, mode, option, op)

        return self.start_operation(srv, f"promote {mode}/{option}" if mode else "update", work, self.server_id(srv), base, api_version)

    def _promote(self, srv: dict, source: dict | None, mode: str, option: str, op: dict) -> None:
        if option == "planned" or mode == "switchover":
            if source is None:
                raise ArmError(400, "PlannedPromotionNotPossible", f"Server '{srv['name']}' has no source server to synchronize with; use promoteOption Forced.")
            self._wait_synchronized(srv, source, op)
        if mode == "switchover":
            if option != "planned":
                raise ArmError(400, "SwitchoverNotSupported", "The emulator performs switchovers with promoteOption Planned only (a forced switchover would need pg_rewind).")
            self._switchover(srv, source)
            return
        self._pg_promote(srv)
        with self.lock:
            srv["role"] = "Primary"
            srv["source"] = None
            self._probe_cache.clear()

    def _pg_promote(self, srv: dict) -> None:
        try:
            with _pg_connect(srv["dsn"]) as conn:
                in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
                if in_recovery:
                    ok = conn.execute("select pg_promote(true, %s)", (int(self.settings["promote_timeout"]),)).fetchone()[0]
                    if not ok:
                        raise ArmError(500, "InternalServerError", f"Server '{srv['name']}': the promotion did not finish within {self.settings['promote_timeout']}s.")
        except ArmError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ArmError(500, "InternalServerError", f"Server '{srv['name']}': promotion failed: {str(e).strip()}") from None

    def _wait_synchronized(self, srv: dict, source: dict, op: dict) -> None:
        """Planned: wait until the replica has replayed everything its source has written."""
        deadline = time.monotonic() + float(self.settings["planned_sync_timeout"])
        last = ""
        while True:
            try:
                with _pg_connect(source["dsn"]) as conn:
                    src_lsn = _lsn(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])
            except Exception as e:  # noqa: BLE001
                raise ArmError(
                    400,
                    "PlannedPromotionNotPossible",
                    f"Planned promotion of '{srv['name']}' needs its source server '{source['name']}' to be reachable "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else e}); use promoteOption Forced.",
                ) from None
            try:
                with _pg_connect(srv["dsn"]) as conn:
                    replay = _lsn(conn.execute("select pg_last_wal_replay_lsn()::text").fetchone()[0])
            except Exception as e:  # noqa: BLE001
                raise ArmError(500, "InternalServerError", f"Server '{srv['name']}' is not reachable: {str(e).strip()}") from None
            if replay >= src_lsn:
                return
            last = f"{src_lsn - replay} bytes behind"
            op["percentComplete"] = 10
            if time.monotonic() > deadline:
                raise ArmError(
                    400,
                    "PlannedPromotionTimedOut",
                    f"Read replica '{srv['name']}' did not synchronize with '{source['name']}' within "
                    f"{self.settings['planned_sync_timeout']}s ({last}).",
                )
            time.sleep(0.1)

    def _switchover(self, srv: dict, source: dict) -> None:
        """Swap roles for real: stop the source cleanly (its last WAL reaches the replica), promote the replica,
        restart the old source as a standby of the new primary. Needs both to be lab clusters."""
        from lab.postgres import Cluster, _write_server_file  # the lab's own file helper (ownership, modes)

        cfg_src, cfg_dst = source.get("_cluster"), srv.get("_cluster")
        if not cfg_src or not cfg_dst:
            raise ArmError(400, "SwitchoverNotSupported", "The emulator can switch over lab clusters only (servers configured with 'cluster').")
        old, new = Cluster.from_dict(cfg_src), Cluster.from_dict(cfg_dst)
        with _pg_connect(source["dsn"]) as conn:
            conn.execute("checkpoint")
        old.stop("fast")
        # The shutdown checkpoint is streamed before the walsender exits; wait until it is replayed.
        time.sleep(0.5)
        self._pg_promote(srv)
        auto = old.datadir / "postgresql.auto.conf"
        kept = [ln for ln in auto.read_text().splitlines() if not ln.startswith(("primary_conninfo", "primary_slot_name"))]
        kept.append(f"primary_conninfo = 'host=127.0.0.1 port={new.port} user=postgres application_name={old.name}'")
        _write_server_file(auto, "\n".join(kept) + "\n")
        _write_server_file(old.datadir / "standby.signal", "")
        old.start(wait=True)
        with self.lock:
            srv["role"], srv["source"] = "Primary", None
            source["role"], source["source"] = "AsyncReplica", srv["name"]
            self._probe_cache.clear()

    # -- flexible servers: create (point-in-time restore, replica) and delete --------------------------------
    def _source_server(self, resource_id: Any) -> dict:
        if not isinstance(resource_id, str) or not resource_id.strip():
            raise _bad_request("'properties.sourceServerResourceId' is required with this createMode.", "InvalidParameterValue")
        segs = [unquote(x) for x in resource_id.strip().strip("/").split("/")]
        low = [x.lower() for x in segs]
        if len(segs) != 8 or low[0] != "subscriptions" or low[2] != "resourcegroups" or low[4] != "providers" \
                or low[5] != PG_NS.lower() or low[6] != "flexibleservers":
            raise _bad_request(f"sourceServerResourceId '{resource_id}' is not a flexible server resource id "
                               f"(/subscriptions/{{id}}/resourceGroups/{{group}}/providers/{PG_TYPE}/{{name}}).", "InvalidResourceId")
        if segs[1].lower() != self.subscription.lower():
            raise ArmError(404, "ResourceNotFound", f"The source server '{resource_id}' was not found: the subscription '{segs[1]}' is unknown.")
        with self.lock:
            srv = self.servers.get(segs[7].lower())
            if srv is None or srv["deleted"] or srv["resource_group"].lower() != segs[3].lower():
                raise _not_found_resource(PG_TYPE, segs[7], segs[3])
            return srv

    def _new_server(self, name: str, rg: str, location: str, source: dict, cluster: dict, tags: dict, request: dict, role: str) -> dict:
        from lab.postgres import Cluster

        return {
            "name": name,
            "resource_group": rg,
            "location": location,
            "dsn": Cluster.from_dict(cluster).dsn,
            "role": role,
            "source": source["name"] if role in REPLICA_ROLES else None,
            "version": source["version"],
            "sku": dict(source["sku"]),
            "fqdn": cluster.get("host") or "127.0.0.1",
            "administrator_login": source["administrator_login"],
            "tags": tags,
            "configurations": {},
            "state_override": None,
            "busy_op": None,
            "created": _now_iso(),
            "_cluster": cluster,
            **_lifecycle_fields("api"),
            "backups": None,  # derived from its cluster: a restored server does not archive, a replica might
            "create": request,
        }

    @staticmethod
    def _cluster_dict(root: Path, name: str, own_address: bool = False) -> dict:
        """Where lab.postgres puts cluster `name` under `root` (root/name/data), on a port chosen now: known before
        the cluster exists, so that a create cut short can still be cleaned up. own_address: a loopback address of
        its own with PostgreSQL's port 5432, given out as the server's fullyQualifiedDomainName — as in Azure,
        where every server listens on 5432 at its FQDN, so clients need no lab-only mapping."""
        from lab.ports import free_port
        from lab.postgres import free_loopback_host

        home = Path(root).resolve() / name
        if own_address:
            return {"name": name, "datadir": str(home / "data"), "port": AZURE_PG_PORT, "host": free_loopback_host(AZURE_PG_PORT),
                    "logfile": str(home / "postgres.log")}
        return {"name": name, "datadir": str(home / "data"), "port": free_port(), "logfile": str(home / "postgres.log")}

    def put_server(self, rg: str, name: str, body: Any, base: str, api_version: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict):
            raise _bad_request("The request content was invalid and could not be deserialized: the body must be a JSON object.", "InvalidRequestContent")
        props = body.get("properties") or {}
        if not isinstance(props, dict):
            raise _bad_request("'properties' must be an object.", "InvalidRequestContent")
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
            raise _bad_request("'tags' must be an object of strings.", "InvalidRequestContent")
        mode = str(props.get("createMode") or "").lower()
        with self.lock:
            existing = self.servers.get(name.lower())
            live = existing is not None and not existing["deleted"]
            if live and existing["resource_group"].lower() != rg.lower():
                raise ArmError(409, "ServerNameAlreadyExists",
                               f"The server name '{name}' is already in use (resource group '{existing['resource_group']}'); server names are globally unique.")
        if mode in ("", "default", "create", "update"):
            raise _bad_request("The ARM emulator creates flexible servers with createMode PointInTimeRestore or Replica only (copies of its "
                               "lab servers; new empty servers map to lab clusters in its config) and updates them with PATCH.", "OperationNotSupported")
        if mode not in ("pointintimerestore", "replica"):
            raise _bad_request(f"The emulator does not support createMode '{props.get('createMode')}' (supported: PointInTimeRestore, Replica).", "OperationNotSupported")
        if existing is None and not _SERVER_NAME.match(name):
            raise _bad_request(f"The server name '{name}' is invalid: 3 to 63 characters, lower-case letters, digits and hyphens, "
                               "not starting or ending with a hyphen.", "InvalidServerName")
        source = self._source_server(props.get("sourceServerResourceId"))
        if source is existing:
            raise _bad_request(f"Server '{name}' cannot be created from itself.", "InvalidParameterValue")
        location = body.get("location") or (existing["location"] if existing is not None else None)
        if not isinstance(location, str) or not location:
            raise _bad_request("'location' is required to create a server.", "LocationRequired")
        user_tags = _user_tags(tags or {})
        if mode == "pointintimerestore":
            return self._create_restore(rg, name, existing, live, source, props, location, user_tags, base, api_version)
        return self._create_replica(rg, name, existing, live, source, location, user_tags, base, api_version)

    def _repeat_create(self, srv: dict, base: str, api_version: str) -> tuple[int, Any, dict]:
        """The same create again on a server it made: idempotent, as ARM's PUT is (the running or a no-op operation)."""
        with self.lock:
            op_id = srv["busy_op"]
            if srv["failed"]:
                raise ArmError(409, "ServerNameAlreadyExists",
                               f"Server '{srv['name']}' exists and its creation failed ({srv['failed']['code']}: {srv['failed']['message']}); delete it first.")
            if op_id is not None:
                op = self.operations[op_id]
                if not op["kind"].startswith("create"):
                    raise ArmError(409, "AnotherOperationInProgress", f"Another operation ({op['kind']}) is in progress on server '{srv['name']}'.")
                return 202, None, self.operation_headers(op, base, api_version)
        return self.start_operation(srv, "create (no change)", lambda op: None, self.server_id(srv), base, api_version)

    def _claim(self, key: str, expected: dict | None, srv: dict) -> None:
        """Under the lock: the name still holds what the request saw (no concurrent create took it); take it."""
        if self.servers.get(key) is not expected:
            raise ArmError(409, "AnotherOperationInProgress", f"Server '{srv['name']}' is being created or deleted by another request; retry.")
        self.servers[key] = srv

    def _create_restore(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, props: dict, location: str,
                        tags: dict, base: str, api_version: str) -> tuple[int, Any, dict]:
        raw = props.get("pointInTimeUTC")
        if raw is None:
            raise _bad_request("'properties.pointInTimeUTC' is required with createMode PointInTimeRestore.", "InvalidParameterValue")
        try:
            point = _parse_time(raw)
        except ValueError:
            raise _bad_request(f"pointInTimeUTC '{raw}' is not a date-time (ISO 8601, e.g. 2024-05-01T03:00:00Z).", "InvalidParameterValue") from None
        request = {"mode": "PointInTimeRestore", "source": source["name"], "point": _iso(point)}
        if live:
            assert existing is not None
            if existing["create"] == request:
                return self._repeat_create(existing, base, api_version)
            raise ArmError(409, "ServerNameAlreadyExists", f"Server '{name}' already exists; delete it first or restore into another name.")
        paths = self.backup_paths(source)
        if paths is None:
            why = (f"it is a read replica (of '{source['source']}'); restore its primary" if source["role"] in REPLICA_ROLES else
                   "its lab cluster does not archive WAL (lab.postgres.init_primary(archive_dir=...)) and no 'backups' are configured for it")
            raise _bad_request(f"Server '{source['name']}' has no backups the emulator can restore: {why}.", "SourceServerHasNoBackups")
        now = datetime.now(timezone.utc)
        if point > now:
            raise _bad_request(f"The point in time {_iso(point)} (pointInTimeUTC) is in the future: it is {_iso(now)} now. "
                               f"Restore to a point between the earliest restore date and now.", "PointInTimeInFuture")
        earliest = self.earliest_restore(source)
        if earliest is None:
            raise _bad_request(f"Server '{source['name']}' has no base backup yet; nothing can be restored.", "NoBackupAvailable")
        if point < earliest:
            raise _bad_request(f"The point in time {_iso(point)} (pointInTimeUTC) is before the earliest restore date {_iso(earliest)} of "
                               f"server '{source['name']}' (properties.backup.earliestRestoreDate; backup retention "
                               f"{paths['retention_days']} days).", "PointInTimeBeforeEarliestRestoreDate")
        root = paths["clusters_root"]
        cluster = self._cluster_dict(root, name, own_address=True)
        srv = self._new_server(name, rg, location, source, cluster, tags, request, "Primary")
        source_cluster = source.get("_cluster")

        def prepare() -> None:
            self._claim(name.lower(), existing, srv)
            srv["provisioning"] = True

        def work(op: dict) -> None:
            from lab.postgres import Cluster, PostgresLabError, archive_now, base_backup_for, restore_to_time

            probe = self.probe(source, max_age=0)
            if source_cluster and probe.get("reachable") and probe.get("in_recovery") is False:
                # Azure archives WAL continuously: everything committed up to now is restorable.
                try:
                    archive_now(Cluster.from_dict(source_cluster))
                except PostgresLabError as e:
                    log.warning("restore %s: could not archive the source's latest WAL: %s", name, _first_line(e))
            backup = base_backup_for(paths["base_backup_dir"], point)
            if backup is None:
                raise ArmError(400, "NoBackupAvailable", f"No base backup of '{source['name']}' ends before {_iso(point)}.")
            op["percentComplete"] = 10
            try:
                restore_to_time(backup, paths["archive_dir"], root, name, point, port=cluster["port"],
                                host=cluster.get("host") or "127.0.0.1")
            except PostgresLabError as e:
                raise ArmError(400, "RestoreFailed", f"The restore of '{source['name']}' as of {_iso(point)} into '{name}' failed: {_first_line(e)}") from None

        def on_done(status: str, error: dict | None) -> None:
            srv["provisioning"] = False
            srv["failed"] = None if status == "Succeeded" else (error or {"code": "InternalServerError", "message": "the restore failed"})

        log.info("point-in-time restore of %s as of %s into %s (port %s)", source["name"], _iso(point), name, cluster["port"])
        return self.start_operation(srv, "create (point-in-time restore)", work, self.server_id(srv), base, api_version, on_done=on_done, prepare=prepare)

    def _create_replica(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, location: str, tags: dict,
                        base: str, api_version: str) -> tuple[int, Any, dict]:
        request = {"mode": "Replica", "source": source["name"], "point": None}
        if source["role"] in REPLICA_ROLES:
            raise _bad_request(f"Server '{source['name']}' is a read replica (of '{source['source']}'); create a replica of a primary.", "InvalidSourceServer")
        source_cluster = source.get("_cluster")
        if not source_cluster:
            raise _bad_request(f"The emulator builds replicas of lab clusters only; server '{source['name']}' is configured with a dsn.", "OperationNotSupported")
        if live:
            assert existing is not None
            with self.lock:
                already = existing["role"] in REPLICA_ROLES and (existing["source"] or "").lower() == source["name"].lower() and not existing["failed"]
            if already:
                return self._repeat_create(existing, base, api_version)
        if existing is not None and existing.get("_cluster"):
            # The old, diverged primary (deleted or not): rebuilt on its own cluster, port and data directory.
            srv, rebuild = existing, True
            from lab.postgres import Cluster, cluster_root

            root = cluster_root(Cluster.from_dict(existing["_cluster"]))
        elif existing is not None and live:
            raise _bad_request(f"Server '{name}' is configured with a dsn, not a lab cluster: the emulator cannot make it a replica.", "OperationNotSupported")
        else:
            paths = self.backup_paths(source)
            if paths is not None:
                root = paths["clusters_root"]
            else:
                from lab.postgres import Cluster, cluster_root

                root = cluster_root(Cluster.from_dict(source_cluster))
            srv = self._new_server(name, rg, location, source, self._cluster_dict(root, name), tags, request, "AsyncReplica")
            rebuild = False

        def prepare() -> None:
            if rebuild:
                self._claim(name.lower(), existing, srv)
                # A new server in Azure's eyes: its old settings, tags and configuration overrides are gone.
                srv.update(deleted=False, failed=None, rebuild=None, create=request, role="AsyncReplica", source=source["name"],
                           resource_group=rg, location=location, tags=tags, configurations={}, state_override=None)
            else:
                self._claim(name.lower(), existing, srv)
            srv["provisioning"] = True

        def work(op: dict) -> None:
            from lab.postgres import Cluster, PostgresLabError, create_replica, rebuild_replica

            primary = Cluster.from_dict(source_cluster)
            t0 = time.monotonic()
            try:
                if rebuild:
                    rebuilt = rebuild_replica(primary, Cluster.from_dict(srv["_cluster"]), root)
                    info = rebuilt.rebuild
                    result = {"method": info.method, "seconds": info.seconds,
                              "fallback_reason": _first_line(info.fallback_reason, 200) if info.fallback_reason else None}
                else:
                    c = srv["_cluster"]
                    create_replica(primary, root, name, port=c["port"])
                    result = {"method": "new", "seconds": round(time.monotonic() - t0, 3), "fallback_reason": None}
            except PostgresLabError as e:
                raise ArmError(400, "ReplicaCreationFailed", f"Server '{name}' could not be made a replica of '{source['name']}': {_first_line(e)}") from None
            with self.lock:
                srv["rebuild"] = result

        def on_done(status: str, error: dict | None) -> None:
            srv["provisioning"] = False
            srv["failed"] = None if status == "Succeeded" else (error or {"code": "InternalServerError", "message": "the replica creation failed"})

        log.info("replica %s of %s (%s)", name, source["name"], "rebuild of its cluster" if rebuild else "new cluster")
        return self.start_operation(srv, "create (replica)", work, self.server_id(srv), base, api_version, on_done=on_done, prepare=prepare)

    def delete_server(self, rg: str, name: str, base: str, api_version: str) -> tuple[int, Any, dict]:
        with self.lock:
            srv = self.servers.get(name.lower())
            if srv is None or srv["deleted"] or srv["resource_group"].lower() != rg.lower():
                return 204, None, {}  # ARM: deleting what does not exist is No Content
            cluster, origin = srv.get("_cluster"), srv["origin"]

        def prepare() -> None:
            srv["dropping"] = True

        def work(op: dict) -> None:
            if not cluster:
                return
            from lab.postgres import Cluster, PostgresLabError, drop_cluster

            c = Cluster.from_dict(cluster)
            if origin == "api":
                drop_cluster(c)  # ours: stopped and removed
            else:
                # A cluster of the lab's own (its config): stopped, and kept for a Replica re-create (failback).
                try:
                    c.stop("fast")
                except PostgresLabError:
                    c.kill()

        def on_done(status: str, error: dict | None) -> None:
            srv["dropping"] = False
            if status != "Succeeded":
                return
            key = srv["name"].lower()
            if origin == "api":
                if self.servers.get(key) is srv:
                    del self.servers[key]
            else:
                srv.update(deleted=True, failed=None, create=None, rebuild=None, configurations={}, tags={}, state_override=None)

        log.info("delete %s (%s)", srv["name"], "drop its cluster" if origin == "api" and cluster else "stop its cluster" if cluster else "no cluster")
        return self.start_operation(srv, "delete", work, None, base, api_version, on_done=on_done, prepare=prepare)

    # -- long-running operations -----------------------------------------------------------------------------
    def start_operation(self, srv: dict, kind: str, work: Callable[[dict], None], resource_path: str | None, base: str, api_version: str,
                        on_done: Callable[[str, dict | None], None] | None = None, prepare: Callable[[], None] | None = None) -> tuple[int, Any, dict]:
        """Run `work(op)` in a thread as a long-running operation on `srv`. `prepare()` runs under the lock once the
        server is known to be free (mark it provisioning...); `on_done(status, error)` runs under the lock when the
        operation ends, before the server is free again. resource_path None: no final resource (a delete)."""
        with self.lock:
            if srv["busy_op"] is not None:
                raise ArmError(409, "AnotherOperationInProgress", f"Another operation ({self.operations[srv['busy_op']]['kind']}) is in progress on server '{srv['name']}'; retry when it has finished.")
            if prepare is not None:
                prepare()
            op_id = str(uuid.uuid4())
            op = {
                "name": op_id,
                "status": "InProgress",
                "startTime": _now_iso(),
                "kind": kind,
                "server": srv["name"],
                "location": srv["location"],
                "resource_path": resource_path,
            }
            self.operations[op_id] = op
            srv["busy_op"] = op_id
        self.persist()
        threading.Thread(target=self._run_operation, args=(srv, op, work, on_done), name=f"arm-op-{op_id[:8]}", daemon=True).start()
        headers = self.operation_headers(op, base, api_version)
        return 202, None, headers

    def operation_headers(self, op: dict, base: str, api_version: str) -> dict:
        prefix = f"{base}/subscriptions/{self.subscription}/providers/{PG_NS}/locations/{op['location']}"
        headers = {
            "Azure-AsyncOperation": f"{prefix}/azureAsyncOperation/{op['name']}?api-version={api_version}",
            "Location": f"{prefix}/operationResults/{op['name']}?api-version={api_version}",
        }
        if self.settings.get("lro_retry_after") is not None:
            headers["Retry-After"] = str(int(self.settings["lro_retry_after"]))
        return headers

    def _run_operation(self, srv: dict, op: dict, work: Callable[[dict], None], on_done: Callable[[str, dict | None], None] | None = None) -> None:
        started = time.monotonic()
        status, error = "Succeeded", None
        try:
            work(op)
        except ArmError as e:
            status, error = "Failed", {"code": e.code, "message": e.message}
        except Exception as e:  # noqa: BLE001
            log.exception("operation %s failed", op["name"])
            status, error = "Failed", {"code": "InternalServerError", "message": f"{type(e).__name__}: {e}"}
        remaining = float(self.settings["lro_seconds"]) - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        with self.lock:
            op["status"] = status
            op["endTime"] = _now_iso()
            op.pop("percentComplete", None)
            if error:
                op["error"] = error
            if on_done is not None:
                try:
                    on_done(status, error)
                except Exception:  # noqa: BLE001
                    log.exception("operation %s: bookkeeping after the operation failed", op["name"])
            srv["busy_op"] = None
            self._probe_cache.pop(srv["name"].lower(), None)
        log.info("operation %s (%s on %s): %s %s", op["name"], op["kind"], srv["name"], status, error or "")
        self.persist()

    def operation_status(self, op_id: str) -> dict:
        with self.lock:
            op = self.operations.get(op_id)
            if op is None:
                raise ArmError(404, "ResourceNotFound", f"The operation '{op_id}' was not found.")
            body = {k: op[k] for k in ("name", "status", "startTime") if k in op}
            for k in ("endTime", "error", "percentComplete"):
                if k in op:
                    body[k] = op[k]
            return body

    # -- traffic manager -------------------------------------------------------------------------------------
    def profile_id(self, prof: dict) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{prof['resource_group']}/providers/{TM_TYPE}/{prof['name']}"

    def monitor_status(self, prof: dict, ep: dict, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if prof["status"] != "Enabled":
            return "Inactive"
        if ep["status"] != "Enabled":
            return "Disabled"
        if now - float(ep["enabled_at"] or 0) < float(self.settings["tm_checking_seconds"]):
            return "CheckingEndpoint"
        return "Online" if ep["healthy"] else "Degraded"

    def endpoint_body(self, prof: dict, ep: dict, now: float | None = None) -> dict:
        props: dict[str, Any] = {
            "endpointStatus": ep["status"],
            "endpointMonitorStatus": self.monitor_status(prof, ep, now),
            "target": ep["target"],
            "weight": ep["weight"],
            "priority": ep["priority"],
            "endpointLocation": ep["location"],
            "alwaysServe": "Disabled",
        }
        if ep["target_resource_id"]:
            props["targetResourceId"] = ep["target_resource_id"]
        return {
            "id": f"{self.profile_id(prof)}/{ep['type']}/{ep['name']}",
            "name": ep["name"],
            "type": f"{TM_TYPE}/{ep['type']}",
            "properties": props,
        }

    def profile_body(self, prof: dict) -> dict:
        now = time.time()
        with self.lock:
            endpoints = [self.endpoint_body(prof, ep, now) for ep in prof["endpoints"].values()]
        statuses = [e["properties"]["endpointMonitorStatus"] for e in endpoints]
        if prof["status"] != "Enabled":
            pstatus = "Disabled"
        elif "Online" in statuses:
            pstatus = "Online"
        elif "CheckingEndpoint" in statuses:
            pstatus = "CheckingEndpoints"
        elif all(s == "Disabled" for s in statuses):
            pstatus = "Inactive"
        else:
            pstatus = "Degraded"
        return {
            "id": self.profile_id(prof),
            "name": prof["name"],
            "type": TM_TYPE,
            "location": "global",
            "tags": {},
            "properties": {
                "profileStatus": prof["status"],
                "trafficRoutingMethod": prof["routing_method"],
                "dnsConfig": {"relativeName": prof["relative_name"], "fqdn": f"{prof['relative_name']}.trafficmanager.net", "ttl": prof["ttl"]},
                "monitorConfig": {"profileMonitorStatus": pstatus, **prof["monitor"]},
                "endpoints": endpoints,
                "trafficViewEnrollmentStatus": "Disabled",
            },
        }

    def write_endpoint(self, prof: dict, etype: str, name: str, body: Any, method: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict):
            raise _bad_request("The request content was invalid and could not be deserialized: the body must be a JSON object.", "InvalidRequestContent")
        props = body.get("properties", {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise _bad_request("'properties' must be an object.", "InvalidRequestContent")
        with self.lock:
            ep = prof["endpoints"].get(name.lower())
            created = False
            if ep is not None and ep["type"] != etype:
                raise _not_found_resource(f"{TM_TYPE}/{etype}", name, prof["resource_group"])
            if ep is None:
                if method == "PATCH":
                    raise _not_found_resource(f"{TM_TYPE}/{etype}", name, prof["resource_group"])
                if not props.get("target") and not props.get("targetResourceId"):
                    raise _bad_request("A new endpoint needs 'target' or 'targetResourceId'.")
                ep = {"name": name, "type": etype, "location": None, "target": None, "target_resource_id": None, "priority": None, "weight": 1, "status": "Enabled", "healthy": True, "enabled_at": time.time()}
                created = True
            new = dict(ep)
            if "endpointStatus" in props and props["endpointStatus"] is not None:
                status = str(props["endpointStatus"]).capitalize()
                if status not in ("Enabled", "Disabled"):
                    raise _bad_request(f"The value '{props['endpointStatus']}' of endpointStatus is invalid; use Enabled or Disabled.")
                new["status"] = status
            for field, key in (("priority", "priority"), ("weight", "weight")):
                if key in props and props[key] is not None:
                    v = props[key]
                    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
                        raise _bad_request(f"The {key} of endpoint '{name}' must be an integer from 1 to 1000, not {v!r}.")
                    new[field] = v
            for field, key in (("target", "target"), ("location", "endpointLocation"), ("target_resource_id", "targetResourceId")):
                if key in props and props[key] is not None:
                    if not isinstance(props[key], str) or not props[key]:
                        raise _bad_request(f"'{key}' must be a non-empty string.")
                    new[field] = props[key]
            if new["priority"] is not None:
                for other in prof["endpoints"].values():
                    if other["name"].lower() != name.lower() and other["priority"] == new["priority"]:
                        raise _bad_request(
                            f"Endpoint '{name}': priority {new['priority']} is already used by endpoint '{other['name']}'; "
                            "no two endpoints of a profile can share the same priority value."
                        )
            if new["status"] == "Enabled" and (ep["status"] != "Enabled" or created):
                new["enabled_at"] = time.time()  # Traffic Manager probes a newly enabled endpoint first
            prof["endpoints"][name.lower()] = new
            result = self.endpoint_body(prof, new)
        self.persist()
        return (201 if created else 200), result, {}

    # -- request routing -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any, base: str) -> tuple[int, Any, dict]:
        segs = [unquote(s) for s in path.strip("/").split("/") if s != ""]
        low = [s.lower() for s in segs]
        if len(segs) < 2 or low[0] != "subscriptions":
            raise ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")
        api_version = (query.get("api-version") or [None])[0]
        if not api_version:
            raise _bad_request("The api-version query parameter (?api-version=) is required for all requests.", "MissingApiVersionParameter")
        if not _API_VERSION.match(api_version):
            raise _bad_request(f"The api-version '{api_version}' is invalid. The supported versions look like 'YYYY-MM-DD[-preview]'.", "InvalidApiVersionParameter")
        if segs[1].lower() != self.subscription.lower():
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{segs[1]}' could not be found.")
        rest, lrest = segs[2:], low[2:]

        # /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/{azureAsyncOperation|operationResults}/{id}
        if len(rest) == 6 and lrest[0] == "providers" and lrest[1] == PG_NS.lower() and lrest[2] == "locations":
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on an operation.")
            kind, op_id = lrest[4], rest[5]
            if kind == "azureasyncoperation":
                status_body = self.operation_status(op_id)
                headers = {}
                if status_body["status"] == "InProgress" and self.settings.get("lro_retry_after") is not None:
                    headers["Retry-After"] = str(int(self.settings["lro_retry_after"]))
                return 200, status_body, headers
            if kind == "operationresults":
                status_body = self.operation_status(op_id)
                with self.lock:
                    op = self.operations[op_id]
                if status_body["status"] == "InProgress":
                    return 202, None, self.operation_headers(op, base, api_version)
                if status_body["status"] == "Failed":
                    err = status_body.get("error") or {}
                    raise ArmError(400, err.get("code", "OperationFailed"), err.get("message", "The operation failed."))
                if not op.get("resource_path"):
                    return 204, None, {}  # a delete: nothing to return
                return 200, self._resource_at(op["resource_path"]), {}
            raise ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")

        if len(rest) < 2 or lrest[0] != "resourcegroups":
            raise ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")
        rg = rest[1]
        if rg.lower() not in self.resource_groups:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        if len(rest) < 5 or lrest[2] != "providers":
            raise ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")
        ns, rtype, tail, ltail = lrest[3], lrest[4], rest[5:], lrest[5:]
        if ns == PG_NS.lower() and rtype == "flexibleservers":
            return self._handle_pg(method, rg, tail, ltail, body, base, api_version)
        if ns == TM_NS.lower() and rtype == "trafficmanagerprofiles":
            return self._handle_tm(method, rg, tail, ltail, body)
        raise ArmError(404, "ResourceNotFound", f"The resource type '{rest[3]}/{rest[4]}' is not served by the ARM emulator.")

    def _server(self, rg: str, name: str) -> dict:
        srv = self.servers.get(name.lower())
        if srv is None or srv["deleted"] or srv["resource_group"].lower() != rg.lower():
            raise _not_found_resource(PG_TYPE, name, rg)
        return srv

    def _profile(self, rg: str, name: str) -> dict:
        prof = self.profiles.get(name.lower())
        if prof is None or prof["resource_group"].lower() != rg.lower():
            raise _not_found_resource(TM_TYPE, name, rg)
        return prof

    def _resource_at(self, resource_path: str) -> dict:
        segs = resource_path.strip("/").split("/")
        srv = self._server(segs[3], segs[7])
        if len(segs) >= 10 and segs[8] == "configurations":
            return self.get_configuration(srv, segs[9])
        if len(segs) >= 10 and segs[8] == "backups":
            return self._handle_backups(srv, "GET", [srv["name"], "backups", segs[9]], "", "")[1]
        return self.server_body(srv)

    def _handle_pg(self, method: str, rg: str, tail: list[str], ltail: list[str], body: Any, base: str, api_version: str) -> tuple[int, Any, dict]:
        if not tail:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on a server collection.")
            with self.lock:
                servers = [s for s in self.servers.values() if s["resource_group"].lower() == rg.lower() and not s["deleted"]]
            return 200, {"value": [self.server_body(s) for s in servers]}, {}
        if len(tail) == 1 and method == "PUT":
            return self.put_server(rg, tail[0], body, base, api_version)
        if len(tail) == 1 and method == "DELETE":
            return self.delete_server(rg, tail[0], base, api_version)
        srv = self._server(rg, tail[0])
        if len(tail) == 1:
            if method == "GET":
                return 200, self.server_body(srv), {}
            if method == "PATCH":
                return self.patch_server(srv, body, base, api_version)
            raise ArmError(405, "MethodNotAllowed", f"The method {method} is not supported on a server by the emulator.")
        if len(tail) == 2 and ltail[1] == "replicas" and method == "GET":
            with self.lock:
                replicas = [s for s in self.servers.values() if (s["source"] or "").lower() == srv["name"].lower() and not s["deleted"]]
            return 200, {"value": [self.server_body(s) for s in replicas]}, {}
        if len(tail) >= 2 and ltail[1] == "backups":
            return self._handle_backups(srv, method, tail, base, api_version)
        if len(tail) >= 2 and ltail[1] == "configurations":
            if len(tail) == 2 and method == "GET":
                return 200, {"value": [self._config_body(srv, row) for row in self._settings_rows(srv)]}, {}
            if len(tail) == 3:
                name = ltail[2]
                if method == "GET":
                    return 200, self.get_configuration(srv, name), {}
                if method in ("PUT", "PATCH"):
                    return self.put_configuration(srv, name, body, base, api_version)
        raise ArmError(404, "NotFound", f"The emulator does not serve {method} {'/'.join(tail[1:])} on flexible servers.")

    # -- flexible servers: on-demand backups (Backups - Create / Get / List By Server) -----------------------------
    def _backup_resource(self, srv: dict, b: dict) -> dict:
        return {"id": f"{self.server_id(srv)}/backups/{b['name']}", "name": b["name"], "type": f"{PG_TYPE}/backups",
                "properties": {"backupType": "Customer On-Demand", "completedTime": b["completedTime"], "source": "Automatic"}}

    def _handle_backups(self, srv: dict, method: str, tail: list[str], base: str, api_version: str) -> tuple[int, Any, dict]:
        """An on-demand backup REALLY keeps the server's data: a base backup of its running cluster (pg_basebackup),
        or a copy of the data directory of a stopped one, under <cluster root>/on-demand-backups/<server>-<name>."""
        with self.lock:
            backups = srv.setdefault("on_demand_backups", {})
        if len(tail) == 2 and method == "GET":
            return 200, {"value": [self._backup_resource(srv, b) for b in backups.values()]}, {}
        if len(tail) != 3:
            raise ArmError(404, "NotFound", "The emulator serves backups/{name} only.")
        name = tail[2]
        if method == "GET":
            if name not in backups:
                raise ArmError(404, "ResourceNotFound", f"The backup '{name}' of server '{srv['name']}' was not found.")
            return 200, self._backup_resource(srv, backups[name]), {}
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", f"The method {method} is not supported on a backup by the emulator.")
        if name in backups:
            return 200, self._backup_resource(srv, backups[name]), {}
        cluster = srv.get("_cluster")
        if not cluster:
            raise ArmError(400, "OperationNotSupported", f"Server '{srv['name']}' has no lab cluster to back up.")

        def work(op: dict) -> None:
            import shutil

            from lab.postgres import Cluster, cluster_root, take_base_backup

            c = Cluster.from_dict(cluster)
            dest = cluster_root(c) / "on-demand-backups" / f"{srv['name']}-{name}"
            if dest.exists():
                shutil.rmtree(dest)  # a half-made one from an emulator that died
            dest.parent.mkdir(parents=True, exist_ok=True)
            if c.is_running():
                take_base_backup(c, dest)
            else:
                shutil.copytree(c.datadir, dest / "data", symlinks=True)
            with self.lock:
                backups[name] = {"name": name, "completedTime": _now_iso(), "path": str(dest)}

        return self.start_operation(srv, "backup", work, f"{self.server_id(srv)}/backups/{name}", base, api_version)

    def _handle_tm(self, method: str, rg: str, tail: list[str], ltail: list[str], body: Any) -> tuple[int, Any, dict]:
        if not tail:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on a profile collection.")
            profs = [p for p in self.profiles.values() if p["resource_group"].lower() == rg.lower()]
            return 200, {"value": [self.profile_body(p) for p in profs]}, {}
        prof = self._profile(rg, tail[0])
        if len(tail) == 1:
            if method == "GET":
                return 200, self.profile_body(prof), {}
            raise ArmError(405, "MethodNotAllowed", f"The emulator does not support {method} on a profile; change its endpoints.")
        if len(tail) == 3 and ltail[1] in ENDPOINT_TYPES:
            etype, name = ENDPOINT_TYPES[ltail[1]], tail[2]
            if method == "GET":
                with self.lock:
                    ep = prof["endpoints"].get(name.lower())
                    if ep is None or ep["type"] != etype:
                        raise _not_found_resource(f"{TM_TYPE}/{etype}", name, rg)
                    return 200, self.endpoint_body(prof, ep), {}
            if method in ("PATCH", "PUT"):
                return self.write_endpoint(prof, etype, name, body, method)
            raise ArmError(405, "MethodNotAllowed", f"The emulator does not support {method} on an endpoint.")
        raise _not_found_resource(f"{TM_TYPE}/{'/'.join(tail[1:])}", tail[0], rg)

    # -- admin -----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self.lock:
            return {
                "subscription_id": self.subscription,
                "settings": dict(self.settings),
                "servers": {s["name"]: {k: v for k, v in s.items() if k not in ("dsn",) and not k.startswith("_")} for s in self.servers.values()},
                "profiles": {
                    p["name"]: {
                        "status": p["status"],
                        "routing_method": p["routing_method"],
                        "endpoints": {e["name"]: {**{k: v for k, v in e.items()}, "monitor_status": self.monitor_status(p, e)} for e in p["endpoints"].values()},
                    }
                    for p in self.profiles.values()
                },
                "operations": [{k: v for k, v in op.items()} for op in self.operations.values()],
                "faults": [self._public_fault(f) for f in self.faults],
            }

    def set_settings(self, values: dict) -> dict:
        if not isinstance(values, dict):
            raise _bad_request("settings must be an object")
        unknown = set(values) - set(DEFAULT_SETTINGS)
        if unknown:
            raise _bad_request(f"unknown settings: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_SETTINGS)})")
        with self.lock:
            self.settings.update(values)
            return dict(self.settings)

    def set_endpoint_health(self, profile: str, endpoint: str, healthy: bool) -> dict:
        with self.lock:
            prof = self.profiles.get(profile.lower())
            ep = prof["endpoints"].get(endpoint.lower()) if prof else None
            if ep is None:
                raise ArmError(404, "ResourceNotFound", f"no endpoint {endpoint!r} in profile {profile!r}")
            ep["healthy"] = bool(healthy)
            result = self.endpoint_body(prof, ep)
        self.persist()
        return result

    def set_server_state(self, server: str, state: str | None) -> dict:
        with self.lock:
            srv = self.servers.get(server.lower())
            if srv is None:
                raise ArmError(404, "ResourceNotFound", f"no flexible server {server!r}")
            srv["state_override"] = state
        self.persist()
        return self.server_body(srv)

    def admin(self, method: str, path: str, body: Any) -> tuple[int, Any, dict]:
        segs = [unquote(s) for s in path.strip("/").split("/")][1:]
        if segs == ["health"] and method == "GET":
            return 200, {"ok": True}, {}
        if segs == ["state"] and method == "GET":
            return 200, self.snapshot(), {}
        if segs == ["counts"] and method == "GET":
            with self.lock:
                return 200, {"requests": dict(self.request_counts), "random_faults": dict(self.random_faults.injected)}, {}
        if segs == ["requests"]:
            if method == "GET":
                return 200, {"value": list(self.request_log)}, {}
            if method == "DELETE":
                self.request_log.clear()
                return 200, {"value": []}, {}
        if segs == ["faults"]:
            if method == "POST":
                return 201, self.add_fault(body), {}
            if method == "GET":
                with self.lock:
                    return 200, {"value": [self._public_fault(f) for f in self.faults]}, {}
            if method == "DELETE":
                with self.lock:
                    self.faults.clear()
                return 200, {"value": []}, {}
        if len(segs) == 3 and segs[:2] == ["vault", "secrets"] and method == "PUT":
            if not isinstance(body, dict) or not isinstance(body.get("value"), str):
                raise _bad_request('body must be {"value": "..."}')
            with self.lock:
                self.vault_secrets[segs[2]] = body["value"]
            return 200, {"name": segs[2]}, {}
        if segs == ["settings"]:
            if method == "GET":
                return 200, dict(self.settings), {}
            if method == "POST":
                return 200, self.set_settings(body), {}
        if len(segs) == 5 and segs[0].lower() == "trafficmanagerprofiles" and segs[2] == "endpoints" and segs[4] == "health" and method == "POST":
            if not isinstance(body, dict) or not isinstance(body.get("healthy"), bool):
                raise _bad_request('body must be {"healthy": true|false}')
            return 200, self.set_endpoint_health(segs[1], segs[3], body["healthy"]), {}
        if len(segs) == 2 and segs[0].lower() == "flexibleservers" and method == "POST":
            if not isinstance(body, dict) or "state" not in body:
                raise _bad_request('body must be {"state": "Stopped" | ... | null}')
            return 200, self.set_server_state(segs[1], body["state"]), {}
        raise ArmError(404, "NotFound", f"no admin resource {method} {path}")


# ---------------------------------------------------------------------------------------------------------------
# HTTPS server
# ---------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "opsflow-arm-emulator/1"
    server: "_HttpsServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        world = self.server.world
        url = urlsplit(self.path)
        path = url.path
        raw = self._read_body()
        status, payload, headers = 500, None, {}
        faulted = False
        try:
            body: Any = None
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise _bad_request(f"The request content was invalid and could not be deserialized: {e}.", "InvalidRequestContent") from None
            elif method in ("PUT", "PATCH", "POST"):
                body = None
            if path.startswith("/_emulator/") or path == "/_emulator":
                status, payload, headers = world.admin(method, path, body if body is not None else {})
            elif path.startswith("/secrets/"):
                host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
                status, payload, headers = world.key_vault(method, path, self.headers.get("Authorization"), f"https://{host}")
            else:
                world.check_auth(self.headers.get("Authorization"))
                fault = world.take_fault(method, path)
                if fault:
                    faulted = True
                    if fault["delay"]:
                        time.sleep(fault["delay"])
                    if fault["drop"]:
                        world.log_request(method, path, 0, True)
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    if fault["status"]:
                        extra = {}
                        if fault["retry_after"] is not None:
                            extra["Retry-After"] = str(fault["retry_after"])
                        raise ArmError(fault["status"], fault["code"], f"Injected fault {fault['id']} ({fault['code']}) for {method} {path}.", extra)
                host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
                status, payload, headers = world.handle(method, path, parse_qs(url.query), body, f"https://{host}")
        except ArmError as e:
            status, payload, headers = e.status, e.body(), e.headers
        except Exception as e:  # noqa: BLE001
            log.exception("emulator error on %s %s", method, self.path)
            status, payload, headers = 500, {"error": {"code": "InternalServerError", "message": f"{type(e).__name__}: {e}"}}, {}
        world.log_request(method, path, status, faulted)
        self._send(status, payload, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        request_id = str(uuid.uuid4())
        self.send_header("x-ms-request-id", request_id)
        self.send_header("x-ms-correlation-request-id", request_id)
        client_id = self.headers.get("x-ms-client-request-id")
        if client_id:
            self.send_header("x-ms-client-request-id", client_id)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)


class _HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], world: World, ssl_context: ssl.SSLContext):
        self.world = world
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # TLS handshake in the connection's own thread: a client that never speaks cannot stall accept().
        request.settimeout(30)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


def load_ca(ca_dir: Path):
    """The lab's test CA (trustme), created once in ca_dir and reused: ca.pem (give it to clients), ca.key."""
    import trustme

    ca_dir = Path(ca_dir)
    ca_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        return trustme.CA.from_pem(cert_path.read_bytes(), key_path.read_bytes()), cert_path
    ca = trustme.CA(organization_name="opsflow lab")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(cert_path))
    return ca, cert_path


class EmulatorHandle:
    """A running emulator: .url (https://127.0.0.1:PORT), .ca_path (the CA file clients trust)."""

    def __init__(self, world: World, server: _HttpsServer, thread: threading.Thread, url: str, ca_path: Path):
        self.world, self._server, self._thread = world, server, thread
        self.url, self.ca_path = url, ca_path
        self.port = server.server_address[1]
        self._stopped = False

    def stop(self) -> None:
        """Stop serving and save the state. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.world.persist()

    def __enter__(self) -> "EmulatorHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def inject_fault(self, match: str, status: int | None = 503, count: int = 1, retry_after: float | None = None,
                     method: str | None = None, delay: float = 0.0, drop: bool = False, code: str | None = None) -> dict:
        """Answer the next `count` requests whose path matches `match` (a regex) with `status` (or drop them)."""
        return self.world.add_fault({"match": match, "status": status, "count": count, "retry_after": retry_after,
                                     "method": method, "delay": delay, "drop": drop, "code": code})

    def clear_faults(self) -> None:
        with self.world.lock:
            self.world.faults.clear()

    def configure(self, **settings: Any) -> dict:
        """lro_seconds, tm_checking_seconds, planned_sync_timeout, promote_timeout, lro_retry_after."""
        return self.world.set_settings(settings)

    def set_endpoint_health(self, profile: str, endpoint: str, healthy: bool) -> dict:
        return self.world.set_endpoint_health(profile, endpoint, healthy)

    def set_server_state(self, server: str, state: str | None) -> dict:
        return self.world.set_server_state(server, state)

    def requests(self) -> list[dict]:
        return list(self.world.request_log)

    def created_clusters(self) -> list[dict]:
        """Cluster.to_dict() of every lab cluster the emulator created (restores, new replicas) and still maps."""
        with self.world.lock:
            return [dict(s["_cluster"]) for s in self.world.servers.values() if s["origin"] == "api" and s.get("_cluster")]

    def state(self) -> dict:
        return self.world.snapshot()


def created_clusters(state_path: Path) -> list[dict]:
    """Cluster.to_dict() of the lab clusters an emulator created (point-in-time restores, new replicas), read from
    its state file: what a lab teardown must stop besides its own clusters (lab.postgres.drop_cluster). [] when
    there is no state file."""
    try:
        data = json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return []
    return [dict(s["cluster"]) for s in (data.get("servers") or {}).values() if s.get("origin") == "api" and s.get("cluster")]


def start_emulator(config: dict, ca_dir: Path, port: int = 0, host: str = "127.0.0.1", state_path: Path | None = None) -> EmulatorHandle:
    """Start the emulator in this process (a daemon thread). state_path default: ca_dir/arm_emulator.state.json."""
    ca, ca_path = load_ca(Path(ca_dir))
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(ctx)
    world = World(config, state_path if state_path is not None else Path(ca_dir) / "arm_emulator.state.json")
    server = _HttpsServer((host, port), world, ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="arm-emulator", daemon=True)
    thread.start()
    url = f"https://{host}:{server.server_address[1]}"
    log.info("ARM emulator on %s (CA %s)", url, ca_path)
    return EmulatorHandle(world, server, thread, url, ca_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.arm_emulator", description="Azure Resource Manager emulator for the opsflow lab (HTTPS only).")
    ap.add_argument("--config", required=True, type=Path, help="JSON config: servers mapped to lab clusters, Traffic Manager profiles")
    ap.add_argument("--port", type=int, default=0, help="TCP port on --host (0: any free port, printed at start)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ca-dir", required=True, type=Path, help="where the test CA lives (ca.pem for clients); created if missing")
    ap.add_argument("--state", type=Path, default=None, help="state file (default: <config>.state.json)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = json.loads(args.config.read_text())
    except (OSError, ValueError) as e:
        print(f"arm_emulator: cannot read config {args.config}: {e}", file=sys.stderr)
        return 2
    state = args.state or args.config.with_name(args.config.name + ".state.json")
    try:
        handle = start_emulator(config, args.ca_dir, port=args.port, host=args.host, state_path=state)
    except (ValueError, OSError) as e:
        print(f"arm_emulator: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"url": handle.url, "ca_path": str(handle.ca_path), "state": str(state), "pid": os.getpid()}), flush=True)
    stop.wait()
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
