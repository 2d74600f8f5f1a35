"""Every call opsflow makes to AWS: RDS for PostgreSQL, Route 53 failover records, S3 for reports and dumps.

`RdsInstance` (DatabaseProvider: status, fence, promote, rebuild_replica for failback), `Route53Router`
(TrafficProvider), `RdsPointInTimeRestore` and `S3DumpRestore` (RestoreProviders for the restore drill),
`store_report_s3` and `upload_dump`.

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

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError
from temporalio import activity
from activities.context import heartbeat as _heartbeat, sleep_or_cancelled as _sleep, time_limit as _time_limit
from temporalio.exceptions import ApplicationError

from activities.postgres import _sql_errors as _db_errors, connect, sql_check_writable, sql_fence, sql_status, sql_unfence, where
from activities.secrets import resolve
from opsflow.inventory import AwsConnection
from opsflow.models import (DbStatus, EndpointState, PromoteResult, RebuildResult, RegionTarget, RestoreRequest, RestoreWindow,
                            ScratchTarget, TrafficRequest, TrafficStatus)

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
    return new_session().client(service, region_name=region or conn.default_region, endpoint_url=conn.endpoint_url, config=config)


_PARSED: dict = {}  # botocore's data files (service models, endpoint rules), parsed once per process


def new_session() -> boto3.session.Session:
    """A new Session per call (boto3's sessions are not thread-safe, and activities run on a pool), so credentials
    come from boto3's chain as they are now. Its loader shares the parsed data files: parsing them again took ~0.2 s of
    CPU per client (a describe loop in a wait made a new client each time). The loader caches the files it parsed in
    `_cache` (botocore.loaders.instance_cache); its results depend only on the search paths, the same for all."""
    core = botocore.session.get_session()
    core.get_component("data_loader")._cache = _PARSED
    return boto3.session.Session(botocore_session=core)


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


def _heartbeat_details() -> list[Any]:
    """What the previous attempt of this activity heartbeated last (empty outside an activity)."""
    if not activity.in_activity():
        return []
    try:
        return list(activity.info().heartbeat_details or [])
    except Exception:  # noqa: BLE001 - payloads that do not decode: start afresh
        return []


class _Poll:
    """Poll intervals that start short (the lab answers in a second) and back off to `cap` (RDS takes minutes)."""

    def __init__(self, first: float = 0.25, cap: float = 5.0):
        self.delay, self.cap = first, cap

    def sleep(self) -> None:
        _sleep(self.delay)
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

    def fence_control_plane(self, budget: float) -> tuple[str, list[str]]:
        """Emergency fence of an old primary that may be dead: default_transaction_read_only=1 in its own
        parameter group (when the inventory names one), else StopDBInstance; then the SQL fence when the server
        answers (self-managed/lab superuser). Raises ApplicationError when the RDS API cannot be reached."""
        actions: list[str] = []
        method = "rds-parameter-group" if self.parameter_group else "rds-stop"
        rds = _client(self.conn, "rds", self.db.aws_region)
        inst = self.describe()
        if self.parameter_group:
            with aws_errors(f"DB parameter group {self.parameter_group} of {self.what}"):
                rds.modify_db_parameter_group(DBParameterGroupName=self.parameter_group, Parameters=[
                    {"ParameterName": "default_transaction_read_only", "ParameterValue": "1", "ApplyMethod": "immediate"}])
            actions.append(f"set default_transaction_read_only=1 in parameter group {self.parameter_group}")
        elif inst.get("DBInstanceStatus") in ("stopped", "stopping"):
            actions.append(f"{self.what} is {inst.get('DBInstanceStatus')} already")
        else:
            with aws_errors(f"stop {self.what}"):
                rds.stop_db_instance(DBInstanceIdentifier=self.ident)
            actions.append(f"asked RDS to stop {self.what}")
        if self.db.dsn:
            try:
                sql_fence(self.db)
                actions.append("fenced it over SQL (read-only, sessions ended)")
            except ApplicationError as e:
                actions.append(f"no SQL fence ({e.message})")
        return method, actions

    def cloud_state(self) -> str | None:
        """One control-plane read: DBInstanceStatus and role (e.g. 'available, ReadReplica')."""
        state, role, _ = self._cloud(self.describe())
        return f"{state}, {role}"

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
                called_at, seen_busy = self._promote_call()
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

    def _promote_call(self) -> tuple[float, bool]:
        """PromoteReadReplica: when it was called, and whether RDS answered that it is at work on it (`modifying`): a
        replica shown available again after that has failed to promote, however quickly that happened."""
        busy = False
        try:
            with aws_errors(self.what):
                answer = self._rds().promote_read_replica(DBInstanceIdentifier=self.ident)
            busy = (answer.get("DBInstance") or {}).get("DBInstanceStatus", "available") != "available"
        except ApplicationError as e:
            # Promoted (or promoting) between our look and the call: the wait that follows sorts it out.
            if _code(e) != "InvalidDBInstanceState":
                raise
            log.info("promote %s: %s", self.what, e.message)
        return time.monotonic(), busy

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

    # rebuild (failback) -------------------------------------------------------------------------------
    DEFAULT_REBUILD_TIMEOUT = 3 * 3600.0  # a cross-region replica of a large instance takes hours; the activity's limit wins
    # States in which RDS accepts a DeleteDBInstance; in the others (creating, modifying, backing-up ...) we wait.
    _DELETABLE = {"available", "stopped", "failed", "storage-full", "incompatible-parameters", "incompatible-restore",
                  "incompatible-network", "inaccessible-encryption-credentials", "incompatible-option-group"}

    def _describe_or_none(self, ident: str | None = None) -> dict[str, Any] | None:
        ident = ident or self.ident
        try:
            with aws_errors(f"RDS instance {ident} in {self.db.aws_region}"):
                return self._rds().describe_db_instances(DBInstanceIdentifier=ident)["DBInstances"][0]
        except ApplicationError as e:
            if e.type == "AwsNotFound":
                return None
            raise

    @staticmethod
    def _is_source(source: str | None, primary: dict[str, Any]) -> bool:
        """Does ReadReplicaSourceDBInstanceIdentifier (an identifier in-region, an ARN across regions) name `primary`?"""
        if not source:
            return False
        return source in (primary.get("DBInstanceIdentifier"), primary.get("DBInstanceArn"))

    def _replica_template(self, inst: dict[str, Any] | None) -> dict[str, Any]:
        """What the new replica keeps of the instance it replaces: class, port (the inventory's DSN points at it),
        parameter group, subnet group, security groups, tags. Carried in heartbeats across a worker crash."""
        t: dict[str, Any] = {}
        if inst:
            t["DBInstanceClass"] = inst.get("DBInstanceClass")
            port = (inst.get("Endpoint") or {}).get("Port") or inst.get("DbInstancePort")
            if port:
                t["Port"] = int(port)
            groups = [g.get("DBParameterGroupName") for g in inst.get("DBParameterGroups", [])]
            if groups and groups[0] and not groups[0].startswith("default."):
                t["DBParameterGroupName"] = groups[0]
            subnet = (inst.get("DBSubnetGroup") or {}).get("DBSubnetGroupName")
            if subnet:
                t["DBSubnetGroupName"] = subnet
            sgs = [g["VpcSecurityGroupId"] for g in inst.get("VpcSecurityGroups", []) if g.get("VpcSecurityGroupId")]
            if sgs and subnet:  # security groups belong to the subnet group's VPC
                t["VpcSecurityGroupIds"] = sgs
            tags = [tag for tag in inst.get("TagList", []) if not tag.get("Key", "").startswith("aws:")]
            if tags:
                t["Tags"] = tags
        if self.db.dsn and "Port" not in t:
            from psycopg.conninfo import conninfo_to_dict

            port = conninfo_to_dict(self.db.dsn).get("port")
            if port and str(port).isdigit():
                t["Port"] = int(port)
        return {k: v for k, v in t.items() if v}

    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """Make this region's RDS instance a read replica of `primary`'s instance again (failback).

        RDS cannot turn a standalone instance into a replica, so the old, diverged primary is deleted (with a
        final snapshot named <id>-before-rebuild-<UTC stamp>: its diverged data is kept, never reused) and
        CreateDBInstanceReadReplica makes a new instance of the same identifier (same endpoint) from the
        primary: by identifier in-region, by ARN across regions. Then wait for `available` (heartbeating the
        RDS status), and, when the inventory gives a DSN, until the replica streams over SQL.

        Idempotent, looking before acting at each turn: a replica of `primary` that is available (and
        streaming) is left as it is (method "already-replica"); one being created (e.g. by an attempt that
        died) is waited for, not recreated; one that failed to build is deleted and built again; an instance
        being deleted is waited for. The primary must be an available standalone instance with automated
        backups (RDS requires them of a replication source)."""
        if primary.database.provider != "aws-rds":
            raise ApplicationError(
                f"rebuild {self.what}: RDS replicates only from an RDS instance; the primary region {primary.region} "
                f"uses provider {primary.database.provider!r}", type="BadInput", non_retryable=True)
        source = RdsInstance(primary)
        started = time.monotonic()
        deadline = started + _time_limit(self.DEFAULT_REBUILD_TIMEOUT)
        previous = next((d for d in _heartbeat_details() if isinstance(d, dict) and d.get("phase")), {})
        template: dict[str, Any] = dict(previous.get("template") or {})
        acted = bool(previous.get("acted"))
        deleted: str | None = previous.get("deleted")
        snapshot_stamp = previous.get("stamp") or datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        poll = _Poll(0.25, 10.0)
        failed_builds = 0

        def beat(phase: str, **extra: Any) -> None:
            _heartbeat({"phase": phase, "acted": acted, "deleted": deleted, "stamp": snapshot_stamp, "template": template,
                        "waited_seconds": round(time.monotonic() - started, 1), **extra})

        while True:
            p = source.describe()
            p_state, _, p_source = self._cloud(p)
            if p_source:
                raise ApplicationError(f"rebuild {self.what}: the primary {source.what} is itself a read replica (of {p_source}); "
                                       f"promote it first or rebuild from the primary", type="NotPrimary", non_retryable=True)
            inst = self._describe_or_none()
            state = inst.get("DBInstanceStatus", "unknown") if inst else None
            if inst is not None and self._is_source(inst.get("ReadReplicaSourceDBInstanceIdentifier"), p):
                if state == "available":
                    break
                if state in self._BROKEN and state not in ("deleting", "stopping", "stopped"):
                    # A replica that failed to build: replace it (the next turn creates it again), once.
                    failed_builds += 1
                    if failed_builds > 1:
                        raise ApplicationError(f"rebuild {self.what}: the read replica of {source.what} failed to build again "
                                               f"(RDS status {state!r}); see the RDS events", type="RebuildFailed")
                    log.warning("rebuild %s: the read replica is %r; deleting it to build it again", self.what, state)
                    self._delete_instance(final_snapshot=None)
                    acted = True
                beat("waiting for the read replica", rds_status=state)
            elif inst is not None:
                # The old, diverged primary (standalone), or a replica of another instance: replace it.
                if not template:
                    template = self._replica_template(inst)
                if state == "deleting":
                    beat("waiting for the old instance to be deleted", rds_status=state)
                elif state in self._DELETABLE:
                    self._refuse_to_replace_a_primary(inst, source)
                    if inst.get("DeletionProtection"):
                        raise ApplicationError(f"rebuild {self.what}: the old instance has deletion protection on; a person must "
                                               f"turn it off to let it be replaced by a read replica", type="Refused", non_retryable=True)
                    snap = f"{self.ident}-before-rebuild-{snapshot_stamp}" if state == "available" else None
                    self._delete_instance(final_snapshot=snap)
                    acted, deleted = True, (f"{self.ident} (final snapshot {snap})" if snap else self.ident)
                    beat("deleting the old instance", rds_status=state, final_snapshot=snap)
                else:
                    beat("waiting for the old instance to settle before deleting it", rds_status=state)
            else:
                if not template:
                    template = self._replica_template(None)
                if p.get("BackupRetentionPeriod") == 0:
                    raise ApplicationError(f"rebuild {self.what}: {source.what} has automated backups off (BackupRetentionPeriod 0), "
                                           f"which RDS requires of a read replica's source; enable them", type="AwsInvalidParameter",
                                           non_retryable=True)
                if p_state != "available":
                    beat("waiting for the primary to be available", primary_status=p_state)
                else:
                    self._create_replica(p, source, template)
                    acted = True
                    beat("creating the read replica", rds_status="creating")
            if time.monotonic() > deadline:
                raise ApplicationError(f"rebuild {self.what}: not a replica of {source.what} after {time.monotonic() - started:.0f}s "
                                       f"(RDS status {state or 'absent'})", type="RebuildTimeout")
            poll.sleep()

        if self.db.dsn:
            self._wait_streaming(deadline, started, beat)
        seconds = round(time.monotonic() - started, 3)
        if not acted:
            return RebuildResult(method="already-replica", seconds=seconds, detail=f"{self.ident} already replicates from {source.ident}")
        detail = f"read replica {self.ident} of {source.ident}" + (f"; replaced {deleted}" if deleted else "")
        preserved = f"RDS final snapshot {deleted.split('final snapshot ', 1)[1].rstrip(')')} of the old instance" \
            if deleted and "final snapshot " in deleted else None
        return RebuildResult(method="rds-read-replica", seconds=seconds, detail=detail, preserved=preserved)

    def _refuse_to_replace_a_primary(self, inst: dict[str, Any], source: "RdsInstance") -> None:
        """Before the old instance is deleted: it must not be the live primary (swapped regions, a split brain)."""
        replicas = inst.get("ReadReplicaDBInstanceIdentifiers") or []
        if replicas:
            raise ApplicationError(f"rebuild {self.what}: it has read replicas ({', '.join(replicas)}): it looks like the primary; "
                                   f"refusing to replace it", type="Refused", non_retryable=True)
        if self.db.dsn and source.db.dsn:
            mine, theirs = sql_status(self.db, self.target.region), sql_status(source.db, source.target.region)
            if (mine.reachable and theirs.reachable and mine.role == "primary" and theirs.role == "primary"
                    and mine.timeline and theirs.timeline and mine.timeline > theirs.timeline):
                raise ApplicationError(
                    f"rebuild {self.what}: it is on timeline {mine.timeline}, later than {source.what} ({theirs.timeline}): it looks like "
                    f"the newer primary; refusing to replace it (check which region is primary)", type="Refused", non_retryable=True)

    def _delete_instance(self, final_snapshot: str | None) -> None:
        kwargs: dict[str, Any] = {"DBInstanceIdentifier": self.ident}
        if final_snapshot:
            kwargs["FinalDBSnapshotIdentifier"] = final_snapshot
        else:
            kwargs["SkipFinalSnapshot"] = True
        try:
            with aws_errors(self.what):
                self._rds().delete_db_instance(**kwargs)
        except ApplicationError as e:
            # Deleted meanwhile, already deleting, or a state that will pass: the next look decides.
            if e.type == "AwsNotFound" or _code(e) in ("InvalidDBInstanceState", "InvalidDBInstanceStateFault"):
                log.info("delete %s: %s", self.what, e.message)
                return
            if _code(e) in ("DBSnapshotAlreadyExists", "DBSnapshotAlreadyExistsFault"):
                # An attempt that died after asking took the snapshot already.
                with aws_errors(self.what):
                    self._rds().delete_db_instance(DBInstanceIdentifier=self.ident, SkipFinalSnapshot=True)
                return
            raise

    def _create_replica(self, p: dict[str, Any], source: "RdsInstance", template: dict[str, Any]) -> None:
        same_region = source.db.aws_region == self.db.aws_region
        kwargs: dict[str, Any] = {
            "DBInstanceIdentifier": self.ident,
            "SourceDBInstanceIdentifier": source.ident if same_region else p["DBInstanceArn"],
            **template,
        }
        if not same_region and p.get("StorageEncrypted"):
            # An encrypted source across regions needs a presigned URL (boto3 makes it from SourceRegion) and a
            # KMS key of this region, which RDS names in its error when it is missing.
            kwargs["SourceRegion"] = source.db.aws_region
        kwargs.setdefault("DBInstanceClass", p.get("DBInstanceClass"))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            with aws_errors(self.what):
                self._rds().create_db_instance_read_replica(**kwargs)
            log.info("rebuild %s: creating a read replica of %s", self.what, source.what)
        except ApplicationError as e:
            if _code(e) not in ("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"):
                raise
            log.info("rebuild %s: %s (the next look decides)", self.what, e.message)

    def _wait_streaming(self, deadline: float, started: float, beat) -> None:
        poll = _Poll(0.2, 5.0)
        while True:
            s = sql_status(self.db, self.target.region)
            if s.reachable and s.role == "replica" and s.streaming:
                return
            seen = (f"role {s.role}, {'streaming' if s.streaming else 'not streaming'}" if s.reachable else f"unreachable: {s.error}")
            if time.monotonic() > deadline:
                raise ApplicationError(f"rebuild {self.what}: RDS shows a read replica but PostgreSQL is not streaming after "
                                       f"{time.monotonic() - started:.0f}s ({seen})", type="RebuildTimeout")
            beat("waiting for the replica to stream", sql=seen)
            poll.sleep()


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


# -- restore drills: RDS point-in-time restore, and a pg_dump in S3 ------------------------------------

DUMP_TIME_METADATA = "opsflow-dump-time"
SCRATCH_TAG = "opsflow-scratch"  # value: the environment; on every RDS instance a drill restores, nothing without it is deleted
SCRATCH_RUN_TAG = "opsflow-run"  # value: the drill run that made it; leftover cleanup spares the current run's


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in inst.get("TagList", []) or []}


def upload_dump(conn: AwsConnection | None, bucket: str, key: str, dump_file: str | Path, dump_time: datetime | None = None) -> str:
    """Put a `pg_dump -Fc` file into s3://bucket/key (multipart when large); returns that URL.

    `dump_time` (when the dump's snapshot was taken; default: the file's modification time) goes into the
    object's metadata as `opsflow-dump-time`: S3DumpRestore takes it as the restore point, which is more exact
    than the object's LastModified (the end of the upload)."""
    key = key.lstrip("/")
    path = Path(dump_file)
    when = _utc(dump_time) if dump_time else datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    extra = {"Metadata": {DUMP_TIME_METADATA: when.isoformat()}, "ContentType": "application/octet-stream"}
    with aws_errors(f"S3 object s3://{bucket}/{key}"):
        _client(conn, "s3").upload_file(str(path), bucket, key, ExtraArgs=extra)
    return f"s3://{bucket}/{key}"


class RdsPointInTimeRestore:
    """RestoreProvider for method "rds-pitr": RestoreDBInstanceToPointInTime of the source region's RDS instance
    into a scratch instance named by the drill, in the source's region, subnet group and security groups (never
    its parameter group: a fence through that group must not reach the scratch instance, and fencing refuses a
    shared group).

    window(): latest = the instance's LatestRestorableTime; earliest = the latest of (latest - the instance's
    BackupRetentionPeriod days, its InstanceCreateTime, the RestoreWindow of its automated backups where RDS
    reports one). start(): idempotent, an instance of that name that the drill made (tag opsflow-scratch=<environment>)
    is reused. status(): ready once `available`, with a DSN made of the source's DSN (user, dbname, sslmode...)
    and the scratch instance's endpoint address and port (in the lab the emulator reports 127.0.0.1 and the
    restored cluster's port there). delete(): DeleteDBInstance(SkipFinalSnapshot) and wait until it is gone;
    only instances tagged as drill scratch instances are deleted or listed, whatever their name.
    """

    METHOD = "rds-pitr"
    DEFAULT_DELETE_TIMEOUT = 1800.0
    _FAILED = {"failed", "incompatible-restore", "incompatible-parameters", "incompatible-network", "storage-full",
               "inaccessible-encryption-credentials", "restore-error"}

    def __init__(self, request: RestoreRequest, *, delete_timeout: float | None = None):
        if request.source.database.provider != "aws-rds":
            raise ApplicationError(f"restore method rds-pitr needs an aws-rds source; region {request.source.region} uses "
                                   f"{request.source.database.provider!r}", type="BadInput", non_retryable=True)
        self.request = request
        self.source = RdsInstance(request.source)
        self.db = self.source.db
        self.delete_timeout = delete_timeout
        self.environment = request.scratch_environment

    def _what(self, name: str) -> str:
        return f"RDS scratch instance {name} in {self.db.aws_region}"

    def _rds(self) -> Any:
        return self.source._rds()

    def _describe(self, name: str) -> dict[str, Any] | None:
        return self.source._describe_or_none(name)

    # window -------------------------------------------------------------------------------------------
    def window(self) -> RestoreWindow:
        inst = self.source.describe()
        retention = int(inst.get("BackupRetentionPeriod") or 0)
        if retention <= 0:
            raise ApplicationError(f"{self.source.what}: automated backups are off (BackupRetentionPeriod 0): no point-in-time "
                                   f"restore is possible", type="RestoreUnavailable", non_retryable=True)
        latest = inst.get("LatestRestorableTime")
        if latest is None:
            raise ApplicationError(f"{self.source.what}: RDS reports no LatestRestorableTime yet (no backup taken yet)",
                                   type="RestoreUnavailable")
        latest = _utc(latest)
        bounds = [latest - timedelta(days=retention)]
        if inst.get("InstanceCreateTime"):
            bounds.append(_utc(inst["InstanceCreateTime"]))
        automated = self._automated_earliest()
        if automated:
            bounds.append(automated)
        earliest = min(max(bounds), latest)
        return RestoreWindow(earliest=earliest, latest=latest,
                             detail=f"RDS {self.source.ident}: backup retention {retention} day(s)")

    def _automated_earliest(self) -> datetime | None:
        try:
            with aws_errors(f"automated backups of {self.source.what}"):
                backups = self._rds().describe_db_instance_automated_backups(DBInstanceIdentifier=self.source.ident)["DBInstanceAutomatedBackups"]
        except ApplicationError as e:  # not allowed or not there: the retention bound stands
            log.info("%s", e.message)
            return None
        times = [_utc(b["RestoreWindow"]["EarliestTime"]) for b in backups
                 if b.get("Status", "active") == "active" and (b.get("RestoreWindow") or {}).get("EarliestTime")]
        return min(times) if times else None

    # start / status -----------------------------------------------------------------------------------
    def start(self, name: str, point: datetime) -> ScratchTarget:
        point = _utc(point)
        inst = self._describe(name)
        if inst is None:
            src = self.source.describe()
            kwargs: dict[str, Any] = {
                "SourceDBInstanceIdentifier": self.source.ident,
                "TargetDBInstanceIdentifier": name,
                "RestoreTime": point,
                "DBInstanceClass": src.get("DBInstanceClass"),
                "MultiAZ": False,
                "DeletionProtection": False,
                "Tags": [{"Key": SCRATCH_TAG, "Value": self.environment}, {"Key": "opsflow-drill-source", "Value": self.source.ident},
                         {"Key": "opsflow-restore-point", "Value": point.isoformat()},
                         *([{"Key": SCRATCH_RUN_TAG, "Value": self.request.run_id}] if self.request.run_id else [])],
            }
            subnet = (src.get("DBSubnetGroup") or {}).get("DBSubnetGroupName")
            if subnet:
                kwargs["DBSubnetGroupName"] = subnet
                sgs = [g["VpcSecurityGroupId"] for g in src.get("VpcSecurityGroups", []) if g.get("VpcSecurityGroupId")]
                if sgs:
                    kwargs["VpcSecurityGroupIds"] = sgs
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            try:
                with aws_errors(f"point-in-time restore of {self.source.what} into {name}"):
                    inst = self._rds().restore_db_instance_to_point_in_time(**kwargs)["DBInstance"]
                log.info("restore %s as of %s into %s", self.source.what, point.isoformat(), name)
            except ApplicationError as e:
                if _code(e) not in ("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"):
                    raise
                inst = self._describe(name)  # made by a concurrent attempt
                if inst is None:
                    raise
        self._require_scratch(inst, name)
        return self._target(inst, name)

    def status(self, name: str) -> ScratchTarget:
        inst = self._describe(name)
        if inst is None:
            raise ApplicationError(f"{self._what(name)} does not exist (deleted, or never created)", type="AwsNotFound", non_retryable=True)
        self._require_scratch(inst, name)
        return self._target(inst, name)

    def _require_scratch(self, inst: dict[str, Any], name: str) -> None:
        if _tags(inst).get(SCRATCH_TAG) != self.environment:
            raise ApplicationError(f"{self._what(name)}: an instance of that name exists and is not a drill's scratch instance "
                                   f"(no tag {SCRATCH_TAG}={self.environment}); refusing to use or delete it", type="Refused", non_retryable=True)

    def _target(self, inst: dict[str, Any], name: str) -> ScratchTarget:
        state = inst.get("DBInstanceStatus", "unknown")
        tags = _tags(inst)
        point = None
        if tags.get("opsflow-restore-point"):
            try:
                point = _utc(datetime.fromisoformat(tags["opsflow-restore-point"]))
            except ValueError:
                point = None
        if state in self._FAILED:
            raise ApplicationError(f"{self._what(name)}: the restore failed (RDS status {state!r}); see the RDS events",
                                   {"rds_status": state}, type="RestoreFailed", non_retryable=True)
        ready = state == "available"
        dsn = self._dsn(inst) if ready else None
        return ScratchTarget(name=name, method=self.METHOD, ready=ready, dsn=dsn, restore_point=point,
                             detail=f"RDS {state}" + (f" at {self._endpoint(inst)}" if ready else ""))

    @staticmethod
    def _endpoint(inst: dict[str, Any]) -> str:
        ep = inst.get("Endpoint") or {}
        return f"{ep.get('Address')}:{ep.get('Port')}"

    def _dsn(self, inst: dict[str, Any]) -> str:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        ep = inst.get("Endpoint") or {}
        if not ep.get("Address"):
            raise ApplicationError(f"{self._what(inst['DBInstanceIdentifier'])}: available but RDS reports no endpoint", type="AwsError")
        host, port = str(ep["Address"]), str(ep.get("Port") or 5432)
        if self.db.dsn:
            params = conninfo_to_dict(self.db.dsn)
            params.pop("hostaddr", None)
            params.update(host=host, port=port)
            return make_conninfo(**params)
        return make_conninfo(host=host, port=port, user=inst.get("MasterUsername") or "postgres", dbname=inst.get("DBName") or "postgres")

    # delete / list ------------------------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        inst = self._describe(name)
        if inst is None:
            return False
        self._require_scratch(inst, name)
        timeout = self.delete_timeout if self.delete_timeout is not None else _time_limit(self.DEFAULT_DELETE_TIMEOUT)
        started = time.monotonic()
        poll = _Poll(0.25, 10.0)
        while inst is not None:
            state = inst.get("DBInstanceStatus", "unknown")
            if state != "deleting":
                try:
                    with aws_errors(self._what(name)):
                        self._rds().delete_db_instance(DBInstanceIdentifier=name, SkipFinalSnapshot=True, DeleteAutomatedBackups=True)
                    log.info("deleting %s", self._what(name))
                except ApplicationError as e:
                    if e.type == "AwsNotFound":
                        return True
                    if _code(e) not in ("InvalidDBInstanceState", "InvalidDBInstanceStateFault"):
                        raise
                    log.info("delete %s: %s; waiting", self._what(name), e.message)  # e.g. still creating
            waited = time.monotonic() - started
            _heartbeat({"phase": "deleting", "instance": name, "rds_status": state, "waited_seconds": round(waited, 1)})
            if waited > timeout:
                if state == "deleting":
                    log.warning("%s: still deleting after %.0fs; RDS finishes it on its own", self._what(name), waited)
                    return True
                raise ApplicationError(f"{self._what(name)}: not deleted after {waited:.0f}s (RDS status {state!r})", type="DeleteTimeout")
            poll.sleep()
            inst = self._describe(name)
        return True

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        with aws_errors(f"RDS instances in {self.db.aws_region}"):
            for page in self._rds().get_paginator("describe_db_instances").paginate():
                for inst in page["DBInstances"]:
                    ident, tags = inst["DBInstanceIdentifier"], _tags(inst)
                    if ident.startswith(prefix) and tags.get(SCRATCH_TAG) == self.environment and inst.get("DBInstanceStatus") != "deleting":
                        found[ident] = tags.get(SCRATCH_RUN_TAG)
        return found


class S3DumpRestore:
    """RestoreProvider for method "s3-dump": the newest `pg_dump -Fc` object under drill.dumps (bucket/prefix),
    restored with pg_restore into a new database named like the scratch target on drill.scratch_server.

    Dumps: every non-empty object under the prefix. A dump's time is its `opsflow-dump-time` metadata (set by
    upload_dump: when the dump's snapshot was taken), else its LastModified. window(): earliest = the oldest
    dump's time, latest = the newest's. A requested point picks the newest dump at or before it.

    start() is quick (it fits the drill's short start step): it picks the dump, creates the empty database and
    records the choice in the database's comment (`opsflow-restore {json}`). status(), called by restore.wait
    with its long timeout and heartbeats, does the work: under a PostgreSQL advisory lock on the scratch server
    (held by the session of the worker doing it, so it ends with that worker) it downloads the object, drops
    and recreates the database, runs pg_restore (--no-owner --no-acl --exit-on-error, -j up to 4), heartbeating,
    and marks the database complete in its comment. Another worker's status() meanwhile says "restoring"; a
    worker that died leaves no lock, and the next status() starts over. The database is ready when marked
    complete. pg_restore must be installed on the worker (postgresql-client; OPSFLOW_PG_RESTORE overrides the
    path); the scratch server's password comes from drill.scratch_server.password, passed as PGPASSWORD.

    delete(): terminate the database's sessions and DROP DATABASE (WITH (FORCE) on PostgreSQL 13+).
    list_scratch(): databases with the prefix that carry the opsflow-restore comment (no other is touched).
    """

    METHOD = "s3-dump"
    MARKER = "opsflow-restore "
    POLL = 1.0

    def __init__(self, request: RestoreRequest):
        drill = request.drill
        if drill.dumps is None or drill.scratch_server is None:
            raise ApplicationError("restore method s3-dump needs drill.dumps (bucket/prefix) and drill.scratch_server (dsn)",
                                   type="BadInput", non_retryable=True)
        self.request = request
        self.bucket = drill.dumps.bucket
        self.prefix = drill.dumps.prefix.lstrip("/")
        self.server = drill.scratch_server
        self.conn = request.source.aws or AwsConnection()

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _s3(self) -> Any:
        return _client(self.conn, "s3")

    # dumps --------------------------------------------------------------------------------------------
    def _objects(self) -> list[dict[str, Any]]:
        objs: list[dict[str, Any]] = []
        with aws_errors(f"S3 dumps under {self.where}"):
            for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                objs += [o for o in page.get("Contents", []) if o.get("Size", 0) > 0 and not o["Key"].endswith("/")]
        if not objs:
            raise ApplicationError(f"no dumps under {self.where}", type="RestoreUnavailable", non_retryable=True)
        return sorted(objs, key=lambda o: (o["LastModified"], o["Key"]))

    def _dump_time(self, obj: dict[str, Any]) -> datetime:
        with aws_errors(f"S3 object s3://{self.bucket}/{obj['Key']}"):
            meta = self._s3().head_object(Bucket=self.bucket, Key=obj["Key"]).get("Metadata", {}) or {}
        text = meta.get(DUMP_TIME_METADATA)
        if text:
            try:
                return _utc(datetime.fromisoformat(text))
            except ValueError:
                log.warning("s3://%s/%s: unreadable %s metadata %r; using LastModified", self.bucket, obj["Key"], DUMP_TIME_METADATA, text)
        return _utc(obj["LastModified"])

    def window(self) -> RestoreWindow:
        objs = self._objects()
        newest = objs[-1]
        latest = self._dump_time(newest)
        earliest = self._dump_time(objs[0]) if len(objs) > 1 else latest
        return RestoreWindow(earliest=min(earliest, latest), latest=latest,
                             detail=f"s3://{self.bucket}/{newest['Key']} ({newest.get('Size', 0)} bytes; {len(objs)} dump(s))")

    def _pick(self, point: datetime) -> tuple[dict[str, Any], datetime]:
        point = _utc(point)
        for obj in reversed(self._objects()):
            when = self._dump_time(obj)
            if when <= point:
                return obj, when
        raise ApplicationError(f"no dump under {self.where} was taken at or before {point.isoformat()}",
                               type="RestoreUnavailable", non_retryable=True)

    # the scratch database -----------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name.encode()) > 63 or not all(c.isalnum() or c in "-_" for c in name):
            raise ApplicationError(f"scratch database name {name!r}: use up to 63 letters, digits, '-' and '_'", type="BadInput", non_retryable=True)

    def _connect(self):
        return connect(self.server, connect_timeout=10)

    def _info(self, conn, name: str) -> dict[str, Any] | None:
        """The database's opsflow-restore record; None when the database does not exist, {} when it has none."""
        row = conn.execute("select shobj_description(oid, 'pg_database') from pg_database where datname = %s", (name,)).fetchone()
        if row is None:
            return None
        text = row[0] or ""
        if not text.startswith(self.MARKER):
            return {}
        try:
            return json.loads(text[len(self.MARKER):])
        except ValueError:
            return {}

    def _mark(self, conn, name: str, info: dict[str, Any]) -> None:
        from psycopg import sql

        conn.execute(sql.SQL("comment on database {} is {}").format(sql.Identifier(name), sql.Literal(self.MARKER + json.dumps(info))))

    def _drop(self, conn, name: str) -> None:
        from psycopg import sql

        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()", (name,))
        force = conn.info.server_version >= 130000
        conn.execute(sql.SQL("drop database if exists {}" + (" with (force)" if force else "")).format(sql.Identifier(name)))

    def _scratch_dsn(self, name: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.server.dsn, dbname=name)

    def _target(self, name: str, info: dict[str, Any], ready: bool, detail: str) -> ScratchTarget:
        point = None
        if info.get("dump_time"):
            point = _utc(datetime.fromisoformat(info["dump_time"]))
        return ScratchTarget(name=name, method=self.METHOD, ready=ready, dsn=self._scratch_dsn(name) if ready else None,
                             restore_point=point, detail=detail)

    def start(self, name: str, point: datetime) -> ScratchTarget:
        from psycopg import errors as pgerrors, sql

        self._check_name(name)
        with self._connect() as conn, _db_errors(self.server, f"start restore into {name}"):
            info = self._info(conn, name)
            if info is None or not info.get("key"):
                obj, when = self._pick(point)
                info = {"state": "pending", "bucket": self.bucket, "key": obj["Key"], "etag": obj.get("ETag", "").strip('"'),
                        "size": obj.get("Size"), "dump_time": when.isoformat(),
                        "environment": self.request.scratch_environment, "run": self.request.run_id or None}
                try:
                    conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
                except pgerrors.DuplicateDatabase:
                    pass  # a concurrent attempt, or one that died before marking it: the record below is ours now
                self._mark(conn, name, info)
            complete = info.get("state") == "complete"
            return self._target(name, info, complete, f"{'restored' if complete else 'to restore'} from s3://{info['bucket']}/{info['key']}")

    def status(self, name: str) -> ScratchTarget:
        self._check_name(name)
        with self._connect() as conn, _db_errors(self.server, f"restore into {name}"):
            info = self._info(conn, name)
            if info is None or not info.get("key"):
                if self.request.point_in_time is None:
                    raise ApplicationError(f"scratch database {name} does not exist on {where(self.server)}", type="AwsNotFound", non_retryable=True)
                self.start(name, self.request.point_in_time)
                info = self._info(conn, name) or {}
            if info.get("state") == "complete":
                return self._target(name, info, True, f"restored from s3://{info['bucket']}/{info['key']}")
            lock_key = f"opsflow-restore:{name}"
            if not conn.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key,)).fetchone()[0]:
                return self._target(name, info, False, f"restoring from s3://{info['bucket']}/{info['key']} (another worker)")
            try:
                info = self._info(conn, name) or info
                if info.get("state") != "complete":
                    self._restore(conn, name, info)
                    info = {**info, "state": "complete", "restored_at": datetime.now(timezone.utc).isoformat()}
                    self._mark(conn, name, info)
            finally:
                conn.execute("select pg_advisory_unlock(hashtextextended(%s, 0))", (lock_key,))
            return self._target(name, info, True, f"restored from s3://{info['bucket']}/{info['key']}")

    def _download(self, bucket: str, key: str, path: Path, size: int) -> None:
        """boto3's threaded download in a helper thread; this (the activity's) thread heartbeats the progress."""
        import threading

        seen = [0]
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with aws_errors(f"S3 object s3://{bucket}/{key}"):
                    self._s3().download_file(bucket, key, str(path), Callback=lambda n: seen.__setitem__(0, seen[0] + n))
            except BaseException as e:  # noqa: BLE001 - re-raised in the activity's thread
                failure.append(e)

        t = threading.Thread(target=run, name=f"download-{key}", daemon=True)
        t.start()
        while True:
            _heartbeat({"phase": "download", "key": key, "bytes": seen[0], "of": size})
            t.join(timeout=self.POLL)
            if not t.is_alive():
                break
        if failure:
            raise failure[0]

    def _restore(self, conn, name: str, info: dict[str, Any]) -> None:
        from psycopg import sql

        binary = _pg_restore_binary()
        key = info["key"]
        tmpdir = Path(tempfile.mkdtemp(prefix="opsflow-dump-"))
        started = time.monotonic()
        try:
            path = tmpdir / "dump"
            self._download(info["bucket"], key, path, int(info.get("size") or 0))
            # A clean database: what a dead attempt restored partly goes.
            self._drop(conn, name)
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
            self._mark(conn, name, {**info, "state": "restoring"})
            from psycopg.conninfo import make_conninfo

            target = make_conninfo(self.server.dsn, dbname=name, application_name="opsflow-restore")
            env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
            if self.server.password is not None:
                env["PGPASSWORD"] = resolve(self.server.password)
            jobs = max(1, min(4, os.cpu_count() or 1))
            args = [binary, "--no-owner", "--no-acl", "--exit-on-error", "-j", str(jobs), "-d", target, str(path)]
            with open(tmpdir / "pg_restore.log", "w+b") as out:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent)
                try:
                    while proc.poll() is None:
                        _heartbeat({"phase": "pg_restore", "key": key, "seconds": round(time.monotonic() - started, 1)})
                        _sleep(self.POLL)
                finally:
                    if proc.poll() is None:  # cancelled (heartbeat raised) or interrupted: stop it
                        proc.kill()
                        proc.wait()
                out.seek(0)
                output = out.read().decode(errors="replace")
            if proc.returncode != 0:
                tail = "\n".join(output.strip().splitlines()[-15:])
                kind = "BadInput" if "input file does not appear to be a valid archive" in output or "unsupported version" in output else "RestoreFailed"
                raise ApplicationError(f"pg_restore of s3://{info['bucket']}/{key} into {name} on {where(self.server)} exited with "
                                       f"{proc.returncode}:\n{tail}", type=kind, non_retryable=kind == "BadInput")
            log.info("restored s3://%s/%s into %s in %.1fs", info["bucket"], key, name, time.monotonic() - started)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    # delete / list ------------------------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        self._check_name(name)
        with self._connect() as conn, _db_errors(self.server, f"drop scratch database {name}"):
            info = self._info(conn, name)
            if info is None:
                return False
            env = self.request.scratch_environment
            if not info and not name.startswith(self.request.drill.scratch_prefix):
                raise ApplicationError(f"database {name} on {where(self.server)} is not a drill's scratch database; refusing to drop it",
                                       type="Refused", non_retryable=True)
            if info.get("environment") not in (None, env):
                raise ApplicationError(f"database {name} on {where(self.server)} is a scratch database of environment "
                                       f"{info['environment']}, not {env}; refusing to drop it", type="Refused", non_retryable=True)
            self._drop(conn, name)
        return True

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        """This environment's scratch databases (marked with it) whose name starts with `prefix`, with their run."""
        with self._connect() as conn, _db_errors(self.server, "list scratch databases"):
            rows = conn.execute(
                "select datname, shobj_description(oid, 'pg_database') from pg_database "
                "where starts_with(datname, %s) and shobj_description(oid, 'pg_database') like %s order by 1",
                (prefix, self.MARKER.replace("%", r"\%").replace("_", r"\_") + "%"),
            ).fetchall()
        found: dict[str, str | None] = {}
        for name, text in rows:
            try:
                info = json.loads(text[len(self.MARKER):])
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("environment") == self.request.scratch_environment:
                found[name] = info.get("run")
        return found


