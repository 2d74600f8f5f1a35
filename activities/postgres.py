"""Self-managed PostgreSQL over SQL (psycopg 3, synchronous): status, fence, promote, probe writes.

`PostgresServer` is the `DatabaseProvider` for provider "postgres". The `sql_*` functions are shared with the
cloud providers (Azure flexible server, RDS), which read replication state over SQL too. They take any `db`
with `.dsn` and `.password` (a `SecretRef` or None) and work inside and outside Temporal activities: where
they wait they heartbeat only when running in an activity.

Errors: what retrying cannot fix (bad DSN, missing secret, authentication or permission refused) raises a
non-retryable `ApplicationError`; a lost or refused connection raises a retryable one (type
"DatabaseUnreachable"). The password never appears in a message.
"""

from __future__ import annotations

import logging
import math
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import psycopg
from psycopg import errors as pgerrors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio import activity
from activities.context import heartbeat as _heartbeat, sleep_or_cancelled as _sleep, time_limit
from temporalio.exceptions import ApplicationError

from activities.secrets import resolve
from opsflow.models import DbStatus, Divergence, PromoteResult, RebuildResult, RegionTarget, lsn_to_int

log = logging.getLogger(__name__)

APPLICATION_NAME = "opsflow"
PROBE_TABLE = "opsflow_probe"
STATUS_STATEMENT_TIMEOUT_MS = 10_000
RELOAD_TIMEOUT = 10.0  # how long a configuration reload may take to reach our session
TERMINATE_WAIT_MS = 5_000  # pg_terminate_backend(pid, timeout): wait for each session to end
POLL = 0.1


# -- small helpers ------------------------------------------------------------------------------------------


def _logger() -> Any:
    return activity.logger if activity.in_activity() else log


def _dsn_of(db: Any) -> str:
    dsn = getattr(db, "dsn", None)
    if not dsn:
        raise ApplicationError("database: the inventory gives no SQL dsn for this database", type="DatabaseConfig", non_retryable=True)
    return dsn


def where(db: Any) -> str:
    """'host:port/dbname' of a db's DSN, for messages (never the password). Raises for a malformed DSN."""
    dsn = _dsn_of(db)
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ApplicationError(f"database: malformed dsn: {str(e).strip()}", type="DatabaseConfig", non_retryable=True) from None
    return f"{d.get('host') or d.get('hostaddr') or 'localhost'}:{d.get('port') or 5432}/{d.get('dbname') or d.get('user') or ''}"


def _scrub(text: str, secret: str | None) -> str:
    text = str(text).strip()
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


# Connection failures that retrying cannot fix: the server answered, and said no.
_PERMANENT_CONNECT = [
    (re.compile(r"password authentication failed|authentication failed|no password supplied|fe_sendauth|SCRAM|"
                r"pg_hba\.conf|not permitted to log in|permission denied for database", re.I), "DatabaseAuthFailed"),
    (re.compile(r'(role|database) ".*" does not exist|invalid (connection option|sslmode|port)|'
                r"invalid integer value", re.I), "DatabaseConfig"),
]


def connect(db: Any, *, connect_timeout: float = 5, autocommit: bool = True) -> psycopg.Connection:
    """Open a connection to db.dsn, with the password fetched from where db.password says it lives."""
    loc = where(db)
    params: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq: whole seconds, at least 2
        "fallback_application_name": APPLICATION_NAME,
    }
    current = conninfo_to_dict(db.dsn)
    for key, value in (("keepalives", 1), ("keepalives_idle", 10), ("keepalives_interval", 5), ("keepalives_count", 3)):
        if key not in current:
            params[key] = value
    secret = resolve(db.password) if getattr(db, "password", None) is not None else None
    if secret is not None:
        params["password"] = secret
    try:
        conninfo = make_conninfo(db.dsn, **params)
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.ProgrammingError as e:  # an option libpq does not know
        raise ApplicationError(f"database {loc}: bad dsn: {_scrub(e, secret)}", type="DatabaseConfig", non_retryable=True) from None
    except psycopg.OperationalError as e:
        msg = _scrub(e, secret)
        for pattern, kind in _PERMANENT_CONNECT:
            if pattern.search(msg):
                raise ApplicationError(f"database {loc}: connection refused by the server: {msg}", type=kind, non_retryable=True) from None
        raise ApplicationError(f"database {loc}: cannot connect: {msg}", type="DatabaseUnreachable") from None


