"""Azure Database for PostgreSQL flexible server: `AzureFlexibleServer` (DatabaseProvider) and the maintenance
window's on-demand backups.

Replication state over SQL (activities/postgres/), the control plane over ARM. Fencing is Azure's way (no
superuser there): the server parameter default_transaction_read_only set through ARM, then the open sessions
are ended over SQL. Promotion is the SDK's replica promotion (PATCH properties.replica.promoteMode,
promoteOption=Planned|Forced), a long-running operation, followed by a wait for the first committed write:
promoteMode Switchover when the inventory names the server's virtual endpoint (Azure swaps the roles: the old
primary becomes this server's read replica, the endpoint's writer host name follows the primary), else
Standalone (the old primary is left as it is).
Failback (rebuild_replica): Azure cannot turn an existing server into a read replica, so the old, diverged
server is kept first (an on-demand backup), then deleted and created again with createMode Replica from the
current primary (same name, so the same FQDN and DSN).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from temporalio.exceptions import ApplicationError

from activities.azure.arm import arm_errors, error_code, field, postgres_client, same_id, utc, wait_poller
from activities.context import Backoff, logger, shielded
from activities.context import heartbeat as _heartbeat
from activities.context import sleep_or_cancelled as _sleep
from activities.context import time_limit as _time_budget
from activities.postgres.connection import connect, where
from activities.postgres.server import end_other_sessions, sql_check_writable, sql_status
from opsflow.inventory import AzureConnection, AzureFlexibleDatabase
from opsflow.maintenance_models import BackupResult
from opsflow.models import DbStatus, PromoteResult, RebuildResult, RegionTarget, VirtualEndpointState

log = logging.getLogger(__name__)


FENCE_PARAMETER = "default_transaction_read_only"
REPLICA_ROLES = ("asyncreplica", "geoasyncreplica")
DEFAULT_PROMOTE_TIMEOUT = 900.0
DEFAULT_REBUILD_TIMEOUT = 3600.0  # Azure builds a read replica in tens of minutes for a large server
SCRATCH_TAG = "opsflow-scratch"  # value: the environment; only servers with it are listed or deleted
SCRATCH_RUN_TAG = "opsflow-run"  # value: the drill run that made it; leftover cleanup spares the current run's
SCRATCH_SOURCE_TAG = "opsflow-source"
SCRATCH_POINT_TAG = "opsflow-restore-point"
# Server states (properties.state) while an operation runs; and those of a server that will not become usable.
_BUSY_STATES = {"provisioning", "updating", "starting", "restarting", "dropping", "stopping"}
FAILED_STATES = {"disabled", "inaccessible"}


def _id_parts(resource_id: str | None) -> tuple[str, str] | None:
    """(resource group, server name) of a flexible server's resource id."""
    parts = (resource_id or "").strip("/").split("/")
    low = [p.lower() for p in parts]
    if "resourcegroups" not in low or "flexibleservers" not in low or low.index("flexibleservers") + 1 >= len(parts):
        return None
    return parts[low.index("resourcegroups") + 1], parts[low.index("flexibleservers") + 1]


def get_server(client: Any, resource_group: str, name: str, what: str) -> Any | None:
    """A flexible server through ARM, or None when there is no such server (its resource group must exist)."""
    with arm_errors(what):
        try:
            return client.servers.get(resource_group, name)
        except ResourceNotFoundError as e:
            code, _ = error_code(e)
            if code and code.lower() in ("resourcegroupnotfound", "subscriptionnotfound"):
                raise
            return None


def server_state(server: Any) -> str:
    return field(server, "properties", "state") or ""


def server_tags(server: Any) -> dict[str, str]:
    return dict(field(server, "tags") or {})