def _pg_restore_binary() -> str:
    found = os.environ.get("OPSFLOW_PG_RESTORE") or shutil.which("pg_restore")
    if not found:
        raise ApplicationError("pg_restore is not installed on this worker (install the PostgreSQL client, e.g. postgresql-client; "
                               "or set OPSFLOW_PG_RESTORE)", type="WorkerConfig", non_retryable=True)
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the worker dies, so no orphaned pg_restore keeps writing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the advisory lock and the drop before a restore still hold
        pass


# -- manual snapshot (the maintenance window's backup before anything) ------------------------------------------


def rds_manual_snapshot(target: RegionTarget, name: str, timeout: float) -> Any:
    """A manual DB snapshot of the region's RDS instance, waited for until `available` (heartbeating).
    Idempotent: a snapshot of that name is reused."""
    from opsflow.maintenance_models import BackupResult

    db = target.database
    rds = _client(target.aws, "rds", db.aws_region)
    what = f"snapshot {name} of RDS instance {db.db_instance_identifier}"
    deadline = time.monotonic() + timeout
    with aws_errors(what):
        try:
            snap = rds.describe_db_snapshots(DBSnapshotIdentifier=name)["DBSnapshots"][0]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "DBSnapshotNotFound":
                raise
            snap = rds.create_db_snapshot(DBSnapshotIdentifier=name, DBInstanceIdentifier=db.db_instance_identifier)["DBSnapshot"]
        while snap.get("Status") != "available":
            if time.monotonic() > deadline:
                raise ApplicationError(f"{what}: still {snap.get('Status')} after {timeout:.0f}s", type="BackupTimeout", non_retryable=True)
            _heartbeat({"snapshot": name, "status": snap.get("Status")})
            time.sleep(5)
            snap = rds.describe_db_snapshots(DBSnapshotIdentifier=name)["DBSnapshots"][0]
    return BackupResult(id=snap.get("DBSnapshotArn") or name, method="rds-snapshot", state="completed",
                        started_at=snap.get("SnapshotCreateTime"), completed_at=snap.get("SnapshotCreateTime"),
                        size_bytes=(snap.get("AllocatedStorage") or 0) * 1024**3, location=db.db_instance_identifier)