@contextmanager
def _sql_errors(db: Any, what: str) -> Iterator[None]:
    """Map psycopg errors raised while talking to the server onto ApplicationErrors."""
    try:
        yield
    except ApplicationError:
        raise
    except pgerrors.InsufficientPrivilege as e:
        raise ApplicationError(f"{what} on {where(db)}: permission denied: {_scrub(e, None)}", type="PermissionDenied", non_retryable=True) from None
    except psycopg.OperationalError as e:  # connection lost, server shutting down, statement timeout
        raise ApplicationError(f"{what} on {where(db)}: {_scrub(e, None)}", type="DatabaseUnreachable") from None
    except psycopg.Error as e:
        state = f" [{e.sqlstate}]" if getattr(e, "sqlstate", None) else ""
        raise ApplicationError(f"{what} on {where(db)}: {_scrub(e, None)}{state}", type="DatabaseError") from None


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
        return DbStatus(region=region, reachable=False, error=f"database {where(db)}: {_scrub(e, None)}")


def open_status_connection(db: Any) -> psycopg.Connection:
    """A connection for repeated sql_status_on() calls (one connection for a whole wait, not one per poll)."""
    conn = connect(db, connect_timeout=5)
    try:
        conn.execute("select set_config('statement_timeout', %s, false)", (str(STATUS_STATEMENT_TIMEOUT_MS),))
    except psycopg.Error as e:
        conn.close()
        raise ApplicationError(f"database {where(db)}: {_scrub(e, None)}", type="DatabaseUnreachable") from None
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
            return DbStatus(region=region, reachable=True, role="primary", read_only=read_only, current_lsn=lsn, timeline=timeline)
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
        raise ApplicationError(f"status of {where(db)}: permission denied: {_scrub(e, None)} (grant the role pg_monitor)",
                               type="PermissionDenied", non_retryable=True) from None


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
    with connect(db) as conn, _sql_errors(db, "fence"):
        conn.execute("alter system set default_transaction_read_only = on")
        conn.execute("select pg_reload_conf()")
        if not _wait_reloaded(conn, True, "fence"):
            raise ApplicationError(f"fence on {where(db)}: default_transaction_read_only is still off {RELOAD_TIMEOUT:.0f}s after the reload",
                                   type="FenceIncomplete")
        end_other_sessions(conn, db)