def _user_tags(server: Any) -> dict[str, str]:
    """The tags a re-created server keeps: the old server's, less those opsflow sets on scratch servers."""
    return {
        k: v
        for k, v in server_tags(server).items()
        if k not in (SCRATCH_TAG, SCRATCH_RUN_TAG, SCRATCH_SOURCE_TAG, SCRATCH_POINT_TAG)
    }


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
        return (
            f"flexible server {self.db.server_name} (resource group {self.db.resource_group}, "
            f"subscription {self.db.subscription_id})"
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = postgres_client(self.conn, self.db.subscription_id)
        return self._client

    def server(self) -> Any:
        with arm_errors(f"get {self.resource}"):
            return self.client.servers.get(self.db.resource_group, self.db.server_name)

    @staticmethod
    def _role(server: Any) -> str | None:
        return field(server, "properties", "replica", "role") or field(server, "properties", "replication_role")

    def _parameter(self, name: str) -> str | None:
        with arm_errors(f"get parameter {name} of {self.resource}"):
            cfg = self.client.configurations.get(self.db.resource_group, self.db.server_name, name)
        return field(cfg, "properties", "value")

    def _set_parameter(self, name: str, value: str, deadline: float) -> None:
        """Set a server parameter through ARM (a long-running operation), unless it already has the value."""
        current = self._parameter(name)
        if current is not None and current.lower() == value.lower():
            return
        what = f"set parameter {name}={value} on {self.resource}"
        with arm_errors(what):
            poller = self.client.configurations.begin_put(
                self.db.resource_group,
                self.db.server_name,
                name,
                {"properties": {"value": value, "source": "user-override"}},
            )
            wait_poller(poller, what, deadline)

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
        update = {"cloud_state": field(server, "properties", "state"), "cloud_role": self._role(server)}
        if self.db.virtual_endpoint:
            try:
                update["virtual_endpoint"] = self.virtual_endpoint(server)
            except ApplicationError as e:
                update["virtual_endpoint"] = VirtualEndpointState(name=self.db.virtual_endpoint, error=e.message)
        return status.model_copy(update=update)

    def virtual_endpoint(self, server: Any | None = None) -> VirtualEndpointState | None:
        """The inventory's virtual endpoint as ARM shows it, read where Azure manages it: on the pair's primary
        (this server, or the source server of this replica). `writer` is that primary when ARM says it is one."""
        name = self.db.virtual_endpoint
        if not name:
            return None
        server = server if server is not None else self.server()
        rg, primary = self.db.resource_group, self.db.server_name
        if (self._role(server) or "").lower() in REPLICA_ROLES:
            source = _id_parts(field(server, "properties", "source_server_resource_id"))
            if source is None:
                return VirtualEndpointState(name=name, error=f"{self.db.server_name} is a replica without a source")
            rg, primary = source
        what = f"get virtual endpoint {name} of flexible server {primary} (resource group {rg})"
        with arm_errors(what):
            try:
                ve = self.client.virtual_endpoints.get(rg, primary, name)
            except ResourceNotFoundError:
                return VirtualEndpointState(name=name, error=f"server {primary} has no virtual endpoint {name!r}")
            if primary != self.db.server_name:
                server = self.client.servers.get(rg, primary)
        writer = primary if (self._role(server) or "").lower() not in REPLICA_ROLES else None
        return VirtualEndpointState(
            name=name,
            writer=writer,
            reader=[str(m) for m in field(ve, "properties", "members") or []],
            hosts=[str(h) for h in field(ve, "properties", "virtual_endpoints") or []],
            error=None if writer else f"{primary} is not the primary in ARM",
        )

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
        return ", ".join(x for x in (field(server, "properties", "state"), self._role(server)) if x) or None

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
                raise ApplicationError(
                    f"{self.resource}: default_transaction_read_only is still {'off' if want else 'on'} "
                    f"over SQL after ARM reported the change",
                    type="FenceIncomplete",
                )
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
        switchover = bool(self.db.virtual_endpoint)
        if (self._role(server) or "").lower() not in REPLICA_ROLES:
            after = sql_status(self.db, self.target.region)
            done = PromoteResult(already_primary=True, seconds=0.0, timeline=after.timeline)
            ve = self.virtual_endpoint(server) if switchover else None
            if ve is not None and ve.reader and ve.reader[0].lower() != self.db.server_name.lower():
                # An earlier attempt switched over: the reader went to the old primary.
                done = self._switched(done, (self.db.resource_group, ve.reader[0]))
            return done
        source = _id_parts(field(server, "properties", "source_server_resource_id"))
        before = sql_status(self.db, self.target.region)
        option = "Forced" if force else "Planned"
        mode = "Switchover" if switchover else "Standalone"
        what = f"promote {self.resource} ({mode}, {option})"
        logger(log).info("%s: received %s, replayed %s", what, before.current_lsn, before.replay_lsn)
        t0 = time.monotonic()
        with arm_errors(what):
            try:
                poller = self.client.servers.begin_update(
                    self.db.resource_group,
                    self.db.server_name,
                    {"properties": {"replica": {"promoteMode": mode, "promoteOption": option}}},
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
                wait_poller(poller, what, deadline)
        self._wait_writable(deadline, t0)
        seconds = time.monotonic() - t0
        with connect(self.db) as conn:
            received, replayed = conn.execute(
                "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
            ).fetchone()
        after = sql_status(self.db, self.target.region)
        done = PromoteResult(
            already_primary=False,
            seconds=round(seconds, 3),
            timeline=after.timeline,
            lsn_at_promotion=replayed or before.replay_lsn,
            received_lsn=received or before.current_lsn,
        )
        return self._switched(done, source) if switchover else done

    def _switched(self, done: PromoteResult, old: tuple[str, str] | None) -> PromoteResult:
        """A switchover's result: which server was the primary and what ARM says it is now."""
        role = None
        if old is not None:
            found = get_server(self.client, old[0], old[1], f"get flexible server {old[1]} (the old primary)")
            role = self._role(found) if found is not None else "deleted"
        return done.model_copy(
            update={"switchover": True, "old_primary": old[1] if old else None, "old_primary_role": role}
        )

    def _wait_not_updating(self, deadline: float) -> Any:
        while True:
            server = self.server()
            state = field(server, "properties", "state")
            if state != "Updating":
                return server
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"{self.resource}: still Updating (another operation runs on it)", type="AzureConflict"
                )
            _heartbeat({"phase": "waiting for a running operation on the server", "state": state})
            _sleep(max(0.2, min(self.conn.polling_interval, 5.0)))

    def _wait_writable(self, deadline: float, t0: float) -> None:
        backoff = Backoff(0.05, 1.0)  # the promotion's operation is done: writable at once, or soon
        while True:
            try:
                sql_check_writable(self.db, region=self.target.region)
                return
            except ApplicationError as e:
                if e.non_retryable or time.monotonic() > deadline:
                    raise
                last = e.message
            _heartbeat(
                {
                    "phase": "waiting for a write to commit",
                    "waited_seconds": round(time.monotonic() - t0, 1),
                    "last": last,
                }
            )
            _sleep(backoff.next())

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
            raise ApplicationError(
                f"rebuild {self.resource}: the primary region {primary.region} is a {pdb.provider!r} database; an "
                "Azure read replica needs an Azure flexible server as its source",
                type="BadInput",
                non_retryable=True,
            )
        if (pdb.subscription_id, pdb.resource_group.lower(), pdb.server_name.lower()) == (
            self.db.subscription_id,
            self.db.resource_group.lower(),
            self.db.server_name.lower(),
        ):
            raise ApplicationError(
                f"rebuild {self.resource}: it is the primary itself", type="BadInput", non_retryable=True
            )
        source_provider = AzureFlexibleServer(primary)
        source = source_provider.server()
        source_id = field(source, "id")
        if (source_provider._role(source) or "").lower() in REPLICA_ROLES:
            raise ApplicationError(
                f"rebuild {self.resource}: {source_provider.resource} (region {primary.region}) is a read replica in "
                "ARM, not the primary; refusing to rebuild from it",
                type="NotPrimary",
                non_retryable=True,
            )
        pst = sql_status(pdb, primary.region)
        if not pst.reachable:
            raise ApplicationError(
                f"rebuild {self.resource}: the primary {where(pdb)} is unreachable over SQL: {pst.error}",
                type="Unreachable",
            )
        if pst.role != "primary":
            raise ApplicationError(
                f"rebuild {self.resource}: {where(pdb)} (region {primary.region}) is in recovery, not a primary; "
                "refusing to rebuild from it",
                type="NotPrimary",
                non_retryable=True,
            )

        current = self._wait_settled(deadline)
        if current is not None and self._is_replica_of(current, source_id):
            self._wait_streaming(deadline, t0)
            return RebuildResult(
                method="already-replica",
                seconds=round(time.monotonic() - t0, 3),
                detail=f"{self.db.server_name} is a read replica of {pdb.server_name}, streaming",
            )
        location = field(current, "location") or self.target.region
        tags = _user_tags(current) if current is not None else {}
        steps = []
        preserved = None
        if current is not None:
            preserved = self._preserve(current, deadline)
            steps.append(f"kept {preserved}")
            what = (
                f"delete {self.resource} (state {server_state(current) or '?'}, role {self._role(current) or '?'}): "
                "Azure cannot make an existing server a replica"
            )
            logger(log).warning("failback: %s", what)
            with arm_errors(what):
                poller = self.client.servers.begin_delete(self.db.resource_group, self.db.server_name)
                wait_poller(poller, what, deadline)
            steps.append("deleted the old server")
        what = f"create {self.resource} as a read replica of {source_provider.resource}"
        logger(log).info("failback: %s", what)
        body = {
            "location": location,
            "properties": {"createMode": "Replica", "sourceServerResourceId": source_id},
            "tags": tags,
        }
        with arm_errors(what):
            poller = self.client.servers.begin_create_or_update(self.db.resource_group, self.db.server_name, body)
            wait_poller(poller, what, deadline)
        steps.append(f"created a read replica of {pdb.server_name} in {location}")
        self._wait_streaming(deadline, t0)
        return RebuildResult(
            method="azure-replica",
            seconds=round(time.monotonic() - t0, 3),
            detail="; ".join(steps),
            preserved=preserved,
        )

    def _preserve(self, server: Any, deadline: float) -> str:
        """Before the old server is deleted: an on-demand backup of it (Backups - Create), so that what it holds
        (writes after the split included) can still be restored. Named by the day, so a retried rebuild finds
        the backup it made; a server that cannot be backed up is not deleted (non-retryable PreserveFailed)."""
        name = f"opsflow-before-rebuild-{datetime.now(timezone.utc):%Y%m%d}"
        what = f"on-demand backup {name} of {self.resource}"
        ops = self.client.backups_automatic_and_on_demand
        try:
            with arm_errors(what):
                try:
                    ops.get(self.db.resource_group, self.db.server_name, name)
                    return f"{what} (already taken)"
                except ResourceNotFoundError:
                    pass
                logger(log).info("failback: %s before the server is deleted", what)
                with shielded():
                    poller = ops.begin_create(self.db.resource_group, self.db.server_name, name)
                wait_poller(poller, what, deadline)
        except ApplicationError as e:
            if not e.non_retryable:
                raise
            raise ApplicationError(
                f"rebuild {self.resource}: {what} failed, so the old server is not deleted: {e.message}. Keep its data "
                "another way (e.g. a point-in-time restore into a new server), then delete it by hand and run the "
                "failback again",
                type="PreserveFailed",
                non_retryable=True,
            ) from None
        return what

    @staticmethod
    def _is_replica_of(server: Any, source_id: str | None) -> bool:
        role = (
            field(server, "properties", "replica", "role") or field(server, "properties", "replication_role") or ""
        ).lower()
        return (
            role in REPLICA_ROLES
            and same_id(field(server, "properties", "source_server_resource_id"), source_id)
            and server_state(server).lower() not in FAILED_STATES
        )

    def _wait_settled(self, deadline: float) -> Any | None:
        """This server once no operation runs on it (None: there is no such server)."""
        while True:
            server = get_server(self.client, self.db.resource_group, self.db.server_name, f"get {self.resource}")
            state = server_state(server)
            if server is None or state.lower() not in _BUSY_STATES:
                return server
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"{self.resource}: still {state} (another operation runs on it)", type="AzureConflict"
                )
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
                raise ApplicationError(
                    f"{self.resource}: created as a read replica, but not streaming over SQL ({seen})",
                    type="ReplicaNotStreaming",
                )
            _heartbeat(
                {
                    "phase": "waiting for the replica to stream",
                    "seen": seen,
                    "waited_seconds": round(time.monotonic() - t0, 1),
                }
            )
            _sleep(0.2)


