"""Route 53: `Route53Router` (TrafficProvider) on a pair of failover records."""

from __future__ import annotations

import logging
import time
from typing import Any

from temporalio.exceptions import ApplicationError

from activities.aws.session import Poll, aws_errors, client, heartbeat_details
from activities.context import heartbeat as _heartbeat
from activities.context import time_limit as _time_limit
from opsflow.inventory import AwsConnection
from opsflow.models import EndpointState, TrafficRequest, TrafficStatus

log = logging.getLogger(__name__)


def _fqdn(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


class Route53Router:
    """TrafficProvider for provider "route53": a pair of failover records (PRIMARY/SECONDARY).

    Each region's record is the one whose SetIdentifier is the region's traffic_endpoint. status() reports
    the PRIMARY as enabled (priority 1) and the SECONDARY as not (priority 2), with the record's health check
    (Healthy/Unhealthy, when it has one) as monitor_status; serving_region is the PRIMARY's region unless its
    health check fails and the SECONDARY's does not (Route 53 then answers with the SECONDARY).

    switch() UPSERTs the target region's record as PRIMARY and the other PRIMARY as SECONDARY in one change
    batch (atomic), then waits until GetChange says INSYNC, heartbeating the change id. Idempotent: when the
    records already point at the target it changes nothing; a retry after a crash finds the change id of the
    previous attempt in the heartbeat details and waits for that change.
    """

    DEFAULT_SYNC_TIMEOUT = 600.0  # Route 53 propagates within 60 s as a rule

    def __init__(self, request: TrafficRequest, *, sync_timeout: float | None = None):
        if request.traffic.provider != "route53":
            raise ValueError(f"Route53Router serves provider 'route53', not {request.traffic.provider!r}")
        self.request = request
        self.traffic = request.traffic
        self.conn = request.aws or AwsConnection()
        self.zone_id = self.traffic.hosted_zone_id.rsplit("/", 1)[-1]
        self.name = _fqdn(self.traffic.record_name)
        self.type = self.traffic.record_type.upper()
        self.sync_timeout = sync_timeout

    @property
    def what(self) -> str:
        return f"Route 53 record {self.name} {self.type} in hosted zone {self.zone_id}"

    def _r53(self) -> Any:
        return client(self.conn, "route53")

    def records(self) -> dict[str, dict[str, Any]]:
        """The record sets of name/type that have a SetIdentifier, by SetIdentifier."""
        r53 = self._r53()
        out: dict[str, dict[str, Any]] = {}
        kwargs: dict[str, Any] = {
            "HostedZoneId": self.zone_id,
            "StartRecordName": self.name,
            "StartRecordType": self.type,
        }
        with aws_errors(self.what):
            while True:
                page = r53.list_resource_record_sets(**kwargs)
                for rr in page["ResourceRecordSets"]:
                    if _fqdn(rr["Name"]) != self.name or rr["Type"].upper() != self.type:
                        return out
                    if rr.get("SetIdentifier") is not None:
                        out[rr["SetIdentifier"]] = rr
                if not page.get("IsTruncated"):
                    return out
                kwargs.update(StartRecordName=page["NextRecordName"], StartRecordType=page["NextRecordType"])
                if page.get("NextRecordIdentifier"):
                    kwargs["StartRecordIdentifier"] = page["NextRecordIdentifier"]

    def _health(self, health_check_id: str | None) -> str | None:
        if not health_check_id:
            return None
        try:
            with aws_errors(f"Route 53 health check {health_check_id}"):
                obs = self._r53().get_health_check_status(HealthCheckId=health_check_id)["HealthCheckObservations"]
        except ApplicationError as e:
            log.warning("%s", e.message)
            return None
        if not obs:
            return None
        ok = sum(1 for o in obs if str(o.get("StatusReport", {}).get("Status", "")).startswith("Success"))
        # Route 53 considers an endpoint healthy when more than 18% of its checkers do.
        return "Healthy" if ok / len(obs) > 0.18 else "Unhealthy"

    def _state(self, recs: dict[str, dict[str, Any]]) -> TrafficStatus:
        endpoints = []
        for region, set_id in self.request.endpoints.items():
            rr = recs.get(set_id)
            if rr is None:
                continue
            role = rr.get("Failover")
            endpoints.append(
                EndpointState(
                    region=region,
                    endpoint=set_id,
                    enabled=role == "PRIMARY",
                    priority={"PRIMARY": 1, "SECONDARY": 2}.get(role or ""),
                    monitor_status=self._health(rr.get("HealthCheckId")),
                )
            )
        if not endpoints:
            raise ApplicationError(
                f"{self.what}: no failover record with a SetIdentifier of "
                f"{', '.join(sorted(self.request.endpoints.values()))}",
                type="AwsNotFound",
                non_retryable=True,
            )
        primary = next((e for e in endpoints if e.priority == 1), None)
        secondary = next((e for e in endpoints if e.priority == 2), None)
        serving = primary.region if primary else None
        if primary and secondary and primary.monitor_status == "Unhealthy" and secondary.monitor_status != "Unhealthy":
            serving = secondary.region
        elif primary is None and secondary is not None:
            serving = secondary.region
        return TrafficStatus(endpoints=endpoints, serving_region=serving)

    def status(self) -> TrafficStatus:
        return self._state(self.records())

    def prepare(self) -> TrafficStatus:
        """Nothing to warm: Route 53 health-checks every failover record all the time."""
        return self.status()

    def switch(self) -> TrafficStatus:
        to = self.request.to_region
        if to not in self.request.endpoints:
            raise ApplicationError(
                f"{self.what}: region {to!r} has no traffic endpoint in the inventory",
                type="AwsInvalidParameter",
                non_retryable=True,
            )
        target_id = self.request.endpoints[to]
        recs = self.records()
        target = recs.get(target_id)
        if target is None:
            raise ApplicationError(
                f"{self.what}: no failover record with SetIdentifier {target_id!r} (region {to})",
                type="AwsNotFound",
                non_retryable=True,
            )
        managed = set(self.request.endpoints.values())
        changes = []
        if target.get("Failover") != "PRIMARY":
            changes.append({"Action": "UPSERT", "ResourceRecordSet": {**target, "Failover": "PRIMARY"}})
        for set_id, rr in recs.items():
            if set_id != target_id and set_id in managed and rr.get("Failover") == "PRIMARY":
                changes.append({"Action": "UPSERT", "ResourceRecordSet": {**rr, "Failover": "SECONDARY"}})
        change_id = None
        if changes:
            with aws_errors(self.what):
                info = self._r53().change_resource_record_sets(
                    HostedZoneId=self.zone_id,
                    ChangeBatch={"Comment": f"opsflow {self.request.environment}: traffic to {to}", "Changes": changes},
                )["ChangeInfo"]
            change_id = info["Id"]
            log.info("%s: traffic to %s (change %s, %s)", self.what, to, change_id, info.get("Status"))
        else:
            # Already there. A previous attempt may have made the change and died before it was INSYNC.
            previous = next((d for d in heartbeat_details() if isinstance(d, dict) and d.get("change_id")), None)
            change_id = previous["change_id"] if previous else None
        if change_id:
            self._wait_insync(change_id)
        return self.status()

    def _wait_insync(self, change_id: str) -> None:
        timeout = self.sync_timeout if self.sync_timeout is not None else _time_limit(self.DEFAULT_SYNC_TIMEOUT)
        started = time.monotonic()
        poll = Poll(0.25, 5.0)
        r53 = self._r53()
        while True:
            with aws_errors(f"Route 53 change {change_id} of {self.what}"):
                status = r53.get_change(Id=change_id)["ChangeInfo"]["Status"]
            waited = time.monotonic() - started
            _heartbeat({"change_id": change_id, "status": status, "waited_seconds": round(waited, 1)})
            if status == "INSYNC":
                return
            if waited > timeout:
                raise ApplicationError(
                    f"Route 53 change {change_id} of {self.what} still {status} after {waited:.0f}s",
                    type="ChangeNotInSync",
                )
            poll.sleep()
