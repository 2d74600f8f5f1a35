"""Azure Traffic Manager: `AzureTrafficManagerRouter` (TrafficProvider), the endpoint states of a profile and the
switch of traffic to one region."""

from __future__ import annotations

import logging
import time
from typing import Any

from temporalio.exceptions import ApplicationError

from activities.azure.arm import arm_errors, field, traffic_manager_client
from activities.context import Backoff, logger
from activities.context import heartbeat as _heartbeat
from activities.context import sleep_or_cancelled as _sleep
from activities.context import time_limit as _time_budget
from opsflow.inventory import AzureConnection, AzureTrafficManager
from opsflow.models import EndpointState, TrafficRequest, TrafficStatus

log = logging.getLogger(__name__)


DEFAULT_SWITCH_TIMEOUT = 600.0


def _endpoint_type_segment(type_name: str | None) -> str:
    """'Microsoft.Network/trafficManagerProfiles/externalEndpoints' -> 'ExternalEndpoints' (the URL segment)."""
    last = (type_name or "").rsplit("/", 1)[-1]
    return last[:1].upper() + last[1:] if last else "ExternalEndpoints"


class AzureTrafficManagerRouter:
    """TrafficProvider for Azure Traffic Manager (priority routing: the enabled, Online endpoint with the lowest
    priority number serves)."""

    def __init__(self, request: TrafficRequest):
        if not isinstance(request.traffic, AzureTrafficManager):
            raise ValueError(
                f"AzureTrafficManagerRouter serves provider 'azure-traffic-manager', not {request.traffic.provider!r}"
            )
        self.request = request
        self.tm: AzureTrafficManager = request.traffic
        self.conn = request.azure or AzureConnection()
        self._client: Any = None

    @property
    def resource(self) -> str:
        return (f"Traffic Manager profile {self.tm.profile} (resource group {self.tm.resource_group}, "
                f"subscription {self.tm.subscription_id})")

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = traffic_manager_client(self.conn, self.tm.subscription_id)
        return self._client

    def _profile(self) -> Any:
        with arm_errors(f"get {self.resource}"):
            return self.client.profiles.get(self.tm.resource_group, self.tm.profile)

    def _endpoints(self, profile: Any) -> dict[str, Any]:
        """The profile's endpoints by lower-case name; every endpoint the inventory names must be there."""
        found = {(field(e, "name") or "").lower(): e for e in (field(profile, "properties", "endpoints") or [])}
        missing = [
            f"{name} (region {region})" for region, name in self.request.endpoints.items() if name.lower() not in found
        ]
        if missing:
            raise ApplicationError(
                f"{self.resource} has no endpoint {', '.join(missing)}; it has: "
                f"{', '.join(field(e, 'name') for e in found.values()) or 'none'}",
                type="AzureResourceNotFound",
                non_retryable=True,
            )
        return found

    def _state(self, profile: Any) -> TrafficStatus:
        found = self._endpoints(profile)
        region_of = {name.lower(): region for region, name in self.request.endpoints.items()}
        states = []
        for region, name in self.request.endpoints.items():
            e = found[name.lower()]
            states.append(
                EndpointState(
                    region=region,
                    endpoint=field(e, "name"),
                    enabled=(field(e, "properties", "endpoint_status") or "").lower() == "enabled",
                    priority=field(e, "properties", "priority"),
                    monitor_status=field(e, "properties", "endpoint_monitor_status"),
                )
            )
        serving = None
        candidates = [
            e
            for e in found.values()
            if (field(e, "properties", "endpoint_status") or "").lower() == "enabled"
            and (field(e, "properties", "endpoint_monitor_status") or "") == "Online"
        ]
        if self._priority_routing(profile) and candidates:
            best = min(candidates, key=lambda e: field(e, "properties", "priority") or 1001)
            serving = region_of.get((field(best, "name") or "").lower())
        elif len(candidates) == 1:
            serving = region_of.get((field(candidates[0], "name") or "").lower())
        return TrafficStatus(endpoints=states, serving_region=serving)

    @staticmethod
    def _priority_routing(profile: Any) -> bool:
        return (field(profile, "properties", "traffic_routing_method") or "").lower() == "priority"

    def status(self) -> TrafficStatus:
        return self._state(self._profile())

    def _patch(self, endpoint: Any, props: dict[str, Any]) -> None:
        name = field(endpoint, "name")
        what = f"update endpoint {name} of {self.resource} ({', '.join(f'{k}={v}' for k, v in props.items())})"
        logger(log).info(what)
        _heartbeat(what)
        with arm_errors(what):
            self.client.endpoints.update(
                self.tm.resource_group,
                self.tm.profile,
                _endpoint_type_segment(field(endpoint, "type")),
                name,
                {"properties": props},
            )

    def switch(self) -> TrafficStatus:
        """Send traffic to request.to_region. Idempotent (only what differs is changed).

        1. make room: an other endpoint holding priority 1 moves to a free priority (priorities are unique);
        2. the target endpoint: Enabled, priority 1;
        3. wait (heartbeating) until Traffic Manager reports it Online: Degraded raises EndpointDegraded, and
           the other endpoints are left as they were, so traffic stays where it is;
        4. the other endpoints: Disabled, priorities 2, 3, ... in their previous order.
        """
        to_region = self.request.to_region
        if to_region not in self.request.endpoints:
            raise ApplicationError(
                f"traffic: region {to_region!r} has no endpoint in the inventory",
                type="TrafficConfig",
                non_retryable=True,
            )
        deadline = time.monotonic() + _time_budget(DEFAULT_SWITCH_TIMEOUT)
        profile = self._profile()
        found = self._endpoints(profile)
        priority_routing = self._priority_routing(profile)
        target_key = self.request.endpoints[to_region].lower()
        target = found[target_key]
        others = [e for k, e in found.items() if k != target_key]

        def prio(e: Any) -> int | None:
            return field(e, "properties", "priority")

        def enabled(e: Any) -> bool:
            return (field(e, "properties", "endpoint_status") or "").lower() == "enabled"

        if priority_routing:
            used = {prio(e) for e in found.values() if prio(e) is not None}
            for e in others:
                if prio(e) == 1:
                    free = next(p for p in list(range(max(used) + 1, 1001)) + list(range(2, 1001)) if p not in used)
                    self._patch(e, {"priority": free})
                    used.discard(1)
                    used.add(free)
        want: dict[str, Any] = {}
        if not enabled(target):
            want["endpointStatus"] = "Enabled"
        if priority_routing and prio(target) != 1:
            want["priority"] = 1
        if want:
            self._patch(target, want)
        self._wait_online(target_key, deadline)
        # Traffic is on the target now: take the others out of rotation, priorities after the target's.
        profile = self._profile()
        found = self._endpoints(profile)
        others = sorted((e for k, e in found.items() if k != target_key), key=lambda e: (prio(e) is None, prio(e) or 0))
        for n, e in enumerate(others, start=2):
            props: dict[str, Any] = {}
            if enabled(e):
                props["endpointStatus"] = "Disabled"
            if priority_routing and prio(e) != n:
                props["priority"] = n
            if props:
                self._patch(e, props)
        return self.status()

    def prepare(self) -> TrafficStatus:
        """Before a planned switch (priority routing): enable the target's endpoint behind every enabled one, so that
        Traffic Manager probes it (CheckingEndpoint, then Online) while the failover fences and promotes, and the
        switch finds it Online. It takes no traffic while an endpoint ahead of it is Online. Nothing is done when
        it is enabled already, when the profile does not route by priority (an enabled endpoint would take a share
        at once) or when no enabled endpoint is Online (it would take the traffic at once). Idempotent."""
        to_region = self.request.to_region
        if to_region not in self.request.endpoints:
            raise ApplicationError(f"traffic: region {to_region!r} has no endpoint in the inventory",
                                   type="TrafficConfig", non_retryable=True)
        profile = self._profile()
        found = self._endpoints(profile)
        target_key = self.request.endpoints[to_region].lower()
        target = found[target_key]

        def enabled(e: Any) -> bool:
            return (field(e, "properties", "endpoint_status") or "").lower() == "enabled"

        ahead = [e for k, e in found.items() if k != target_key and enabled(e)]
        online = [e for e in ahead if field(e, "properties", "endpoint_monitor_status") == "Online"]
        if enabled(target) or not self._priority_routing(profile) or not online:
            return self._state(profile)
        last = max(field(e, "properties", "priority") or 0 for e in ahead)
        props: dict[str, Any] = {"endpointStatus": "Enabled"}
        if (field(target, "properties", "priority") or 0) <= last:
            used = {field(e, "properties", "priority") for e in found.values()}
            props["priority"] = next(p for p in range(last + 1, 1001) if p not in used)
        self._patch(target, props)
        return self.status()

    def _wait_online(self, target_key: str, deadline: float) -> None:
        started = time.monotonic()
        # Quick looks first (an endpoint already probed is Online at once), then the inventory's cadence.
        backoff = Backoff(0.05, max(0.2, min(self.conn.polling_interval, 5.0)))
        while True:
            profile = self._profile()
            e = self._endpoints(profile)[target_key]
            monitor = field(e, "properties", "endpoint_monitor_status")
            if monitor == "Online":
                return
            if monitor in ("Degraded", "Stopped"):
                raise ApplicationError(
                    f"traffic: endpoint {field(e, 'name')} of {self.resource} (region {self.request.to_region}) is "
                    f"{monitor}: Traffic Manager's health probes fail there, so it will not take traffic; the other "
                    "endpoints were left as they were",
                    {"endpoint": field(e, "name"), "monitor_status": monitor},
                    type="EndpointDegraded",
                    non_retryable=True,
                )
            waited = time.monotonic() - started
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"traffic: endpoint {field(e, 'name')} of {self.resource} is still {monitor} after {waited:.0f}s",
                    type="EndpointNotOnline",
                )
            _heartbeat(
                {
                    "phase": "waiting for the endpoint to be Online",
                    "endpoint": field(e, "name"),
                    "monitor_status": monitor,
                    "waited_seconds": round(waited, 1),
                }
            )
            _sleep(backoff.next())