def end_other_sessions(conn: psycopg.Connection, db: Any) -> None:
    """End the other client sessions (walsenders and our own session stay), so that none keeps a read-write
    transaction past a fence. Sessions this role may not end (another provider's superuser) are skipped with
    a warning."""
    others = conn.execute(
        "select pid, usename from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()"
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
        _logger().warning("fence on %s: read-only now, but these sessions were not ended: %s", where(db), ", ".join(skipped))


def sql_unfence(db: Any) -> None:
    """Undo sql_fence: ALTER SYSTEM RESET default_transaction_read_only and reload. Idempotent."""
    with connect(db) as conn, _sql_errors(db, "unfence"):
        conn.execute("alter system reset default_transaction_read_only")
        conn.execute("select pg_reload_conf()")
        if not _wait_reloaded(conn, False, "unfence"):
            source, sourcefile = conn.execute(
                "select source, sourcefile from pg_settings where name = 'default_transaction_read_only'"
            ).fetchone()
            if source == "configuration file":
                raise ApplicationError(f"unfence on {where(db)}: default_transaction_read_only is set in {sourcefile}; remove it there",
                                       type="UnfenceRefused", non_retryable=True)
            raise ApplicationError(f"unfence on {where(db)}: default_transaction_read_only is still on ({source})", type="UnfenceIncomplete")


# -- writes -----------------------------------------------------------------------------------------------


def _probe_write(conn: psycopg.Connection, key: str) -> None:
    for attempt in range(2):
        try:
            with conn.transaction():
                if conn.execute("select to_regclass(%s)", (PROBE_TABLE,)).fetchone()[0] is None:
                    conn.execute(f"create table if not exists {PROBE_TABLE} (region text primary key, at timestamptz not null)")
                conn.execute(
                    f"insert into {PROBE_TABLE} (region, at) values (%s, now()) on conflict (region) do update set at = excluded.at",
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
    with connect(db) as conn, _sql_errors(db, "probe write"):
        try:
            _probe_write(conn, key)
        except pgerrors.ReadOnlySqlTransaction as e:
            raise ApplicationError(f"{where(db)} refused a write: {_scrub(e, None)}", type="NotWritable") from None


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
    with connect(db) as conn, _sql_errors(db, "promote"):
        in_recovery, receive_before, replay_before = conn.execute(
            "select pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
        ).fetchone()
        if not in_recovery:
            _, timeline = _primary_position(conn)
            return PromoteResult(already_primary=True, seconds=0.0, timeline=timeline)
        _logger().info("promoting %s (received %s, replayed %s)", where(db), receive_before, replay_before)
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
                raise ApplicationError(f"promote {where(db)}: still in recovery after {waited:.0f}s (timeout {timeout:.0f}s); "
                                       f"retrying continues to wait", type="PromoteTimeout")
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
                        f"(default_transaction_read_only=on): unfence it. Server: {_scrub(e, None)}",
                        type="NotWritable", non_retryable=True) from None
                if time.monotonic() > deadline:
                    raise ApplicationError(f"promote {where(db)}: promoted but not writable after {timeout:.0f}s: {_scrub(e, None)}",
                                           type="NotWritable") from None
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
    with connect(db) as conn, _sql_errors(db, "replication source"):
        row = conn.execute(
            "select pg_is_in_recovery(), r.status, r.sender_host, r.sender_port "
            "from (select 1) one left join pg_stat_wal_receiver r on true"
        ).fetchone()
    in_recovery, status, sender_host, sender_port = row
    if not in_recovery or status != "streaming":
        return False
    host, port = _host_port(_dsn_of(primary))
    loopback = {"localhost", "127.0.0.1", "::1"}
    same_host = sender_host == host or (sender_host in loopback and host in loopback)
    return same_host and sender_port == port


def sql_rebuild_check(db: Any, primary: Any, *, region: str, primary_region: str) -> RebuildResult:
    """The SQL-only half of a rebuild: success when db already streams from primary, else RebuildNotSupported."""
    try:
        if sql_streams_from(db, primary):
            return RebuildResult(method="already-streaming", seconds=0.0, detail=f"{region} already streams from {primary_region}")
    except ApplicationError as e:
        if e.type != "DatabaseUnreachable":
            raise
    raise ApplicationError(
        f"{region}: a self-managed PostgreSQL server (provider 'postgres') is reached over SQL only and cannot be rebuilt "
        f"from here. On its host, stop it and run pg_rewind -D <datadir> --source-server '<{primary_region} dsn>' (or, when "
        f"that fails, move the data directory aside and pg_basebackup -R from {primary_region}), start it as a standby of "
        f"{where(primary)}, then run the failback again.",
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


# -- integrity verification (restore drills) ------------------------------------------------------------------
#
# Run against a restored scratch server (and the source, for the counts to compare with). Provider-neutral:
# `db` is any object with .dsn and .password, like everywhere in this module. Names of tables and objects are
# written the way SQL reads them: 'orders', 'shop.orders', 'shop."Order Lines"' (unquoted names fold to lower
# case; unqualified ones are looked up on the search_path). They are resolved by the server (to_regclass,
# to_regproc...) and only the resolved schema and name go into SQL, quoted by psycopg.sql. The only SQL
# text taken from the caller is a check's own query, which runs alone (one statement, prepared) in a READ ONLY
# transaction with a statement_timeout.

CHECK_STATEMENT_TIMEOUT = 60.0
COUNT_STATEMENT_TIMEOUT = 600.0
_COUNTABLE = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}
_KINDS = {**_COUNTABLE, "i": "index", "I": "partitioned index", "S": "sequence", "c": "composite type", "t": "TOAST table"}


def _bad_input(message: str) -> ApplicationError:
    return ApplicationError(message, type="BadInput", non_retryable=True)


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


def _is_name_error(e: psycopg.Error) -> bool:
    # 22xxx data exceptions (invalid name syntax, improper qualified name), 42xxx syntax errors: the name, not the server
    return bool(getattr(e, "sqlstate", None)) and e.sqlstate[:2] in ("22", "42") and not isinstance(e, pgerrors.InsufficientPrivilege)


def _resolve_relation(conn: psycopg.Connection, name: str) -> tuple[str, str, str] | None:
    """(schema, name, relkind) of a relation named as SQL reads it; None when it does not exist.
    Raises BadInput for a name that is not a valid relation name at all."""
    if not isinstance(name, str) or not name.strip():
        raise _bad_input(f"not a table name: {name!r}")
    try:
        return conn.execute(
            """
            select n.nspname, c.relname, c.relkind::text
              from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where c.oid = to_regclass(%s)
            """,
            (name,),
        ).fetchone()
    except psycopg.Error as e:
        if _is_name_error(e):
            raise _bad_input(f"{name!r} is not a valid table name: {_scrub(e, None)}") from None
        raise


def _countable(db: Any, conn: psycopg.Connection, table: str, *, missing_ok: bool = False) -> tuple[str, str] | None:
    rel = _resolve_relation(conn, table)
    if rel is None:
        if missing_ok:
            return None
        raise _bad_input(f"unknown table {table!r} on {where(db)}: no such table or view (names are resolved like SQL: "
                         f"schema-qualified or on the search_path, unquoted names in lower case)")
    schema, relname, kind = rel
    if kind not in _COUNTABLE:
        what = _KINDS.get(kind, f"relation of kind {kind!r}")
        raise _bad_input(f"{table!r} on {where(db)} is {'an' if what[0] in 'aeiou' else 'a'} {what}, not a table or view")
    return schema, relname


def table_exists(db: Any, table: str) -> bool:
    """Whether a table or view of that name exists on db (name as SQL reads it). BadInput for a malformed name."""
    with connect(db) as conn, _sql_errors(db, "table lookup"):
        rel = _resolve_relation(conn, table)
        return rel is not None and rel[2] in _COUNTABLE


def require_tables(db: Any, tables: list[str], timestamp_columns: dict[str, str] | None = None) -> None:
    """Raise ApplicationError(type="BadInput", non_retryable) naming every table (and timestamp column) that does
    not exist on db; run it against the source before anything is restored. Returns None when all exist."""
    problems = []
    with connect(db) as conn, _sql_errors(db, "table validation"):
        for table in [*tables, *(t for t in (timestamp_columns or {}) if t not in tables)]:
            try:
                rel = _countable(db, conn, table)
            except ApplicationError as e:
                problems.append(e.message)
                continue
            column = (timestamp_columns or {}).get(table)
            if column is not None:
                try:
                    _timestamp_column(db, conn, table, rel, column)
                except ApplicationError as e:
                    problems.append(e.message)
    if problems:
        raise _bad_input("; ".join(problems))


validate_tables = require_tables


def _timestamp_column(db: Any, conn: psycopg.Connection, table: str, rel: tuple[str, str], column: str) -> None:
    row = conn.execute(
        """
        select format_type(a.atttypid, a.atttypmod)
          from pg_attribute a
         where a.attrelid = to_regclass(%s) and a.attname = %s and a.attnum > 0 and not a.attisdropped
        """,
        (sql.Identifier(*rel).as_string(conn), column),
    ).fetchone()
    if row is None:
        raise _bad_input(f"table {table!r} on {where(db)} has no column {column!r}")
    if row[0] not in ("timestamp with time zone", "timestamp without time zone", "date"):
        raise _bad_input(f"column {column!r} of {table!r} is {row[0]}, not a timestamp")


def row_counts(db: Any, tables: list[str], *, missing_ok: bool = False,
               statement_timeout: float = COUNT_STATEMENT_TIMEOUT) -> dict[str, int | None]:
    """count(*) of each table, keyed by the name as given, all in one REPEATABLE READ READ ONLY transaction
    (one snapshot). An unknown table raises BadInput naming it; with missing_ok (the restored side of a
    comparison, where a missing table is a finding, not bad input) its count is None instead."""
    counts: dict[str, int | None] = {}
    with connect(db, autocommit=False) as conn, _sql_errors(db, "row counts"):
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            conn.execute("select set_config('statement_timeout', %s, true)", (_ms(statement_timeout),))
            resolved = {t: _countable(db, conn, t, missing_ok=missing_ok) for t in tables}
            for table, rel in resolved.items():
                if rel is None:
                    counts[table] = None
                    continue
                _heartbeat(f"counting rows of {table}")
                counts[table] = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(*rel))).fetchone()[0]
    return counts


