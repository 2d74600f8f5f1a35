"""ArmState: what every resource of the ARM emulator shares — the settings, the servers' and profiles' records,
the operations, the state file (every change saved, so a restarted emulator keeps it), bearer tokens, and what
the lab clusters say about themselves (probes). Thread-safe: one lock."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from lab.arm.common import (
    DEFAULT_SETTINGS,
    DEFAULT_SUBSCRIPTION,
    PG_TYPE,
    TM_TYPE,
    ArmError,
    bad_request,
    first_line,
    now_iso,
    pg_connect,
)

log = logging.getLogger("opsflow.lab.arm_emulator")

# What the state file keeps of a server: what changes (every server), and what a server created through the
# API was created with (its record is rebuilt from the state file after a restart).
MUTABLE_FIELDS = ("role", "source", "configurations", "tags", "state_override", "deleted", "provisioning",
                  "dropping", "failed", "create", "rebuild", "on_demand_backups")
FIXED_FIELDS = ("origin", "name", "resource_group", "location", "dsn", "version", "sku", "fqdn",
                "administrator_login", "created", "backups")
ENDPOINT_FIELDS = ("status", "priority", "weight", "target", "healthy", "enabled_at", "location")
AUTH_CHALLENGE = ('Bearer authorization_uri="https://login.microsoftonline.com/common", error="invalid_token", '
                  'error_description="{}"')


def lifecycle_fields(origin: str) -> dict:
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


class ArmState:
    """The state all resource types share (world.World adds the resources)."""

    def __init__(self, config: dict, state_path: Path | None = None):
        self.lock = threading.RLock()
        self.subscription = str(config.get("subscription_id") or DEFAULT_SUBSCRIPTION)
        self.tokens = set(config.get("tokens") or [])
        unknown = set(config.get("settings", {})) - set(DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"unknown emulator settings: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(DEFAULT_SETTINGS)})")
        self.settings: dict[str, Any] = {**DEFAULT_SETTINGS, **config.get("settings", {})}
        self.state_path = Path(state_path) if state_path else None
        self.servers: dict[str, dict] = {}
        self.profiles: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.virtual_endpoints: dict[str, dict] = {}  # lab/arm/virtual_endpoints.py
        self.probe_cache: dict[str, tuple[float, Any]] = {}
        self.resource_groups: set[str] = {rg.lower() for rg in config.get("resource_groups", [])}

    def server_id(self, srv: dict) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{srv['resource_group']}/providers/{PG_TYPE}/"
                f"{srv['name']}")

    def profile_id(self, prof: dict) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{prof['resource_group']}/providers/{TM_TYPE}/"
                f"{prof['name']}")

    # -- persistence -----------------------------------------------------------------------------------------
    def load_state(self) -> None:
        if not self.state_path or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable emulator state %s: %s", self.state_path, e)
            return
        for key, s in (data.get("servers") or {}).items():
            self._load_server(key, s)
        for key, rec in (data.get("api_profiles") or {}).items():  # made by a PUT: not in the config
            if key not in self.profiles and isinstance(rec, dict) and rec.get("resource_group"):
                self.profiles[key] = rec
                self.resource_groups.add(rec["resource_group"].lower())
        for key, p in (data.get("profiles") or {}).items():
            prof = self.profiles.get(key)
            if prof is None:
                continue
            prof["status"] = p.get("status", prof["status"])
            for ek, e in (p.get("endpoints") or {}).items():
                ep = prof["endpoints"].get(ek)
                if ep is None:
                    continue
                for f in ENDPOINT_FIELDS:
                    if f in e:
                        ep[f] = e[f]
        for key, ve in (data.get("virtual_endpoints") or {}).items():
            if isinstance(ve, dict) and isinstance(ve.get("servers"), list) and ve.get("name"):
                self.virtual_endpoints[key] = ve
        for op_id, op in (data.get("operations") or {}).items():
            if op.get("status") == "InProgress":
                # The emulator stopped while this ran: its outcome is unknown to ARM.
                op.update(status="Failed", endTime=now_iso(), error={
                    "code": "InternalServerError",
                    "message": "the ARM emulator restarted while the operation ran; look at the resource"})
            self.operations[op_id] = op
        log.info("loaded emulator state from %s", self.state_path)

    def _load_server(self, key: str, s: dict) -> None:
        srv = self.servers.get(key)
        if srv is None:
            if s.get("origin") != "api":
                return  # a configured server no longer in the config
            try:
                srv = self._server_from_state(s)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignoring unreadable server %s in the emulator state: %s", key, e)
                return
            self.servers[key] = srv
        for f in MUTABLE_FIELDS:
            if f in s:
                srv[f] = s[f]
        if srv.get("origin") == "config" and s.get("cluster"):
            srv["_cluster"] = s["cluster"]  # a Replica re-create may have rebuilt it (same port)
            srv["dsn"] = s.get("dsn") or srv["dsn"]
        if srv["provisioning"]:
            # The emulator stopped while the server was being created: its cluster may be half made.
            srv["provisioning"] = False
            srv["failed"] = {"code": "InternalServerError",
                             "message": "the ARM emulator restarted while the server was being created; "
                                        "delete it and create it again"}
        srv["dropping"] = False

    def persist(self) -> None:
        if not self.state_path:
            return
        with self.lock:
            data = {
                "saved_at": now_iso(),
                "servers": {k: self._server_state(s) for k, s in self.servers.items()},
                "profiles": {
                    k: {
                        "status": p["status"],
                        "endpoints": {ek: {f: e[f] for f in ENDPOINT_FIELDS} for ek, e in p["endpoints"].items()},
                    }
                    for k, p in self.profiles.items()
                },
                "api_profiles": {k: p for k, p in self.profiles.items() if p.get("origin") == "api"},
                "virtual_endpoints": {k: dict(ve) for k, ve in self.virtual_endpoints.items()},
                "operations": {k: {f: v for f, v in op.items() if not f.startswith("_")}
                               for k, op in list(self.operations.items())[-200:]},
            }
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.state_path)

    @staticmethod
    def _server_state(srv: dict) -> dict:
        data = {f: srv[f] for f in MUTABLE_FIELDS}
        data["cluster"] = srv.get("_cluster")
        for f in FIXED_FIELDS:
            data[f] = srv[f]
        return data

    @staticmethod
    def _server_from_state(s: dict) -> dict:
        srv = {f: s[f] for f in FIXED_FIELDS}
        srv.update({f: s.get(f) for f in MUTABLE_FIELDS})
        srv["configurations"] = dict(srv.get("configurations") or {})
        srv["tags"] = dict(srv.get("tags") or {})
        srv["on_demand_backups"] = dict(srv.get("on_demand_backups") or {})
        srv["_cluster"] = s.get("cluster")
        srv["busy_op"] = None
        return srv

    def created_clusters(self) -> list[dict]:
        """Cluster.to_dict() of every lab cluster the emulator created (restores, new replicas) and still maps."""
        with self.lock:
            return [dict(s["_cluster"]) for s in self.servers.values() if s["origin"] == "api" and s.get("_cluster")]

    # -- settings, auth ----------------------------------------------------------------------------------------
    def set_settings(self, values: dict) -> dict:
        if not isinstance(values, dict):
            raise bad_request("settings must be an object")
        unknown = set(values) - set(DEFAULT_SETTINGS)
        if unknown:
            raise bad_request(f"unknown settings: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_SETTINGS)})")
        with self.lock:
            self.settings.update(values)
            return dict(self.settings)

    def check_auth(self, header: str | None) -> None:
        if not header:
            msg = "Authentication failed. The 'Authorization' header is missing."
            raise ArmError(401, "AuthenticationFailed", msg, {"WWW-Authenticate": AUTH_CHALLENGE.format(msg)})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            msg = "Authentication failed. The 'Authorization' header is provided in an invalid format."
            raise ArmError(401, "AuthenticationFailed", msg, {"WWW-Authenticate": AUTH_CHALLENGE.format(msg)})
        if self.tokens and token.strip() not in self.tokens:
            msg = "The access token is invalid."
            raise ArmError(401, "InvalidAuthenticationToken", msg, {"WWW-Authenticate": AUTH_CHALLENGE.format(msg)})

    # -- SQL against the mapped clusters ---------------------------------------------------------------------
    def probe(self, srv: dict, max_age: float = 0.5) -> dict:
        """What the cluster says about itself (cached briefly); {'reachable': False, ...} when it is down."""
        key = srv["name"].lower()
        cached = self.probe_cache.get(key)
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        info: dict[str, Any]
        try:
            with pg_connect(srv["dsn"], timeout=2) as conn:
                row = conn.execute(
                    "select pg_is_in_recovery(), current_setting('server_version'), "
                    "(select status from pg_stat_wal_receiver), "
                    "case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text "
                    "else pg_current_wal_lsn()::text end"
                ).fetchone()
            assert row is not None
            info = {"reachable": True, "in_recovery": row[0], "version": row[1], "receiver": row[2], "lsn": row[3]}
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable" here
            info = {"reachable": False, "error": first_line(e)}
        self.probe_cache[key] = (time.monotonic(), info)
        return info
