"""Flexible servers (Microsoft.DBforPostgreSQL/flexibleServers): their records, their bodies and their
configurations.

    GET    .../flexibleServers                       list (resource group)
    GET    .../flexibleServers/{server}              properties.state, replicationRole, replica{role,replicationState},
                                                     backup.earliestRestoreDate (servers with backups: backups.py)
    GET    .../flexibleServers/{server}/replicas
    GET    .../flexibleServers/{server}/configurations[/{name}]   read from the cluster's pg_settings
    PUT|PATCH .../configurations/{name}              202 long-running operation: ALTER SYSTEM + pg_reload_conf
                                                     on the mapped cluster (how Azure fences writes:
                                                     default_transaction_read_only, no superuser needed)

A server maps to a lab cluster ("cluster": Cluster.to_dict()) or to any PostgreSQL ("dsn": "host=... user=...").

Lab-only tags (computed on every read, never stored; informative only, opsflow's activities never read them):
    opsflow-lab-port            the mapped cluster's port
    opsflow-lab-latest-restore  the latest point in time a restore of this server can reach (ISO, UTC)
    opsflow-lab-rebuild         how the last Replica create rebuilt the server (pg_rewind | pg_basebackup | new)
    opsflow-lab-error           why the server's creation failed
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from lab.arm.backups import Backups, backups_config
from lab.arm.common import (
    INVALID_BODY,
    PG_TYPE,
    REPLICA_ROLES,
    ROLES,
    TAG_ERROR,
    TAG_LATEST_RESTORE,
    TAG_PORT,
    TAG_REBUILD,
    ArmError,
    bad_request,
    first_line,
    iso,
    not_found_resource,
    now_iso,
    pg_connect,
)
from lab.arm.operations import Answer
from lab.arm.state import lifecycle_fields
from lab.postgres import Cluster

SETTINGS_SQL = (
    "select name, setting, unit, boot_val, vartype, enumvals, min_val, max_val, context, short_desc, "
    "pending_restart from pg_settings"
)
DATA_TYPES = {"bool": "Boolean", "integer": "Integer", "real": "Numeric", "enum": "Enumeration", "string": "String"}


def dsn_of(server_cfg: dict) -> str:
    if server_cfg.get("dsn"):
        return server_cfg["dsn"]
    cluster = server_cfg.get("cluster")
    if not cluster:
        raise ValueError("a flexible server needs 'cluster' (lab.postgres.Cluster.to_dict()) or 'dsn'")
    return Cluster.from_dict(cluster).dsn


def server_from_config(name: str, s: dict) -> dict:
    """The record of a server of the config file."""
    role = ROLES.get(str(s.get("role", "Primary")).lower())
    if role is None:
        raise ValueError(f"flexible server {name}: role must be one of {', '.join(ROLES.values())}")
    if role in REPLICA_ROLES and not s.get("source"):
        raise ValueError(f"flexible server {name}: a replica needs 'source' (the server it replicates from)")
    return {
        "name": name,
        "resource_group": s.get("resource_group") or "rg-lab",
        "location": s.get("location", "westeurope"),
        "dsn": dsn_of(s),
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
        "created": now_iso(),
        "_cluster": s.get("cluster"),  # lab.postgres.Cluster dict (switchovers stop/start it)
        **lifecycle_fields("config"),
        "backups": backups_config(name, s.get("backups")),
    }


class FlexibleServers(Backups):
    def load_servers(self, config: dict) -> None:
        for name, s in (config.get("flexible_servers") or {}).items():
            srv = server_from_config(name, s)
            self.resource_groups.add(srv["resource_group"].lower())
            self.servers[name.lower()] = srv
        for srv in self.servers.values():
            if srv["source"] and srv["source"].lower() not in self.servers:
                raise ValueError(f"flexible server {srv['name']}: source {srv['source']!r} is not a configured server")

    def server(self, rg: str, name: str) -> dict:
        srv = self.servers.get(name.lower())
        if srv is None or srv["deleted"] or srv["resource_group"].lower() != rg.lower():
            raise not_found_resource(PG_TYPE, name, rg)
        return srv

    def list_servers(self, rg: str) -> Answer:
        with self.lock:
            servers = [s for s in self.servers.values()
                       if s["resource_group"].lower() == rg.lower() and not s["deleted"]]
        return 200, {"value": [self.server_body(s) for s in servers]}, {}

    def list_replicas(self, srv: dict) -> Answer:
        with self.lock:
            replicas = [s for s in self.servers.values()
                        if (s["source"] or "").lower() == srv["name"].lower() and not s["deleted"]]
        return 200, {"value": [self.server_body(s) for s in replicas]}, {}

    # -- bodies ------------------------------------------------------------------------------------------------
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
            "backup": self.backup_body(srv, settled),
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
            replica["replicationState"] = self._replication_state(srv, busy, probe)
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

    @staticmethod
    def _replication_state(srv: dict, busy: bool, probe: dict) -> str:
        if srv["provisioning"]:
            return "Provisioning"
        if busy:
            return "Updating"
        if not probe.get("reachable") or not probe.get("in_recovery"):
            return "Broken"
        if probe.get("receiver") == "streaming":
            return "Active"
        return "Reconfiguring" if probe.get("receiver") else "Broken"

    def _lab_tags(self, srv: dict, settled: bool, probe: dict) -> dict:
        tags: dict[str, str] = {}
        cluster = srv.get("_cluster")
        if cluster and not srv.get("failed"):
            tags[TAG_PORT] = str(cluster["port"])
        if settled and self.backup_paths(srv) is not None:
            latest = self.latest_restore(srv, probe)
            if latest is not None:
                tags[TAG_LATEST_RESTORE] = iso(latest)
        rebuild = srv.get("rebuild")
        if rebuild:
            text = rebuild["method"]
            if rebuild.get("fallback_reason"):
                text += f" (pg_rewind not used: {rebuild['fallback_reason']})"
            tags[TAG_REBUILD] = text[:256]  # Azure's limit on a tag value
        if srv.get("failed"):
            tags[TAG_ERROR] = f"{srv['failed']['code']}: {srv['failed']['message']}"[:256]
        return tags

    def set_server_state(self, server: str, state: str | None) -> dict:
        """Admin: override the state a server reports (None: its own again)."""
        with self.lock:
            srv = self.servers.get(server.lower())
            if srv is None:
                raise ArmError(404, "ResourceNotFound", f"no flexible server {server!r}")
            srv["state_override"] = state
        self.persist()
        return self.server_body(srv)

    # -- configurations ------------------------------------------------------------------------------------------
    def config_body(self, srv: dict, row: tuple) -> dict:
        name, setting, unit, boot_val, vartype, enumvals, min_val, max_val, context, desc, pending = row
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
        doc = f"https://www.postgresql.org/docs/15/runtime-config.html#GUC-{name.upper().replace('_', '-')}"
        return {
            "properties": {
                "value": setting,
                "description": desc,
                "defaultValue": boot_val,
                "dataType": DATA_TYPES.get(vartype, "String"),
                "allowedValues": allowed,
                "source": "user-override" if overridden else "system-default",
                "isDynamicConfig": context not in ("postmaster", "internal"),
                "isReadOnly": context == "internal",
                "isConfigPendingRestart": bool(pending),
                "unit": unit,
                "documentationLink": doc,
            },
            "id": f"{self.server_id(srv)}/configurations/{name}",
            "name": name,
            "type": f"{PG_TYPE}/configurations",
        }

    def settings_rows(self, srv: dict, name: str | None = None) -> list[tuple]:
        try:
            with pg_connect(srv["dsn"]) as conn:
                if name is None:
                    return conn.execute(SETTINGS_SQL + " order by name").fetchall()
                return conn.execute(SETTINGS_SQL + " where name = %s", (name,)).fetchall()
        except psycopg.OperationalError as e:
            raise ArmError(409, "ServerNotReady", f"Server '{srv['name']}' is not reachable: {first_line(e)}") from None

    def list_configurations(self, srv: dict) -> Answer:
        return 200, {"value": [self.config_body(srv, row) for row in self.settings_rows(srv)]}, {}

    def get_configuration(self, srv: dict, name: str) -> dict:
        rows = self.settings_rows(srv, name)
        if not rows:
            raise ArmError(404, "ResourceNotFound",
                           f"The configuration '{name}' does not exist for server '{srv['name']}'.")
        return self.config_body(srv, rows[0])

    @staticmethod
    def _validate_setting(name: str, value: str, row: tuple) -> str:
        _, _, _, _, vartype, enumvals, min_val, max_val, context, _, _ = row
        if context == "internal":
            raise bad_request(f"The configuration '{name}' is read-only.", "ConfigurationIsReadOnly")
        bad = bad_request(f"The value '{value}' for configuration '{name}' is not valid.", "InvalidParameterValue")
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

    def put_configuration(self, srv: dict, name: str, body: Any, base: str, api_version: str) -> Answer:
        if not isinstance(body, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        props = body.get("properties")
        if not isinstance(props, dict):
            raise bad_request("The request content was invalid: 'properties' (an object with 'value' and 'source') "
                              "is required.", "InvalidRequestContent")
        value, source = props.get("value"), props.get("source")
        if value is not None and not isinstance(value, str):
            raise bad_request("The configuration value must be a string.", "InvalidRequestContent")
        reset = value is None or (isinstance(source, str) and source.lower() == "system-default"
                                  and value in (None, ""))
        if value is None and not reset:
            raise bad_request("The configuration value is required.", "InvalidRequestContent")
        rows = self.settings_rows(srv, name)
        if not rows:
            raise ArmError(404, "ResourceNotFound",
                           f"The configuration '{name}' does not exist for server '{srv['name']}'.")
        normalized = None if reset else self._validate_setting(name, value, rows[0])

        def work(op: dict) -> None:
            # `name` was validated against pg_settings: a real parameter name
            with pg_connect(srv["dsn"]) as conn:
                if normalized is None:
                    conn.execute(f"alter system reset {name}")
                else:
                    conn.execute(sql.SQL("alter system set {} = {}").format(sql.Identifier(name),
                                                                            sql.Literal(normalized)))
                conn.execute("select pg_reload_conf()")
            # pg_reload_conf only signals the postmaster: wait until new sessions see the value (a loaded machine
            # running several labs can take seconds).
            deadline = time.monotonic() + 30
            want = normalized if normalized is not None else rows[0][3]
            while True:
                with pg_connect(srv["dsn"]) as conn:
                    row = conn.execute("select setting, context from pg_settings where name = %s", (name,)).fetchone()
                if row is None or row[1] == "postmaster" or want is None or str(row[0]).lower() == str(want).lower():
                    break
                if time.monotonic() > deadline:
                    raise ArmError(500, "InternalServerError",
                                   f"configuration '{name}' did not take effect after reload (value {row[0]!r})")
                time.sleep(0.05)
            with self.lock:
                if normalized is None:
                    srv["configurations"].pop(name, None)
                else:
                    srv["configurations"][name] = normalized

        path = f"{self.server_id(srv)}/configurations/{name}"
        return self.start_operation(srv, f"configuration {name}", work, path, base, api_version)
