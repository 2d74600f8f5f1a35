"""Virtual endpoints of flexible servers (Microsoft.DBforPostgreSQL/flexibleServers/virtualendpoints).

    PUT    .../flexibleServers/{server}/virtualendpoints/{name}   202 long-running operation; body
                                                                  {"properties": {"endpointType": "ReadWrite",
                                                                  "members": ["<replica>"]}}
    PATCH  .../flexibleServers/{server}/virtualendpoints/{name}   202 long-running operation (members)
    GET    .../flexibleServers/{server}/virtualendpoints/{name}   200, or 404 ResourceNotFound
    GET    .../flexibleServers/{server}/virtualendpoints          200 {"value": [...]}
    DELETE .../flexibleServers/{server}/virtualendpoints/{name}   202 long-running operation (204 when absent)

A virtual endpoint is a pair of host names over one replication pair: `<name>.writer.<suffix>` always targets
the current primary, `<name>.reader.<suffix>` the server named in `members` (a read replica, or the primary).
As Azure documents it ("concepts-read-replicas-virtual-endpoints", "concepts-read-replicas-promote"): it is
created and managed on the primary (400 VirtualEndpointOnReplica on a replica; the emulator also answers GET on
the other server of the pair); a promotion with promoteMode Switchover needs one whose reader targets the
replica being promoted (400 VirtualEndpointRequired otherwise); after the switchover the writer targets the new
primary and the reader the new replica (the old primary); a Standalone promotion takes the promoted server out
of the pair and the reader falls back to the primary. One virtual endpoint per server (409 otherwise).
"""

from __future__ import annotations

from typing import Any

from lab.arm.common import INVALID_BODY, PG_TYPE, REPLICA_ROLES, ArmError, bad_request
from lab.arm.operations import Answer, Operations

VE_TYPE = f"{PG_TYPE}/virtualEndpoints"
HOST_SUFFIX = "postgres.database.azure.com"


