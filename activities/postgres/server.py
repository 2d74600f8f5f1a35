"""A PostgreSQL server over SQL: status, fence, probe writes, promote, the rebuild check; `PostgresServer` is the
`DatabaseProvider` for provider "postgres" (self-managed). The `sql_*` functions are shared with the cloud
providers (Azure flexible server, RDS), which read replication state over SQL too."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from temporalio.exceptions import ApplicationError

from activities.context import heartbeat as _heartbeat
from activities.context import logger, time_limit
from activities.context import sleep_or_cancelled as _sleep
from activities.postgres.connection import connect, dsn_of, redact, sql_errors, where
from opsflow.models import DbStatus, PromoteResult, RebuildResult, RegionTarget, lsn_to_int

log = logging.getLogger(__name__)


PROBE_TABLE = "opsflow_probe"
STATUS_STATEMENT_TIMEOUT_MS = 10_000
RELOAD_TIMEOUT = 10.0  # how long a configuration reload may take to reach our session
TERMINATE_WAIT_MS = 5_000  # pg_terminate_backend(pid, timeout): wait for each session to end
POLL = 0.1


def _timeline_of_walfile(name: str | None) -> int | None:
    return int(name[:8], 16) if name else None


def _read_only(conn: psycopg.Connection) -> bool:
    return conn.execute("select current_setting('default_transaction_read_only')::bool").fetchone()[0]


def _primary_position(conn: psycopg.Connection) -> tuple[str, int | None]:
    # The timeline the primary writes on now. pg_control_checkpoint() lags behind a promotion until the next
    # checkpoint has completed; pg_walfile_name() names the insert timeline at once (PostgreSQL 15).
    lsn, walfile = conn.execute("select pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())").fetchone()
    return lsn, _timeline_of_walfile(walfile)


# -- status ---------------------------------------------------------------------------------------------------


def sql_status(db: Any, region: str) -> DbStatus:
    """Role, fence and replication state. An unreachable (or refusing) server gives reachable=False, error=...

    A configuration error of ours (malformed DSN, secret missing on this worker) still raises non-retryable.
    """
    try:
        conn = connect(db, connect_timeout=5)
    except ApplicationError as e:
        if e.type in ("DatabaseConfig", "SecretMissing"):
            raise
        return DbStatus(region=region, reachable=False, error=e.message)
    try:
        with conn:
            conn.execute("select set_config('statement_timeout', %s, false)", (str(STATUS_STATEMENT_TIMEOUT_MS),))
            return sql_status_on(conn, db, region)
    except psycopg.Error as e:  # the server went away or stopped answering in the middle
        return DbStatus(region=region, reachable=False, error=f"database {where(db)}: {redact(e, None)}")


def open_status_connection(db: Any) -> psycopg.Connection:
    """A connection for repeated sql_status_on() calls (one connection for a whole wait, not one per poll)."""
    conn = connect(db, connect_timeout=5)
    try:
        conn.execute("select set_config('statement_timeout', %s, false)", (str(STATUS_STATEMENT_TIMEOUT_MS),))
    except psycopg.Error as e:
        conn.close()
        raise ApplicationError(f"database {where(db)}: {redact(e, None)}", type="DatabaseUnreachable") from None
    return conn


def sql_status_on(conn: psycopg.Connection, db: Any, region: str) -> DbStatus:
    """sql_status() over an open connection. psycopg errors (a lost connection) propagate to the caller, except
    a missing privilege (non-retryable PermissionDenied)."""
    try:
        in_recovery, read_only = conn.execute(
            "select pg_is_in_recovery(), current_setting('default_transaction_read_only')::bool"
        ).fetchone()
        if not in_recovery:
            lsn, timeline = _primary_position(conn)
            return DbStatus(
                region=region, reachable=True, role="primary", read_only=read_only, current_lsn=lsn, timeline=timeline
            )
        row = conn.execute(
            """
            select r.pid, r.status, r.received_tli,
                   pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
                   extract(epoch from now() - pg_last_xact_replay_timestamp())::float8,
                   (select timeline_id from pg_control_checkpoint())
              from (select 1) one left join pg_stat_wal_receiver r on true
            """
        ).fetchone()
        pid, receiver_status, received_tli, receive_lsn, replay_lsn, since_replay, checkpoint_tli = row
        error = None
        if pid is not None and receiver_status is None:
            error = "the WAL receiver's state is hidden from this role: grant it pg_monitor"
        receive, replay = lsn_to_int(receive_lsn), lsn_to_int(replay_lsn)
        if receive is not None and replay is not None and receive <= replay:
            delay: float | None = 0.0  # everything received is replayed
        else:
            delay = max(0.0, since_replay) if since_replay is not None else None
        return DbStatus(
            region=region,
            reachable=True,
            error=error,
            role="replica",
            streaming=receiver_status == "streaming",
            read_only=read_only,
            current_lsn=receive_lsn,
            replay_lsn=replay_lsn,
            replay_delay_seconds=delay,
            timeline=received_tli or checkpoint_tli,
        )
    except pgerrors.InsufficientPrivilege as e:
        raise ApplicationError(
            f"status of {where(db)}: permission denied: {redact(e, None)} (grant the role pg_monitor)",
            type="PermissionDenied",
            non_retryable=True,
        ) from None


# -- fence ----------------------------------------------------------------------------------------------------


def _wait_reloaded(conn: psycopg.Connection, want: bool, what: str) -> bool:
    """Wait until our own session sees default_transaction_read_only == want.

    pg_reload_conf() only signals the postmaster, which re-reads the files and then signals every backend;
    once our session has the new value, the postmaster has it too and every session forked from now on
    starts with it.
    """
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while _read_only(conn) != want:
        if time.monotonic() > deadline:
            return False
        _heartbeat(f"{what}: waiting for the configuration reload")
        _sleep(0.02)
    return True


def sql_fence(db: Any) -> None:
    """Refuse new writes (default_transaction_read_only=on, persisted with ALTER SYSTEM) and end the other
    client sessions (walsenders and our own session stay). Idempotent.

    This is a soft fence: a session may still ask for a read-write transaction explicitly, which is why the
    sessions that exist are ended; new sessions start read-only.
    """
    with connect(db) as conn, sql_errors(db, "fence"):
        conn.execute("alter system set default_transaction_read_only = on")
        conn.execute("select pg_reload_conf()")
        if not _wait_reloaded(conn, True, "fence"):
            raise ApplicationError(
                f"fence on {where(db)}: default_transaction_read_only is still off "
                f"{RELOAD_TIMEOUT:.0f}s after the reload",
                type="FenceIncomplete",
            )
        end_other_sessions(conn, db)


def end_other_sessions(conn: psycopg.Connection, db: Any, keep: tuple[str, ...] = ()) -> None:
    """End the other client sessions (walsenders and our own session stay), so that none keeps a read-write
    transaction past a fence. Sessions this role may not end (another provider's superuser) are skipped with
    a warning. `keep`: application names whose sessions stay (Patroni's own)."""
    others = conn.execute(
        "select pid, usename from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid() "
        "and not coalesce(application_name = any(%s), false)",
        (list(keep),),
    ).fetchall()
    skipped = []
    for pid, user in others:
        _heartbeat(f"fence: ending session {pid}")
        try:
            ended = conn.execute("select pg_terminate_backend(%s, %s)", (pid, TERMINATE_WAIT_MS)).fetchone()[0]
        except pgerrors.InsufficientPrivilege:
            skipped.append(f"{pid} ({user}: not allowed)")
            continue
        if not ended:
            # false: gone already, or still alive after the wait
            alive = conn.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone()
            if alive:
                skipped.append(f"{pid} ({user}: still running after {TERMINATE_WAIT_MS} ms)")
    if skipped:
        logger(log).warning(
            "fence on %s: read-only now, but these sessions were not ended: %s", where(db), ", ".join(skipped)
        )


def sql_unfence(db: Any) -> None:
    """Undo sql_fence: ALTER SYSTEM RESET default_transaction_read_only and reload. Idempotent."""
    with connect(db) as conn, sql_errors(db, "unfence"):
        conn.execute("alter system reset default_transaction_read_only")
        conn.execute("select pg_reload_conf()")
        if not _wait_reloaded(conn, False, "unfence"):
            source, sourcefile = conn.execute(
                "select source, sourcefile from pg_settings where name = 'default_transaction_read_only'"
            ).fetchone()
            if source == "configuration file":
                raise ApplicationError(
                    f"unfence on {where(db)}: default_transaction_read_only is set in {sourcefile}; remove it there",
                    type="UnfenceRefused",
                    non_retryable=True,
                )
            raise ApplicationError(
                f"unfence on {where(db)}: default_transaction_read_only is still on ({source})",
                type="UnfenceIncomplete",
            )


# -- writes -----------------------------------------------------------------------------------------------


def _probe_write(conn: psycopg.Connection, key: str) -> None:
    for attempt in range(2):
        try:
            with conn.transaction():
                if conn.execute("select to_regclass(%s)", (PROBE_TABLE,)).fetchone()[0] is None:
                    conn.execute(
                        f"create table if not exists {PROBE_TABLE} (region text primary key, at timestamptz not null)"
                    )
                conn.execute(
                    f"insert into {PROBE_TABLE} (region, at) values (%s, now()) "
                    "on conflict (region) do update set at = excluded.at",
                    (key,),
                )
            return
        except pgerrors.UniqueViolation:
            if attempt:  # two first-ever probes raced to create the table; the second try finds it
                raise


def sql_check_writable(db: Any, *, region: str | None = None) -> None:
    """Commit a real probe write (upsert a row keyed by region into opsflow_probe, created if missing).

    Raises ApplicationError(type="NotWritable") with the server's message when the server refuses it (a
    replica, a fenced primary); retryable, since a server in promotion becomes writable.
    """
    key = region or where(db)
    with connect(db) as conn, sql_errors(db, "probe write"):
        try:
            _probe_write(conn, key)
        except pgerrors.ReadOnlySqlTransaction as e:
            raise ApplicationError(f"{where(db)} refused a write: {redact(e, None)}", type="NotWritable") from None


# -- promote ------------------------------------------------------------------------------------------------


def sql_promote(db: Any, timeout: float, *, region: str | None = None) -> PromoteResult:
    """Promote a replica and wait until a probe write commits. A primary: already_primary=True (idempotent).

    `seconds` runs from the promotion request to the first committed write. `lsn_at_promotion` is the last
    WAL position replayed before the server left recovery, `received_lsn` the last one it had received:
    received - replayed is WAL that was not applied.
    """
    key = region or where(db)
    started = time.monotonic()
    deadline = started + timeout
    with connect(db) as conn, sql_errors(db, "promote"):
        in_recovery, receive_before, replay_before = conn.execute(
            "select pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
        ).fetchone()
        if not in_recovery:
            _, timeline = _primary_position(conn)
            return PromoteResult(already_primary=True, seconds=0.0, timeline=timeline)
        logger(log).info("promoting %s (received %s, replayed %s)", where(db), receive_before, replay_before)
        _heartbeat({"phase": "promoting", "received_lsn": receive_before, "replayed_lsn": replay_before})
        t0 = time.monotonic()
        promoted_by_us = True
        try:
            # Returns at once; we poll below so that we can heartbeat while the startup process finishes.
            conn.execute("select pg_promote(wait => false)")
        except pgerrors.ObjectNotInPrerequisiteState:
            promoted_by_us = False  # left recovery between our look and the request: someone else promoted it
        while conn.execute("select pg_is_in_recovery()").fetchone()[0]:
            waited = time.monotonic() - t0
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"promote {where(db)}: still in recovery after {waited:.0f}s (timeout {timeout:.0f}s); retrying "
                    "continues to wait",
                    type="PromoteTimeout",
                )
            _heartbeat({"phase": "leaving recovery", "waited_seconds": round(waited, 1)})
            _sleep(POLL)
        # Wait until the new primary commits a write.
        while True:
            try:
                _probe_write(conn, key)
                break
            except pgerrors.ReadOnlySqlTransaction as e:
                if _read_only(conn):
                    raise ApplicationError(
                        f"promote {where(db)}: promoted, but it refuses writes because it is fenced "
                        f"(default_transaction_read_only=on): unfence it. Server: {redact(e, None)}",
                        type="NotWritable",
                        non_retryable=True,
                    ) from None
                if time.monotonic() > deadline:
                    raise ApplicationError(
                        f"promote {where(db)}: promoted but not writable after {timeout:.0f}s: {redact(e, None)}",
                        type="NotWritable",
                    ) from None
            _heartbeat({"phase": "waiting for a write to commit", "waited_seconds": round(time.monotonic() - t0, 1)})
            _sleep(POLL)
        seconds = time.monotonic() - t0
        # After recovery these stay at the last positions received / replayed during it.
        receive_after, replay_after = conn.execute(
            "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
        ).fetchone()
        _, timeline = _primary_position(conn)
    return PromoteResult(
        already_primary=not promoted_by_us,
        seconds=round(seconds, 3),
        timeline=timeline,
        lsn_at_promotion=replay_after or replay_before,
        received_lsn=receive_after or receive_before,
    )


# -- rebuild (failback) ----------------------------------------------------------------------------------------


def _host_port(dsn: str) -> tuple[str, int]:
    d = conninfo_to_dict(dsn)
    host = (d.get("hostaddr") or d.get("host") or "localhost").split(",")[0]
    return host, int(str(d.get("port") or 5432).split(",")[0])


def sql_streams_from(db: Any, primary: Any) -> bool:
    """Whether db is a replica whose WAL receiver streams from the server of primary.dsn (host and port)."""
    with connect(db) as conn, sql_errors(db, "replication source"):
        row = conn.execute(
            "select pg_is_in_recovery(), r.status, r.sender_host, r.sender_port "
            "from (select 1) one left join pg_stat_wal_receiver r on true"
        ).fetchone()
    in_recovery, status, sender_host, sender_port = row
    if not in_recovery or status != "streaming":
        return False
    host, port = _host_port(dsn_of(primary))
    loopback = {"localhost", "127.0.0.1", "::1"}
    same_host = sender_host == host or (sender_host in loopback and host in loopback)
    return same_host and sender_port == port


def sql_rebuild_check(db: Any, primary: Any, *, region: str, primary_region: str) -> RebuildResult:
    """The SQL-only half of a rebuild: success when db already streams from primary, else RebuildNotSupported."""
    try:
        if sql_streams_from(db, primary):
            return RebuildResult(
                method="already-streaming", seconds=0.0, detail=f"{region} already streams from {primary_region}"
            )
    except ApplicationError as e:
        if e.type != "DatabaseUnreachable":
            raise
    raise ApplicationError(
        f"{region}: a self-managed PostgreSQL server (provider 'postgres') is reached over SQL only and cannot be "
        f"rebuilt from here. On its host, stop it and run pg_rewind -D <datadir> --source-server '<{primary_region} "
        f"dsn>' (or, when that fails, move the data directory aside and pg_basebackup -R from {primary_region}), start "
        f"it as a standby of {where(primary)}, then run the failback again.",
        type="RebuildNotSupported",
        non_retryable=True,
    )


# -- the provider ---------------------------------------------------------------------------------------------


class PostgresServer:
    """DatabaseProvider for provider "postgres": a self-managed server reached over SQL only.

    promote(force) is the same with or without force: pg_promote never waits for the old primary.
    """

    DEFAULT_PROMOTE_TIMEOUT = 300.0

    def __init__(self, target: RegionTarget, *, promote_timeout: float | None = None):
        if target.database.provider != "postgres":
            raise ValueError(f"PostgresServer serves provider 'postgres', not {target.database.provider!r}")
        self.target = target
        self.db = target.database
        self.promote_timeout = promote_timeout

    def status(self) -> DbStatus:
        return sql_status(self.db, self.target.region)

    def fence(self) -> None:
        sql_fence(self.db)

    def fence_control_plane(self, budget: float) -> tuple[str, list[str]]:
        """Self-managed: no control plane; the SQL fence if the server answers (raises when it does not)."""
        sql_fence(self.db)
        return "sql-read-only", [f"fenced {where(self.db)} over SQL (default_transaction_read_only=on, sessions ended)"]

    def unfence(self) -> None:
        sql_unfence(self.db)

    def promote(self, force: bool) -> PromoteResult:
        return sql_promote(self.db, self._promote_timeout(), region=self.target.region)

    def check_writable(self) -> None:
        sql_check_writable(self.db, region=self.target.region)

    def rebuild_replica(self, primary: RegionTarget) -> RebuildResult:
        """A self-managed server is reached over SQL only: it cannot be rewound or re-copied from here (that
        takes its host: pg_rewind or pg_basebackup on the data directory; the lab does it with
        lab.postgres.rebuild_replica). Idempotent success when it already streams from `primary`; otherwise a
        non-retryable RebuildNotSupported error that says what to run on the host."""
        return sql_rebuild_check(self.db, primary.database, region=self.target.region, primary_region=primary.region)

    def _promote_timeout(self) -> float:
        if self.promote_timeout is not None:
            return self.promote_timeout
        return time_limit(self.DEFAULT_PROMOTE_TIMEOUT)