# -- weighted routing: a region-level canary (the rollout's traffic-manager router) --------------------------

TM_WEIGHT_SCALE = 10  # a share of p % is the endpoint weight 10 x p (Traffic Manager takes 1..1000)


class TrafficManagerWeights:
    """The canary's share as Traffic Manager endpoint weights (weighted routing): stable and canary endpoints get
    10 x their percent; an endpoint at 0 % is Disabled (Traffic Manager's weights start at 1)."""

    def __init__(self, router: Any, conn: AzureConnection | None):
        self.r = router  # opsflow.rollout.TrafficManagerRouter
        self.conn = conn or AzureConnection()
        self._client: Any = None

    @property
    def resource(self) -> str:
        return (f"Traffic Manager profile {self.r.profile} (resource group {self.r.resource_group}, "
                f"subscription {self.r.subscription_id})")

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = traffic_manager_client(self.conn, self.r.subscription_id)
        return self._client

    def roles(self) -> dict[str, str]:
        return {"stable": self.r.stable_endpoint, "canary": self.r.canary_endpoint}

    def endpoints(self) -> dict[str, Any]:
        """role -> endpoint, read from the profile; a profile without weighted routing or without an endpoint the
        inventory names is refused (non-retryable), naming what it has."""
        with arm_errors(f"get {self.resource}"):
            profile = self.client.profiles.get(self.r.resource_group, self.r.profile)
        method = field(profile, "properties", "traffic_routing_method") or field(profile, "traffic_routing_method")
        if (method or "").lower() != "weighted":
            raise ApplicationError(f"{self.resource} routes by {method}, not Weighted: a canary needs weighted "
                                   "routing", type="TrafficConfig", non_retryable=True)
        found = {(field(e, "name") or "").lower(): e for e in (field(profile, "properties", "endpoints") or
                                                                 field(profile, "endpoints") or [])}
        missing = [n for n in self.roles().values() if n.lower() not in found]
        if missing:
            raise ApplicationError(
                f"{self.resource} has no endpoint {', '.join(missing)}; it has: "
                f"{', '.join(field(e, 'name') for e in found.values()) or 'none'}",
                type="AzureResourceNotFound", non_retryable=True)
        return {role: found[name.lower()] for role, name in self.roles().items()}

    @staticmethod
    def _props(e: Any, key: str) -> Any:
        v = field(e, "properties", key)
        return v if v is not None else field(e, key)

    def shares(self, endpoints: dict[str, Any] | None = None) -> dict[str, int]:
        """role -> percent, as weighted routing answers: an enabled endpoint's weight over the enabled total."""
        eps = endpoints if endpoints is not None else self.endpoints()
        weights = {role: (self._props(e, "weight") or 1) if (self._props(e, "endpoint_status") or "").lower()
                   == "enabled" else 0 for role, e in eps.items()}
        total = sum(weights.values())
        return {role: round(100 * w / total) if total else 0 for role, w in weights.items()}

    def set(self, shares: dict[str, int]) -> dict[str, int]:
        """Give each role its share; the endpoint that gains weight first, so no moment has both disabled."""
        eps = self.endpoints()
        order = sorted(shares, key=lambda role: -shares[role])  # the larger share first: never both at 0
        for role in order:
            e, pct = eps[role], shares[role]
            enabled = (self._props(e, "endpoint_status") or "").lower() == "enabled"
            props: dict[str, Any] = {}
            if pct > 0:
                if not enabled:
                    props["endpointStatus"] = "Enabled"
                if self._props(e, "weight") != pct * TM_WEIGHT_SCALE:
                    props["weight"] = pct * TM_WEIGHT_SCALE
            elif enabled:
                props["endpointStatus"] = "Disabled"
            if not props:
                continue
            name = field(e, "name")
            what = f"update endpoint {name} of {self.resource} ({', '.join(f'{k}={v}' for k, v in props.items())})"
            logger(log).info(what)
            _heartbeat(what)
            with arm_errors(what):
                self.client.endpoints.update(self.r.resource_group, self.r.profile, self.r.endpoint_type, name,
                                             {"properties": props})
        return self.shares()
