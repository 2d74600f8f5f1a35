"""Every call opsflow makes to Azure: flexible servers (azure-mgmt-postgresqlflexibleservers) and Traffic Manager
(azure-mgmt-trafficmanager), through Azure Resource Manager.

The SDKs are blocking: these providers run in synchronous activities on the worker's thread pool. Where they
wait (a long-running operation, an endpoint's health probes) they heartbeat when running in an activity.

- `AzureFlexibleServer` (DatabaseProvider): replication state over SQL (activities.postgres), the control plane
  over ARM. Fencing is Azure's way (no superuser there): the server parameter default_transaction_read_only set
  through ARM, then the open sessions are ended over SQL. Promotion is the SDK's replica promotion
  (PATCH properties.replica.promoteMode=Standalone, promoteOption=Planned|Forced), a long-running operation,
  followed by a wait for the first committed write.
  Failback (rebuild_replica): Azure cannot turn an existing server into a read replica, so the old, diverged
  server is kept first (an on-demand backup), then deleted and created again with createMode Replica from the
  current primary (same name, so the same FQDN and DSN).
- `AzurePointInTimeRestore` (RestoreProvider, method "azure-pitr"): the monthly restore drill's point-in-time
  restore of a flexible server into a scratch server (createMode PointInTimeRestore) in the source's resource
  group, tagged `opsflow-scratch=<environment>`: only servers with that tag are ever listed or deleted.
- `AzureTrafficManagerRouter` (TrafficProvider): endpoint states of a Traffic Manager profile and the switch of
  traffic to one region.

Errors: what retrying cannot fix (authentication, permission, resource not found, bad request, no TLS / a CA we
do not trust) raises a non-retryable ApplicationError naming the resource; throttling (429), unavailability
(5xx), timeouts and lost connections raise retryable ones (after the SDK's own retries).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Iterator

from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from temporalio import activity
from activities.context import check_cancelled, heartbeat as _heartbeat, shielded, sleep_or_cancelled as _sleep, time_limit as _time_budget
from temporalio.exceptions import ApplicationError

from activities.postgres import connect, end_other_sessions, sql_check_writable, sql_status, where
from opsflow.inventory import AzureConnection, AzureFlexibleDatabase, AzureTrafficManager, PostgresDatabase
from opsflow.models import (
    DbStatus,
    EndpointState,
    PromoteResult,
    RebuildResult,
    RegionTarget,
    RestoreRequest,
    RestoreWindow,
    ScratchTarget,
    TrafficRequest,
    TrafficStatus,
)

log = logging.getLogger(__name__)

STATIC_TOKEN_ENV = "OPSFLOW_AZURE_STATIC_TOKEN"
DEFAULT_STATIC_TOKEN = "opsflow-lab-token"
FENCE_PARAMETER = "default_transaction_read_only"
REPLICA_ROLES = ("asyncreplica", "geoasyncreplica")
DEFAULT_PROMOTE_TIMEOUT = 900.0
DEFAULT_SWITCH_TIMEOUT = 600.0
DEFAULT_REBUILD_TIMEOUT = 3600.0  # Azure builds a read replica in tens of minutes for a large server
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
SCRATCH_TAG = "opsflow-scratch"  # value: the environment; only servers with it are listed or deleted
SCRATCH_RUN_TAG = "opsflow-run"  # value: the drill run that made it; leftover cleanup spares the current run's
SCRATCH_SOURCE_TAG = "opsflow-source"
SCRATCH_POINT_TAG = "opsflow-restore-point"
_SERVER_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")
# Server states (properties.state) while an operation runs; and those of a server that will not become usable.
_BUSY_STATES = {"provisioning", "updating", "starting", "restarting", "dropping", "stopping"}
_FAILED_STATES = {"disabled", "inaccessible"}
# LRO failure codes for which a retry would fail the same way.
_PERMANENT_OPERATION_CODES = {
    "plannedpromotionnotpossible",
    "replicapromotionnotallowed",
    "invalidparametervalue",
    "switchovernotsupported",
    "configurationisreadonly",
    "badrequest",
    "invalidsourceserver",
    "nobackupavailable",
    "operationnotsupported",
}


# -- heartbeats ---------------------------------------------------------------------------------------------


def _logger() -> Any:
    return activity.logger if activity.in_activity() else log


# -- credentials and clients --------------------------------------------------------------------------------


class StaticTokenCredential:
    """A TokenCredential that always returns the same token (the lab's ARM emulator only)."""

    def __init__(self, token: str):
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


def arm_credential(conn: AzureConnection) -> Any:
    """'default': azure-identity's DefaultAzureCredential (managed identity, workload identity, az login...);
    'static-token': a fixed token from $OPSFLOW_AZURE_STATIC_TOKEN (default 'opsflow-lab-token'), lab only."""
    if conn.credential == "static-token":
        return StaticTokenCredential(os.environ.get(STATIC_TOKEN_ENV) or DEFAULT_STATIC_TOKEN)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _client_kwargs(conn: AzureConnection, fast: bool = False) -> dict[str, Any]:
    endpoint = conn.arm_endpoint.rstrip("/")
    kwargs: dict[str, Any] = {
        "base_url": endpoint,
        # The token audience is the ARM endpoint (public, sovereign clouds and the lab alike).
        "credential_scopes": [f"{endpoint}/.default"],
        "polling_interval": conn.polling_interval,
        # The SDK retries 408/429/5xx and lost connections itself, honouring Retry-After; keep it bounded
        # so that Temporal's retry policy (and our heartbeats) stay in charge of the long waits.
        "retry_total": 4,
        "retry_backoff_factor": 0.5,
        "retry_backoff_max": 20,
        "connection_timeout": 10,
        "read_timeout": 60,
    }
    if conn.ca_bundle:
        kwargs["connection_verify"] = conn.ca_bundle
    if fast:  # an emergency's best-effort call into a region that may be down: fail fast, the caller reports it
        kwargs.update(retry_total=1, retry_backoff_max=2, connection_timeout=5, read_timeout=15)
    return kwargs


def postgres_client(conn: AzureConnection, subscription_id: str, fast: bool = False) -> Any:
    from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient

    return PostgreSQLManagementClient(arm_credential(conn), subscription_id, **_client_kwargs(conn, fast))


def traffic_manager_client(conn: AzureConnection, subscription_id: str) -> Any:
    from azure.mgmt.trafficmanager import TrafficManagerManagementClient

    return TrafficManagerManagementClient(arm_credential(conn), subscription_id, **_client_kwargs(conn))


# -- error mapping ------------------------------------------------------------------------------------------


def _error_code(e: HttpResponseError) -> tuple[str | None, str]:
    err = getattr(e, "error", None)
    code = getattr(err, "code", None) if err is not None else None
    message = getattr(err, "message", None) if err is not None else None
    return code, (message or e.message or str(e)).strip().splitlines()[0]


def arm_error(e: Exception, what: str) -> ApplicationError:
    """Map an azure-core exception onto an ApplicationError: non-retryable for what a retry cannot fix."""
    if isinstance(e, ApplicationError):
        return e
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        text = str(e)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return ApplicationError(f"{what}: the ARM endpoint's TLS certificate is not trusted (set azure.ca_bundle?): {text}",
                                    type="AzureTlsError", non_retryable=True)
        if "non-TLS" in text or "non-https" in text:
            return ApplicationError(f"{what}: {text} (azure.arm_endpoint must be https://)", type="AzureConfig", non_retryable=True)
        return ApplicationError(f"{what}: ARM unreachable: {text}", type="AzureUnavailable")
    if isinstance(e, HttpResponseError):
        status = e.status_code
        code, message = _error_code(e)
        detail = f"{code}: {message}" if code else message
        if isinstance(e, ClientAuthenticationError) or status == 401:
            return ApplicationError(f"{what}: authentication refused by ARM ({detail})", type="AzureAuthFailed", non_retryable=True)
        if status == 403:
            return ApplicationError(f"{what}: permission denied by ARM ({detail})", type="AzurePermissionDenied", non_retryable=True)
        if isinstance(e, ResourceNotFoundError) or status == 404:
            return ApplicationError(f"{what}: not found ({detail})", type="AzureResourceNotFound", non_retryable=True)
        if status in (400, 405, 422):
            return ApplicationError(f"{what}: ARM refused the request ({detail})", type="AzureBadRequest", non_retryable=True)
        if status == 409:
            return ApplicationError(f"{what}: conflict ({detail})", type="AzureConflict")
        if status in (200, 201, 202) and code:  # a long-running operation that ended Failed/Canceled
            permanent = code.lower() in _PERMANENT_OPERATION_CODES
            return ApplicationError(f"{what}: the operation failed ({detail})", type="AzureOperationFailed", non_retryable=permanent)
        return ApplicationError(f"{what}: ARM answered {status} ({detail})", type="AzureUnavailable")
    return ApplicationError(f"{what}: {type(e).__name__}: {e}", type="AzureError")


@contextmanager
def _arm(what: str) -> Iterator[None]:
    try:
        yield
    except ApplicationError:
        raise
    except (HttpResponseError, ServiceRequestError, ServiceResponseError) as e:
        raise arm_error(e, what) from None


def _wait_poller(poller: Any, what: str, deadline: float) -> Any:
    """Wait for an LROPoller, heartbeating; return its result."""
    started = time.monotonic()
    while not poller.done():
        waited = time.monotonic() - started
        _heartbeat({"phase": what, "operation": poller.status(), "waited_seconds": round(waited, 1)})
        check_cancelled(what)  # the operation goes on in Azure; whoever comes next finds it by the resource's state
        if time.monotonic() > deadline:
            raise ApplicationError(f"{what}: the ARM operation is still {poller.status()} after {waited:.0f}s", type="AzureOperationTimeout")
        poller.wait(timeout=1.0)
    return poller.result()


def _get(obj: Any, *path: str) -> Any:
    """obj.a.b... over SDK models or dicts; None where a step is missing; enums as their plain string value."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if isinstance(obj, Enum):
        return obj.value
    return obj


def _get_server(client: Any, resource_group: str, name: str, what: str) -> Any | None:
    """A flexible server through ARM, or None when there is no such server (its resource group must exist)."""
    with _arm(what):
        try:
            return client.servers.get(resource_group, name)
        except ResourceNotFoundError as e:
            code, _ = _error_code(e)
            if code and code.lower() in ("resourcegroupnotfound", "subscriptionnotfound"):
                raise
            return None


def _state(server: Any) -> str:
    return _get(server, "properties", "state") or ""


def _tags(server: Any) -> dict[str, str]:
    return dict(_get(server, "tags") or {})


def _user_tags(server: Any) -> dict[str, str]:
    """The tags a re-created server keeps: the old server's, less those opsflow sets on scratch servers."""
    return {k: v for k, v in _tags(server).items() if k not in (SCRATCH_TAG, SCRATCH_RUN_TAG, SCRATCH_SOURCE_TAG, SCRATCH_POINT_TAG)}


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return _utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        return None


def _iso(t: datetime) -> str:
    return _utc(t).isoformat(timespec="microseconds").replace("+00:00", "Z")  # type: ignore[union-attr]


def _same_id(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and a.strip("/").lower() == b.strip("/").lower()  # type: ignore[union-attr]


# -- flexible server ----------------------------------------------------------------------------------------


class AzureFlexibleServer:
    """DatabaseProvider for provider "azure-flexible": Azure Database for PostgreSQL flexible server."""

    def __init__(self, target: RegionTarget, *, promote_timeout: float | None = None):
        if not isinstance(target.database, AzureFlexibleDatabase):
            raise ValueError(f"AzureFlexibleServer serves provider 'azure-flexible', not {target.database.provider!r}")
        self.target = target
        self.db: AzureFlexibleDatabase = target.database
        self.conn = target.azure or AzureConnection()
        self.promote_timeout = promote_timeout
        self._client: Any = None

    # -- ARM ---------------------------------------------------------------------------------------------------
    @property
    def resource(self) -> str:
        return (f"flexible server {self.db.server_name} (resource group {self.db.resource_group}, "
                f"subscription {self.db.subscription_id})")

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = postgres_client(self.conn, self.db.subscription_id)
        return self._client

    def server(self) -> Any:
        with _arm(f"get {self.resource}"):
            return self.client.servers.get(self.db.resource_group, self.db.server_name)

    @staticmethod
    def _role(server: Any) -> str | None:
        return _get(server, "properties", "replica", "role") or _get(server, "properties", "replication_role")

    def _parameter(self, name: str) -> str | None:
        with _arm(f"get parameter {name} of {self.resource}"):
            cfg = self.client.configurations.get(self.db.resource_group, self.db.server_name, name)
        return _get(cfg, "properties", "value")

    def _set_parameter(self, name: str, value: str, deadline: float) -> None:
        """Set a server parameter through ARM (a long-running operation), unless it already has the value."""
        current = self._parameter(name)
        if current is not None and current.lower() == value.lower():
            return
        what = f"set parameter {name}={value} on {self.resource}"
        with _arm(what):
            poller = self.client.configurations.begin_put(
                self.db.resource_group, self.db.server_name, name, {"properties": {"value": value, "source": "user-override"}}
            )
            _wait_poller(poller, what, deadline)

    # -- DatabaseProvider ------------------------------------------------------------------------------------
    def status(self) -> DbStatus:
        status = sql_status(self.db, self.target.region)
        try:
            server = self.server()
        except ApplicationError as e:
            if e.non_retryable:
                raise  # our inventory names a server ARM does not know, or we may not read it
            note = f"control plane: {e.message}"
            return status.model_copy(update={"error": f"{status.error}; {note}" if status.error else note})
        return status.model_copy(update={"cloud_state": _get(server, "properties", "state"), "cloud_role": self._role(server)})

    def fence_control_plane(self, budget: float) -> tuple[str, list[str]]:
        """Emergency fence of an old primary that may be dead: default_transaction_read_only=on through ARM (the
        server applies it whenever it runs again), then its sessions ended over SQL if it answers. Short
        timeouts and no SDK retries beyond one: raises ApplicationError when ARM cannot be reached."""
        deadline = time.monotonic() + budget
        self._client = postgres_client(self.conn, self.db.subscription_id, fast=True)
        self._set_parameter(FENCE_PARAMETER, "on", deadline)
        actions = [f"set {FENCE_PARAMETER}=on on {self.resource} through ARM"]
        try:
            self._end_sessions()
            actions.append("ended its client sessions over SQL")
        except ApplicationError as e:
            actions.append(f"sessions not ended over SQL ({e.message})")
        return "azure-read-only-parameter", actions

    def cloud_state(self) -> str | None:
        """One control-plane read: the server's state and role in ARM (e.g. 'Ready, AsyncReplica')."""
        server = self.server()
        return ", ".join(x for x in (_get(server, "properties", "state"), self._role(server)) if x) or None

    def fence(self) -> None:
        """Azure's fence: default_transaction_read_only=on through ARM, then end the open sessions over SQL."""
        deadline = time.monotonic() + _time_budget(300.0)
        self._set_parameter(FENCE_PARAMETER, "on", deadline)
        self._wait_sql_read_only(True, deadline)
        self._end_sessions()

    def unfence(self) -> None:
        deadline = time.monotonic() + _time_budget(300.0)
        self._set_parameter(FENCE_PARAMETER, "off", deadline)
        self._wait_sql_read_only(False, deadline)

    def _wait_sql_read_only(self, want: bool, deadline: float) -> None:
        """New sessions must see the parameter before we go on (the reload reaches them asynchronously)."""
        while True:
            with connect(self.db) as conn:
                now = conn.execute("select current_setting('default_transaction_read_only')::bool").fetchone()[0]
            if now == want:
                return
            if time.monotonic() > deadline:
                raise ApplicationError(f"{self.resource}: default_transaction_read_only is still {'off' if want else 'on'} "
                                       f"over SQL after ARM reported the change", type="FenceIncomplete")
            _heartbeat("waiting for the parameter to reach new sessions")
            _sleep(0.1)

    def _end_sessions(self) -> None:
        """End the other client sessions so that none keeps a read-write transaction (walsenders stay).

        Azure's admin role may end sessions of ordinary roles (pg_signal_backend), not those of Azure's own
        superuser; those are skipped with a warning."""
        with connect(self.db) as conn:
            end_other_sessions(conn, self.db)

    def promote(self, force: bool) -> PromoteResult:
        """Promote this read replica to a standalone primary through ARM and wait until it commits a write.

        Idempotent: a server that ARM already reports as not a replica gives already_primary=True. A promotion
        still running (an earlier attempt of this activity) is waited for rather than started again.
        force: promoteOption Forced (do not wait for the source server; emergency), else Planned.
        """
        budget = self.promote_timeout if self.promote_timeout is not None else _time_budget(DEFAULT_PROMOTE_TIMEOUT)
        deadline = time.monotonic() + budget
        server = self._wait_not_updating(deadline)
        if (self._role(server) or "").lower() not in REPLICA_ROLES:
            after = sql_status(self.db, self.target.region)
            return PromoteResult(already_primary=True, seconds=0.0, timeline=after.timeline)
        before = sql_status(self.db, self.target.region)
        option = "Forced" if force else "Planned"
        what = f"promote {self.resource} (Standalone, {option})"
        _logger().info("%s: received %s, replayed %s", what, before.current_lsn, before.replay_lsn)
        t0 = time.monotonic()
        with _arm(what):
            try:
                poller = self.client.servers.begin_update(
                    self.db.resource_group,
                    self.db.server_name,
                    {"properties": {"replica": {"promoteMode": "Standalone", "promoteOption": option}}},
                )
            except HttpResponseError as e:
                if e.status_code != 409:
                    raise
                # Another operation runs on the server (our own earlier attempt?): wait and look again.
                server = self._wait_not_updating(deadline)
                if (self._role(server) or "").lower() in REPLICA_ROLES:
                    raise
                poller = None
            if poller is not None:
                _wait_poller(poller, what, deadline)
        self._wait_writable(deadline, t0)
        seconds = time.monotonic() - t0
        with connect(self.db) as conn:
            received, replayed = conn.execute("select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text").fetchone()
        after = sql_status(self.db, self.target.region)
        return PromoteResult(
            already_primary=False,
            seconds=round(seconds, 3),
            timeline=after.timeline,
            lsn_at_promotion=replayed or before.replay_lsn,
            received_lsn=received or before.current_lsn,
        )

    def _wait_not_updating(self, deadline: float) -> Any:
        while True:
            server = self.server()
            state = _get(server, "properties", "state")
            if state != "Updating":
                return server
            if time.monotonic() > deadline:
                raise ApplicationError(f"{self.resource}: still Updating (another operation runs on it)", type="AzureConflict")
            _heartbeat({"phase": "waiting for a running operation on the server", "state": state})
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))

    def _wait_writable(self, deadline: float, t0: float) -> None:
        while True:
            try:
                sql_check_writable(self.db, region=self.target.region)
                return
            except ApplicationError as e:
                if e.non_retryable or time.monotonic() > deadline:
                    raise
                last = e.message
            _heartbeat({"phase": "waiting for a write to commit", "waited_seconds": round(time.monotonic() - t0, 1), "last": last})
            _sleep(0.2)

    def check_writable(self) -> None:
        sql_check_writable(self.db, region=self.target.region)

    # -- failback: a read replica of the current primary --------------------------------------------------------
    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """Make this region's server a read replica of `primary`'s server again (failback).

        Azure cannot turn an existing server into a replica: the old server (the former primary, diverged) is
        deleted, then created again under the same name with createMode Replica and sourceServerResourceId the
        primary's server (a long-running operation, heartbeated), in the old server's location (else the
        inventory's region name) and with its tags. Then we wait until it streams over SQL. The same name keeps
        the FQDN, so the inventory's DSN stays right.

        Idempotent and safe to retry after a crash: a server that ARM already shows as a replica of the primary
        (an earlier attempt's, or one that never diverged) is left as it is once it streams ("already-replica");
        a create still running is waited for; a server whose create failed is deleted and created again. It
        refuses (non-retryable) when `primary` is not a primary in ARM and over SQL: the server deleted here must
        never be the one serving writes.
        """
        t0 = time.monotonic()
        deadline = t0 + _time_budget(DEFAULT_REBUILD_TIMEOUT)
        pdb = primary.database
        if not isinstance(pdb, AzureFlexibleDatabase):
            raise ApplicationError(f"rebuild {self.resource}: the primary region {primary.region} is a {pdb.provider!r} database; an Azure read "
                                   f"replica needs an Azure flexible server as its source", type="BadInput", non_retryable=True)
        if (pdb.subscription_id, pdb.resource_group.lower(), pdb.server_name.lower()) == (self.db.subscription_id, self.db.resource_group.lower(), self.db.server_name.lower()):
            raise ApplicationError(f"rebuild {self.resource}: it is the primary itself", type="BadInput", non_retryable=True)
        source_provider = AzureFlexibleServer(primary)
        source = source_provider.server()
        source_id = _get(source, "id")
        if (source_provider._role(source) or "").lower() in REPLICA_ROLES:
            raise ApplicationError(f"rebuild {self.resource}: {source_provider.resource} (region {primary.region}) is a read replica in ARM, "
                                   f"not the primary; refusing to rebuild from it", type="NotPrimary", non_retryable=True)
        pst = sql_status(pdb, primary.region)
        if not pst.reachable:
            raise ApplicationError(f"rebuild {self.resource}: the primary {where(pdb)} is unreachable over SQL: {pst.error}", type="Unreachable")
        if pst.role != "primary":
            raise ApplicationError(f"rebuild {self.resource}: {where(pdb)} (region {primary.region}) is in recovery, not a primary; "
                                   f"refusing to rebuild from it", type="NotPrimary", non_retryable=True)

        current = self._wait_settled(deadline)
        if current is not None and self._is_replica_of(current, source_id):
            self._wait_streaming(deadline, t0)
            return RebuildResult(method="already-replica", seconds=round(time.monotonic() - t0, 3),
                                 detail=f"{self.db.server_name} is a read replica of {pdb.server_name}, streaming")
        location = _get(current, "location") or self.target.region
        tags = _user_tags(current) if current is not None else {}
        steps = []
        preserved = None
        if current is not None:
            preserved = self._preserve(current, deadline)
            steps.append(f"kept {preserved}")
            what = (f"delete {self.resource} (state {_state(current) or '?'}, role {self._role(current) or '?'}): Azure cannot make an "
                    f"existing server a replica")
            _logger().warning("failback: %s", what)
            with _arm(what):
                poller = self.client.servers.begin_delete(self.db.resource_group, self.db.server_name)
                _wait_poller(poller, what, deadline)
            steps.append("deleted the old server")
        what = f"create {self.resource} as a read replica of {source_provider.resource}"
        _logger().info("failback: %s", what)
        body = {"location": location, "properties": {"createMode": "Replica", "sourceServerResourceId": source_id}, "tags": tags}
        with _arm(what):
            poller = self.client.servers.begin_create_or_update(self.db.resource_group, self.db.server_name, body)
            _wait_poller(poller, what, deadline)
        steps.append(f"created a read replica of {pdb.server_name} in {location}")
        self._wait_streaming(deadline, t0)
        return RebuildResult(method="azure-replica", seconds=round(time.monotonic() - t0, 3), detail="; ".join(steps), preserved=preserved)

    def _preserve(self, server: Any, deadline: float) -> str:
        """Before the old server is deleted: an on-demand backup of it (Backups - Create), so that what it holds
        (writes after the split included) can still be restored. Named by the day, so a retried rebuild finds
        the backup it made; a server that cannot be backed up is not deleted (non-retryable PreserveFailed)."""
        name = f"opsflow-before-rebuild-{datetime.now(timezone.utc):%Y%m%d}"
        what = f"on-demand backup {name} of {self.resource}"
        ops = self.client.backups_automatic_and_on_demand
        try:
            with _arm(what):
                try:
                    ops.get(self.db.resource_group, self.db.server_name, name)
                    return f"{what} (already taken)"
                except ResourceNotFoundError:
                    pass
                _logger().info("failback: %s before the server is deleted", what)
                with shielded():
                    poller = ops.begin_create(self.db.resource_group, self.db.server_name, name)
                _wait_poller(poller, what, deadline)
        except ApplicationError as e:
            if not e.non_retryable:
                raise
            raise ApplicationError(f"rebuild {self.resource}: {what} failed, so the old server is not deleted: {e.message}. Keep its "
                                   f"data another way (e.g. a point-in-time restore into a new server), then delete it by hand "
                                   f"and run the failback again", type="PreserveFailed", non_retryable=True) from None
        return what

    @staticmethod
    def _is_replica_of(server: Any, source_id: str | None) -> bool:
        role = (_get(server, "properties", "replica", "role") or _get(server, "properties", "replication_role") or "").lower()
        return (role in REPLICA_ROLES and _same_id(_get(server, "properties", "source_server_resource_id"), source_id)
                and _state(server).lower() not in _FAILED_STATES)

    def _wait_settled(self, deadline: float) -> Any | None:
        """This server once no operation runs on it (None: there is no such server)."""
        while True:
            server = _get_server(self.client, self.db.resource_group, self.db.server_name, f"get {self.resource}")
            state = _state(server)
            if server is None or state.lower() not in _BUSY_STATES:
                return server
            if time.monotonic() > deadline:
                raise ApplicationError(f"{self.resource}: still {state} (another operation runs on it)", type="AzureConflict")
            _heartbeat({"phase": "waiting for a running operation on the server", "state": state})
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))

    def _wait_streaming(self, deadline: float, t0: float) -> None:
        """Wait until the server is a replica whose WAL receiver streams (over SQL), heartbeating."""
        while True:
            st = sql_status(self.db, self.target.region)
            if st.reachable and st.role == "replica" and st.streaming:
                return
            seen = st.error if not st.reachable else f"role {st.role}, streaming {st.streaming}"
            if time.monotonic() > deadline:
                raise ApplicationError(f"{self.resource}: created as a read replica, but not streaming over SQL ({seen})", type="ReplicaNotStreaming")
            _heartbeat({"phase": "waiting for the replica to stream", "seen": seen, "waited_seconds": round(time.monotonic() - t0, 1)})
            _sleep(0.2)


