"""The database activities the procedures call. Provider-neutral: each picks the region's provider."""

from __future__ import annotations

import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.providers import database_provider
from opsflow.models import RebuildRequest, RebuildResult, CatchUpRequest, CatchUpResult, DbStatus, PromoteRequest, PromoteResult, RegionTarget, lsn_to_int


@activity.defn(name="db.status")
def db_status(target: RegionTarget) -> DbStatus:
    return database_provider(target).status()


@activity.defn(name="db.fence")
def db_fence(target: RegionTarget) -> DbStatus:
    provider = database_provider(target)
    provider.fence()
    return provider.status()


@activity.defn(name="db.unfence")
def db_unfence(target: RegionTarget) -> DbStatus:
    provider = database_provider(target)
    provider.unfence()
    return provider.status()


@activity.defn(name="db.promote")
def db_promote(request: PromoteRequest) -> PromoteResult:
    return database_provider(request.target).promote(request.force)


@activity.defn(name="db.check_writable")
def db_check_writable(target: RegionTarget) -> None:
    database_provider(target).check_writable()


@activity.defn(name="db.wait_caught_up")
def db_wait_caught_up(request: CatchUpRequest) -> CatchUpResult:
    """Wait until the replica has replayed the primary's WAL up to its current position (LSN compare).

    Heartbeats the remaining bytes so the UI shows them falling. Raises a non-retryable
    CatchUpTimeout when the bound passes: retrying would only wait longer than the runbook allows."""
    primary, replica = database_provider(request.primary), database_provider(request.replica)
    started = time.monotonic()
    while True:
        p, r = primary.status(), replica.status()
        for s in (p, r):
            if not s.reachable:
                raise ApplicationError(f"{s.region}: database unreachable: {s.error}", type="Unreachable")
        if r.role != "replica":
            raise ApplicationError(f"{r.region}: is not a replica any more (role {r.role})", type="NotReplica", non_retryable=True)
        primary_lsn = lsn_to_int(p.current_lsn) or 0
        replay_lsn = lsn_to_int(r.replay_lsn) or 0
        lag = max(primary_lsn - replay_lsn, 0)
        waited = time.monotonic() - started
        if activity.in_activity():
            activity.heartbeat({"lag_bytes": lag, "waited_seconds": round(waited, 1)})
        if lag <= request.max_lag_bytes:
            return CatchUpResult(
                primary_lsn=p.current_lsn or "0/0",
                replay_lsn=r.replay_lsn or "0/0",
                lag_bytes=lag,
                replay_delay_seconds=r.replay_delay_seconds,
                waited_seconds=waited,
            )
        if waited > request.timeout_seconds:
            raise ApplicationError(
                f"{r.region} still {lag} bytes behind {p.region} after {waited:.0f}s",
                {"lag_bytes": lag},
                type="CatchUpTimeout",
                non_retryable=True,
            )
        time.sleep(0.2)


@activity.defn(name="db.rebuild_replica")
def db_rebuild_replica(request: RebuildRequest) -> RebuildResult:
    return database_provider(request.target).rebuild_replica(request.primary)
