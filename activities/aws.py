"""Every call opsflow makes to AWS: RDS for PostgreSQL, Route 53 failover records, S3 for reports.

Synchronous boto3 (run these in sync activities on the worker's thread pool). A client is built per call
from the inventory's `AwsConnection` (`endpoint_url` override, e.g. the lab's moto server, and region);
credentials come from boto3's usual chain (environment, profile, instance/task role), never from the
inventory. botocore retries a few times itself (standard mode, 3 attempts); what is left is mapped onto
Temporal errors by `aws_errors()`:

* access denied / not found / invalid parameter (and missing credentials) -> `ApplicationError(...,
  non_retryable=True)` whose message names the resource (type AwsAccessDenied, AwsNotFound,
  AwsInvalidParameter, AwsCredentials);
* throttling, HTTP 5xx, connection failures and anything else -> retryable (AwsThrottled, AwsUnavailable,
  AwsError); the activity's retry policy bounds them.

Waits heartbeat when they run inside an activity (`activity.in_activity()`), and work outside one too.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.postgres import connect, sql_check_writable, sql_fence, sql_status, sql_unfence
from opsflow.inventory import AwsConnection
from opsflow.models import DbStatus, EndpointState, PromoteResult, RegionTarget, TrafficRequest, TrafficStatus

log = logging.getLogger(__name__)

_THROTTLED = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "RequestLimitExceeded", "TooManyRequestsException", "SlowDown", "PriorRequestNotComplete", "BandwidthLimitExceeded",
}
_ACCESS = {
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess", "AuthorizationError",
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "AuthFailure", "OptInRequired",
}
_INVALID = {
    "InvalidInput", "InvalidArgument", "InvalidRequest", "ValidationError", "ValidationException", "MissingParameter",
    "MalformedQueryString", "InvalidChangeBatch", "InvalidDomainName", "InvalidAction",
}


# -- clients and errors -------------------------------------------------------------------------------


def _client(conn: AwsConnection | None, service: str, region: str | None = None) -> Any:
    conn = conn or AwsConnection()
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
        user_agent_extra="opsflow",
        s3={"addressing_style": "path"} if conn.endpoint_url else None,
    )
    # A new Session per call: boto3's default session is not thread-safe, and activities run on a pool.
    return boto3.session.Session().client(service, region_name=region or conn.default_region, endpoint_url=conn.endpoint_url, config=config)


def aws_error(e: Exception, what: str) -> ApplicationError:
    """An AWS SDK error as a Temporal ApplicationError whose message names `what` (the resource)."""
    if isinstance(e, ApplicationError):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        message = str(err.get("Message", "") or "").strip()
        http = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        text = f"{what}: {code or http}: {message or e}"
        details = {"code": code, "http_status": http, "resource": what}
        if code in _THROTTLED or "Throttl" in code:
            return ApplicationError(text, details, type="AwsThrottled")
        if http >= 500 or code in ("InternalFailure", "InternalError", "ServiceUnavailable", "ServiceUnavailableException"):
            return ApplicationError(text, details, type="AwsUnavailable")
        if code in _ACCESS or "AccessDenied" in code or http == 403:
            return ApplicationError(text, details, type="AwsAccessDenied", non_retryable=True)
        if "NotFound" in code or code.startswith("NoSuch") or http == 404:
            return ApplicationError(text, details, type="AwsNotFound", non_retryable=True)
        if code.startswith("InvalidParameter") or code in _INVALID:
            return ApplicationError(text, details, type="AwsInvalidParameter", non_retryable=True)
        return ApplicationError(text, details, type="AwsError")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return ApplicationError(f"{what}: no AWS credentials on this worker ({e})", type="AwsCredentials", non_retryable=True)
    if isinstance(e, NoRegionError):
        return ApplicationError(f"{what}: no AWS region given", type="AwsInvalidParameter", non_retryable=True)
    if isinstance(e, BotoCoreError):  # connection refused/reset, timeouts, unparsable answers
        return ApplicationError(f"{what}: {e}", type="AwsUnavailable")
    return ApplicationError(f"{what}: {type(e).__name__}: {e}", type="AwsError")


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ApplicationError:
        raise
    except (ClientError, BotoCoreError) as e:
        raise aws_error(e, what) from None


def _code(e: ApplicationError) -> str:
    d = e.details[0] if e.details else None
    return d.get("code", "") if isinstance(d, dict) else ""


def _heartbeat(details: Any) -> None:
    if activity.in_activity():
        activity.heartbeat(details)


def _heartbeat_details() -> list[Any]:
    """What the previous attempt of this activity heartbeated last (empty outside an activity)."""
    if not activity.in_activity():
        return []
    try:
        return list(activity.info().heartbeat_details or [])
    except Exception:  # noqa: BLE001 - payloads that do not decode: start afresh
        return []


def _time_limit(default: float) -> float:
    """The activity's start-to-close limit less a margin (so we report a timeout ourselves), else default."""
    if activity.in_activity():
        info = activity.info()
        limit = info.start_to_close_timeout or info.schedule_to_close_timeout
        if limit:
            return max(5.0, limit.total_seconds() - 5.0)
    return default