# -- restore drills: point-in-time restore into a scratch server -------------------------------------------------


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
        return f"flexible server {name} (resource group {self.db.resource_group}, subscription {self.db.subscription_id})"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = postgres_client(self.conn, self.db.subscription_id)
        return self._client

    def _source(self) -> Any:
        with _arm(f"get {self.resource}"):
            return self.client.servers.get(self.db.resource_group, self.db.server_name)

    def _get(self, name: str) -> Any | None:
        return _get_server(self.client, self.db.resource_group, name, f"get {self._resource(name)}")

    # -- RestoreProvider --------------------------------------------------------------------------------------
    def window(self) -> RestoreWindow:
        source = self._source()
        earliest = _utc(_get(source, "properties", "backup", "earliest_restore_date"))
        retention = _get(source, "properties", "backup", "backup_retention_days")
        now = datetime.now(timezone.utc)
        latest, how = now - timedelta(seconds=LATEST_RESTORE_MARGIN), f"latest: now minus {LATEST_RESTORE_MARGIN:.0f}s (clock skew margin)"
        if earliest is not None and earliest <= now and latest < earliest:
            latest, how = earliest, "latest: the earliest restore date (the first backup is younger than the clock skew margin)"
        notes = [f"earliest: backup.earliestRestoreDate of {self.db.server_name}" if earliest else
                 f"ARM reports no backup.earliestRestoreDate for {self.db.server_name} (no backup yet?)", how]
        if retention:
            notes.append(f"retention {retention} days")
        return RestoreWindow(earliest=earliest, latest=latest, detail="; ".join(notes))

    def start(self, name: str, point: datetime) -> ScratchTarget:
        if not _SERVER_NAME.match(name):
            raise ApplicationError(f"scratch server name {name!r} is not a valid flexible server name (3-63 lower-case letters, digits, hyphens)",
                                   type="BadInput", non_retryable=True)
        point = _utc(point)  # type: ignore[assignment]
        existing = self._get(name)
        if existing is not None:
            self._check_scratch(existing, name)
            _logger().info("restore: scratch server %s exists already (state %s); reusing it", name, _state(existing))
            return self._scratch(existing, name)
        source = self._source()
        what = f"point-in-time restore of {self.resource} as of {_iso(point)} into {name}"
        body = {
            "location": _get(source, "location"),
            "properties": {"createMode": "PointInTimeRestore", "sourceServerResourceId": _get(source, "id"), "pointInTimeUTC": _iso(point)},
            "tags": {SCRATCH_TAG: self.environment, SCRATCH_SOURCE_TAG: self.db.server_name, SCRATCH_POINT_TAG: _iso(point),
                     **({SCRATCH_RUN_TAG: self.run_id} if self.run_id else {})},
        }
        with _arm(what):
            # polling=False: the initial PUT only. ARM goes on restoring; restore.wait follows it with status().
            self.client.servers.begin_create_or_update(self.db.resource_group, name, body, polling=False)
        _logger().info("restore: %s accepted by ARM", what)
        return ScratchTarget(name=name, method=self.method, ready=False, restore_point=point, detail=f"{what}: accepted, provisioning")

    def status(self, name: str) -> ScratchTarget:
        server = self._get(name)
        if server is None:
            first = self._missing_since.setdefault(name, time.monotonic())
            if time.monotonic() - first < SCRATCH_MISSING_GRACE:
                return ScratchTarget(name=name, method=self.method, ready=False, detail="not visible in ARM (yet)")
            raise ApplicationError(f"scratch server {name} does not exist in resource group {self.db.resource_group}: its restore failed and "
                                   f"ARM removed it, or it was deleted", type="RestoreFailed", non_retryable=True)
        self._missing_since.pop(name, None)
        return self._scratch(server, name)

    def delete(self, name: str) -> bool:
        deadline = time.monotonic() + _time_budget(DEFAULT_DELETE_TIMEOUT)
        server = self._get(name)
        if server is None:
            return False
        self._check_scratch(server, name)
        what = f"delete scratch {self._resource(name)}"
        started = time.monotonic()
        while True:
            if server is None:
                return True  # gone while we waited (an earlier attempt's delete finished)
            state = _state(server)
            if state.lower() != "dropping":
                try:
                    with _arm(what):
                        poller = self.client.servers.begin_delete(self.db.resource_group, name)
                        _wait_poller(poller, what, deadline)
                    _logger().info("restore: %s done", what)
                    return True
                except ApplicationError as e:
                    if e.type != "AzureConflict":  # another operation runs on it (the restore): wait, then delete
                        raise
                    state = f"{state} (another operation runs: {e.message})"
            waited = time.monotonic() - started
            if time.monotonic() > deadline:
                raise ApplicationError(f"{what}: still {state} after {waited:.0f}s", type="AzureOperationTimeout")
            _heartbeat({"phase": "waiting to delete the scratch server", "state": state, "waited_seconds": round(waited, 1)})
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))
            server = self._get(name)

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        with _arm(f"list the flexible servers of resource group {self.db.resource_group}"):
            servers = list(self.client.servers.list_by_resource_group(self.db.resource_group))
        return {_get(s, "name"): _tags(s).get(SCRATCH_RUN_TAG) for s in servers
                if (_get(s, "name") or "").startswith(prefix) and _tags(s).get(SCRATCH_TAG) == self.environment}

    # -- helpers ------------------------------------------------------------------------------------------------
    def _check_scratch(self, server: Any, name: str) -> None:
        """Refuse to touch a server that is not a scratch server of this environment (tag opsflow-scratch)."""
        if name.lower() == self.db.server_name.lower() or _tags(server).get(SCRATCH_TAG) != self.environment:
            raise ApplicationError(f"{self._resource(name)} is not a scratch server of environment {self.environment} "
                                   f"(tag {SCRATCH_TAG}={self.environment} missing): the drill does not touch it",
                                   type="Refused", non_retryable=True)

    def _scratch(self, server: Any, name: str) -> ScratchTarget:
        state = _state(server)
        tags = _tags(server)
        point = _parse_time(tags.get(SCRATCH_POINT_TAG))
        if state.lower() in _FAILED_STATES:
            raise ApplicationError(
                f"the point-in-time restore into scratch {self._resource(name)} failed (state {state}); the create operation's "
                f"error is in the resource group's activity log", type="RestoreFailed", non_retryable=True)
        if state.lower() != "ready":
            return ScratchTarget(name=name, method=self.method, ready=False, restore_point=point, detail=f"ARM state {state or 'unknown'}")
        dsn = self._dsn(server)
        scratch_db = PostgresDatabase(provider="postgres", dsn=dsn, password=self.db.password)
        try:
            with connect(scratch_db, connect_timeout=5):
                pass
        except ApplicationError as e:
            if e.non_retryable:
                raise
            return ScratchTarget(name=name, method=self.method, ready=False, dsn=dsn, restore_point=point,
                                 detail=f"Ready in ARM, not answering over SQL yet: {e.message}")
        return ScratchTarget(name=name, method=self.method, ready=True, dsn=dsn, restore_point=point, detail=f"Ready at {where(scratch_db)}")

    def _dsn(self, server: Any) -> str:
        """The source's DSN (user, dbname, sslmode...) pointed at the scratch server."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        host = _get(server, "properties", "fully_qualified_domain_name")
        if not host:
            raise ApplicationError(f"scratch server {_get(server, 'name')}: ARM gives no fullyQualifiedDomainName", type="AzureError")
        params = conninfo_to_dict(self.db.dsn)
        params.pop("hostaddr", None)
        params["host"] = host
        params["port"] = str(AZURE_PG_PORT)
        return make_conninfo("", **params)


# -- traffic manager ----------------------------------------------------------------------------------------


def _endpoint_type_segment(type_name: str | None) -> str:
    """'Microsoft.Network/trafficManagerProfiles/externalEndpoints' -> 'ExternalEndpoints' (the URL segment)."""
    last = (type_name or "").rsplit("/", 1)[-1]
    return last[:1].upper() + last[1:] if last else "ExternalEndpoints"


class AzureTrafficManagerRouter:
    """TrafficProvider for Azure Traffic Manager (priority routing: the enabled, Online endpoint with the lowest
    priority number serves)."""

    def __init__(self, request: TrafficRequest):
        if not isinstance(request.traffic, AzureTrafficManager):
            raise ValueError(f"AzureTrafficManagerRouter serves provider 'azure-traffic-manager', not {request.traffic.provider!r}")
        self.request = request
        self.tm: AzureTrafficManager = request.traffic
        self.conn = request.azure or AzureConnection()
        self._client: Any = None

    @property
    def resource(self) -> str:
        return f"Traffic Manager profile {self.tm.profile} (resource group {self.tm.resource_group}, subscription {self.tm.subscription_id})"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = traffic_manager_client(self.conn, self.tm.subscription_id)
        return self._client

    def _profile(self) -> Any:
        with _arm(f"get {self.resource}"):
            return self.client.profiles.get(self.tm.resource_group, self.tm.profile)

    def _endpoints(self, profile: Any) -> dict[str, Any]:
        """The profile's endpoints by lower-case name; every endpoint the inventory names must be there."""
        found = {(_get(e, "name") or "").lower(): e for e in (_get(profile, "properties", "endpoints") or [])}
        missing = [f"{name} (region {region})" for region, name in self.request.endpoints.items() if name.lower() not in found]
        if missing:
            raise ApplicationError(f"{self.resource} has no endpoint {', '.join(missing)}; it has: {', '.join(_get(e, 'name') for e in found.values()) or 'none'}",
                                   type="AzureResourceNotFound", non_retryable=True)
        return found

    def _state(self, profile: Any) -> TrafficStatus:
        found = self._endpoints(profile)
        region_of = {name.lower(): region for region, name in self.request.endpoints.items()}
        states = []
        for region, name in self.request.endpoints.items():
            e = found[name.lower()]
            states.append(EndpointState(
                region=region,
                endpoint=_get(e, "name"),
                enabled=(_get(e, "properties", "endpoint_status") or "").lower() == "enabled",
                priority=_get(e, "properties", "priority"),
                monitor_status=_get(e, "properties", "endpoint_monitor_status"),
            ))
        serving = None
        candidates = [e for e in found.values()
                      if (_get(e, "properties", "endpoint_status") or "").lower() == "enabled"
                      and (_get(e, "properties", "endpoint_monitor_status") or "") == "Online"]
        if self._priority_routing(profile) and candidates:
            best = min(candidates, key=lambda e: _get(e, "properties", "priority") or 1001)
            serving = region_of.get((_get(best, "name") or "").lower())
        elif len(candidates) == 1:
            serving = region_of.get((_get(candidates[0], "name") or "").lower())
        return TrafficStatus(endpoints=states, serving_region=serving)

    @staticmethod
    def _priority_routing(profile: Any) -> bool:
        return (_get(profile, "properties", "traffic_routing_method") or "").lower() == "priority"

    def status(self) -> TrafficStatus:
        return self._state(self._profile())

    def _patch(self, endpoint: Any, props: dict[str, Any]) -> None:
        name = _get(endpoint, "name")
        what = f"update endpoint {name} of {self.resource} ({', '.join(f'{k}={v}' for k, v in props.items())})"
        _logger().info(what)
        _heartbeat(what)
        with _arm(what):
            self.client.endpoints.update(self.tm.resource_group, self.tm.profile, _endpoint_type_segment(_get(endpoint, "type")),
                                         name, {"properties": props})

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
            raise ApplicationError(f"traffic: region {to_region!r} has no endpoint in the inventory", type="TrafficConfig", non_retryable=True)
        deadline = time.monotonic() + _time_budget(DEFAULT_SWITCH_TIMEOUT)
        profile = self._profile()
        found = self._endpoints(profile)
        priority_routing = self._priority_routing(profile)
        target_key = self.request.endpoints[to_region].lower()
        target = found[target_key]
        others = [e for k, e in found.items() if k != target_key]

        def prio(e: Any) -> int | None:
            return _get(e, "properties", "priority")

        def enabled(e: Any) -> bool:
            return (_get(e, "properties", "endpoint_status") or "").lower() == "enabled"

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

    def _wait_online(self, target_key: str, deadline: float) -> None:
        started = time.monotonic()
        while True:
            profile = self._profile()
            e = self._endpoints(profile)[target_key]
            monitor = _get(e, "properties", "endpoint_monitor_status")
            if monitor == "Online":
                return
            if monitor in ("Degraded", "Stopped"):
                raise ApplicationError(
                    f"traffic: endpoint {_get(e, 'name')} of {self.resource} (region {self.request.to_region}) is {monitor}: "
                    f"Traffic Manager's health probes fail there, so it will not take traffic; the other endpoints were left as they were",
                    {"endpoint": _get(e, "name"), "monitor_status": monitor},
                    type="EndpointDegraded",
                    non_retryable=True,
                )
            waited = time.monotonic() - started
            if time.monotonic() > deadline:
                raise ApplicationError(f"traffic: endpoint {_get(e, 'name')} of {self.resource} is still {monitor} after {waited:.0f}s",
                                       type="EndpointNotOnline")
            _heartbeat({"phase": "waiting for the endpoint to be Online", "endpoint": _get(e, "name"), "monitor_status": monitor,
                        "waited_seconds": round(waited, 1)})
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))


