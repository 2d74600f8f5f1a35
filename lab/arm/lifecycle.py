"""Flexible servers: create (PUT) and delete.

    PUT    .../flexibleServers/{server}              202 long-running operation creating a server; createMode
                                                     PointInTimeRestore (restore.py) or Replica (replicas.py).
                                                     Repeating the same create is idempotent (202, the running or
                                                     a no-op operation).
    DELETE .../flexibleServers/{server}              202 long-running operation (204 when there is no such server,
                                                     as ARM answers): a server the emulator created loses its
                                                     cluster (lab.postgres.drop_cluster); a configured server's
                                                     cluster is stopped and kept for a Replica re-create
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lab.arm.common import (
    AZURE_PG_PORT,
    INVALID_BODY,
    PG_NS,
    PG_TYPE,
    REPLICA_ROLES,
    ArmError,
    bad_request,
    check_tags,
    not_found_resource,
    now_iso,
    user_tags,
)
from lab.arm.flexible import FlexibleServers
from lab.arm.operations import Answer
from lab.arm.state import lifecycle_fields
from lab.ports import free_port
from lab.postgres import Cluster, PostgresLabError, drop_cluster, free_loopback_host

log = logging.getLogger("opsflow.lab.arm_emulator")

# Azure's rule for flexible server names (they become DNS names).
SERVER_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")


def cluster_dict(root: Path, name: str, own_address: bool = False) -> dict:
    """Where lab.postgres puts cluster `name` under `root` (root/name/data), on a port chosen now: known before
    the cluster exists, so that a create cut short can still be cleaned up. own_address: a loopback address of
    its own with PostgreSQL's port 5432, given out as the server's fullyQualifiedDomainName — as in Azure,
    where every server listens on 5432 at its FQDN, so clients need no lab-only mapping."""
    home = Path(root).resolve() / name
    if own_address:
        return {"name": name, "datadir": str(home / "data"), "port": AZURE_PG_PORT,
                "host": free_loopback_host(AZURE_PG_PORT), "logfile": str(home / "postgres.log")}
    return {"name": name, "datadir": str(home / "data"), "port": free_port(), "logfile": str(home / "postgres.log")}


def new_server(name: str, rg: str, location: str, source: dict, cluster: dict, tags: dict, request: dict,
               role: str) -> dict:
    """The record of a server created through the API (a restore or a new replica) of `source`."""
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
        "created": now_iso(),
        "_cluster": cluster,
        **lifecycle_fields("api"),
        "backups": None,  # derived from its cluster: a restored server does not archive, a replica might
        "create": request,
    }


class ServerLifecycle(FlexibleServers):
    def put_server(self, rg: str, name: str, body: Any, base: str, api_version: str) -> Answer:
        if not isinstance(body, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        props = body.get("properties") or {}
        if not isinstance(props, dict):
            raise bad_request("'properties' must be an object.", "InvalidRequestContent")
        tags = body.get("tags")
        check_tags(tags)
        mode = str(props.get("createMode") or "").lower()
        with self.lock:
            existing = self.servers.get(name.lower())
            live = existing is not None and not existing["deleted"]
            if live and existing["resource_group"].lower() != rg.lower():
                raise ArmError(409, "ServerNameAlreadyExists",
                               f"The server name '{name}' is already in use (resource group "
                               f"'{existing['resource_group']}'); server names are globally unique.")
        if mode in ("", "default", "create", "update"):
            raise bad_request("The ARM emulator creates flexible servers with createMode PointInTimeRestore or "
                              "Replica only (copies of its lab servers; new empty servers map to lab clusters in "
                              "its config) and updates them with PATCH.", "OperationNotSupported")
        if mode not in ("pointintimerestore", "replica"):
            raise bad_request(f"The emulator does not support createMode '{props.get('createMode')}' "
                              "(supported: PointInTimeRestore, Replica).", "OperationNotSupported")
        if existing is None and not SERVER_NAME.match(name):
            raise bad_request(f"The server name '{name}' is invalid: 3 to 63 characters, lower-case letters, digits "
                              "and hyphens, not starting or ending with a hyphen.", "InvalidServerName")
        source = self.source_server(props.get("sourceServerResourceId"))
        if source is existing:
            raise bad_request(f"Server '{name}' cannot be created from itself.", "InvalidParameterValue")
        location = body.get("location") or (existing["location"] if existing is not None else None)
        if not isinstance(location, str) or not location:
            raise bad_request("'location' is required to create a server.", "LocationRequired")
        stored_tags = user_tags(tags or {})
        if mode == "pointintimerestore":
            return self.create_restore(rg, name, existing, live, source, props, location, stored_tags, base,
                                       api_version)
        return self.create_replica(rg, name, existing, live, source, location, stored_tags, base, api_version)

    def create_restore(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, props: dict,
                       location: str, tags: dict, base: str, api_version: str) -> Answer:
        """createMode PointInTimeRestore: restore.Restores."""
        raise NotImplementedError

    def create_replica(self, rg: str, name: str, existing: dict | None, live: bool, source: dict, location: str,
                       tags: dict, base: str, api_version: str) -> Answer:
        """createMode Replica: replicas.Replicas."""
        raise NotImplementedError

    def source_server(self, resource_id: Any) -> dict:
        if not isinstance(resource_id, str) or not resource_id.strip():
            raise bad_request("'properties.sourceServerResourceId' is required with this createMode.",
                              "InvalidParameterValue")
        segs = [unquote(x) for x in resource_id.strip().strip("/").split("/")]
        low = [x.lower() for x in segs]
        if len(segs) != 8 or low[0] != "subscriptions" or low[2] != "resourcegroups" or low[4] != "providers" \
                or low[5] != PG_NS.lower() or low[6] != "flexibleservers":
            raise bad_request(f"sourceServerResourceId '{resource_id}' is not a flexible server resource id "
                              f"(/subscriptions/{{id}}/resourceGroups/{{group}}/providers/{PG_TYPE}/{{name}}).",
                              "InvalidResourceId")
        if segs[1].lower() != self.subscription.lower():
            raise ArmError(404, "ResourceNotFound", f"The source server '{resource_id}' was not found: the "
                                                    f"subscription '{segs[1]}' is unknown.")
        with self.lock:
            srv = self.servers.get(segs[7].lower())
            if srv is None or srv["deleted"] or srv["resource_group"].lower() != segs[3].lower():
                raise not_found_resource(PG_TYPE, segs[7], segs[3])
            return srv

    def repeat_create(self, srv: dict, base: str, api_version: str) -> Answer:
        """The same create again on a server it made: idempotent, as ARM's PUT is (the running or a no-op
        operation)."""
        with self.lock:
            op_id = srv["busy_op"]
            if srv["failed"]:
                raise ArmError(409, "ServerNameAlreadyExists",
                               f"Server '{srv['name']}' exists and its creation failed ({srv['failed']['code']}: "
                               f"{srv['failed']['message']}); delete it first.")
            if op_id is not None:
                op = self.operations[op_id]
                if not op["kind"].startswith("create"):
                    raise ArmError(409, "AnotherOperationInProgress",
                                   f"Another operation ({op['kind']}) is in progress on server '{srv['name']}'.")
                return 202, None, self.operation_headers(op, base, api_version)
        return self.start_operation(srv, "create (no change)", lambda op: None, self.server_id(srv), base,
                                    api_version)

    def claim(self, key: str, expected: dict | None, srv: dict) -> None:
        """Under the lock: the name still holds what the request saw (no concurrent create took it); take it."""
        if self.servers.get(key) is not expected:
            raise ArmError(409, "AnotherOperationInProgress",
                           f"Server '{srv['name']}' is being created or deleted by another request; retry.")
        self.servers[key] = srv

    def delete_server(self, rg: str, name: str, base: str, api_version: str) -> Answer:
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
                srv.update(deleted=True, failed=None, create=None, rebuild=None, configurations={}, tags={},
                           state_override=None)

        what = "drop its cluster" if origin == "api" and cluster else "stop its cluster" if cluster else "no cluster"
        log.info("delete %s (%s)", srv["name"], what)
        return self.start_operation(srv, "delete", work, None, base, api_version, on_done=on_done, prepare=prepare)
