"""RDS for PostgreSQL: `RdsInstance` (DatabaseProvider: status, fence, promote, rebuild_replica for failback)
and `rds_manual_snapshot` (the maintenance window's backup)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from botocore.exceptions import ClientError
from psycopg.conninfo import conninfo_to_dict
from temporalio.exceptions import ApplicationError

from activities.aws.session import Poll, aws_errors, client, error_code, heartbeat_details
from activities.context import heartbeat as _heartbeat
from activities.context import time_limit as _time_limit
from activities.postgres.connection import connect
from activities.postgres.server import sql_check_writable, sql_fence, sql_status, sql_unfence
from opsflow.inventory import AwsConnection
from opsflow.maintenance_models import BackupResult
from opsflow.models import DbStatus, PromoteResult, RebuildResult, RegionTarget

log = logging.getLogger(__name__)


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
    handles them. Without a parameter group: the SQL fence of activities.postgres.server (ALTER SYSTEM, reload, end
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

    def __init__(
        self, target: RegionTarget, *, parameter_group: str | None = None, promote_timeout: float | None = None
    ):
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

    def rds_client(self) -> Any:
        return client(self.conn, "rds", self.db.aws_region)

    def describe(self) -> dict[str, Any]:
        with aws_errors(self.what):
            return self.rds_client().describe_db_instances(DBInstanceIdentifier=self.ident)["DBInstances"][0]

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
        rds = client(self.conn, "rds", self.db.aws_region)
        inst = self.describe()
        if self.parameter_group:
            with aws_errors(f"DB parameter group {self.parameter_group} of {self.what}"):
                rds.modify_db_parameter_group(
                    DBParameterGroupName=self.parameter_group,
                    Parameters=[
                        {
                            "ParameterName": "default_transaction_read_only",
                            "ParameterValue": "1",
                            "ApplyMethod": "immediate",
                        }
                    ],
                )
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
                points = client(self.conn, "cloudwatch", self.db.aws_region).get_metric_statistics(
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
                type="FenceUnsupported",
                non_retryable=True,
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
                type="FenceUnsupported",
                non_retryable=True,
            )

    def _set_read_only(self, on: bool) -> None:
        group = self.parameter_group
        what = f"DB parameter group {group} of {self.what}"
        rds = self.rds_client()
        inst = self.describe()  # again: fence() looked already, but this one is cheap and current
        attached = [g.get("DBParameterGroupName", "") for g in inst.get("DBParameterGroups", [])]
        if group.lower() not in (g.lower() for g in attached):
            raise ApplicationError(
                f"{what}: not attached to the instance (it has {', '.join(attached) or 'none'})",
                type="AwsInvalidParameter",
                non_retryable=True,
            )
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
                type="AwsInvalidParameter",
                non_retryable=True,
            )
        with aws_errors(what):
            rds.modify_db_parameter_group(
                DBParameterGroupName=group,
                Parameters=[
                    {
                        "ParameterName": "default_transaction_read_only",
                        "ParameterValue": "1" if on else "0",
                        "ApplyMethod": "immediate",
                    }
                ],
            )
        # Wait until it took effect: over SQL where we can, else until RDS reports the group in sync.
        deadline = time.monotonic() + self.FENCE_TIMEOUT
        poll = Poll(0.1, 2.0)
        while True:
            if self.db.dsn:
                s = sql_status(self.db, self.target.region)
                done, seen = s.reachable and s.read_only == on, (f"read_only={s.read_only}" if s.reachable else s.error)
            else:
                groups = self.describe().get("DBParameterGroups", [])
                state = next(
                    (
                        g.get("ParameterApplyStatus")
                        for g in groups
                        if g.get("DBParameterGroupName", "").lower() == group.lower()
                    ),
                    None,
                )
                done, seen = state == "in-sync", f"ParameterApplyStatus={state}"
            if done:
                return
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"{what}: default_transaction_read_only={'1' if on else '0'} not in effect after "
                    f"{self.FENCE_TIMEOUT:.0f}s ({seen})",
                    type="FenceIncomplete",
                )
            _heartbeat({"phase": "fence" if on else "unfence", "seen": seen})
            poll.sleep()

    # promote ---------------------------------------------------------------------------------------
    def promote(self, force: bool) -> PromoteResult:
        timeout = (
            self.promote_timeout if self.promote_timeout is not None else _time_limit(self.DEFAULT_PROMOTE_TIMEOUT)
        )
        started = time.monotonic()
        deadline = started + timeout
        inst = self.describe()
        state, _, source = self._cloud(inst)
        if not source and state == "available":
            sql = sql_status(self.db, self.target.region) if self.db.dsn else None
            if sql is None or not sql.reachable or sql.role == "primary":
                return PromoteResult(
                    already_primary=True, seconds=0.0, timeline=sql.timeline if sql and sql.reachable else None
                )
            # RDS shows it standalone but PostgreSQL is still in recovery: a promotion is finishing. Wait below.

        called_at: float | None = None
        seen_busy = False
        poll = Poll()
        while True:
            state, _, source = self._cloud(inst)
            waited = time.monotonic() - started
            _heartbeat(
                {"phase": "rds promotion", "rds_status": state, "source": source, "waited_seconds": round(waited, 1)}
            )
            if state in self._BROKEN:
                raise ApplicationError(
                    f"promote {self.what}: RDS reports it {state!r}",
                    {"rds_status": state},
                    type="RdsInstanceState",
                    non_retryable=True,
                )
            if state != "available":
                seen_busy = True
            elif not source:
                break  # promoted
            elif called_at is None:
                called_at, seen_busy = self._promote_call()
            elif seen_busy or time.monotonic() - called_at > self.PROMOTE_GRACE:
                raise ApplicationError(
                    f"promote {self.what}: RDS finished but the instance still replicates from {source}; retrying "
                    "promotes again",
                    type="PromoteFailed",
                )
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"promote {self.what}: RDS still shows {state!r} (source {source}) after {waited:.0f}s",
                    type="PromoteTimeout",
                )
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
                received, replayed = conn.execute(
                    "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
                ).fetchone()
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
                answer = self.rds_client().promote_read_replica(DBInstanceIdentifier=self.ident)
            busy = (answer.get("DBInstance") or {}).get("DBInstanceStatus", "available") != "available"
        except ApplicationError as e:
            # Promoted (or promoting) between our look and the call: the wait that follows sorts it out.
            if error_code(e) != "InvalidDBInstanceState":
                raise
            log.info("promote %s: %s", self.what, e.message)
        return time.monotonic(), busy

    def _wait_writable(self, deadline: float, started: float) -> None:
        poll = Poll(0.1, 2.0)
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
                        f"promote {self.what}: promoted, but it refuses writes because default_transaction_read_only "
                        "is on (a fence, or its parameter group): unfence it",
                        type="NotWritable",
                        non_retryable=True,
                    ) from None
                waited = time.monotonic() - started
                if time.monotonic() > deadline:
                    raise ApplicationError(
                        f"promote {self.what}: promoted in RDS but not writable after {waited:.0f}s: {e.message}",
                        type="PromoteTimeout",
                    ) from None
                _heartbeat(
                    {"phase": "waiting for a write to commit", "waited_seconds": round(waited, 1), "last": e.message}
                )
                poll.sleep()

    def check_writable(self) -> None:
        if not self.db.dsn:
            raise ApplicationError(
                f"cannot probe writes on {self.what}: the inventory gives no dsn",
                type="DatabaseConfig",
                non_retryable=True,
            )
        sql_check_writable(self.db, region=self.target.region)

    # rebuild (failback) -------------------------------------------------------------------------------
    # a cross-region replica of a large instance takes hours; the activity's limit wins
    DEFAULT_REBUILD_TIMEOUT = 3 * 3600.0
    # States in which RDS accepts a DeleteDBInstance; in the others (creating, modifying, backing-up ...) we wait.
    _DELETABLE = {
        "available",
        "stopped",
        "failed",
        "storage-full",
        "incompatible-parameters",
        "incompatible-restore",
        "incompatible-network",
        "inaccessible-encryption-credentials",
        "incompatible-option-group",
    }

    def describe_or_none(self, ident: str | None = None) -> dict[str, Any] | None:
        ident = ident or self.ident
        try:
            with aws_errors(f"RDS instance {ident} in {self.db.aws_region}"):
                return self.rds_client().describe_db_instances(DBInstanceIdentifier=ident)["DBInstances"][0]
        except ApplicationError as e:
            if e.type == "AwsNotFound":
                return None
            raise

    @staticmethod
    def _is_source(source: str | None, primary: dict[str, Any]) -> bool:
        """Does ReadReplicaSourceDBInstanceIdentifier (an identifier in-region, an ARN across regions) name
        `primary`?"""
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
                f"uses provider {primary.database.provider!r}",
                type="BadInput",
                non_retryable=True,
            )
        source = RdsInstance(primary)
        started = time.monotonic()
        deadline = started + _time_limit(self.DEFAULT_REBUILD_TIMEOUT)
        previous = next((d for d in heartbeat_details() if isinstance(d, dict) and d.get("phase")), {})
        template: dict[str, Any] = dict(previous.get("template") or {})
        acted = bool(previous.get("acted"))
        deleted: str | None = previous.get("deleted")
        snapshot_stamp = previous.get("stamp") or datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        poll = Poll(0.25, 10.0)
        failed_builds = 0

        def beat(phase: str, **extra: Any) -> None:
            _heartbeat(
                {
                    "phase": phase,
                    "acted": acted,
                    "deleted": deleted,
                    "stamp": snapshot_stamp,
                    "template": template,
                    "waited_seconds": round(time.monotonic() - started, 1),
                    **extra,
                }
            )

        while True:
            p = source.describe()
            p_state, _, p_source = self._cloud(p)
            if p_source:
                raise ApplicationError(
                    f"rebuild {self.what}: the primary {source.what} is itself a read replica (of {p_source}); "
                    f"promote it first or rebuild from the primary",
                    type="NotPrimary",
                    non_retryable=True,
                )
            inst = self.describe_or_none()
            state = inst.get("DBInstanceStatus", "unknown") if inst else None
            if inst is not None and self._is_source(inst.get("ReadReplicaSourceDBInstanceIdentifier"), p):
                if state == "available":
                    break
                if state in self._BROKEN and state not in ("deleting", "stopping", "stopped"):
                    # A replica that failed to build: replace it (the next turn creates it again), once.
                    failed_builds += 1
                    if failed_builds > 1:
                        raise ApplicationError(
                            f"rebuild {self.what}: the read replica of {source.what} failed to build again "
                            f"(RDS status {state!r}); see the RDS events",
                            type="RebuildFailed",
                        )
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
                        raise ApplicationError(
                            f"rebuild {self.what}: the old instance has deletion protection on; a person must "
                            f"turn it off to let it be replaced by a read replica",
                            type="Refused",
                            non_retryable=True,
                        )
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
                    raise ApplicationError(
                        f"rebuild {self.what}: {source.what} has automated backups off (BackupRetentionPeriod 0), "
                        f"which RDS requires of a read replica's source; enable them",
                        type="AwsInvalidParameter",
                        non_retryable=True,
                    )
                if p_state != "available":
                    beat("waiting for the primary to be available", primary_status=p_state)
                else:
                    self._create_replica(p, source, template)
                    acted = True
                    beat("creating the read replica", rds_status="creating")
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"rebuild {self.what}: not a replica of {source.what} after {time.monotonic() - started:.0f}s "
                    f"(RDS status {state or 'absent'})",
                    type="RebuildTimeout",
                )
            poll.sleep()

        if self.db.dsn:
            self._wait_streaming(deadline, started, beat)
        seconds = round(time.monotonic() - started, 3)
        if not acted:
            return RebuildResult(
                method="already-replica", seconds=seconds, detail=f"{self.ident} already replicates from {source.ident}"
            )
        detail = f"read replica {self.ident} of {source.ident}" + (f"; replaced {deleted}" if deleted else "")
        preserved = (
            f"RDS final snapshot {deleted.split('final snapshot ', 1)[1].rstrip(')')} of the old instance"
            if deleted and "final snapshot " in deleted
            else None
        )
        return RebuildResult(method="rds-read-replica", seconds=seconds, detail=detail, preserved=preserved)

    def _refuse_to_replace_a_primary(self, inst: dict[str, Any], source: "RdsInstance") -> None:
        """Before the old instance is deleted: it must not be the live primary (swapped regions, a split brain)."""
        replicas = inst.get("ReadReplicaDBInstanceIdentifiers") or []
        if replicas:
            raise ApplicationError(
                f"rebuild {self.what}: it has read replicas ({', '.join(replicas)}): it looks like the primary; "
                "refusing to replace it",
                type="Refused",
                non_retryable=True,
            )
        if self.db.dsn and source.db.dsn:
            mine, theirs = sql_status(self.db, self.target.region), sql_status(source.db, source.target.region)
            if (
                mine.reachable
                and theirs.reachable
                and mine.role == "primary"
                and theirs.role == "primary"
                and mine.timeline
                and theirs.timeline
                and mine.timeline > theirs.timeline
            ):
                raise ApplicationError(
                    f"rebuild {self.what}: it is on timeline {mine.timeline}, later than {source.what} "
                    f"({theirs.timeline}): it looks like "
                    f"the newer primary; refusing to replace it (check which region is primary)",
                    type="Refused",
                    non_retryable=True,
                )

    def _delete_instance(self, final_snapshot: str | None) -> None:
        kwargs: dict[str, Any] = {"DBInstanceIdentifier": self.ident}
        if final_snapshot:
            kwargs["FinalDBSnapshotIdentifier"] = final_snapshot
        else:
            kwargs["SkipFinalSnapshot"] = True
        try:
            with aws_errors(self.what):
                self.rds_client().delete_db_instance(**kwargs)
        except ApplicationError as e:
            # Deleted meanwhile, already deleting, or a state that will pass: the next look decides.
            if e.type == "AwsNotFound" or error_code(e) in ("InvalidDBInstanceState", "InvalidDBInstanceStateFault"):
                log.info("delete %s: %s", self.what, e.message)
                return
            if error_code(e) in ("DBSnapshotAlreadyExists", "DBSnapshotAlreadyExistsFault"):
                # An attempt that died after asking took the snapshot already.
                with aws_errors(self.what):
                    self.rds_client().delete_db_instance(DBInstanceIdentifier=self.ident, SkipFinalSnapshot=True)
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
                self.rds_client().create_db_instance_read_replica(**kwargs)
            log.info("rebuild %s: creating a read replica of %s", self.what, source.what)
        except ApplicationError as e:
            if error_code(e) not in ("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"):
                raise
            log.info("rebuild %s: %s (the next look decides)", self.what, e.message)

    def _wait_streaming(self, deadline: float, started: float, beat) -> None:
        poll = Poll(0.2, 5.0)
        while True:
            s = sql_status(self.db, self.target.region)
            if s.reachable and s.role == "replica" and s.streaming:
                return
            seen = (
                f"role {s.role}, {'streaming' if s.streaming else 'not streaming'}"
                if s.reachable
                else f"unreachable: {s.error}"
            )
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"rebuild {self.what}: RDS shows a read replica but PostgreSQL is not streaming after "
                    f"{time.monotonic() - started:.0f}s ({seen})",
                    type="RebuildTimeout",
                )
            beat("waiting for the replica to stream", sql=seen)
            poll.sleep()


# -- manual snapshot (the maintenance window's backup before anything) ------------------------------------------


def rds_manual_snapshot(target: RegionTarget, name: str, timeout: float) -> Any:
    """A manual DB snapshot of the region's RDS instance, waited for until `available` (heartbeating).
    Idempotent: a snapshot of that name is reused."""
    db = target.database
    rds = client(target.aws, "rds", db.aws_region)
    what = f"snapshot {name} of RDS instance {db.db_instance_identifier}"
    deadline = time.monotonic() + timeout
    with aws_errors(what):
        try:
            snap = rds.describe_db_snapshots(DBSnapshotIdentifier=name)["DBSnapshots"][0]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "DBSnapshotNotFound":
                raise
            created = rds.create_db_snapshot(DBSnapshotIdentifier=name, DBInstanceIdentifier=db.db_instance_identifier)
            snap = created["DBSnapshot"]
        while snap.get("Status") != "available":
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"{what}: still {snap.get('Status')} after {timeout:.0f}s", type="BackupTimeout", non_retryable=True
                )
            _heartbeat({"snapshot": name, "status": snap.get("Status")})
            time.sleep(5)
            snap = rds.describe_db_snapshots(DBSnapshotIdentifier=name)["DBSnapshots"][0]
    return BackupResult(
        id=snap.get("DBSnapshotArn") or name,
        method="rds-snapshot",
        state="completed",
        started_at=snap.get("SnapshotCreateTime"),
        completed_at=snap.get("SnapshotCreateTime"),
        size_bytes=(snap.get("AllocatedStorage") or 0) * 1024**3,
        location=db.db_instance_identifier,
    )