class VirtualEndpoints(Operations):
    # self.virtual_endpoints (ArmState): name (lower case) -> {"name", "resource_group", "servers": [names]}

    def load_virtual_endpoints(self, config: dict) -> None:
        """The config's virtual endpoints: {name: {"server": primary, "members": [reader]}} (the state file's win)."""
        for name, ve in (config.get("virtual_endpoints") or {}).items():
            server, members = ve.get("server"), ve.get("members") or []
            if not server or len(members) != 1:
                raise ValueError(f"virtual endpoint {name}: needs 'server' and one 'members' entry (the reader)")
            pair = [server] + [m for m in members if m.lower() != server.lower()]
            rg = self.servers[server.lower()]["resource_group"] if server.lower() in self.servers else ""
            self.virtual_endpoints[name.lower()] = {"name": name, "resource_group": rg, "servers": pair,
                                                    "reader": members[0]}

    def _pair(self, ve: dict) -> list[dict]:
        return [s for s in (self.servers.get(n.lower()) for n in ve["servers"]) if s is not None and not s["deleted"]]

    def virtual_endpoint_of(self, srv: dict) -> dict | None:
        """The virtual endpoint whose pair holds this server (None: it has none)."""
        with self.lock:
            for ve in self.virtual_endpoints.values():
                if srv["name"].lower() in {n.lower() for n in ve["servers"]}:
                    return ve
        return None

    def virtual_endpoint_body(self, ve: dict, via: dict) -> dict:
        return {
            "id": f"{self.server_id(via)}/virtualEndpoints/{ve['name']}",
            "name": ve["name"],
            "type": VE_TYPE,
            "properties": {
                "endpointType": "ReadWrite",
                "members": [ve["reader"]],
                "virtualEndpoints": [f"{ve['name']}.reader.{HOST_SUFFIX}", f"{ve['name']}.writer.{HOST_SUFFIX}"],
            },
        }

    def switch_virtual_endpoint(self, promoted: dict, demoted: dict) -> None:
        """After a switchover: the writer follows the new primary (a role), the reader goes to the old primary."""
        ve = self.virtual_endpoint_of(promoted)
        if ve is not None and ve["reader"].lower() == promoted["name"].lower():
            ve["reader"] = demoted["name"]

    def leave_virtual_endpoint(self, promoted: dict, primary: dict | None) -> None:
        """After a Standalone promotion: the promoted server leaves the pair; a reader on it goes to the primary."""
        ve = self.virtual_endpoint_of(promoted)
        if ve is None:
            return
        ve["servers"] = [n for n in ve["servers"] if n.lower() != promoted["name"].lower()]
        if ve["reader"].lower() == promoted["name"].lower():
            ve["reader"] = primary["name"] if primary is not None else ve["servers"][0]

    def require_virtual_endpoint(self, replica: dict, source: dict) -> None:
        """A switchover needs a virtual endpoint over both servers whose reader targets the replica."""
        ve = self.virtual_endpoint_of(source)
        if ve is None or ve["reader"].lower() != replica["name"].lower() \
                or replica["name"].lower() not in {n.lower() for n in ve["servers"]}:
            raise ArmError(400, "VirtualEndpointRequired",
                           f"Promoting '{replica['name']}' to primary server (promoteMode Switchover) needs a virtual "
                           f"endpoint on '{source['name']}' whose reader endpoint targets '{replica['name']}'"
                           + (f" (virtual endpoint '{ve['name']}' reads from '{ve['reader']}')." if ve else "."))

    def _endpoint_of(self, srv: dict, name: str) -> dict:
        with self.lock:
            ve = self.virtual_endpoints.get(name.lower())
            if ve is None or srv["name"].lower() not in {n.lower() for n in ve["servers"]}:
                raise ArmError(404, "ResourceNotFound",
                               f"The Resource '{VE_TYPE}/{name}' under resource group '{srv['resource_group']}' "
                               "was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix")
            return ve

    def handle_virtual_endpoints(self, srv: dict, method: str, tail: list[str], body: Any, base: str,
                                 api_version: str) -> Answer:
        if len(tail) == 2:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on virtual endpoints.")
            with self.lock:
                mine = [ve for ve in self.virtual_endpoints.values()
                        if srv["name"].lower() in {n.lower() for n in ve["servers"]}]
            return 200, {"value": [self.virtual_endpoint_body(ve, srv) for ve in mine]}, {}
        name = tail[2]
        if method == "GET":
            return 200, self.virtual_endpoint_body(self._endpoint_of(srv, name), srv), {}
        if method in ("PUT", "PATCH"):
            return self._put_virtual_endpoint(srv, name, body, method == "PATCH", base, api_version)
        if method == "DELETE":
            with self.lock:
                ve = self.virtual_endpoints.get(name.lower())
                if ve is None or srv["name"].lower() not in {n.lower() for n in ve["servers"]}:
                    return 204, None, {}

            def drop(op: dict) -> None:
                with self.lock:
                    self.virtual_endpoints.pop(name.lower(), None)

            return self.start_operation(srv, "delete virtual endpoint", drop, None, base, api_version)
        raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on a virtual endpoint.")

    def _put_virtual_endpoint(self, srv: dict, name: str, body: Any, patch: bool, base: str,
                              api_version: str) -> Answer:
        if not isinstance(body, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        props = body.get("properties")
        if not isinstance(props, dict):
            raise bad_request("'properties' must be an object.", "InvalidRequestContent")
        kind = props.get("endpointType", "ReadWrite" if patch else None)
        if str(kind).lower() != "readwrite":
            raise bad_request(f"The value '{kind}' of endpointType is invalid; the only endpoint type is ReadWrite.",
                              "InvalidParameterValue")
        members = props.get("members")
        if not isinstance(members, list) or len(members) != 1 or not isinstance(members[0], str) or not members[0]:
            raise bad_request("'properties.members' must name one server: the reader endpoint's target (a read "
                              "replica of the server, or the server itself).", "InvalidParameterValue")
        with self.lock:
            existing = self.virtual_endpoints.get(name.lower())
            if existing is not None and srv["name"].lower() not in {n.lower() for n in existing["servers"]}:
                raise ArmError(409, "VirtualEndpointAlreadyExists",
                               f"The virtual endpoint name '{name}' is taken by another server.")
            if srv["role"] in REPLICA_ROLES:
                raise bad_request(f"Server '{srv['name']}' is a read replica: virtual endpoints are managed on the "
                                  "primary server.", "VirtualEndpointOnReplica")
            reader = self.servers.get(members[0].lower())
            if reader is None or reader["deleted"]:
                raise bad_request(f"The member server '{members[0]}' does not exist.", "InvalidParameterValue")
            if reader is not srv and (reader["source"] or "").lower() != srv["name"].lower():
                raise bad_request(f"The member server '{reader['name']}' is not a read replica of '{srv['name']}': "
                                  "the reader endpoint targets the primary or one of its replicas.",
                                  "InvalidParameterValue")
            pair = [srv["name"]] + ([reader["name"]] if reader is not srv else [])
            if existing is not None:
                pair += [n for n in existing["servers"] if n.lower() not in {p.lower() for p in pair}]
            for other_name, ve in self.virtual_endpoints.items():
                taken = {n.lower() for n in ve["servers"]} & {n.lower() for n in pair}
                if other_name != name.lower() and taken:
                    raise ArmError(409, "VirtualEndpointAlreadyExists",
                                   f"Server '{sorted(taken)[0]}' already has the virtual endpoint '{ve['name']}'; "
                                   "a server has at most one.")

        def work(op: dict) -> None:
            with self.lock:
                self.virtual_endpoints[name.lower()] = {"name": existing["name"] if existing else name,
                                                        "resource_group": srv["resource_group"], "servers": pair,
                                                        "reader": reader["name"]}

        path = f"{self.server_id(srv)}/virtualendpoints/{name}"
        return self.start_operation(srv, "virtual endpoint", work, path, base, api_version)
