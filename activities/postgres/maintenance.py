"""Maintenance: VACUUM / ANALYZE / REINDEX CONCURRENTLY under guards (the weekly window).
Each statement runs on its own session with lock_timeout and statement_timeout set for that session only. A
second session watches it: heartbeats progress from pg_stat_progress_vacuum / pg_stat_progress_create_index,
counts the time it waits on a lock, and on cancellation (delivered by a heartbeat) or at the cutoff cancels the
statement with pg_cancel_backend, waits for it to end and stops cleanly. Names reach SQL only as
sql.Identifier; the inventory has already refused anything that is not a plain identifier.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.context import heartbeat as _heartbeat
from activities.postgres.bloat import (
    bloated_index_candidates,
    bloated_table_candidates,
    has_pgstattuple,
    index_bloat,
    table_bloat,
)
from activities.postgres.connection import (
    APPLICATION_NAME,
    bad_input,
    connect,
    error_line,
    is_name_error,
    redact,
    sql_errors,
    timeout_ms,
    where,
)
from opsflow.maintenance import VACUUM_KINDS
from opsflow.maintenance_models import ItemResult, TableStats

MAINTENANCE_POLL = 1.0  # how often the watching session samples progress and heartbeats
BLOAT_KINDS = ("vacuum", "vacuum-analyze", "vacuum-freeze", "reindex")  # measured before and after
CCNEW = "_ccnew"  # REINDEX CONCURRENTLY names its new index <index>_ccnew[N]; a failed run leaves it invalid


def _split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def _ident(table: str) -> sql.Composable:
    return sql.Identifier(*_split_table(table))


def table_stats(conn: psycopg.Connection, table: str, bloat: bool = False) -> Any:
    """n_live_tup, n_dead_tup, sizes, last (auto)vacuum/analyze, invalid indexes and XID ages of a table, or None;
    with `bloat` its table and index bloat too (activities/postgres/bloat.py: reads the table and its indexes)."""
    schema, name = _split_table(table)
    row = conn.execute(
        """
        select s.n_live_tup, s.n_dead_tup, pg_table_size(c.oid), pg_indexes_size(c.oid),
               greatest(s.last_vacuum, s.last_autovacuum), greatest(s.last_analyze, s.last_autoanalyze),
               coalesce((select array_agg(ic.relname::text order by ic.relname)
                           from pg_index i join pg_class ic on ic.oid = i.indexrelid
                          where i.indrelid = c.oid and not i.indisvalid), '{}'),
               greatest(age(c.relfrozenxid), age(t.relfrozenxid)), mxid_age(c.relminmxid), c.relfilenode
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
          left join pg_class t on t.oid = c.reltoastrelid
          left join pg_stat_user_tables s on s.relid = c.oid
         where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p', 'm')
        """,
        (schema, name),
    ).fetchone()
    if row is None:
        return None
    live, dead, tbytes, ibytes, last_vacuum, last_analyze, invalid, xid_age, mxid_age, relfilenode = row
    measured: dict[str, Any] = {}
    if bloat:
        pgstattuple = has_pgstattuple(conn)
        ratio, method = table_bloat(conn, schema, name, pgstattuple)
        measured = {"table_bloat": ratio, "bloat_method": method,
                    "indexes": index_bloat(conn, schema, name, pgstattuple)}
    return TableStats(
        **measured,
        n_live_tup=live or 0,
        n_dead_tup=dead or 0,
        table_bytes=tbytes or 0,
        index_bytes=ibytes or 0,
        last_vacuum=last_vacuum,
        last_analyze=last_analyze,
        invalid_indexes=list(invalid),
        xid_age=xid_age,
        mxid_age=mxid_age,
        relfilenode=relfilenode,
    )


def missing_tables(db: Any, tables: list[str]) -> list[str]:
    """The listed tables (schema.table, already validated identifiers) that do not exist on db. Catalog only:
    no lock is taken, so a table another session holds locked is found, not waited for."""
    with connect(db) as conn, sql_errors(db, "table lookup"):
        return [
            t
            for t in tables
            if conn.execute(
                "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and "
                "c.relname = %s and c.relkind in ('r', 'p', 'm')",
                _split_table(t),
            ).fetchone()
            is None
        ]


def dead_tuple_candidates(db: Any, min_dead_tuples: int, dead_ratio: float, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables with at least `min_dead_tuples` dead tuples making up at least
    `dead_ratio` of the rows, worst first. The statistics are the collector's: a table just bloated may need a
    moment to show up."""
    with connect(db) as conn, sql_errors(db, "table selection"):
        rows = conn.execute(
            """
            select schemaname, relname, n_dead_tup, n_live_tup,
                   n_dead_tup::float8 / greatest(n_dead_tup + n_live_tup, 1) as ratio
              from pg_stat_user_tables
             where n_dead_tup >= %s and n_dead_tup::float8 / greatest(n_dead_tup + n_live_tup, 1) >= %s
             order by n_dead_tup desc, schemaname, relname
             limit %s
            """,
            (min_dead_tuples, dead_ratio, limit),
        ).fetchall()
    return [
        (f"{s}.{t}", f"{dead} dead tuples, {ratio:.0%} of its rows (thresholds: {min_dead_tuples}, {dead_ratio:.0%})")
        for s, t, dead, live, ratio in rows
    ]