def row_counts_at(db: Any, table: str, timestamp_column: str, at: datetime, *,
                  statement_timeout: float = COUNT_STATEMENT_TIMEOUT) -> int:
    """Rows of `table` whose `timestamp_column` is strictly before `at`: the source's count at a restore point,
    for a table that records when its rows were written (same strictness as restore_to_time: transactions
    committed before the target). A naive `at`, and a timestamp-without-time-zone column, are taken as UTC.

    The column holds the time a row was written, not when its transaction committed: a transaction that
    straddles `at` is counted here but absent from the restore; compare with a tolerance where that matters.
    Unknown table or column, or a column that is not a timestamp: BadInput."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at
    with connect(db, autocommit=False) as conn, _sql_errors(db, "row count at a point in time"):
        conn.read_only = True
        with conn.transaction():
            conn.execute("select set_config('statement_timeout', %s, true), set_config('TimeZone', 'UTC', true)", (_ms(statement_timeout),))
            rel = _countable(db, conn, table)
            _timestamp_column(db, conn, table, rel, timestamp_column)
            query = sql.SQL("select count(*) from {} where {} < %s").format(sql.Identifier(*rel), sql.Identifier(timestamp_column))
            return conn.execute(query, (at,)).fetchone()[0]


def _check_pairs(checks: Any) -> list[tuple[str, str]]:
    pairs = []
    for i, check in enumerate(checks):
        if isinstance(check, dict):
            name, query = check.get("name"), check.get("sql")
        elif isinstance(check, (tuple, list)) and len(check) == 2:
            name, query = check
        else:
            name, query = getattr(check, "name", None), getattr(check, "sql", None)
        if not isinstance(name, str) or not isinstance(query, str) or not query.strip():
            raise _bad_input(f"check #{i + 1}: give a name and an SQL query (name, sql), not {check!r}")
        pairs.append((name, query))
    return pairs


def _check_outcome(rows: list[tuple], columns: int) -> tuple[bool, str]:
    if len(rows) != 1:
        got = "no rows" if not rows else "more than one row"
        return False, f"returned {got}; a check returns exactly one row with one boolean"
    if columns != 1:
        return False, f"returned {columns} columns; a check returns exactly one row with one boolean"
    value = rows[0][0]
    if value is True:
        return True, "true"
    if value is False:
        return False, "returned false"
    if value is None:
        return False, "returned NULL"
    return False, f"returned {value!r} ({type(value).__name__}), not a boolean"


def _error_line(e: psycopg.Error) -> str:
    """The server's primary message and SQLSTATE on one line (no LINE/caret context)."""
    diag = getattr(e, "diag", None)
    text = (diag.message_primary if diag is not None and diag.message_primary else str(e)).strip().splitlines()[0]
    state = f" [{e.sqlstate}]" if getattr(e, "sqlstate", None) else ""
    return _scrub(text, None) + state


