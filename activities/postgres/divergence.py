"""Failback: what the old primary holds that the new one does not (timeline histories, the switch point)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from temporalio.exceptions import ApplicationError

from activities.context import logger
from activities.postgres.connection import connect, dsn_of, where
from activities.postgres.server import sql_status
from opsflow.models import Divergence, lsn_to_int

log = logging.getLogger(__name__)


def timeline_history(db: Any, timeline: int) -> str | None:
    """The text of timeline `timeline`'s history file on db's server ('<parent tli>\\t<switch lsn>\\t<reason>' per
    line): over a replication connection (TIMELINE_HISTORY, needs the REPLICATION attribute), else
    pg_read_file (superuser or pg_read_server_files). None when neither is allowed or timeline is 1."""
    if timeline <= 1:
        return None
    repl = type("ReplicationDb", (), {"dsn": make_conninfo(dsn_of(db), replication="database"),
                                      "password": getattr(db, "password", None)})()
    try:
        with connect(repl) as conn:
            res = conn.pgconn.exec_(f"TIMELINE_HISTORY {int(timeline)}".encode())
            if res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.ntuples == 1:
                return bytes(res.get_value(0, 1) or b"").decode()
    except (ApplicationError, psycopg.Error) as e:
        logger(log).info("TIMELINE_HISTORY on %s: %s; trying pg_read_file", where(db), getattr(e, "message", e))
    try:
        with connect(db) as conn:
            return conn.execute("select pg_read_file(%s)", (f"pg_wal/{timeline:08X}.history",)).fetchone()[0]
    except (ApplicationError, psycopg.Error) as e:
        logger(log).info("pg_read_file of the timeline history on %s: %s", where(db), getattr(e, "message", e))
        return None


def switch_point(history: str, old_timeline: int) -> str | None:
    """The LSN where the history's timeline left `old_timeline` (None if it never descended from it)."""
    for line in history.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) == old_timeline:
            return parts[1]
    return None


def sql_divergence(old_db: Any, new_db: Any, *, old_region: str, new_region: str) -> Divergence:
    """Whether the old primary wrote after the split: its last LSN on its timeline against the point where the
    new primary's timeline branched off that timeline. Never raises for an unreachable old server (unknown)."""
    new = sql_status(new_db, new_region)
    base = {"old_region": old_region, "new_region": new_region, "new_timeline": new.timeline}
    if not new.reachable:
        return Divergence(diverged=None, **base, detail=f"the new primary cannot be read: {new.error}")
    old = sql_status(old_db, old_region)
    if not old.reachable:
        return Divergence(
            diverged=None,
            **base,
            detail=f"the old primary cannot be read ({old.error}): whether it took writes after "
            f"the split is unknown; keep its data until someone has looked",
        )
    if old.role != "primary":
        return Divergence(
            diverged=None,
            **base,
            old_timeline=old.timeline,
            old_last_lsn=old.replay_lsn,
            detail=f"{old_region} is a replica (timeline {old.timeline}): it was rebuilt already, or never promoted",
        )
    base.update(old_timeline=old.timeline, old_last_lsn=old.current_lsn)
    if old.timeline == new.timeline:
        return Divergence(
            diverged=None,
            **base,
            detail=f"both servers are primaries on timeline {old.timeline}: no promotion "
            f"separates them (split brain?); compare their data by hand",
        )
    history = timeline_history(new_db, new.timeline or 0)
    split = switch_point(history, old.timeline or 0) if history else None
    if split is None:
        why = (
            "its timeline history cannot be read (grant REPLICATION or pg_read_server_files)"
            if history is None
            else f"timeline {new.timeline} does not descend from timeline {old.timeline}"
        )
        return Divergence(diverged=None, **base, detail=f"{new_region}: {why}")
    after = max(0, (lsn_to_int(old.current_lsn) or 0) - (lsn_to_int(split) or 0))
    # Any WAL past the switch point is something the new primary never got (a shutdown checkpoint included:
    # pg_rewind is needed all the same); the transaction count, when the host can tell, says if it was data.
    diverged = after > 0
    detail = (
        f"{old_region} wrote {after} bytes of WAL on timeline {old.timeline} after {new_region} branched off at "
        f"{split} (old primary at {old.current_lsn})"
        if diverged
        else f"{old_region} stopped at {old.current_lsn}, not past the switch point {split}: "
             "nothing was written after the split"
    )
    return Divergence(diverged=diverged, **base, split_lsn=split, bytes_after_split=after, detail=detail)