def wraparound_candidates(db: Any, freeze_ratio: float, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables whose transaction-ID age (the greater of the table's and its TOAST
    table's age(relfrozenxid)) has reached `freeze_ratio` of autovacuum_freeze_max_age, or whose multixact age
    (mxid_age(relminmxid)) that share of autovacuum_multixact_freeze_max_age, the oldest (by that share) first.
    A per-table autovacuum_freeze_max_age storage parameter is honoured where set. Catalog only, no lock."""
    with connect(db) as conn, sql_errors(db, "wraparound selection"):
        rows = conn.execute(
            """
            with t as (
              select n.nspname, c.relname,
                     greatest(age(c.relfrozenxid), age(tc.relfrozenxid))::bigint as xid_age,
                     mxid_age(c.relminmxid)::bigint as mxid_age,
                     least(current_setting('autovacuum_freeze_max_age')::bigint,
                           coalesce((select option_value::bigint from pg_options_to_table(c.reloptions)
                                      where option_name = 'autovacuum_freeze_max_age'),
                                    current_setting('autovacuum_freeze_max_age')::bigint)) as xid_max,
                     current_setting('autovacuum_multixact_freeze_max_age')::bigint as mxid_max
                from pg_class c join pg_namespace n on n.oid = c.relnamespace
                left join pg_class tc on tc.oid = c.reltoastrelid
               where c.relkind in ('r', 'm') and n.nspname not in ('pg_catalog', 'information_schema')
                 and n.nspname !~ '^pg_(toast|temp_)'
            )
            select nspname, relname, xid_age, mxid_age, xid_max, mxid_max,
                   greatest(xid_age::float8 / xid_max, mxid_age::float8 / mxid_max) as share
              from t
             where xid_age::float8 / xid_max >= %s or mxid_age::float8 / mxid_max >= %s
             order by share desc, nspname, relname
             limit %s
            """,
            (freeze_ratio, freeze_ratio, limit),
        ).fetchall()
    return [
        (f"{s}.{t}", f"XID age {xid} ({xid / xmax:.0%} of autovacuum_freeze_max_age {xmax}), multixact age {mxid} "
                     f"({mxid / mmax:.0%} of {mmax}); threshold {freeze_ratio:.0%}: VACUUM (FREEZE) before the "
                     "anti-wraparound autovacuum")
        for s, t, xid, mxid, xmax, mmax, _share in rows
    ]


def bloated_index_tables(db: Any, min_bloat: float, min_bytes: int, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables with a btree index bloated beyond the thresholds, worst first."""
    with connect(db) as conn, sql_errors(db, "index bloat"):
        return bloated_index_candidates(conn, min_bloat, min_bytes, limit)


def bloated_tables(db: Any, min_bloat: float, min_bytes: int, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables whose heap is bloated beyond the thresholds, worst first (pg_repack)."""
    with connect(db) as conn, sql_errors(db, "table bloat"):
        return bloated_table_candidates(conn, min_bloat, min_bytes, limit)


def replication_lag_bytes(db: Any) -> dict[str, int]:
    """Bytes each streaming replica of the primary `db` has still to replay (pg_stat_replication)."""
    with connect(db) as conn, sql_errors(db, "replication lag"):
        rows = conn.execute(
            "select application_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint "
            "from pg_stat_replication"
        ).fetchall()
    return {name: int(lag) for name, lag in rows}


def _maintenance_statement(item: Any) -> sql.Composable:
    if item.kind == "sql":
        return sql.SQL(item.sql)  # a named statement from the inventory, written by its operators
    table = _ident(item.table)
    return {
        "vacuum": sql.SQL("VACUUM {}"),
        "analyze": sql.SQL("ANALYZE {}"),
        "vacuum-analyze": sql.SQL("VACUUM (ANALYZE) {}"),
        "vacuum-freeze": sql.SQL("VACUUM (FREEZE, ANALYZE) {}"),
        "reindex": sql.SQL("REINDEX TABLE CONCURRENTLY {}"),
    }[item.kind].format(table)


def _drop_invalid_ccnew(conn: psycopg.Connection, table: str) -> list[str]:
    """Drop the invalid `_ccnew` indexes an interrupted REINDEX CONCURRENTLY left on the table."""
    schema, name = _split_table(table)
    dropped = []
    for (index,) in conn.execute(
        """
        select ic.relname from pg_index i join pg_class ic on ic.oid = i.indexrelid
          join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = %s and c.relname = %s and not i.indisvalid and ic.relname ~ %s
        """,
        (schema, name, f"{CCNEW}[0-9]*$"),
    ).fetchall():
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, index)))
        dropped.append(f"{schema}.{index}")
    return dropped


def _progress(conn: psycopg.Connection, pid: int) -> tuple[str, bool]:
    """(a progress line, whether the statement is waiting on a lock) for backend `pid`."""
    row = conn.execute(
        """
        select a.wait_event_type = 'Lock',
               (select format('%%s: %%s/%%s heap blocks scanned, %%s vacuumed, %%s dead tuples', v.phase,
                              v.heap_blks_scanned, v.heap_blks_total, v.heap_blks_vacuumed, v.num_dead_tuples)
                  from pg_stat_progress_vacuum v where v.pid = a.pid),
               (select format('%%s: %%s/%%s blocks, %%s/%%s tuples', p.phase, p.blocks_done, p.blocks_total,
                              p.tuples_done, p.tuples_total)
                  from pg_stat_progress_create_index p where p.pid = a.pid),
               (select format('%%s: %%s/%%s sample blocks', p.phase, p.sample_blks_scanned, p.sample_blks_total)
                  from pg_stat_progress_analyze p where p.pid = a.pid),
               a.wait_event_type, a.wait_event
          from pg_stat_activity a where a.pid = %s
        """,
        (pid,),
    ).fetchone()
    if row is None:
        return "", False
    waiting, vacuum, index, analyze, wtype, wevent = row
    line = vacuum or index or analyze or (f"waiting: {wtype}/{wevent}" if wtype else "running")
    return line, bool(waiting)


def _identical_running(conn: psycopg.Connection, text: str, own_pid: int) -> list[tuple[int, bool]]:
    """(pid, started by opsflow) of the other sessions of this database running exactly `text` now: what a
    previous attempt of this item left running when its worker died (its backend goes on until it next talks to
    the client), or the same statement typed by a person."""
    return [
        (pid, app == APPLICATION_NAME)
        for pid, app in conn.execute(
            """
            select pid, application_name from pg_stat_activity
             where datname = current_database() and state = 'active' and pid <> %s and backend_type = 'client backend'
               and query = left(%s, (select setting::int - 1 from pg_settings where name = 'track_activity_query_size'))
             order by query_start
            """,
            (own_pid, text),
        ).fetchall()
    ]


def earlier_attempt() -> tuple[Any, datetime | None]:
    """What a retry knows of the attempt before it, whose worker died mid-item (its statement or pg_repack may have
    gone on, and finished): (the table's statistics before, as that attempt heartbeated them, None) or, when it
    died before its first heartbeat reached the server, (None, when this step was first scheduled). (None, None)
    on a first attempt or outside an activity."""
    if not activity.in_activity() or activity.info().attempt <= 1:
        return None, None
    details = activity.info().heartbeat_details
    before = details[0].get("before") if details and isinstance(details[0], dict) else None
    try:
        return TableStats.model_validate(before), None
    except ValueError:  # none heartbeated (or unreadable)
        return None, activity.info().scheduled_time


def _mark(stats: Any, kind: str) -> Any:
    """What this kind of work leaves in the table's statistics: VACUUM's and ANALYZE's timestamps, a rebuild's new
    file (pg_repack); None for the kinds that leave nothing to tell by (REINDEX, sql)."""
    if kind == "repack":
        return stats.relfilenode
    return stats.last_vacuum if kind in VACUUM_KINDS else stats.last_analyze if kind == "analyze" else None


def finished_before(kind: str, now: Any, before: Any = None, since: datetime | None = None) -> bool:
    """Did a statement started before this attempt (a dead attempt's, or the identical one waited for) do this
    item's work? Given `since` (a retry whose attempt died before its first heartbeat: when the step was first
    scheduled), it was done at or after then (by the VACUUM's or ANALYZE's timestamp; pg_repack analyzes the table
    after its swap). Else, from the statistics `before` it started from, its mark moved (`_mark`). The kinds that
    leave no mark cannot tell: they run again."""
    if now is None:
        return False
    if since is not None:
        done_at = now.last_vacuum if kind in VACUUM_KINDS else now.last_analyze if kind in ("analyze", "repack") \
            else None
        return done_at is not None and done_at >= since
    if before is None or kind == "repack" and before.relfilenode is None:  # a file unknown before: no telling
        return False
    mark = _mark(now, kind)
    return mark is not None and mark != _mark(before, kind)


def beat(item: Any, progress: str, started: float, before: Any) -> None:
    """Progress, and the statistics before (a retry after a crash reads them back: did that attempt finish?)."""
    _heartbeat({"item": item.key, "progress": progress, "seconds": round(time.monotonic() - started, 1),
                "before": before.model_dump(mode="json") if before is not None else None})


def _wait_for_identical(
    watch: psycopg.Connection, item: Any, text: str, own_pid: int, started: float, poll: float,
    cancel_at: datetime | None, before: Any = None,
) -> tuple[list[int], bool]:
    """Wait, heartbeating its progress, until no identical statement runs any more, instead of queueing a second
    one behind its lock. Returns the pids waited for and whether the cutoff cancelled ours among them. An abort
    (cancellation) or the cutoff cancels those opsflow started (pg_cancel_backend); a person's is left alone."""
    waited: list[int] = []
    at_cutoff = False
    while others := _identical_running(watch, text, own_pid):
        waited += [p for p, _ in others if p not in waited]
        pid = others[0][0]
        line, _ = _progress(watch, pid)
        beat(item, f"waiting for the identical statement already running (pid {pid}): {line}", started, before)
        if activity.in_activity() and activity.is_cancelled():
            for p, ours in others:
                if ours:
                    watch.execute("select pg_cancel_backend(%s)", (p,))
            raise CancelledError("activity cancelled")
        if cancel_at is not None and not at_cutoff and datetime.now(timezone.utc) >= cancel_at:
            at_cutoff = True
            for p, ours in others:
                if ours:
                    watch.execute("select pg_cancel_backend(%s)", (p,))
        time.sleep(poll)
    return waited, at_cutoff


def run_maintenance(
    db: Any, item: Any, guards: Any, *, cancel_at: datetime | None = None, poll: float = MAINTENANCE_POLL
) -> Any:
    """Run one work item (VACUUM/ANALYZE/REINDEX CONCURRENTLY of a table, or a named sql statement) with the
    guards, and return its ItemResult with the table's statistics before and after.

    A lock wait beyond lock_timeout gives outcome "lock-timeout", a statement beyond statement_timeout
    "statement-timeout", the cutoff (cancel_at) "cancelled-at-cutoff": the caller decides whether to retry. A
    cancelled activity cancels the statement (pg_cancel_backend), waits for it to end, then raises."""
    started = time.monotonic()
    result = ItemResult(
        key=item.key, kind=item.kind, table=item.table, name=item.name, outcome="done", reason=item.reason
    )
    work = connect(db)
    watch = connect(db)
    try:
        with sql_errors(db, f"maintenance {item.key}"):
            for session in (work, watch):  # the sizes in the statistics need a lock on the table too
                session.execute(
                    "select set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                    (timeout_ms(guards.lock_timeout), timeout_ms(guards.statement_timeout)),
                )
            if item.table:
                try:
                    result.before = table_stats(watch, item.table, bloat=item.kind in BLOAT_KINDS)
                except pgerrors.LockNotAvailable:
                    result.outcome, result.detail = "lock-timeout", f"lock not granted within {guards.lock_timeout:g}s"
                    result.seconds = time.monotonic() - started
                    return result
                if result.before is None:
                    raise bad_input(f"table {item.table} does not exist on {where(db)}")
            pid = work.info.backend_pid
            # A retry after a worker died mid-statement: that statement may still run on its backend. Wait for it
            # rather than start a second one behind its lock (and never drop the _ccnew index it is building).
            # The earlier attempt's statistics before (from its last heartbeat) tell whether it finished.
            prior, since = earlier_attempt()
            if prior is not None:
                result.before = prior
            waited, at_cutoff = _wait_for_identical(watch, item, _maintenance_statement(item).as_string(work), pid,
                                                    started, poll, cancel_at, result.before)
            seconds = time.monotonic() - started
            if waited:
                pids = ", ".join(str(p) for p in waited)
                result.detail = f"waited {seconds:.1f}s for the identical statement already running (pid {pids})"
                if at_cutoff:
                    result.outcome = "cancelled-at-cutoff"
                    result.detail += "; cancelled at the window's cutoff (pg_cancel_backend)"
                    result.seconds = seconds
                    return result
            # A previous attempt that died before its first heartbeat reached the server left no statistics
            # before: a VACUUM/ANALYZE of the table since this step was first scheduled is then its work.
            if (waited or prior or since) and item.table:
                now = table_stats(watch, item.table)
                if finished_before(item.kind, now, result.before, since):
                    result.detail = (result.detail + ", which did the work" if waited else
                                     "the previous attempt's statement finished after its worker stopped") + \
                        ": not run again"
                    result.seconds = seconds
                    result.after = table_stats(watch, item.table, bloat=item.kind in BLOAT_KINDS)
                    return result
            if waited:
                result.detail += "; it did not finish the work: run again"
            if item.kind == "reindex":
                result.dropped_invalid = _drop_invalid_ccnew(work, item.table)
        failure: list[BaseException] = []

        def execute() -> None:
            try:
                work.execute(_maintenance_statement(item))
            except BaseException as e:  # reported by the watching loop
                failure.append(e)

        runner = threading.Thread(target=execute, name=f"maintenance {item.key}", daemon=True)
        runner.start()
        cancelled_by: str | None = None
        last_sample = time.monotonic()
        try:
            while runner.is_alive():
                runner.join(poll)
                now = time.monotonic()
                try:
                    line, waiting = _progress(watch, pid)
                except psycopg.Error:
                    line, waiting = "", False
                if waiting:
                    result.lock_wait_seconds += now - last_sample
                last_sample = now
                beat(item, line, started, result.before)
                if activity.in_activity() and activity.is_cancelled():
                    raise CancelledError("activity cancelled")
                if cancel_at is not None and cancelled_by is None and datetime.now(timezone.utc) >= cancel_at:
                    cancelled_by = "cutoff"
                    watch.execute("select pg_cancel_backend(%s)", (pid,))
        except (CancelledError, KeyboardInterrupt):
            # Abort: stop the statement, wait for it to end, leave no invalid index behind, then report it.
            watch.execute("select pg_cancel_backend(%s)", (pid,))
            runner.join(60)
            if item.kind == "reindex" and item.table:
                _drop_invalid_ccnew(watch, item.table)
            raise
        result.seconds = time.monotonic() - started
        if failure:
            e = failure[0]
            if isinstance(e, pgerrors.LockNotAvailable):
                result.outcome, result.detail = "lock-timeout", f"lock not granted within {guards.lock_timeout:g}s"
            elif isinstance(e, pgerrors.QueryCanceled):
                if cancelled_by == "cutoff":
                    result.outcome, result.detail = (
                        "cancelled-at-cutoff",
                        "cancelled at the window's cutoff (pg_cancel_backend)",
                    )
                else:
                    result.outcome, result.detail = (
                        "statement-timeout",
                        f"statement ran over {guards.statement_timeout:g}s",
                    )
            elif isinstance(e, psycopg.Error) and is_name_error(e) and item.kind == "sql":
                raise bad_input(f"sql task {item.name!r}: {error_line(e)}")
            elif isinstance(e, psycopg.OperationalError):
                raise ApplicationError(
                    f"maintenance {item.key} on {where(db)}: {redact(e, None)}", type="DatabaseUnreachable"
                )
            else:
                raise ApplicationError(
                    f"maintenance {item.key} on {where(db)}: {error_line(e) if isinstance(e, psycopg.Error) else e}",
                    type="DatabaseError",
                )
            if item.kind == "reindex" and item.table:
                result.dropped_invalid += _drop_invalid_ccnew(watch, item.table)
        if item.table and result.outcome != "lock-timeout":
            with sql_errors(db, f"statistics of {item.table}"):
                if item.kind in VACUUM_KINDS and result.outcome == "done":
                    # the statistics collector reports a VACUUM's effect asynchronously; wait until it shows
                    deadline = time.monotonic() + 10
                    while True:
                        after = table_stats(watch, item.table)
                        if (
                            after.last_vacuum != (result.before.last_vacuum if result.before else None)
                            or time.monotonic() > deadline
                        ):
                            break
                        time.sleep(0.1)
                    result.after = table_stats(watch, item.table, bloat=True)
                else:
                    result.after = table_stats(watch, item.table, bloat=item.kind in BLOAT_KINDS)
        return result
    finally:
        for c in (work, watch):
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