class _Poll:
    """Poll intervals that start short (the lab answers in a second) and back off to `cap` (RDS takes minutes)."""

    def __init__(self, first: float = 0.25, cap: float = 5.0):
        self.delay, self.cap = first, cap

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.cap, self.delay * 1.5)


# -- RDS ----------------------------------------------------------------------------------------------


class RdsInstance:
    """DatabaseProvider for provider "aws-rds": an RDS for PostgreSQL instance.

    status(): with a `dsn` that answers, the SQL status (role, LSNs, lag, fence) plus the control plane's
    `DBInstanceStatus` in cloud_state and "ReadReplica"/"Primary" (from ReadReplicaSourceDBInstanceIdentifier)
    in cloud_role. Without a dsn, or when SQL does not answer, the role comes from RDS and the lag from the
    CloudWatch metric AWS/RDS ReplicaLag (seconds; unknown when CloudWatch has no recent datapoint); without
    a dsn `reachable` means RDS reports the instance `available`, with a dsn that fails it is False.

    fence()/unfence(): RDS gives no superuser, so ALTER SYSTEM does not work there. When a parameter group is
    named (`parameter_group`: the constructor argument, or the inventory field of that name once it has one)
    the fence sets `default_transaction_read_only` to 1 (unfence: 0) in that group with ApplyMethod=immediate:
    PostgreSQL reloads it, and every new transaction, in new and existing sessions, starts read-only. The group
    must be attached to this instance only (checked: fencing a shared group would fence its replicas, and a
    promoted replica would refuse writes). Sessions are not ended on this path; the drain before the fence
    handles them. Without a parameter group: the SQL fence of activities.postgres (ALTER SYSTEM, reload, end
    sessions), which needs a superuser: the lab and self-managed servers, not production RDS.

    promote(force): idempotent. Standalone and `available` already -> already_primary=True. Otherwise
    PromoteReadReplica (unless a promotion is already under way, e.g. after a worker crash), wait until RDS
    shows the instance `available` without a source (heartbeating), then until a probe write commits over SQL.
    `force` changes nothing: RDS promotes without asking the source either way.
    """

    DEFAULT_PROMOTE_TIMEOUT = 1800.0  # RDS promotions take minutes; the activity's own limit wins when there is one
    FENCE_TIMEOUT = 120.0
    PROMOTE_GRACE = 60.0  # after PromoteReadReplica, how long RDS may keep showing an available replica
    _BROKEN = {"failed", "incompatible-parameters", "incompatible-restore", "incompatible-network", "storage-full",
               "inaccessible-encryption-credentials", "deleting", "stopped", "stopping"}

    def __init__(self, target: RegionTarget, *, parameter_group: str | None = None, promote_timeout: float | None = None):
        if target.database.provider != "aws-rds":
            raise ValueError(f"RdsInstance serves provider 'aws-rds', not {target.database.provider!r}")
        self.target = target
        self.db = target.database
        self.conn = target.aws or AwsConnection()
        self.parameter_group = parameter_group or getattr(self.db, "parameter_group", None)
        self.promote_timeout = promote_timeout

    @property
    def ident(self) -> str:
        return self.db.db_instance_identifier

    @property
    def what(self) -> str:
        return f"RDS instance {self.ident} in {self.db.aws_region}"

    def _rds(self) -> Any:
        return _client(self.conn, "rds", self.db.aws_region)

    def describe(self) -> dict[str, Any]:
        with aws_errors(self.what):
            return self._rds().describe_db_instances(DBInstanceIdentifier=self.ident)["DBInstances"][0]

    @staticmethod
    def _cloud(inst: dict[str, Any]) -> tuple[str, str, str | None]:
        source = inst.get("ReadReplicaSourceDBInstanceIdentifier")
        return inst.get("DBInstanceStatus", "unknown"), ("ReadReplica" if source else "Primary"), source

    # status ----------------------------------------------------------------------------------------
    def status(self) -> DbStatus:
        region = self.target.region
        inst: dict[str, Any] | None = None
        cloud_error = None
        try:
            inst = self.describe()
        except ApplicationError as e:
            if e.non_retryable:  # not found, access denied: a configuration error, not an outage
                raise
            cloud_error = f"RDS API: {e.message}"
        cloud_state, cloud_role, source = self._cloud(inst) if inst else (None, None, None)

        sql_error = None
        if self.db.dsn:
            s = sql_status(self.db, region)
            if s.reachable:
                error = "; ".join(x for x in (s.error, cloud_error) if x) or None
                return s.model_copy(update={"cloud_state": cloud_state, "cloud_role": cloud_role, "error": error})
            sql_error = s.error
        if inst is None:
            return DbStatus(region=region, reachable=False, error="; ".join(x for x in (sql_error, cloud_error) if x))
        lag = self._replica_lag() if source else None
        return DbStatus(
            region=region,
            reachable=(cloud_state == "available") and not self.db.dsn,
            error=sql_error,
            role="replica" if source else "primary",
            replay_delay_seconds=lag,
            cloud_state=cloud_state,
            cloud_role=cloud_role,
        )

    def _replica_lag(self) -> float | None:
        """The latest AWS/RDS ReplicaLag datapoint of the last 10 minutes (seconds), or None."""
        now = datetime.now(timezone.utc)
        try:
            with aws_errors(f"CloudWatch ReplicaLag of {self.what}"):
                points = _client(self.conn, "cloudwatch", self.db.aws_region).get_metric_statistics(
                    Namespace="AWS/RDS",
                    MetricName="ReplicaLag",
                    Dimensions=[{"Name": "DBInstanceIdentifier", "Value": self.ident}],
                    StartTime=now - timedelta(minutes=10),
                    EndTime=now + timedelta(minutes=1),
                    Period=60,
                    Statistics=["Maximum"],
                )["Datapoints"]
        except ApplicationError as e:
            log.warning("%s", e.message)
            return None
        if not points:
            return None
        latest = max(points, key=lambda p: p["Timestamp"])
        value = latest.get("Maximum")
        return max(0.0, float(value)) if value is not None else None

    # fence -----------------------------------------------------------------------------------------
    def fence(self) -> None:
        self.describe()  # the inventory's instance exists (else non-retryable, naming it) before we touch SQL
        if self.parameter_group:
            self._set_read_only(True)
        elif self.db.dsn:
            sql_fence(self.db)
        else:
            raise ApplicationError(
                f"cannot fence {self.what}: the inventory names neither a dsn nor a parameter group",
                type="FenceUnsupported", non_retryable=True,
            )

    def unfence(self) -> None:
        self.describe()
        if self.parameter_group:
            self._set_read_only(False)
        elif self.db.dsn:
            sql_unfence(self.db)
        else:
            raise ApplicationError(
                f"cannot unfence {self.what}: the inventory names neither a dsn nor a parameter group",
                type="FenceUnsupported", non_retryable=True,
            )

    def _set_read_only(self, on: bool) -> None:
        group = self.parameter_group
        what = f"DB parameter group {group} of {self.what}"
        rds = self._rds()
        inst = self.describe()  # again: fence() looked already, but this one is cheap and current
        attached = [g.get("DBParameterGroupName", "") for g in inst.get("DBParameterGroups", [])]
        if group.lower() not in (g.lower() for g in attached):
            raise ApplicationError(f"{what}: not attached to the instance (it has {', '.join(attached) or 'none'})",
                                   type="AwsInvalidParameter", non_retryable=True)
        with aws_errors(f"RDS instances in {self.db.aws_region}"):
            others = [
                i["DBInstanceIdentifier"]
                for page in rds.get_paginator("describe_db_instances").paginate()
                for i in page["DBInstances"]
                if i["DBInstanceIdentifier"] != self.ident
                and group.lower() in (g.get("DBParameterGroupName", "").lower() for g in i.get("DBParameterGroups", []))
            ]
        if others:
            raise ApplicationError(
                f"{what}: shared with {', '.join(sorted(others))}; fencing through it would fence them too. "
                f"Give this instance a parameter group of its own.",
                type="AwsInvalidParameter", non_retryable=True,
            )
        with aws_errors(what):
            rds.modify_db_parameter_group(
                DBParameterGroupName=group,
                Parameters=[{"ParameterName": "default_transaction_read_only", "ParameterValue": "1" if on else "0", "ApplyMethod": "immediate"}],
            )
        # Wait until it took effect: over SQL where we can, else until RDS reports the group in sync.
        deadline = time.monotonic() + self.FENCE_TIMEOUT
        poll = _Poll(0.1, 2.0)
        while True:
            if self.db.dsn:
                s = sql_status(self.db, self.target.region)
                done, seen = s.reachable and s.read_only == on, (f"read_only={s.read_only}" if s.reachable else s.error)
            else:
                groups = self.describe().get("DBParameterGroups", [])
                state = next((g.get("ParameterApplyStatus") for g in groups if g.get("DBParameterGroupName", "").lower() == group.lower()), None)
                done, seen = state == "in-sync", f"ParameterApplyStatus={state}"
            if done:
                return
            if time.monotonic() > deadline:
                raise ApplicationError(f"{what}: default_transaction_read_only={'1' if on else '0'} not in effect after "
                                       f"{self.FENCE_TIMEOUT:.0f}s ({seen})", type="FenceIncomplete")
            _heartbeat({"phase": "fence" if on else "unfence", "seen": seen})
            poll.sleep()

    # promote ---------------------------------------------------------------------------------------
    def promote(self, force: bool) -> PromoteResult:
        timeout = self.promote_timeout if self.promote_timeout is not None else _time_limit(self.DEFAULT_PROMOTE_TIMEOUT)
        started = time.monotonic()
        deadline = started + timeout
        inst = self.describe()
        state, _, source = self._cloud(inst)
        if not source and state == "available":
            sql = sql_status(self.db, self.target.region) if self.db.dsn else None
            if sql is None or not sql.reachable or sql.role == "primary":
                return PromoteResult(already_primary=True, seconds=0.0, timeline=sql.timeline if sql and sql.reachable else None)
            # RDS shows it standalone but PostgreSQL is still in recovery: a promotion is finishing. Wait below.

        called_at: float | None = None
        seen_busy = False
        poll = _Poll()
        while True:
            state, _, source = self._cloud(inst)
            waited = time.monotonic() - started
            _heartbeat({"phase": "rds promotion", "rds_status": state, "source": source, "waited_seconds": round(waited, 1)})
            if state in self._BROKEN:
                raise ApplicationError(f"promote {self.what}: RDS reports it {state!r}", {"rds_status": state},
                                       type="RdsInstanceState", non_retryable=True)
            if state != "available":
                seen_busy = True
            elif not source:
                break  # promoted
            elif called_at is None:
                called_at = self._promote_call()
                seen_busy = False
            elif seen_busy or time.monotonic() - called_at > self.PROMOTE_GRACE:
                raise ApplicationError(
                    f"promote {self.what}: RDS finished but the instance still replicates from {source}; retrying promotes again",
                    type="PromoteFailed",
                )
            if time.monotonic() > deadline:
                raise ApplicationError(f"promote {self.what}: RDS still shows {state!r} (source {source}) after {waited:.0f}s",
                                       type="PromoteTimeout")
            poll.sleep()
            inst = self.describe()

        rds_seconds = time.monotonic() - (called_at or started)
        if not self.db.dsn:
            return PromoteResult(already_primary=False, seconds=round(rds_seconds, 3))
        self._wait_writable(deadline, started)
        seconds = time.monotonic() - (called_at or started)
        received = replayed = None
        try:
            with connect(self.db) as conn:
                # After recovery these stay at the last positions received / replayed while it was a replica.
                received, replayed = conn.execute("select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text").fetchone()
        except Exception as e:  # noqa: BLE001 - the positions are for the report; the promotion stands
            log.warning("promote %s: could not read the last replayed position: %s", self.what, e)
        after = sql_status(self.db, self.target.region)
        return PromoteResult(
            already_primary=False,
            seconds=round(seconds, 3),
            timeline=after.timeline if after.reachable else None,
            lsn_at_promotion=replayed,
            received_lsn=received,
        )

    def _promote_call(self) -> float:
        try:
            with aws_errors(self.what):
                self._rds().promote_read_replica(DBInstanceIdentifier=self.ident)
        except ApplicationError as e:
            # Promoted (or promoting) between our look and the call: the wait that follows sorts it out.
            if _code(e) != "InvalidDBInstanceState":
                raise
            log.info("promote %s: %s", self.what, e.message)
        return time.monotonic()

    def _wait_writable(self, deadline: float, started: float) -> None:
        poll = _Poll(0.1, 2.0)
        while True:
            try:
                sql_check_writable(self.db, region=self.target.region)
                return
            except ApplicationError as e:
                if e.non_retryable:
                    raise
                s = sql_status(self.db, self.target.region)
                if s.reachable and s.role == "primary" and s.read_only:
                    raise ApplicationError(
                        f"promote {self.what}: promoted, but it refuses writes because default_transaction_read_only is on "
                        f"(a fence, or its parameter group): unfence it", type="NotWritable", non_retryable=True,
                    ) from None
                waited = time.monotonic() - started
                if time.monotonic() > deadline:
                    raise ApplicationError(f"promote {self.what}: promoted in RDS but not writable after {waited:.0f}s: {e.message}",
                                           type="PromoteTimeout") from None
                _heartbeat({"phase": "waiting for a write to commit", "waited_seconds": round(waited, 1), "last": e.message})
                poll.sleep()

    def check_writable(self) -> None:
        if not self.db.dsn:
            raise ApplicationError(f"cannot probe writes on {self.what}: the inventory gives no dsn", type="DatabaseConfig", non_retryable=True)
        sql_check_writable(self.db, region=self.target.region)