def on_demand_backup(target: RegionTarget, name: str, timeout: float) -> Any:
    """An on-demand backup of the region's flexible server (backups_automatic_and_on_demand.begin_create),
    waited for with heartbeats. Idempotent: a backup of that name that exists already is returned."""
    server = AzureFlexibleServer(target)
    db, client = server.db, server.client
    what = f"on-demand backup {name} of {server.resource}"
    with arm_errors(what):
        try:
            backup = client.backups_automatic_and_on_demand.get(db.resource_group, db.server_name, name)
        except ResourceNotFoundError:
            poller = client.backups_automatic_and_on_demand.begin_create(db.resource_group, db.server_name, name)
            backup = wait_poller(poller, what, time.monotonic() + timeout)
            if backup is None:
                backup = client.backups_automatic_and_on_demand.get(db.resource_group, db.server_name, name)
    return BackupResult(
        id=field(backup, "id") or name,
        method="azure-on-demand",
        state="completed",
        completed_at=backup_completed_at(backup),
        location=db.server_name,
    )


def backup_completed_at(backup: Any) -> datetime | None:
    """When a flexible server's backup (SDK model) completed, in UTC."""
    return utc(field(backup, "properties", "completed_time") or field(backup, "completed_time"))


def get_backup(target: RegionTarget, name: str) -> Any | None:
    """The flexible server's backup of that name (SDK model), or None."""
    server = AzureFlexibleServer(target)
    with arm_errors(f"get backup {name} of {server.resource}"):
        try:
            return server.client.backups_automatic_and_on_demand.get(
                server.db.resource_group, server.db.server_name, name
            )
        except ResourceNotFoundError:
            return None
