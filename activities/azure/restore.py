"""The restore drill's point-in-time restore of a flexible server: `AzurePointInTimeRestore` (RestoreProvider,
method "azure-pitr") into a scratch server (createMode PointInTimeRestore) in the source's resource group,
tagged `opsflow-scratch=<environment>`: only servers with that tag are ever listed or deleted."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.azure.arm import arm_errors, field, iso, parse_time, postgres_client, utc, wait_poller
from activities.azure.flexible_server import (
    FAILED_STATES,
    SCRATCH_POINT_TAG,
    SCRATCH_RUN_TAG,
    SCRATCH_SOURCE_TAG,
    SCRATCH_TAG,
    get_server,
    server_state,
    server_tags,
)
from activities.context import heartbeat as _heartbeat
from activities.context import logger
from activities.context import sleep_or_cancelled as _sleep
from activities.context import time_limit as _time_budget
from activities.postgres.connection import connect, where
from opsflow.inventory import AzureConnection, AzureFlexibleDatabase, PostgresDatabase
from opsflow.models import RestoreRequest, RestoreWindow, ScratchTarget

log = logging.getLogger(__name__)


DEFAULT_DELETE_TIMEOUT = 900.0
AZURE_PG_PORT = 5432
# Azure restores to any point up to now from its continuously archived WAL (the Azure CLI's default restore time
# is the current time); ARM reports no "latest restorable time". The latest point we offer is the worker's clock
# less this margin for clock skew (NTP-synchronised hosts differ by milliseconds); a point ARM finds in its future
# is refused at once with PointInTimeInFuture, a clear non-retryable error.
LATEST_RESTORE_MARGIN = 1.0
# ARM shows a server right after accepting its creation; a scratch server that stays invisible this long after
# we first looked for it is gone (its restore failed and ARM removed it, or someone deleted it).
SCRATCH_MISSING_GRACE = 30.0
_SERVER_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")


class AzurePointInTimeRestore:
    """RestoreProvider for method "azure-pitr": point-in-time restore of the source region's flexible server into
    a scratch server of the same resource group (createMode PointInTimeRestore, pointInTimeUTC,
    sourceServerResourceId), through ARM.

    - window(): earliest = the source's properties.backup.earliestRestoreDate; latest = now minus
      LATEST_RESTORE_MARGIN (ARM reports no latest restorable time; never before earliest).
    - start(): accepts the creation and returns at once (ready=False): ARM runs the restore, and restore.wait
      polls status(). A scratch server of that name already there is reused (the activity may be retried).
    - status(): ready once ARM says Ready and the server answers over SQL; its DSN is the source's with the host
      replaced by fullyQualifiedDomainName and the port 5432. The password is
      the source's: a restore copies the roles. A failed create is a non-retryable RestoreFailed.
    - delete(), list_scratch(): scratch servers only, i.e. with tag opsflow-scratch=<environment>; anything
      else is refused, so a drill can never delete a server it did not create.
    Errors: what ARM refuses (a point in the future, before the earliest restore date, an unknown source) is
    non-retryable and carries ARM's code and message.
    """

    method = "azure-pitr"

    def __init__(self, request: RestoreRequest):
        db = request.source.database
        if not isinstance(db, AzureFlexibleDatabase):
            raise ValueError(f"AzurePointInTimeRestore restores provider 'azure-flexible', not {db.provider!r}")
        self.request = request
        self.db: AzureFlexibleDatabase = db
        self.conn = request.source.azure or AzureConnection()
        self.environment = request.scratch_environment
        self.run_id = request.run_id
        self._client: Any = None
        self._missing_since: dict[str, float] = {}

    @property
    def resource(self) -> str:
        return self._resource(self.db.server_name)

    def _resource(self, name: str) -> str:
        return (
            f"flexible server {name} (resource group {self.db.resource_group}, subscription {self.db.subscription_id})"
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = postgres_client(self.conn, self.db.subscription_id)
        return self._client

    def _source(self) -> Any:
        with arm_errors(f"get {self.resource}"):
            return self.client.servers.get(self.db.resource_group, self.db.server_name)

    def _server(self, name: str) -> Any | None:
        return get_server(self.client, self.db.resource_group, name, f"get {self._resource(name)}")

    # -- RestoreProvider --------------------------------------------------------------------------------------
    def window(self) -> RestoreWindow:
        source = self._source()
        earliest = utc(field(source, "properties", "backup", "earliest_restore_date"))
        retention = field(source, "properties", "backup", "backup_retention_days")
        now = datetime.now(timezone.utc)
        latest, how = (
            now - timedelta(seconds=LATEST_RESTORE_MARGIN),
            f"latest: now minus {LATEST_RESTORE_MARGIN:.0f}s (clock skew margin)",
        )
        if earliest is not None and earliest <= now and latest < earliest:
            latest, how = (
                earliest,
                "latest: the earliest restore date (the first backup is younger than the clock skew margin)",
            )
        notes = [
            f"earliest: backup.earliestRestoreDate of {self.db.server_name}"
            if earliest
            else f"ARM reports no backup.earliestRestoreDate for {self.db.server_name} (no backup yet?)",
            how,
        ]
        if retention:
            notes.append(f"retention {retention} days")
        return RestoreWindow(earliest=earliest, latest=latest, detail="; ".join(notes))

    def start(self, name: str, point: datetime) -> ScratchTarget:
        if not _SERVER_NAME.match(name):
            raise ApplicationError(
                f"scratch server name {name!r} is not a valid flexible server name (3-63 lower-case letters, digits, "
                "hyphens)",
                type="BadInput",
                non_retryable=True,
            )
        point = utc(point)  # type: ignore[assignment]
        existing = self._server(name)
        if existing is not None:
            self._check_scratch(existing, name)
            logger(log).info(
                "restore: scratch server %s exists already (state %s); reusing it", name, server_state(existing)
            )
            return self._scratch(existing, name)
        source = self._source()
        what = f"point-in-time restore of {self.resource} as of {iso(point)} into {name}"
        body = {
            "location": field(source, "location"),
            "properties": {
                "createMode": "PointInTimeRestore",
                "sourceServerResourceId": field(source, "id"),
                "pointInTimeUTC": iso(point),
            },
            "tags": {
                SCRATCH_TAG: self.environment,
                SCRATCH_SOURCE_TAG: self.db.server_name,
                SCRATCH_POINT_TAG: iso(point),
                **({SCRATCH_RUN_TAG: self.run_id} if self.run_id else {}),
            },
        }
        with arm_errors(what):
            # polling=False: the initial PUT only. ARM goes on restoring; restore.wait follows it with status().
            self.client.servers.begin_create_or_update(self.db.resource_group, name, body, polling=False)
        logger(log).info("restore: %s accepted by ARM", what)
        return ScratchTarget(
            name=name, method=self.method, ready=False, restore_point=point, detail=f"{what}: accepted, provisioning"
        )

    def status(self, name: str) -> ScratchTarget:
        server = self._server(name)
        if server is None:
            first = self._missing_since.setdefault(name, time.monotonic())
            if time.monotonic() - first < SCRATCH_MISSING_GRACE:
                return ScratchTarget(name=name, method=self.method, ready=False, detail="not visible in ARM (yet)")
            raise ApplicationError(
                f"scratch server {name} does not exist in resource group {self.db.resource_group}: its restore failed "
                "and ARM removed it, or it was deleted",
                type="RestoreFailed",
                non_retryable=True,
            )
        self._missing_since.pop(name, None)
        return self._scratch(server, name)

    def delete(self, name: str) -> bool:
        deadline = time.monotonic() + _time_budget(DEFAULT_DELETE_TIMEOUT)
        server = self._server(name)
        if server is None:
            return False
        self._check_scratch(server, name)
        what = f"delete scratch {self._resource(name)}"
        started = time.monotonic()
        while True:
            if server is None:
                return True  # gone while we waited (an earlier attempt's delete finished)
            state = server_state(server)
            if state.lower() != "dropping":
                try:
                    with arm_errors(what):
                        poller = self.client.servers.begin_delete(self.db.resource_group, name)
                        wait_poller(poller, what, deadline)
                    logger(log).info("restore: %s done", what)
                    return True
                except ApplicationError as e:
                    if e.type != "AzureConflict":  # another operation runs on it (the restore): wait, then delete
                        raise
                    state = f"{state} (another operation runs: {e.message})"
            waited = time.monotonic() - started
            if time.monotonic() > deadline:
                raise ApplicationError(f"{what}: still {state} after {waited:.0f}s", type="AzureOperationTimeout")
            _heartbeat(
                {"phase": "waiting to delete the scratch server", "state": state, "waited_seconds": round(waited, 1)}
            )
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))
            server = self._server(name)

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        with arm_errors(f"list the flexible servers of resource group {self.db.resource_group}"):
            servers = list(self.client.servers.list_by_resource_group(self.db.resource_group))
        return {
            field(s, "name"): server_tags(s).get(SCRATCH_RUN_TAG)
            for s in servers
            if (field(s, "name") or "").startswith(prefix) and server_tags(s).get(SCRATCH_TAG) == self.environment
        }

    # -- helpers ------------------------------------------------------------------------------------------------
    def _check_scratch(self, server: Any, name: str) -> None:
        """Refuse to touch a server that is not a scratch server of this environment (tag opsflow-scratch)."""
        if name.lower() == self.db.server_name.lower() or server_tags(server).get(SCRATCH_TAG) != self.environment:
            raise ApplicationError(
                f"{self._resource(name)} is not a scratch server of environment {self.environment} "
                f"(tag {SCRATCH_TAG}={self.environment} missing): the drill does not touch it",
                type="Refused",
                non_retryable=True,
            )

    def _scratch(self, server: Any, name: str) -> ScratchTarget:
        state = server_state(server)
        tags = server_tags(server)
        point = parse_time(tags.get(SCRATCH_POINT_TAG))
        if state.lower() in FAILED_STATES:
            raise ApplicationError(
                f"the point-in-time restore into scratch {self._resource(name)} failed (state {state}); the create "
                "operation's error is in the resource group's activity log",
                type="RestoreFailed",
                non_retryable=True,
            )
        if state.lower() != "ready":
            return ScratchTarget(
                name=name,
                method=self.method,
                ready=False,
                restore_point=point,
                detail=f"ARM state {state or 'unknown'}",
            )
        dsn = self._dsn(server)
        scratch_db = PostgresDatabase(provider="postgres", dsn=dsn, password=self.db.password)
        try:
            with connect(scratch_db, connect_timeout=5):
                pass
        except ApplicationError as e:
            if e.non_retryable:
                raise
            return ScratchTarget(
                name=name,
                method=self.method,
                ready=False,
                dsn=dsn,
                restore_point=point,
                detail=f"Ready in ARM, not answering over SQL yet: {e.message}",
            )
        return ScratchTarget(
            name=name,
            method=self.method,
            ready=True,
            dsn=dsn,
            restore_point=point,
            detail=f"Ready at {where(scratch_db)}",
        )

    def _dsn(self, server: Any) -> str:
        """The source's DSN (user, dbname, sslmode...) pointed at the scratch server."""
        host = field(server, "properties", "fully_qualified_domain_name")
        if not host:
            raise ApplicationError(
                f"scratch server {field(server, 'name')}: ARM gives no fullyQualifiedDomainName", type="AzureError"
            )
        params = conninfo_to_dict(self.db.dsn)
        params.pop("hostaddr", None)
        params["host"] = host
        params["port"] = str(AZURE_PG_PORT)
        return make_conninfo("", **params)
