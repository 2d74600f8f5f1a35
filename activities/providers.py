"""The small interfaces every provider implements, and the choice of provider per region.

Workflows never name a provider: they call the `db.*` and `traffic.*` activities
(activities/database.py, activities/traffic.py), which pick the implementation
the inventory names for the region.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from activities.postgres.server import PostgresServer
from opsflow.models import (
    DbStatus,
    PromoteResult,
    RebuildResult,
    RegionTarget,
    RestoreRequest,
    RestoreWindow,
    ScratchTarget,
    TrafficRequest,
    TrafficStatus,
)


class DatabaseProvider(Protocol):
    def status(self) -> DbStatus:
        """Role, replication state and LSNs. Never raises for an unreachable server: reachable=False."""

    def fence(self) -> None:
        """Refuse new writes and end client sessions. Idempotent."""

    def unfence(self) -> None:
        """Undo fence(). Idempotent."""

    def promote(self, force: bool) -> PromoteResult:
        """Make this replica the primary and wait until it accepts writes. A primary: already_primary=True."""

    def check_writable(self) -> None:
        """Commit a probe write; raise if the server refuses it."""

    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """Make this region's database a streaming replica of `primary` again (failback). The old, diverged
        primary is never reused blindly: rewound where its timeline allows, else replaced by a fresh copy.
        Idempotent: a replica already streaming from `primary` is left as it is."""


class TrafficProvider(Protocol):
    def status(self) -> TrafficStatus: ...

    def switch(self) -> TrafficStatus:
        """Send traffic to request.to_region: its endpoint enabled first, the others disabled. Idempotent."""

    def prepare(self) -> TrafficStatus:
        """Before a planned switch: make request.to_region's endpoint ready to serve without sending it traffic
        (Traffic Manager: enabled behind the serving endpoint, so its probes run; Route 53: nothing, its health
        checks always run). Idempotent."""


def database_provider(target: RegionTarget) -> DatabaseProvider:
    kind = target.database.provider
    # The cloud providers load on first use: boto3 and the Azure clients take ~1-1.5 s to import, and a worker (or
    # workflows/drill.py, which imports this module) may never need them.
    if kind == "postgres":
        return PostgresServer(target)
    if kind == "azure-flexible":
        from activities.azure.flexible_server import AzureFlexibleServer

        return AzureFlexibleServer(target)
    if kind == "aws-rds":
        from activities.aws.rds import RdsInstance

        return RdsInstance(target)
    if kind == "patroni":
        from activities.patroni import PatroniCluster, PatroniMember

        return PatroniMember(target) if target.database.layout == "stretched" else PatroniCluster(target)
    raise ValueError(f"unknown database provider {kind!r}")


def traffic_provider(request: TrafficRequest) -> TrafficProvider:
    kind = request.traffic.provider
    if kind == "azure-traffic-manager":
        from activities.azure.traffic_manager import AzureTrafficManagerRouter

        return AzureTrafficManagerRouter(request)
    if kind == "route53":
        from activities.aws.route53 import Route53Router

        return Route53Router(request)
    raise ValueError(f"unknown traffic provider {kind!r}")


class RestoreProvider(Protocol):
    """Restores a backup into a scratch target (a server, an instance, or a database), for drills."""

    def window(self) -> "RestoreWindow":
        """The restorable range: earliest (retention) and latest restore point."""

    def start(self, name: str, point: datetime) -> "ScratchTarget":
        """Begin restoring into scratch target `name`. Idempotent: an existing target of that name is reused."""

    def status(self, name: str) -> "ScratchTarget":
        """Where the restore of `name` stands (ready, and its DSN once ready). Raises if it failed."""

    def delete(self, name: str) -> bool:
        """Delete scratch target `name`; False when it was already gone. Idempotent."""

    def list_scratch(self, prefix: str) -> list[str]:
        """Scratch targets of this environment whose name starts with `prefix` (what a crashed run may have
        left behind)."""

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        """list_scratch(prefix) with the run that made each target (tag/mark opsflow-run; None if unknown)."""


def restore_provider(request: "RestoreRequest") -> RestoreProvider:
    if request.method == "azure-pitr":
        from activities.azure.restore import AzurePointInTimeRestore

        return AzurePointInTimeRestore(request)
    if request.method == "rds-pitr":
        from activities.aws.rds_restore import RdsPointInTimeRestore

        return RdsPointInTimeRestore(request)
    if request.method == "s3-dump":
        from activities.aws.dump_restore import S3DumpRestore

        return S3DumpRestore(request)
    if request.method == "s3-mysqldump":
        from activities.mysql import MysqlDumpRestore

        return MysqlDumpRestore(request)
    if request.method == "host-pitr":
        from activities.postgres.host_restore import HostPointInTimeRestore

        return HostPointInTimeRestore(request)
    raise ValueError(f"unknown restore method {request.method!r}")


def default_restore_method(provider: str) -> str:
    return {"azure-flexible": "azure-pitr", "aws-rds": "rds-pitr"}.get(provider, "s3-dump")