def run_checks(db: Any, checks: list[tuple[str, str]], *,
               statement_timeout: float = CHECK_STATEMENT_TIMEOUT) -> list[tuple[str, bool, str]]:
    """Run the caller's SQL checks; each must return a single row holding boolean true.

    Each check runs alone: one statement (prepared: 'a; b' is refused), in its own READ ONLY transaction
    (rolled back), with statement_timeout. Returns (name, ok, detail) per check, in order; detail is 'true',
    what it returned instead, or 'error: <the server's message>' — an error is a failed check, not an
    exception. Only failing to reach the server at all raises (retryable DatabaseUnreachable). `checks`:
    (name, sql) pairs, or dicts / objects with name and sql."""
    pairs = _check_pairs(checks)
    results: list[tuple[str, bool, str]] = []
    conn = connect(db, autocommit=True)
    try:
        # A second guard besides BEGIN READ ONLY: a session whose transactions all start read-only.
        conn.execute("set default_transaction_read_only = on")
        for name, query in pairs:
            _heartbeat(f"check {name}")
            if conn.broken or conn.closed:
                conn = connect(db, autocommit=True)
                conn.execute("set default_transaction_read_only = on")
            try:
                conn.execute("begin transaction read only")
                try:
                    conn.execute("select set_config('statement_timeout', %s, true)", (_ms(statement_timeout),))
                    cur = conn.execute(query, prepare=True)
                    if cur.description is None:
                        ok, detail = False, "returned no result; a check is a query returning one boolean"
                    else:
                        ok, detail = _check_outcome(cur.fetchmany(2), len(cur.description))
                finally:
                    if not conn.broken:
                        conn.execute("rollback")
            except pgerrors.QueryCanceled as e:
                ok, detail = False, f"error: {_error_line(e)} (statement_timeout {statement_timeout:g}s)"
            except psycopg.Error as e:
                ok, detail = False, f"error: {_error_line(e)}"
            results.append((name, ok, detail))
    finally:
        conn.close()
    return results


def missing_objects(db: Any, objects: list[str]) -> list[str]:
    """The names in `objects` that do not exist on db, in the order given. A name is looked up as a relation
    (table, view, materialized view, index, sequence: to_regclass), a function or procedure ('f' or
    'f(int, text)': to_regproc / to_regprocedure; an overloaded name exists when any overload does) or a type
    (to_regtype). A name that cannot be a name at all raises BadInput."""
    missing = []
    with connect(db) as conn, _sql_errors(db, "schema objects"):
        for obj in objects:
            if not isinstance(obj, str) or not obj.strip():
                raise _bad_input(f"not an object name: {obj!r}")
            try:
                found = conn.execute(
                    """
                    select to_regclass(%(o)s) is not null
                        or (strpos(%(o)s, '(') = 0 and (
                              to_regproc(%(o)s) is not null
                              or exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                                          where p.proname = (parse_ident(%(o)s))[array_upper(parse_ident(%(o)s), 1)]
                                            and case array_length(parse_ident(%(o)s), 1)
                                                  when 1 then n.nspname = any (current_schemas(true))
                                                  when 2 then n.nspname = (parse_ident(%(o)s))[1]
                                                  else false end)))
                    """,
                    {"o": obj},
                ).fetchone()[0]
                if not found and "(" in obj:
                    found = conn.execute("select to_regprocedure(%s) is not null", (obj,)).fetchone()[0]
                if not found and "(" not in obj:
                    found = conn.execute("select to_regtype(%s) is not null", (obj,)).fetchone()[0]
            except psycopg.Error as e:
                if _is_name_error(e):
                    raise _bad_input(f"{obj!r} is not a valid object name: {_scrub(e, None)}") from None
                raise
            if not found:
                missing.append(obj)
    return missing


