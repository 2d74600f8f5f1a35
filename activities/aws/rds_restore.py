"""The restore drill's RDS point-in-time restore: `RdsPointInTimeRestore` (RestoreProvider, method "rds-pitr")."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.aws.rds import RdsInstance
from activities.aws.session import Poll, aws_errors, error_code, utc
from activities.context import heartbeat as _heartbeat
from activities.context import time_limit as _time_limit
from opsflow.models import RestoreRequest, RestoreWindow, ScratchTarget

log = logging.getLogger(__name__)


# value: the environment; on every RDS instance a drill restores, nothing without it is deleted
SCRATCH_TAG = "opsflow-scratch"
SCRATCH_RUN_TAG = "opsflow-run"  # value: the drill run that made it; leftover cleanup spares the current run's


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in inst.get("TagList", []) or []}


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
            raise ApplicationError(
                f"restore method rds-pitr needs an aws-rds source; region {request.source.region} uses "
                f"{request.source.database.provider!r}",
                type="BadInput",
                non_retryable=True,
            )
        self.request = request
        self.source = RdsInstance(request.source)
        self.db = self.source.db
        self.delete_timeout = delete_timeout
        self.environment = request.scratch_environment

    def _what(self, name: str) -> str:
        return f"RDS scratch instance {name} in {self.db.aws_region}"

    def _rds(self) -> Any:
        return self.source.rds_client()

    def _describe(self, name: str) -> dict[str, Any] | None:
        return self.source.describe_or_none(name)

    # window -------------------------------------------------------------------------------------------
    def window(self) -> RestoreWindow:
        inst = self.source.describe()
        retention = int(inst.get("BackupRetentionPeriod") or 0)
        if retention <= 0:
            raise ApplicationError(
                f"{self.source.what}: automated backups are off (BackupRetentionPeriod 0): no point-in-time restore is "
                "possible",
                type="RestoreUnavailable",
                non_retryable=True,
            )
        latest = inst.get("LatestRestorableTime")
        if latest is None:
            raise ApplicationError(
                f"{self.source.what}: RDS reports no LatestRestorableTime yet (no backup taken yet)",
                type="RestoreUnavailable",
            )
        latest = utc(latest)
        bounds = [latest - timedelta(days=retention)]
        if inst.get("InstanceCreateTime"):
            bounds.append(utc(inst["InstanceCreateTime"]))
        automated = self._automated_earliest()
        if automated:
            bounds.append(automated)
        earliest = min(max(bounds), latest)
        return RestoreWindow(
            earliest=earliest, latest=latest, detail=f"RDS {self.source.ident}: backup retention {retention} day(s)"
        )

    def _automated_earliest(self) -> datetime | None:
        try:
            with aws_errors(f"automated backups of {self.source.what}"):
                backups = self._rds().describe_db_instance_automated_backups(DBInstanceIdentifier=self.source.ident)[
                    "DBInstanceAutomatedBackups"
                ]
        except ApplicationError as e:  # not allowed or not there: the retention bound stands
            log.info("%s", e.message)
            return None
        times = [
            utc(b["RestoreWindow"]["EarliestTime"])
            for b in backups
            if b.get("Status", "active") == "active" and (b.get("RestoreWindow") or {}).get("EarliestTime")
        ]
        return min(times) if times else None

    # start / status -----------------------------------------------------------------------------------
    def start(self, name: str, point: datetime) -> ScratchTarget:
        point = utc(point)
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
                "Tags": [
                    {"Key": SCRATCH_TAG, "Value": self.environment},
                    {"Key": "opsflow-drill-source", "Value": self.source.ident},
                    {"Key": "opsflow-restore-point", "Value": point.isoformat()},
                    *([{"Key": SCRATCH_RUN_TAG, "Value": self.request.run_id}] if self.request.run_id else []),
                ],
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
                if error_code(e) not in ("DBInstanceAlreadyExists", "DBInstanceAlreadyExistsFault"):
                    raise
                inst = self._describe(name)  # made by a concurrent attempt
                if inst is None:
                    raise
        self._require_scratch(inst, name)
        return self._target(inst, name)

    def status(self, name: str) -> ScratchTarget:
        inst = self._describe(name)
        if inst is None:
            raise ApplicationError(
                f"{self._what(name)} does not exist (deleted, or never created)", type="AwsNotFound", non_retryable=True
            )
        self._require_scratch(inst, name)
        return self._target(inst, name)

    def _require_scratch(self, inst: dict[str, Any], name: str) -> None:
        if _tags(inst).get(SCRATCH_TAG) != self.environment:
            raise ApplicationError(
                f"{self._what(name)}: an instance of that name exists and is not a drill's scratch instance "
                f"(no tag {SCRATCH_TAG}={self.environment}); refusing to use or delete it",
                type="Refused",
                non_retryable=True,
            )

    def _target(self, inst: dict[str, Any], name: str) -> ScratchTarget:
        state = inst.get("DBInstanceStatus", "unknown")
        tags = _tags(inst)
        point = None
        if tags.get("opsflow-restore-point"):
            try:
                point = utc(datetime.fromisoformat(tags["opsflow-restore-point"]))
            except ValueError:
                point = None
        if state in self._FAILED:
            raise ApplicationError(
                f"{self._what(name)}: the restore failed (RDS status {state!r}); see the RDS events",
                {"rds_status": state},
                type="RestoreFailed",
                non_retryable=True,
            )
        ready = state == "available"
        dsn = self._dsn(inst) if ready else None
        return ScratchTarget(
            name=name,
            method=self.METHOD,
            ready=ready,
            dsn=dsn,
            restore_point=point,
            detail=f"RDS {state}" + (f" at {self._endpoint(inst)}" if ready else ""),
        )

    @staticmethod
    def _endpoint(inst: dict[str, Any]) -> str:
        ep = inst.get("Endpoint") or {}
        return f"{ep.get('Address')}:{ep.get('Port')}"

    def _dsn(self, inst: dict[str, Any]) -> str:
        ep = inst.get("Endpoint") or {}
        if not ep.get("Address"):
            raise ApplicationError(
                f"{self._what(inst['DBInstanceIdentifier'])}: available but RDS reports no endpoint", type="AwsError"
            )
        host, port = str(ep["Address"]), str(ep.get("Port") or 5432)
        if self.db.dsn:
            params = conninfo_to_dict(self.db.dsn)
            params.pop("hostaddr", None)
            params.update(host=host, port=port)
            return make_conninfo(**params)
        return make_conninfo(
            host=host, port=port, user=inst.get("MasterUsername") or "postgres", dbname=inst.get("DBName") or "postgres"
        )

    # delete / list ------------------------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        inst = self._describe(name)
        if inst is None:
            return False
        self._require_scratch(inst, name)
        timeout = self.delete_timeout if self.delete_timeout is not None else _time_limit(self.DEFAULT_DELETE_TIMEOUT)
        started = time.monotonic()
        poll = Poll(0.25, 10.0)
        while inst is not None:
            state = inst.get("DBInstanceStatus", "unknown")
            if state != "deleting":
                try:
                    with aws_errors(self._what(name)):
                        self._rds().delete_db_instance(
                            DBInstanceIdentifier=name, SkipFinalSnapshot=True, DeleteAutomatedBackups=True
                        )
                    log.info("deleting %s", self._what(name))
                except ApplicationError as e:
                    if e.type == "AwsNotFound":
                        return True
                    if error_code(e) not in ("InvalidDBInstanceState", "InvalidDBInstanceStateFault"):
                        raise
                    log.info("delete %s: %s; waiting", self._what(name), e.message)  # e.g. still creating
            waited = time.monotonic() - started
            _heartbeat({"phase": "deleting", "instance": name, "rds_status": state, "waited_seconds": round(waited, 1)})
            if waited > timeout:
                if state == "deleting":
                    log.warning("%s: still deleting after %.0fs; RDS finishes it on its own", self._what(name), waited)
                    return True
                raise ApplicationError(
                    f"{self._what(name)}: not deleted after {waited:.0f}s (RDS status {state!r})", type="DeleteTimeout"
                )
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
                    if (
                        ident.startswith(prefix)
                        and tags.get(SCRATCH_TAG) == self.environment
                        and inst.get("DBInstanceStatus") != "deleting"
                    ):
                        found[ident] = tags.get(SCRATCH_RUN_TAG)
        return found