# -- Route 53 -----------------------------------------------------------------------------------------


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
        return _client(self.conn, "route53")

    def records(self) -> dict[str, dict[str, Any]]:
        """The record sets of name/type that have a SetIdentifier, by SetIdentifier."""
        r53 = self._r53()
        out: dict[str, dict[str, Any]] = {}
        kwargs: dict[str, Any] = {"HostedZoneId": self.zone_id, "StartRecordName": self.name, "StartRecordType": self.type}
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
            endpoints.append(EndpointState(
                region=region,
                endpoint=set_id,
                enabled=role == "PRIMARY",
                priority={"PRIMARY": 1, "SECONDARY": 2}.get(role or ""),
                monitor_status=self._health(rr.get("HealthCheckId")),
            ))
        if not endpoints:
            raise ApplicationError(
                f"{self.what}: no failover record with a SetIdentifier of {', '.join(sorted(self.request.endpoints.values()))}",
                type="AwsNotFound", non_retryable=True,
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

    def switch(self) -> TrafficStatus:
        to = self.request.to_region
        if to not in self.request.endpoints:
            raise ApplicationError(f"{self.what}: region {to!r} has no traffic endpoint in the inventory", type="AwsInvalidParameter", non_retryable=True)
        target_id = self.request.endpoints[to]
        recs = self.records()
        target = recs.get(target_id)
        if target is None:
            raise ApplicationError(f"{self.what}: no failover record with SetIdentifier {target_id!r} (region {to})",
                                   type="AwsNotFound", non_retryable=True)
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
            previous = next((d for d in _heartbeat_details() if isinstance(d, dict) and d.get("change_id")), None)
            change_id = previous["change_id"] if previous else None
        if change_id:
            self._wait_insync(change_id)
        return self.status()

    def _wait_insync(self, change_id: str) -> None:
        timeout = self.sync_timeout if self.sync_timeout is not None else _time_limit(self.DEFAULT_SYNC_TIMEOUT)
        started = time.monotonic()
        poll = _Poll(0.25, 5.0)
        r53 = self._r53()
        while True:
            with aws_errors(f"Route 53 change {change_id} of {self.what}"):
                status = r53.get_change(Id=change_id)["ChangeInfo"]["Status"]
            waited = time.monotonic() - started
            _heartbeat({"change_id": change_id, "status": status, "waited_seconds": round(waited, 1)})
            if status == "INSYNC":
                return
            if waited > timeout:
                raise ApplicationError(f"Route 53 change {change_id} of {self.what} still {status} after {waited:.0f}s", type="ChangeNotInSync")
            poll.sleep()


# -- S3 -----------------------------------------------------------------------------------------------


def store_report_s3(conn: AwsConnection, bucket: str, key: str, body: str, content_type: str) -> str:
    """Put a report into s3://bucket/key (UTF-8); returns that URL. Overwrites: same key, same report."""
    key = key.lstrip("/")
    with aws_errors(f"S3 object s3://{bucket}/{key}"):
        _client(conn, "s3").put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"), ContentType=content_type)
    return f"s3://{bucket}/{key}"