# -- maintenance: VACUUM / ANALYZE / REINDEX CONCURRENTLY under guards (the weekly window) ---------------------
#
# Each statement runs on its own session with lock_timeout and statement_timeout set for that session only. A
# second session watches it: heartbeats progress from pg_stat_progress_vacuum / pg_stat_progress_create_index,
# counts the time it waits on a lock, and on cancellation (delivered by a heartbeat) or at the cutoff cancels the
# statement with pg_cancel_backend, waits for it to end and stops cleanly. Names reach SQL only as
# sql.Identifier; the inventory has already refused anything that is not a plain identifier.

MAINTENANCE_POLL = 1.0  # how often the watching session samples progress and heartbeats
CCNEW = "_ccnew"  # REINDEX CONCURRENTLY names its new index <index>_ccnew[N]; a failed run leaves it invalid


def _split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def _ident(table: str) -> sql.Composable:
    return sql.Identifier(*_split_table(table))


def table_stats(conn: psycopg.Connection, table: str) -> Any:
    """n_live_tup, n_dead_tup, sizes, last (auto)vacuum/analyze and invalid indexes of a table, or None."""
    from opsflow.maintenance_models import TableStats

    schema, name = _split_table(table)
    row = conn.execute(
        """
        select s.n_live_tup, s.n_dead_tup, pg_table_size(c.oid), pg_indexes_size(c.oid),
               greatest(s.last_vacuum, s.last_autovacuum), greatest(s.last_analyze, s.last_autoanalyze),
               coalesce((select array_agg(ic.relname::text order by ic.relname) from pg_index i join pg_class ic on ic.oid = i.indexrelid
                          where i.indrelid = c.oid and not i.indisvalid), '{}')
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
          left join pg_stat_user_tables s on s.relid = c.oid
         where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p', 'm')
        """,
        (schema, name),
    ).fetchone()
    if row is None:
        return None
    live, dead, tbytes, ibytes, last_vacuum, last_analyze, invalid = row
    return TableStats(n_live_tup=live or 0, n_dead_tup=dead or 0, table_bytes=tbytes or 0, index_bytes=ibytes or 0,
                      last_vacuum=last_vacuum, last_analyze=last_analyze, invalid_indexes=list(invalid))


def missing_tables(db: Any, tables: list[str]) -> list[str]:
    """The listed tables (schema.table, already validated identifiers) that do not exist on db. Catalog only:
    no lock is taken, so a table another session holds locked is found, not waited for."""
    with connect(db) as conn, _sql_errors(db, "table lookup"):
        return [t for t in tables if conn.execute(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p', 'm')",
            _split_table(t)).fetchone() is None]


def dead_tuple_candidates(db: Any, min_dead_tuples: int, dead_ratio: float, limit: int) -> list[tuple[str, str]]:
    """(schema.table, why) of the tables with at least `min_dead_tuples` dead tuples making up at least
    `dead_ratio` of the rows, worst first. The statistics are the collector's: a table just bloated may need a
    moment to show up."""
    with connect(db) as conn, _sql_errors(db, "table selection"):
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
    return [(f"{s}.{t}", f"{dead} dead tuples, {ratio:.0%} of its rows (thresholds: {min_dead_tuples}, {dead_ratio:.0%})")
            for s, t, dead, live, ratio in rows]