# -- on-demand backup (the maintenance window's backup before anything) ------------------------------------------


def on_demand_backup(target: RegionTarget, name: str, timeout: float) -> Any:
    """An on-demand backup of the region's flexible server (backups_automatic_and_on_demand.begin_create),
    waited for with heartbeats. Idempotent: a backup of that name that exists already is returned."""
    from opsflow.maintenance_models import BackupResult

    server = AzureFlexibleServer(target)
    db, client = server.db, server.client
    what = f"on-demand backup {name} of {server.resource}"
    with _arm(what):
        try:
            backup = client.backups_automatic_and_on_demand.get(db.resource_group, db.server_name, name)
        except ResourceNotFoundError:
            poller = client.backups_automatic_and_on_demand.begin_create(db.resource_group, db.server_name, name)
            backup = _wait_poller(poller, what, time.monotonic() + timeout)
            if backup is None:
                backup = client.backups_automatic_and_on_demand.get(db.resource_group, db.server_name, name)
    return BackupResult(id=_get(backup, "id") or name, method="azure-on-demand", state="completed",
                        completed_at=_utc(_get(backup, "properties", "completed_time") or _get(backup, "completed_time")),
                        location=db.server_name)


def get_backup(target: RegionTarget, name: str) -> Any | None:
    """The flexible server's backup of that name (SDK model), or None."""
    server = AzureFlexibleServer(target)
    with _arm(f"get backup {name} of {server.resource}"):
        try:
            return server.client.backups_automatic_and_on_demand.get(server.db.resource_group, server.db.server_name, name)
        except ResourceNotFoundError:
            return None
