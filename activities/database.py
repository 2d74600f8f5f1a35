"""The database activities the procedures call. Provider-neutral: each picks the region's provider."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.context import Backoff, Every, heartbeat, sleep_or_cancelled, time_limit
from activities.postgres import host
from activities.postgres.connection import where
from activities.postgres.divergence import sql_divergence
from activities.postgres.drain import sql_drain
from activities.postgres.server import open_status_connection, sql_status_on
from activities.providers import database_provider
from opsflow.contracts.db import (
    DB_CHECK_WRITABLE,
    DB_DIVERGENCE,
    DB_DRAIN,
    DB_FENCE,
    DB_FENCE_CONTROL_PLANE,
    DB_FOLLOW,
    DB_PROMOTE,
    DB_REBUILD_REPLICA,
    DB_SHUT_DOWN,
    DB_START,
    DB_STATUS,
    DB_UNFENCE,
    DB_WAIT_CAUGHT_UP,
)
from opsflow.models import (
    CatchUpRequest,
    CatchUpResult,
    DbStatus,
    Divergence,
    DivergenceRequest,
    DrainRequest,
    DrainResult,
    FenceResult,
    FollowRequest,
    PromoteRequest,
    PromoteResult,
    RebuildRequest,
    RebuildResult,
    RegionTarget,
    ShutdownRequest,
    ShutdownResult,
    lsn_to_int,
)


@DB_STATUS.implementation
def db_status(target: RegionTarget) -> DbStatus:
    return database_provider(target).status()


@DB_FENCE.implementation
def db_fence(target: RegionTarget) -> DbStatus:
    provider = database_provider(target)
    provider.fence()
    return provider.status()


@DB_UNFENCE.implementation
def db_unfence(target: RegionTarget) -> DbStatus:
    provider = database_provider(target)
    provider.unfence()
    return provider.status()


@DB_PROMOTE.implementation
def db_promote(request: PromoteRequest) -> PromoteResult:
    provider = database_provider(request.target)
    if request.demote is not None:  # a provider that demotes the old primary itself (Patroni)
        return provider.promote(request.force, demote=request.demote)
    return provider.promote(request.force)


@DB_CHECK_WRITABLE.implementation
def db_check_writable(target: RegionTarget) -> None:
    database_provider(target).check_writable()


@DB_WAIT_CAUGHT_UP.implementation
def db_wait_caught_up(request: CatchUpRequest) -> CatchUpResult:
    """Wait until the replica has replayed the primary's WAL up to its current position (LSN compare).

    Cheap for waits of hours: the LSNs are read over ONE SQL connection per server, kept for the whole wait,
    polled with backoff (0.2 s growing to 2 s); the cloud's control plane (ARM GET, DescribeDBInstances) is
    read at most every `control_plane_interval` seconds. A database without a SQL DSN (RDS without one) is
    read through its provider at that interval only. Heartbeats the remaining bytes on every poll, and stops
    within one poll when cancelled (CancelledError; nothing to undo: it only reads). Raises a non-retryable
    CatchUpTimeout when the bound passes: retrying would only wait longer than the runbook allows."""
    waiter = _CatchUpWaiter(request)
    try:
        return waiter.run()
    finally:
        waiter.close()


class _CatchUpWaiter:
    def __init__(self, request: CatchUpRequest):
        self.request = request
        self.sides = {"primary": request.primary, "replica": request.replica}
        self.providers = {k: database_provider(t) for k, t in self.sides.items()}
        self.conns: dict[str, Any] = {}
        self.control_plane = Every(request.control_plane_interval)
        self.control_plane_reads = 0
        self.polls = 0
        self.cloud: dict[str, str | None] = {}

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self.conns.clear()

    def _sql_status(self, side: str) -> DbStatus | None:
        """The SQL status over the kept connection (reconnecting once it broke); None: no DSN for this side."""
        target = self.sides[side]
        db = target.database
        if not getattr(db, "dsn", None):
            return None
        conn = self.conns.get(side)
        if conn is None or conn.closed or conn.broken:
            self.conns.pop(side, None)
            try:
                conn = self.conns[side] = open_status_connection(db)
            except ApplicationError as e:
                if e.non_retryable:
                    raise
                return DbStatus(region=target.region, reachable=False, error=e.message)
        try:
            return sql_status_on(conn, db, target.region)
        except psycopg.Error as e:
            self.conns.pop(side, None)
            conn.close()
            return DbStatus(region=target.region, reachable=False, error=f"database {where(db)}: {str(e).strip()}")

    def _status(self, side: str, control_plane: bool) -> DbStatus | None:
        st = self._sql_status(side)
        if st is None:  # no SQL: the provider's status (control plane) is all there is, within the budget
            if not control_plane and side in self.last:
                return self.last[side]
            self.control_plane_reads += 1
            return self.providers[side].status()
        if control_plane:
            cloud = getattr(self.providers[side], "cloud_state", None)
            if cloud is not None:
                self.control_plane_reads += 1
                try:
                    self.cloud[side] = cloud()
                except ApplicationError as e:
                    if e.non_retryable:
                        raise
                    self.cloud[side] = f"control plane: {e.message}"
        return st.model_copy(update={"cloud_state": self.cloud.get(side)}) if self.cloud.get(side) else st

    def run(self) -> CatchUpResult:
        request = self.request
        started = time.monotonic()
        backoff = Backoff(0.05, 2.0)  # right after a fence the replica is bytes behind: look again soon
        self.last: dict[str, DbStatus] = {}
        while True:
            control_plane = self.control_plane.due()
            p, r = self._status("primary", control_plane), self._status("replica", control_plane)
            self.last = {"primary": p, "replica": r}
            self.polls += 1
            for s in (p, r):
                if not s.reachable:
                    raise ApplicationError(f"{s.region}: database unreachable: {s.error}", type="Unreachable")
            if r.role != "replica":
                raise ApplicationError(
                    f"{r.region}: is not a replica any more (role {r.role})", type="NotReplica", non_retryable=True
                )
            primary_lsn = lsn_to_int(p.current_lsn) or 0
            replay_lsn = lsn_to_int(r.replay_lsn) or 0
            lag = max(primary_lsn - replay_lsn, 0)
            waited = time.monotonic() - started
            if lag <= request.max_lag_bytes:
                return CatchUpResult(
                    primary_lsn=p.current_lsn or "0/0",
                    replay_lsn=r.replay_lsn or "0/0",
                    lag_bytes=lag,
                    replay_delay_seconds=r.replay_delay_seconds,
                    waited_seconds=waited,
                    polls=self.polls,
                    control_plane_reads=self.control_plane_reads,
                )
            if waited > request.timeout_seconds:
                raise ApplicationError(
                    f"{r.region} still {lag} bytes behind {p.region} after {waited:.0f}s",
                    {"lag_bytes": lag},
                    type="CatchUpTimeout",
                    non_retryable=True,
                )
            sleep_or_cancelled(
                backoff.next(),
                {
                    "lag_bytes": lag,
                    "waited_seconds": round(waited, 1),
                    "polls": self.polls,
                    "control_plane_reads": self.control_plane_reads,
                },
                what=f"catch-up of {r.region}",
            )


@DB_REBUILD_REPLICA.implementation
def db_rebuild_replica(request: RebuildRequest) -> RebuildResult:
    """Rebuild the recovered region as a replica of the primary (see DatabaseProvider.rebuild_replica). First,
    while the old server still holds its data, whether it took writes after the split (db.divergence), carried
    in the heartbeat so that an attempt after a crash reports what the first one saw; the provider keeps what
    the old server holds before it removes or rewinds it (RebuildResult.preserved). Cancelled mid-way, the
    target is left "not a replica yet" and the next attempt starts over from what it finds."""
    previous = None
    if activity.in_activity():
        try:
            previous = next(
                (
                    d["divergence"]
                    for d in activity.info().heartbeat_details or []
                    if isinstance(d, dict) and d.get("divergence")
                ),
                None,
            )
        except Exception:  # noqa: BLE001 - details that do not decode: look again
            previous = None
    if previous is not None:
        divergence = Divergence.model_validate(previous)
    else:
        divergence = db_divergence(DivergenceRequest(old=request.target, new=request.primary))
        heartbeat({"phase": "divergence", "divergence": divergence.model_dump(mode="json")})
    result = database_provider(request.target).rebuild_replica(request.primary)
    return result.model_copy(update={"divergence": divergence})


@DB_DIVERGENCE.implementation
def db_divergence(request: DivergenceRequest) -> Divergence:
    """Before a failback rewinds or replaces the old primary: did it take writes after the split? Compares the old
    primary's last LSN on its timeline with the point where the new primary's timeline branched off (read from
    the new primary's timeline history over SQL). Read-only; an unreachable server gives diverged=None."""
    old_db, new_db = request.old.database, request.new.database
    if not getattr(old_db, "dsn", None) or not getattr(new_db, "dsn", None):
        return Divergence(
            diverged=None,
            old_region=request.old.region,
            new_region=request.new.region,
            detail="the inventory gives no SQL dsn for both databases: the LSNs cannot be compared",
        )
    return sql_divergence(old_db, new_db, old_region=request.old.region, new_region=request.new.region)


FENCE_BUDGET = 40.0  # an emergency's fence of the old primary: never longer than this (the step allows 60 s)


@DB_FENCE_CONTROL_PLANE.implementation
def db_fence_control_plane(target: RegionTarget) -> FenceResult:
    """Emergency fence of the OLD primary (split brain if its region comes back): best effort through the
    control plane (Azure: default_transaction_read_only through ARM; RDS: parameter group or StopDBInstance;
    self-managed: the SQL fence), short timeouts. Runs on the TARGET region's queue (the old region's worker
    may be dead). Never raises for an unreachable region or a refusal: done=False and `remaining` says what a
    person must still do; the failover goes on and lists it."""
    provider = database_provider(target)
    try:
        method, actions = provider.fence_control_plane(min(FENCE_BUDGET, time_limit(FENCE_BUDGET)))
    except CancelledError:
        raise
    except ApplicationError as e:
        return FenceResult(
            region=target.region,
            fenced=False,
            detail=f"fence the old primary in {target.region} by hand "
            f"(read-only or stopped) before its region comes back: {e.message}",
        )
    except Exception as e:  # noqa: BLE001 - a dead region fails in many ways; none may stop the failover
        return FenceResult(
            region=target.region,
            fenced=False,
            detail=f"fence the old primary in {target.region} by hand: {type(e).__name__}: {e}",
        )
    return FenceResult(region=target.region, fenced=True, method=method, detail="; ".join(actions))


@DB_DRAIN.implementation
def db_drain(request: DrainRequest) -> DrainResult:
    """The drain of a planned failover (maintenance mode is on): wait until no application session of the old
    primary is in a transaction, at most `limit_seconds`; the fence then ends what is left. A database without a
    SQL DSN (RDS without one) cannot be looked at: the whole limit is waited."""
    db = request.target.database
    if not getattr(db, "dsn", None):
        t0 = time.monotonic()
        sleep_or_cancelled(request.limit_seconds, "drain: no SQL access, waiting the whole limit")
        return DrainResult(waited_seconds=round(time.monotonic() - t0, 3), idle=False,
                           detail="drain limit reached (no SQL access to look at the sessions)")
    return sql_drain(db, request.limit_seconds)


@DB_SHUT_DOWN.implementation
def db_shut_down(request: ShutdownRequest) -> ShutdownResult:
    """Self-managed switchover (activities/postgres/host.py): a clean shutdown of the fenced old primary and the
    proof that the replica replayed its shutdown checkpoint; not proven: the old primary is started again."""
    return host.shut_down_for_switchover(request.target, request.replica, request.timeout_seconds)


@DB_START.implementation
def db_start(target: RegionTarget) -> DbStatus:
    """Start a self-managed server that a switchover shut down (idempotent): the undo before any promotion."""
    return host.start_again(target)


@DB_FOLLOW.implementation
def db_follow(request: FollowRequest) -> DbStatus:
    """Start the cleanly shut down old primary as a standby of the new one; returns once it streams, unfenced."""
    return host.follow(request.target, request.primary, request.timeout_seconds)
