"""The small interfaces every provider implements, and the choice of provider per region.

Workflows never name a provider: they call the `db.*` and `traffic.*` activities
(activities/database.py, activities/traffic.py), which pick the implementation
the inventory names for the region.
"""

from __future__ import annotations

from typing import Protocol

from opsflow.models import DbStatus, PromoteResult, RegionTarget, TrafficRequest, TrafficStatus


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


class TrafficProvider(Protocol):
    def status(self) -> TrafficStatus: ...

    def switch(self) -> TrafficStatus:
        """Send traffic to request.to_region: its endpoint enabled first, the others disabled. Idempotent."""


def database_provider(target: RegionTarget) -> DatabaseProvider:
    kind = target.database.provider
    if kind == "postgres":
        from activities.postgres import PostgresServer

        return PostgresServer(target)
    if kind == "azure-flexible":
        from activities.azure import AzureFlexibleServer

        return AzureFlexibleServer(target)
    if kind == "aws-rds":
        from activities.aws import RdsInstance

        return RdsInstance(target)
    raise ValueError(f"unknown database provider {kind!r}")


def traffic_provider(request: TrafficRequest) -> TrafficProvider:
    kind = request.traffic.provider
    if kind == "azure-traffic-manager":
        from activities.azure import AzureTrafficManagerRouter

        return AzureTrafficManagerRouter(request)
    if kind == "route53":
        from activities.aws import Route53Router

        return Route53Router(request)
    raise ValueError(f"unknown traffic provider {kind!r}")
