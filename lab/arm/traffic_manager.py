"""Traffic Manager (Microsoft.Network/trafficManagerProfiles).

    GET    .../trafficmanagerprofiles[/{profile}]    endpoints with endpointMonitorStatus computed the way
                                                     Traffic Manager does: Disabled when disabled,
                                                     CheckingEndpoint for a while after enabling, then Online
                                                     (Degraded when the emulator is told it is unhealthy),
                                                     Inactive when the profile is disabled
    PUT    .../trafficmanagerprofiles/{profile}      create or replace a profile (routing method, DNS, monitor,
                                                     endpoints), as profiles.create_or_update does
    GET|PATCH|PUT .../trafficmanagerprofiles/{profile}/{AzureEndpoints|ExternalEndpoints}/{endpoint}
                                                     endpointStatus, priority (1..1000, unique in the profile),
                                                     weight, target
"""

from __future__ import annotations

import random
import time
from typing import Any

from lab.arm.common import ENDPOINT_TYPES, INVALID_BODY, TM_TYPE, ArmError, bad_request, not_found_resource
from lab.arm.operations import Answer
from lab.arm.state import ArmState

DEFAULT_MONITOR = {"protocol": "HTTPS", "port": 443, "path": "/healthz", "intervalInSeconds": 30,
                   "timeoutInSeconds": 10, "toleratedNumberOfFailures": 3}


