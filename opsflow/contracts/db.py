"""The database of a region: status, fence, promote, catch-up, rebuild (activities/database.py)."""

from __future__ import annotations

from opsflow.contracts.base import Activity
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
)

DB_STATUS = Activity("db.status", RegionTarget, DbStatus)
DB_FENCE = Activity("db.fence", RegionTarget, DbStatus)
DB_UNFENCE = Activity("db.unfence", RegionTarget, DbStatus)
DB_PROMOTE = Activity("db.promote", PromoteRequest, PromoteResult)
DB_CHECK_WRITABLE = Activity("db.check_writable", RegionTarget, None)
DB_WAIT_CAUGHT_UP = Activity("db.wait_caught_up", CatchUpRequest, CatchUpResult)
DB_REBUILD_REPLICA = Activity("db.rebuild_replica", RebuildRequest, RebuildResult)
DB_DIVERGENCE = Activity("db.divergence", DivergenceRequest, Divergence)
DB_FENCE_CONTROL_PLANE = Activity("db.fence_control_plane", RegionTarget, FenceResult)
# Planned failover: wait until the old primary's application sessions are idle (at most the drain limit).
DB_DRAIN = Activity("db.drain", DrainRequest, DrainResult)
# Self-managed switchover (provider "postgres" with `host`): clean shutdown + proof, start again, follow.
DB_SHUT_DOWN = Activity("db.shut_down", ShutdownRequest, ShutdownResult)
DB_START = Activity("db.start", RegionTarget, DbStatus)
DB_FOLLOW = Activity("db.follow", FollowRequest, DbStatus)
