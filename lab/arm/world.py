"""World: all emulated ARM resources (one mixin per resource type), the routing of ARM requests to them, and
the ARM emulator's own admin resources.

Any api-version of the form YYYY-MM-DD[-preview] is accepted (the installed SDKs send 2026-10-01 for PostgreSQL
and 2026-09-01 for Traffic Manager). Errors have ARM's shape {"error": {"code", "message"}}: 401 without a bearer
token, 404 ResourceNotFound / ResourceGroupNotFound / SubscriptionNotFound, 400 for bad bodies, 409
AnotherOperationInProgress.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lab.arm.common import PG_NS, TM_NS, ArmError, bad_request
from lab.arm.keyvault import KeyVault
from lab.arm.operations import Answer
from lab.arm.replicas import Replicas
from lab.arm.restore import Restores
from lab.arm.traffic_manager import TrafficManager

API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")


def _no_resource(path: str) -> ArmError:
    return ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")


class World(Restores, Replicas, TrafficManager, KeyVault):
    """All emulated resources, their state and operations. Thread-safe (one lock)."""

    def __init__(self, config: dict, state_path: Path | None = None):
        super().__init__(config, state_path)
        self.load_servers(config)
        self.load_profiles(config)
        self.load_secrets(config)
        self.load_virtual_endpoints(config)
        self.load_state()

    # -- request routing -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any, base: str) -> Answer:
        segs = [unquote(s) for s in path.strip("/").split("/") if s != ""]
        low = [s.lower() for s in segs]
        if len(segs) < 2 or low[0] != "subscriptions":
            raise _no_resource(path)
        api_version = (query.get("api-version") or [None])[0]
        if not api_version:
            raise bad_request("The api-version query parameter (?api-version=) is required for all requests.",
                              "MissingApiVersionParameter")
        if not API_VERSION.match(api_version):
            raise bad_request(f"The api-version '{api_version}' is invalid. The supported versions look like "
                              "'YYYY-MM-DD[-preview]'.", "InvalidApiVersionParameter")
        if segs[1].lower() != self.subscription.lower():
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{segs[1]}' could not be found.")
        rest, lrest = segs[2:], low[2:]

        # /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/{azureAsyncOperation|...}/{id}
        if len(rest) == 6 and lrest[0] == "providers" and lrest[1] == PG_NS.lower() and lrest[2] == "locations":
            return self.handle_operation(method, lrest[4], rest[5], path, base, api_version)

        if len(rest) < 2 or lrest[0] != "resourcegroups":
            raise _no_resource(path)
        rg = rest[1]
        if rg.lower() not in self.resource_groups:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        if len(rest) < 5 or lrest[2] != "providers":
            raise _no_resource(path)
        ns, rtype, tail, ltail = lrest[3], lrest[4], rest[5:], lrest[5:]
        if ns == PG_NS.lower() and rtype == "flexibleservers":
            return self.handle_pg(method, rg, tail, ltail, body, base, api_version)
        if ns == TM_NS.lower() and rtype == "trafficmanagerprofiles":
            return self.handle_tm(method, rg, tail, ltail, body)
        raise ArmError(404, "ResourceNotFound",
                       f"The resource type '{rest[3]}/{rest[4]}' is not served by the ARM emulator.")

    def handle_pg(self, method: str, rg: str, tail: list[str], ltail: list[str], body: Any, base: str,
                  api_version: str) -> Answer:
        if not tail:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on a server collection.")
            return self.list_servers(rg)
        if len(tail) == 1 and method == "PUT":
            return self.put_server(rg, tail[0], body, base, api_version)
        if len(tail) == 1 and method == "DELETE":
            return self.delete_server(rg, tail[0], base, api_version)
        srv = self.server(rg, tail[0])
        if len(tail) == 1:
            if method == "GET":
                return 200, self.server_body(srv), {}
            if method == "PATCH":
                return self.patch_server(srv, body, base, api_version)
            raise ArmError(405, "MethodNotAllowed",
                           f"The method {method} is not supported on a server by the emulator.")
        if len(tail) == 2 and ltail[1] == "replicas" and method == "GET":
            return self.list_replicas(srv)
        if len(tail) >= 2 and ltail[1] == "backups":
            return self.handle_backups(srv, method, tail, base, api_version)
        if 2 <= len(tail) <= 3 and ltail[1] == "virtualendpoints":
            return self.handle_virtual_endpoints(srv, method, tail, body, base, api_version)
        if len(tail) >= 2 and ltail[1] == "configurations":
            if len(tail) == 2 and method == "GET":
                return self.list_configurations(srv)
            if len(tail) == 3:
                name = ltail[2]
                if method == "GET":
                    return 200, self.get_configuration(srv, name), {}
                if method in ("PUT", "PATCH"):
                    return self.put_configuration(srv, name, body, base, api_version)
        raise ArmError(404, "NotFound",
                       f"The emulator does not serve {method} {'/'.join(tail[1:])} on flexible servers.")

    def resource_at(self, resource_path: str) -> dict:
        segs = resource_path.strip("/").split("/")
        srv = self.server(segs[3], segs[7])
        if len(segs) >= 10 and segs[8] == "configurations":
            return self.get_configuration(srv, segs[9])
        if len(segs) >= 10 and segs[8].lower() == "virtualendpoints":
            return self.virtual_endpoint_body(self._endpoint_of(srv, segs[9]), srv)
        if len(segs) >= 10 and segs[8] == "backups":
            return self.handle_backups(srv, "GET", [srv["name"], "backups", segs[9]], "", "")[1]
        return self.server_body(srv)

    # -- admin -----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self.lock:
            return {
                "subscription_id": self.subscription,
                "settings": dict(self.settings),
                "servers": {s["name"]: {k: v for k, v in s.items() if k != "dsn" and not k.startswith("_")}
                            for s in self.servers.values()},
                "profiles": self.profiles_snapshot(),
                "operations": [dict(op) for op in self.operations.values()],
            }

    def admin_route(self, method: str, segs: list[str], body: Any) -> tuple[int, Any] | None:
        """The ARM emulator's own admin resources (under /_emulator/):

            GET|POST /settings   {"lro_seconds": s, "tm_checking_seconds": s, "planned_sync_timeout": s,
                                  "promote_timeout": s, "lro_retry_after": s|null}
            PUT  /vault/secrets/{name}                              {"value": "..."}
            POST /trafficmanagerprofiles/{profile}/endpoints/{endpoint}/health  {"healthy": false}
            POST /flexibleServers/{server}                          {"state": "Stopped"|null} (the reported state)
            POST /trafficmanagerprofiles/{profile}/dns              {"queries": n, "seed": s}: the endpoints n DNS
                                                                    queries would get (the profile's routing method)
        """
        if len(segs) == 3 and segs[:2] == ["vault", "secrets"] and method == "PUT":
            if not isinstance(body, dict) or not isinstance(body.get("value"), str):
                raise bad_request('body must be {"value": "..."}')
            self.set_secret(segs[2], body["value"])
            return 200, {"name": segs[2]}
        if segs == ["settings"]:
            if method == "GET":
                return 200, dict(self.settings)
            if method == "POST":
                return 200, self.set_settings(body)
        if len(segs) == 5 and segs[0].lower() == "trafficmanagerprofiles" and segs[2] == "endpoints" \
                and segs[4] == "health" and method == "POST":
            if not isinstance(body, dict) or not isinstance(body.get("healthy"), bool):
                raise bad_request('body must be {"healthy": true|false}')
            return 200, self.set_endpoint_health(segs[1], segs[3], body["healthy"])
        if len(segs) == 3 and segs[0].lower() == "trafficmanagerprofiles" and segs[2] == "dns" and method == "POST":
            body = body if isinstance(body, dict) else {}
            queries = body.get("queries", 1000)
            if isinstance(queries, bool) or not isinstance(queries, int) or not 1 <= queries <= 100000:
                raise bad_request('body must be {"queries": 1..100000, "seed": n}')
            return 200, self.dns_answers(segs[1], queries, int(body.get("seed") or 0))
        if len(segs) == 2 and segs[0].lower() == "flexibleservers" and method == "POST":
            if not isinstance(body, dict) or "state" not in body:
                raise bad_request('body must be {"state": "Stopped" | ... | null}')
            return 200, self.set_server_state(segs[1], body["state"])
        return None
