"""The drain of a planned failover: with new traffic stopped (maintenance mode), wait until the old primary's
application sessions have no transaction in progress, and no longer; at most the inventory's `failover.drain`.
The fence then ends what is left."""

from __future__ import annotations

import time
from typing import Any

from activities.context import heartbeat, sleep_or_cancelled
from activities.postgres.connection import APPLICATION_NAME, connect, sql_errors
from opsflow.models import DrainResult

POLL = 0.05

# Client sessions in a transaction, but ours (this session, every opsflow connection by its application_name)
# and replication (walsenders are not client backends). A session whose state this role may not see (no
# pg_read_all_stats, e.g. pg_monitor) counts as busy: the drain then waits for its limit.
BUSY = """
select count(*) from pg_stat_activity
 where backend_type = 'client backend' and pid <> pg_backend_pid()
   and application_name is distinct from %s
   and (state is null or state <> 'idle' and xact_start is not null)
"""


def sql_drain(db: Any, limit: float) -> DrainResult:
    """Poll pg_stat_activity until no application session is in a transaction, or `limit` seconds have passed."""
    t0 = time.monotonic()
    with connect(db) as conn, sql_errors(db, "drain"):
        while True:
            busy = conn.execute(BUSY, (APPLICATION_NAME,)).fetchone()[0]
            waited = round(time.monotonic() - t0, 3)
            if busy == 0:
                return DrainResult(waited_seconds=waited, idle=True, detail="sessions idle")
            if waited >= limit:
                return DrainResult(waited_seconds=waited, idle=False, busy_sessions=busy,
                                   detail=f"drain limit reached, {busy} session(s) still in a transaction "
                                          "(the fence ends them)")
            heartbeat({"busy_sessions": busy, "waited_seconds": waited})
            sleep_or_cancelled(min(POLL, max(0.0, limit - waited)))