def replication_lag_bytes(db: Any) -> dict[str, int]:
    """Bytes each streaming replica of the primary `db` has still to replay (pg_stat_replication)."""
    with connect(db) as conn, _sql_errors(db, "replication lag"):
        rows = conn.execute(
            "select application_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint from pg_stat_replication"
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


def run_maintenance(db: Any, item: Any, guards: Any, *, cancel_at: datetime | None = None, poll: float = MAINTENANCE_POLL) -> Any:
    """Run one work item (VACUUM/ANALYZE/REINDEX CONCURRENTLY of a table, or a named sql statement) with the
    guards, and return its ItemResult with the table's statistics before and after.

    A lock wait beyond lock_timeout gives outcome "lock-timeout", a statement beyond statement_timeout
    "statement-timeout", the cutoff (cancel_at) "cancelled-at-cutoff": the caller decides whether to retry. A
    cancelled activity cancels the statement (pg_cancel_backend), waits for it to end, then raises."""
    import threading

    from temporalio.exceptions import CancelledError

    from opsflow.maintenance_models import ItemResult

    started = time.monotonic()
    result = ItemResult(key=item.key, kind=item.kind, table=item.table, name=item.name, outcome="done", reason=item.reason)
    work = connect(db)
    watch = connect(db)
    try:
        with _sql_errors(db, f"maintenance {item.key}"):
            for session in (work, watch):  # the sizes in the statistics need a lock on the table too
                session.execute("select set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                                (_ms(guards.lock_timeout), _ms(guards.statement_timeout)))
            if item.table:
                try:
                    result.before = table_stats(watch, item.table)
                except pgerrors.LockNotAvailable:
                    result.outcome, result.detail = "lock-timeout", f"lock not granted within {guards.lock_timeout:g}s"
                    result.seconds = time.monotonic() - started
                    return result
                if result.before is None:
                    raise _bad_input(f"table {item.table} does not exist on {where(db)}")
            if item.kind == "reindex":
                result.dropped_invalid = _drop_invalid_ccnew(work, item.table)
            pid = work.info.backend_pid
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
                _heartbeat({"item": item.key, "progress": line, "seconds": round(now - started, 1)})
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
                    result.outcome, result.detail = "cancelled-at-cutoff", "cancelled at the window's cutoff (pg_cancel_backend)"
                else:
                    result.outcome, result.detail = "statement-timeout", f"statement ran over {guards.statement_timeout:g}s"
            elif isinstance(e, psycopg.Error) and _is_name_error(e) and item.kind == "sql":
                raise _bad_input(f"sql task {item.name!r}: {_error_line(e)}")
            elif isinstance(e, psycopg.OperationalError):
                raise ApplicationError(f"maintenance {item.key} on {where(db)}: {_scrub(e, None)}", type="DatabaseUnreachable")
            else:
                raise ApplicationError(f"maintenance {item.key} on {where(db)}: {_error_line(e) if isinstance(e, psycopg.Error) else e}",
                                       type="DatabaseError")
            if item.kind == "reindex" and item.table:
                result.dropped_invalid += _drop_invalid_ccnew(watch, item.table)
        if item.table and result.outcome != "lock-timeout":
            with _sql_errors(db, f"statistics of {item.table}"):
                if item.kind in ("vacuum", "vacuum-analyze") and result.outcome == "done":
                    # the statistics collector reports a VACUUM's effect asynchronously; wait until it shows
                    deadline = time.monotonic() + 10
                    while True:
                        after = table_stats(watch, item.table)
                        if after.last_vacuum != (result.before.last_vacuum if result.before else None) or time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
                    result.after = after
                else:
                    result.after = table_stats(watch, item.table)
        return result
    finally:
        for c in (work, watch):
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


def base_backup(db: Any, directory: str, name: str, *, timeout: float = 3600) -> Any:
    """A fresh base backup of `db` with pg_basebackup over the replication protocol (plain format, WAL included,
    fast checkpoint) into directory/name on this worker, verified by pg_verifybackup's manifest check later.
    Needs a role with REPLICATION and a pg_hba entry for replication. A finished backup of that name is reused."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    dest = Path(directory) / name
    started = datetime.now(timezone.utc)
    if (dest / "backup_manifest").exists():
        return _backup_result(dest, "completed")
    if dest.exists():  # a crashed attempt: start again
        shutil.rmtree(dest)
    Path(directory).mkdir(parents=True, exist_ok=True)
    binary = shutil.which("pg_basebackup") or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"))), None)
    if binary is None:
        raise ApplicationError("backup: pg_basebackup is not installed on this worker (postgresql-client)", type="BackupConfig", non_retryable=True)
    env = {**os.environ}
    if getattr(db, "password", None) is not None:
        env["PGPASSWORD"] = resolve(db.password)
    proc = subprocess.Popen([binary, "-d", _dsn_of(db), "-D", str(dest), "-Fp", "-X", "stream", "-c", "fast", "--no-password"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        _heartbeat({"backup": name, "bytes": _dir_bytes(dest)})
        if time.monotonic() > deadline:
            proc.kill()
            raise ApplicationError(f"backup: pg_basebackup ran over {timeout:.0f}s", type="BackupTimeout", non_retryable=True)
        time.sleep(1)
    output = (proc.stdout.read() if proc.stdout else "").strip()
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise ApplicationError(f"backup: pg_basebackup of {where(db)} failed: {output[-500:]}", type="BackupFailed")
    result = _backup_result(dest, "completed")
    result.started_at = started
    return result


def _dir_bytes(path: Any) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _backup_result(dest: Any, state: str) -> Any:
    from opsflow.maintenance_models import BackupResult

    manifest = dest / "backup_manifest"
    done = datetime.fromtimestamp(manifest.stat().st_mtime, timezone.utc) if manifest.exists() else None
    return BackupResult(id=dest.name, method="pg_basebackup", state=state, completed_at=done, size_bytes=_dir_bytes(dest), location=str(dest))


def verify_base_backup(location: str) -> str:
    """pg_verifybackup on a plain-format base backup: every file against its manifest, and the WAL it needs."""
    import shutil
    import subprocess
    from pathlib import Path

    binary = shutil.which("pg_verifybackup") or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_verifybackup"))), None)
    if binary is None:
        raise ApplicationError("backup: pg_verifybackup is not installed on this worker", type="BackupConfig", non_retryable=True)
    proc = subprocess.run([binary, location], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise ApplicationError(f"backup {location} does not verify: {(proc.stderr or proc.stdout).strip()[-500:]}", type="BackupInvalid", non_retryable=True)
    return (proc.stdout or "backup successfully verified").strip()


# -- divergence (failback: what the old primary holds that the new one does not) ------------------------------


def timeline_history(db: Any, timeline: int) -> str | None:
    """The text of timeline `timeline`'s history file on db's server ('<parent tli>\\t<switch lsn>\\t<reason>' per
    line): over a replication connection (TIMELINE_HISTORY, needs the REPLICATION attribute), else
    pg_read_file (superuser or pg_read_server_files). None when neither is allowed or timeline is 1."""
    if timeline <= 1:
        return None
    repl = type("ReplicationDb", (), {"dsn": make_conninfo(_dsn_of(db), replication="database"),
                                      "password": getattr(db, "password", None)})()
    try:
        with connect(repl) as conn:
            res = conn.pgconn.exec_(f"TIMELINE_HISTORY {int(timeline)}".encode())
            if res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.ntuples == 1:
                return bytes(res.get_value(0, 1) or b"").decode()
    except (ApplicationError, psycopg.Error) as e:
        _logger().info("TIMELINE_HISTORY on %s: %s; trying pg_read_file", where(db), getattr(e, "message", e))
    try:
        with connect(db) as conn:
            return conn.execute("select pg_read_file(%s)", (f"pg_wal/{timeline:08X}.history",)).fetchone()[0]
    except (ApplicationError, psycopg.Error) as e:
        _logger().info("pg_read_file of the timeline history on %s: %s", where(db), getattr(e, "message", e))
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
        return Divergence(diverged=None, **base, detail=f"the old primary cannot be read ({old.error}): whether it took writes after "
                                                        f"the split is unknown; keep its data until someone has looked")
    if old.role != "primary":
        return Divergence(diverged=None, **base, old_timeline=old.timeline, old_last_lsn=old.replay_lsn,
                          detail=f"{old_region} is a replica (timeline {old.timeline}): it was rebuilt already, or never promoted")
    base.update(old_timeline=old.timeline, old_last_lsn=old.current_lsn)
    if old.timeline == new.timeline:
        return Divergence(diverged=None, **base, detail=f"both servers are primaries on timeline {old.timeline}: no promotion "
                                                        f"separates them (split brain?); compare their data by hand")
    history = timeline_history(new_db, new.timeline or 0)
    split = switch_point(history, old.timeline or 0) if history else None
    if split is None:
        why = "its timeline history cannot be read (grant REPLICATION or pg_read_server_files)" if history is None else \
              f"timeline {new.timeline} does not descend from timeline {old.timeline}"
        return Divergence(diverged=None, **base, detail=f"{new_region}: {why}")
    after = max(0, (lsn_to_int(old.current_lsn) or 0) - (lsn_to_int(split) or 0))
    # Any WAL past the switch point is something the new primary never got (a shutdown checkpoint included:
    # pg_rewind is needed all the same); the transaction count, when the host can tell, says if it was data.
    diverged = after > 0
    detail = (f"{old_region} wrote {after} bytes of WAL on timeline {old.timeline} after {new_region} branched off at {split} "
              f"(old primary at {old.current_lsn})" if diverged else
              f"{old_region} stopped at {old.current_lsn}, not past the switch point {split}: nothing was written after the split")
    return Divergence(diverged=diverged, **base, split_lsn=split, bytes_after_split=after, detail=detail)