def _endpoint_from_config(profile: str, ep_name: str, e: dict) -> dict:
    etype = ENDPOINT_TYPES.get(str(e.get("type", "externalEndpoints")).lower())
    if etype is None:
        raise ValueError(f"profile {profile} endpoint {ep_name}: type must be azureEndpoints or externalEndpoints")
    status = str(e.get("status", "Enabled")).capitalize()
    if status not in ("Enabled", "Disabled"):
        raise ValueError(f"profile {profile} endpoint {ep_name}: status must be Enabled or Disabled")
    return {
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


def profile_from_config(name: str, p: dict) -> dict:
    """The record of a profile of the config file."""
    endpoints = {ep_name.lower(): _endpoint_from_config(name, ep_name, e)
                 for ep_name, e in (p.get("endpoints") or {}).items()}
    prios = [e["priority"] for e in endpoints.values() if e["priority"] is not None]
    if len(prios) != len(set(prios)):
        raise ValueError(f"profile {name}: endpoint priorities must be unique")
    return {
        "name": name,
        "resource_group": p.get("resource_group") or "rg-lab",
        "routing_method": p.get("routing_method", "Priority"),
        "status": p.get("status", "Enabled"),
        "relative_name": p.get("relative_name", name.lower()),
        "ttl": int(p.get("ttl", 30)),
        "monitor": p.get("monitor") or dict(DEFAULT_MONITOR),
        "endpoints": endpoints,
    }


class TrafficManager(ArmState):
    def load_profiles(self, config: dict) -> None:
        for name, p in (config.get("traffic_manager_profiles") or {}).items():
            prof = profile_from_config(name, p)
            self.resource_groups.add(prof["resource_group"].lower())
            self.profiles[name.lower()] = prof

    def profile(self, rg: str, name: str) -> dict:
        prof = self.profiles.get(name.lower())
        if prof is None or prof["resource_group"].lower() != rg.lower():
            raise not_found_resource(TM_TYPE, name, rg)
        return prof

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
        dns = {"relativeName": prof["relative_name"], "fqdn": f"{prof['relative_name']}.trafficmanager.net",
               "ttl": prof["ttl"]}
        return {
            "id": self.profile_id(prof),
            "name": prof["name"],
            "type": TM_TYPE,
            "location": "global",
            "tags": {},
            "properties": {
                "profileStatus": prof["status"],
                "trafficRoutingMethod": prof["routing_method"],
                "dnsConfig": dns,
                "monitorConfig": {"profileMonitorStatus": pstatus, **prof["monitor"]},
                "endpoints": endpoints,
                "trafficViewEnrollmentStatus": "Disabled",
            },
        }

    def write_endpoint(self, prof: dict, etype: str, name: str, body: Any, method: str) -> Answer:
        if not isinstance(body, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        props = body.get("properties", {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise bad_request("'properties' must be an object.", "InvalidRequestContent")
        with self.lock:
            ep = prof["endpoints"].get(name.lower())
            created = False
            if ep is not None and ep["type"] != etype:
                raise not_found_resource(f"{TM_TYPE}/{etype}", name, prof["resource_group"])
            if ep is None:
                if method == "PATCH":
                    raise not_found_resource(f"{TM_TYPE}/{etype}", name, prof["resource_group"])
                if not props.get("target") and not props.get("targetResourceId"):
                    raise bad_request("A new endpoint needs 'target' or 'targetResourceId'.")
                ep = {"name": name, "type": etype, "location": None, "target": None, "target_resource_id": None,
                      "priority": None, "weight": 1, "status": "Enabled", "healthy": True, "enabled_at": time.time()}
                created = True
            new = self._changed_endpoint(prof, ep, name, props)
            if new["status"] == "Enabled" and (ep["status"] != "Enabled" or created):
                new["enabled_at"] = time.time()  # Traffic Manager probes a newly enabled endpoint first
            prof["endpoints"][name.lower()] = new
            result = self.endpoint_body(prof, new)
        self.persist()
        return (201 if created else 200), result, {}

    @staticmethod
    def _changed_endpoint(prof: dict, ep: dict, name: str, props: dict) -> dict:
        """The endpoint `ep` with what the request's properties change, checked."""
        new = dict(ep)
        if "endpointStatus" in props and props["endpointStatus"] is not None:
            status = str(props["endpointStatus"]).capitalize()
            if status not in ("Enabled", "Disabled"):
                raise bad_request(f"The value '{props['endpointStatus']}' of endpointStatus is invalid; use Enabled "
                                  "or Disabled.")
            new["status"] = status
        for key in ("priority", "weight"):
            if key in props and props[key] is not None:
                v = props[key]
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
                    raise bad_request(f"The {key} of endpoint '{name}' must be an integer from 1 to 1000, not {v!r}.")
                new[key] = v
        for field, key in (("target", "target"), ("location", "endpointLocation"),
                           ("target_resource_id", "targetResourceId")):
            if key in props and props[key] is not None:
                if not isinstance(props[key], str) or not props[key]:
                    raise bad_request(f"'{key}' must be a non-empty string.")
                new[field] = props[key]
        if new["priority"] is not None:
            for other in prof["endpoints"].values():
                if other["name"].lower() != name.lower() and other["priority"] == new["priority"]:
                    raise bad_request(
                        f"Endpoint '{name}': priority {new['priority']} is already used by endpoint "
                        f"'{other['name']}'; no two endpoints of a profile can share the same priority value."
                    )
        return new

    def handle_tm(self, method: str, rg: str, tail: list[str], ltail: list[str], body: Any) -> Answer:
        if not tail:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on a profile collection.")
            profs = [p for p in self.profiles.values() if p["resource_group"].lower() == rg.lower()]
            return 200, {"value": [self.profile_body(p) for p in profs]}, {}
        if len(tail) == 1 and method == "PUT":
            return self.put_profile(rg, tail[0], body)
        prof = self.profile(rg, tail[0])
        if len(tail) == 1:
            if method == "GET":
                return 200, self.profile_body(prof), {}
            raise ArmError(405, "MethodNotAllowed",
                           f"The emulator does not support {method} on a profile; PUT it whole or change its "
                           "endpoints.")
        if len(tail) == 3 and ltail[1] in ENDPOINT_TYPES:
            etype, name = ENDPOINT_TYPES[ltail[1]], tail[2]
            if method == "GET":
                with self.lock:
                    ep = prof["endpoints"].get(name.lower())
                    if ep is None or ep["type"] != etype:
                        raise not_found_resource(f"{TM_TYPE}/{etype}", name, rg)
                    return 200, self.endpoint_body(prof, ep), {}
            if method in ("PATCH", "PUT"):
                return self.write_endpoint(prof, etype, name, body, method)
            raise ArmError(405, "MethodNotAllowed", f"The emulator does not support {method} on an endpoint.")
        raise not_found_resource(f"{TM_TYPE}/{'/'.join(tail[1:])}", tail[0], rg)

    def put_profile(self, rg: str, name: str, body: Any) -> Answer:
        """Create or replace profile `name` from an ARM body (properties.trafficRoutingMethod, dnsConfig,
        monitorConfig, endpoints[{name, type, properties}]); its endpoints start Online (no probing period). A
        restarted emulator has it still (its state file)."""
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict):
            raise bad_request(INVALID_BODY, "InvalidRequestContent")
        method = props.get("trafficRoutingMethod")
        if method not in ("Priority", "Weighted", "Performance", "Geographic", "MultiValue", "Subnet"):
            raise bad_request(f"The value {method!r} of trafficRoutingMethod is invalid.")
        other = self.profiles.get(name.lower())
        if other is not None and other["resource_group"].lower() != rg.lower():
            raise ArmError(409, "Conflict", f"A profile named {name!r} exists in resource group "
                           f"{other['resource_group']!r}.")
        endpoints = {}
        for e in props.get("endpoints") or []:
            ep_props = e.get("properties") or {} if isinstance(e, dict) else None
            if not isinstance(ep_props, dict) or not e.get("name"):
                raise bad_request("Each endpoint needs a name and properties.")
            endpoints[e["name"]] = {
                "type": str(e.get("type") or "externalEndpoints").rsplit("/", 1)[-1],
                "region": ep_props.get("endpointLocation"), "target": ep_props.get("target"),
                "target_resource_id": ep_props.get("targetResourceId"), "priority": ep_props.get("priority"),
                "weight": ep_props.get("weight", 1), "status": ep_props.get("endpointStatus", "Enabled")}
        dns = props.get("dnsConfig") or {}
        config = {"resource_group": rg, "routing_method": method, "status": props.get("profileStatus", "Enabled"),
                  "relative_name": dns.get("relativeName", name.lower()), "ttl": dns.get("ttl", 30),
                  "monitor": {k: v for k, v in (props.get("monitorConfig") or {}).items()
                              if k != "profileMonitorStatus"} or None,
                  "endpoints": endpoints}
        try:
            prof = profile_from_config(name, config)
        except ValueError as e:
            raise bad_request(str(e)) from None
        prof["origin"] = "api"  # kept across a restart of the emulator (its state file)
        with self.lock:
            self.resource_groups.add(rg.lower())
            self.profiles[name.lower()] = prof
        self.persist()
        return (200 if other is not None else 201), self.profile_body(prof), {}

    def set_endpoint_health(self, profile: str, endpoint: str, healthy: bool) -> dict:
        """Admin: what Traffic Manager's probes of an endpoint find."""
        with self.lock:
            prof = self.profiles.get(profile.lower())
            ep = prof["endpoints"].get(endpoint.lower()) if prof else None
            if prof is None or ep is None:
                raise ArmError(404, "ResourceNotFound", f"no endpoint {endpoint!r} in profile {profile!r}")
            ep["healthy"] = bool(healthy)
            result = self.endpoint_body(prof, ep)
        self.persist()
        return result

    def dns_answers(self, profile: str, queries: int, seed: int = 0) -> dict:
        """Admin: which endpoint each of `queries` DNS queries gets, as Traffic Manager answers: the endpoints it
        may answer with are the enabled ones its probes find Online (or still checking; all enabled ones when none
        is); weighted routing picks one at random in proportion to its weight, priority routing the lowest
        priority number. Returns {"answers": {endpoint: count}, "routing_method": ...}."""
        with self.lock:
            prof = self.profiles.get(profile.lower())
            if prof is None:
                raise ArmError(404, "ResourceNotFound", f"no profile {profile!r}")
            now = time.time()
            enabled = [e for e in prof["endpoints"].values() if e["status"] == "Enabled"]
            serving = [e for e in enabled if self.monitor_status(prof, e, now) in ("Online", "CheckingEndpoint")]
            serving = serving or enabled
            method = prof["routing_method"]
        answers = {e["name"]: 0 for e in prof["endpoints"].values()}
        if serving and prof["status"] == "Enabled":
            if method.lower() == "weighted":
                rng = random.Random(seed)
                picks = rng.choices(serving, weights=[e["weight"] for e in serving], k=queries)
                for e in picks:
                    answers[e["name"]] += 1
            else:
                best = min(serving, key=lambda e: e["priority"] if e["priority"] is not None else 1001)
                answers[best["name"]] = queries
        return {"answers": answers, "queries": queries, "routing_method": method}

    def profiles_snapshot(self) -> dict:
        with self.lock:
            return {
                p["name"]: {
                    "status": p["status"],
                    "routing_method": p["routing_method"],
                    "endpoints": {e["name"]: {**e, "monitor_status": self.monitor_status(p, e)}
                                  for e in p["endpoints"].values()},
                }
                for p in self.profiles.values()
            }
