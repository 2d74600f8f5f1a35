"""Online rebuild of a bloated table with pg_repack (https://reorg.github.io/pg_repack/; Debian
`postgresql-15-repack`): the table is copied, its indexes built on the copy, the writes made meanwhile replayed
from a log table, and the two swapped; the table is locked ACCESS EXCLUSIVE only for the short swap, so writers
keep writing. VACUUM FULL or CLUSTER would hold that lock for the whole rewrite.

Guards, before and during each table:
- the extension must be installed in the database (`CREATE EXTENSION pg_repack`) and the worker must have the
  `pg_repack` client of the same version; otherwise the table is skipped, saying which command installs it;
- the table needs a primary key or a unique index on NOT NULL columns (pg_repack's own requirement): skipped;
- replication lag: a rebuild writes the whole table to WAL again, so no table starts while a replica lags more
  than `guards.max_replication_lag` (waiting up to `guards.lag_wait`, then the table is skipped);
- locks: `--wait-timeout=<guards.lock_timeout> --no-kill-backend`: where another session holds a lock the swap
  needs, pg_repack gives up on the table rather than cancel or terminate that session (outcome lock-timeout,
  retried after the others as any locked table is);
- older transactions: before its swap pg_repack waits for every transaction older than its copy to finish
  ("Waiting for N transactions to finish. First PID: P"), on any table; one left open would hold it without
  end. After `guards.transaction_wait` it is interrupted and the table given up (lock-timeout: retried after
  the others, then skipped), the transaction named;
- `guards.statement_timeout` bounds the run; a cancelled activity (abort) or the cutoff interrupts pg_repack
  (SIGINT: it drops its log table and trigger) and what it might have left is cleaned up.
The client runs with the connection's parameters in libpq's environment variables (PGHOST, ..., PGPASSWORD),
never on its command line, where any local user could read the password.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.postgres.connection import connect, sql_errors, where
from activities.postgres.maintenance import beat, earlier_attempt, finished_before, replication_lag_bytes, table_stats
from activities.secrets import resolve
from opsflow.maintenance_models import ItemResult

REPACK_POLL = 1.0
APPLICATION = "pg_repack"  # pg_repack's own application_name: how its sessions are found
def _split_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


INSTALL_CLIENT = "apt-get install postgresql-15-repack (the client and the server's extension, one package)"
# libpq connection parameters and the environment variable that carries each (the client reads them there)
_PG_ENV = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
           "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
           "connect_timeout": "PGCONNECT_TIMEOUT", "options": "PGOPTIONS", "password": "PGPASSWORD",
           "target_session_attrs": "PGTARGETSESSIONATTRS"}


def client_binary() -> str | None:
    """The pg_repack client on this worker (OPSFLOW_PG_REPACK, else the PATH, else Debian's place)."""
    for candidate in (os.environ.get("OPSFLOW_PG_REPACK"), shutil.which("pg_repack"), "/usr/bin/pg_repack"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def client_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else out.strip()


def client_env(db: Any) -> dict[str, str]:
    """The environment the client connects with: the DSN's parameters and the password, as libpq variables."""
    env = dict(os.environ)  # the worker's own libpq settings (PGSSLMODE, PGOPTIONS...) as its connections have
    for key, value in conninfo_to_dict(db.dsn).items():
        if key in _PG_ENV and value is not None:
            env[_PG_ENV[key]] = str(value)
    secret = resolve(db.password) if getattr(db, "password", None) is not None else None
    if secret is not None:
        env["PGPASSWORD"] = secret
    env["PGAPPNAME"] = APPLICATION
    return env


def preconditions(conn: psycopg.Connection, table: str, binary: str | None) -> str | None:
    """Why pg_repack cannot rebuild this table here (the command that fixes it), or None."""
    row = conn.execute("select extversion from pg_extension where extname = 'pg_repack'").fetchone()
    if row is None:
        available = conn.execute(
            "select default_version from pg_available_extensions where name = 'pg_repack'"
        ).fetchone()
        fix = ("run `CREATE EXTENSION pg_repack;` in this database" if available else
               f"install pg_repack on the database server ({INSTALL_CLIENT}; Azure: allow-list PG_REPACK in the "
               "azure.extensions server parameter; RDS: it is a supported extension), then run "
               "`CREATE EXTENSION pg_repack;` in this database")
        return f"the pg_repack extension is not installed in database {conn.info.dbname}: {fix}"
    if binary is None:
        return f"the pg_repack client is not installed on this worker: {INSTALL_CLIENT}, or set OPSFLOW_PG_REPACK"
    ours = client_version(binary)
    if ours != row[0]:
        return (f"the worker's pg_repack client is {ours} but the database's extension is {row[0]}: they must match "
                f"(`ALTER EXTENSION pg_repack UPDATE;` or install client {row[0]})")
    schema, name = _split_table(table)
    keyed = conn.execute(
        """
        select exists (select 1 from pg_index i join pg_class c on c.oid = i.indrelid
                         join pg_namespace n on n.oid = c.relnamespace
                        where n.nspname = %s and c.relname = %s and i.indisvalid and i.indpred is null
                          and (i.indisprimary or (i.indisunique and not exists (
                                select 1 from pg_attribute a where a.attrelid = c.oid
                                   and a.attnum = any(i.indkey::int2[]) and not a.attnotnull))))
        """,
        (schema, name),
    ).fetchone()[0]
    if not keyed:
        return (f"table {table} has no primary key nor unique index on NOT NULL columns, which pg_repack needs "
                "to replay the writes made during the rebuild")
    return None


def wait_for_lag(db: Any, guards: Any, item: Any, started: float, before: Any) -> str | None:
    """Wait (heartbeating) until every replica lags at most max_replication_lag; why not within lag_wait."""
    deadline = time.monotonic() + guards.lag_wait
    while True:
        lags = replication_lag_bytes(db)
        over = {r: lag for r, lag in lags.items() if lag > guards.max_replication_lag}
        if not over:
            return None
        beat(item, f"waiting for replication lag under {guards.max_replication_lag} bytes: {over}", started, before)
        if time.monotonic() >= deadline:
            return (f"replication lag above {guards.max_replication_lag} bytes for {guards.lag_wait:g}s before the "
                    "rebuild: " + ", ".join(f"{r} {lag}" for r, lag in over.items()))
        if activity.in_activity() and activity.is_cancelled():
            raise CancelledError("activity cancelled")
        time.sleep(1)


_WAITING = re.compile(r"Waiting for (\d+) transactions? to finish\. First PID: (\d+)")


def _holder(conn: psycopg.Connection, pid: int) -> str:
    row = conn.execute(
        "select state, now() - xact_start, left(query, 80), application_name from pg_stat_activity where pid = %s",
        (pid,),
    ).fetchone()
    if row is None:
        return f"pid {pid}"
    state, age, text, app = row
    return f"pid {pid} ({app or 'no application_name'}, {state}, transaction open {age}, last query: {text})"


def _still_waiting(conn: psycopg.Connection) -> bool:
    """Whether pg_repack is still in its loop of waiting for older transactions (it alternates repack_apply and
    the virtualxid check until they end, then goes on to lock and swap)."""
    try:
        return bool(conn.execute(
            "select exists (select 1 from pg_stat_activity where application_name = %s and datname = "
            "current_database() and (query like '%%virtualxid%%' or query like '%%repack_apply%%'))",
            (APPLICATION,),
        ).fetchone()[0])
    except psycopg.Error:
        return True


REPACK_LOCK_KEY = 16185446  # pg_repack's advisory lock per table: (16185446, -2147483648 + relid)


def _running_repack(conn: psycopg.Connection, table: str) -> tuple[int, int] | None:
    """(pid, relfilenode) of a pg_repack already rebuilding this table (its advisory lock), or None: what an
    earlier attempt left running when its worker died (the client runs in its own session and goes on)."""
    schema, name = _split_table(table)
    return conn.execute(
        """
        select l.pid, c.relfilenode from pg_class c join pg_namespace n on n.oid = c.relnamespace
          join pg_locks l on l.locktype = 'advisory' and l.classid = %s and l.objsubid = 2 and l.granted
                         and l.objid::bigint = (c.oid::bigint + 2147483648) %% 4294967296
         where n.nspname = %s and c.relname = %s
        """,
        (REPACK_LOCK_KEY, schema, name),
    ).fetchone()


def _wait_for_running(conn: psycopg.Connection, item: Any, guards: Any, started: float, poll: float,
                      before: Any) -> str | None:
    """Wait, heartbeating, for a pg_repack already rebuilding the table to end, instead of starting a second one
    (which would fail on its lock, or rebuild the table twice). Returns what happened, or None when none ran.
    An abort cancels it (pg_cancel_backend: the client stops and cleans up)."""
    found = _running_repack(conn, item.table)
    if found is None:
        return None
    pid = found[0]
    at_start = table_stats(conn, item.table)
    while (now := _running_repack(conn, item.table)) is not None:
        line = _progress(conn)
        beat(item, f"waiting for the pg_repack already rebuilding {item.table} (pid {pid}): {line or 'running'}",
             started, before)
        if activity.in_activity() and activity.is_cancelled():
            conn.execute("select pg_cancel_backend(%s)", (now[0],))
            raise CancelledError("activity cancelled")
        if time.monotonic() - started > guards.statement_timeout:
            return f"timeout: the pg_repack already running (pid {pid}) ran over {guards.statement_timeout:g}s"
        time.sleep(poll)
    if finished_before("repack", table_stats(conn, item.table), at_start):
        return f"done: waited {time.monotonic() - started:.1f}s for the pg_repack already rebuilding it (pid {pid}), " \
               "which finished the rebuild: not run again"
    return f"again: waited {time.monotonic() - started:.1f}s for the pg_repack already running (pid {pid}); it " \
           "ended without the swap: run again"


def _progress(conn: psycopg.Connection) -> str:
    row = conn.execute(
        "select state, wait_event_type, left(query, 80) from pg_stat_activity where application_name = %s "
        "and datname = current_database() and state <> 'idle' order by query_start limit 1",
        (APPLICATION,),
    ).fetchone()
    return "" if row is None else f"{row[0]}{' (waiting: ' + row[1] + ')' if row[1] else ''}: {row[2]}"


def _leftovers(conn: psycopg.Connection, table: str) -> list[str]:
    """Drop what an interrupted pg_repack left on the table (its trigger and log table), as the client itself
    does on cleanup (repack.repack_drop); return what was dropped."""
    schema, name = _split_table(table)
    row = conn.execute(
        "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s",
        (schema, name),
    ).fetchone()
    if row is None:
        return []
    oid = row[0]
    found = conn.execute(
        "select (select count(*) from pg_trigger where tgrelid = %s and tgname = 'repack_trigger') + "
        "(select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        " where n.nspname = 'repack' and c.relname in (%s, %s))",
        (oid, f"log_{oid}", f"table_{oid}"),
    ).fetchone()[0]
    if not found:
        return []
    conn.execute("select repack.repack_drop(%s, 4)", (oid,))
    return [f"pg_repack trigger and log of {table}"]


def repack_table(
    db: Any, item: Any, guards: Any, *, cancel_at: datetime | None = None, poll: float = REPACK_POLL
) -> Any:
    """Rebuild item.table online with pg_repack under the guards; the ItemResult has the statistics (and the
    measured bloat) before and after. Outcomes: done, skipped (a precondition or the lag guard, said in the
    detail), lock-timeout (--wait-timeout ran out: retried later), statement-timeout, cancelled-at-cutoff."""
    started = time.monotonic()
    result = ItemResult(key=item.key, kind=item.kind, table=item.table, outcome="done", reason=item.reason)
    binary = client_binary()
    watch = connect(db)
    try:
        with sql_errors(db, f"pg_repack {item.table}"):
            watch.execute("select set_config('lock_timeout', %s, false)", (f"{int(guards.lock_timeout * 1000)}ms",))
            result.before = table_stats(watch, item.table, bloat=True)
            if result.before is None:
                raise ApplicationError(f"table {item.table} does not exist on {where(db)}", type="BadInput",
                                       non_retryable=True)
            why = preconditions(watch, item.table, binary)
            # A retry after a worker died mid-rebuild: its pg_repack runs on (its own session and process). Wait for
            # it; or, gone already, tell by the table whether it finished (the statistics that attempt heartbeated).
            prior, since = earlier_attempt()
            if prior is not None:
                result.before = prior
            waited = _wait_for_running(watch, item, guards, started, poll, result.before) if why is None else None
            if (waited is None and why is None and (prior or since)
                    and finished_before(item.kind, table_stats(watch, item.table), prior, since)):
                waited = "done: the previous attempt's pg_repack finished after its worker stopped: not run again"
            if waited is not None and not waited.startswith("again: "):
                outcome, _, result.detail = waited.partition(": ")
                result.outcome = "done" if outcome == "done" else "statement-timeout"
                result.after = table_stats(watch, item.table, bloat=True)
                result.seconds = time.monotonic() - started
                return result
            if why is None:
                why = wait_for_lag(db, guards, item, started, result.before)
            if why is not None:
                result.outcome, result.detail = "skipped", why
                result.seconds = time.monotonic() - started
                return result
        assert binary is not None
        argv = [binary, "--table", item.table, "--wait-timeout", str(max(1, round(guards.lock_timeout))),
                "--no-kill-backend"]
        if not watch.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]:
            argv.append("--no-superuser-check")  # Azure's and RDS's admin roles are not superusers
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(argv, env=client_env(db), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # a Ctrl-C to the worker is not the rebuild's
            stopped_by: str | None = None
            seen = 0  # how much of the client's output was read
            waiting_since: float | None = None  # since when it has been waiting for older transactions
            holder = ""
            waits: list = []
            try:
                while proc.poll() is None:
                    fresh = os.pread(out.fileno(), 1 << 16, seen)
                    seen += len(fresh)
                    waits = _WAITING.findall(fresh.decode(errors="replace")) or waits
                    if waits and waiting_since is None and fresh:
                        waiting_since = time.monotonic()
                    elif waiting_since is not None and not _still_waiting(watch):
                        waiting_since, waits = None, []  # the older transactions ended: it moved on to the swap
                    if (stopped_by is None and waiting_since is not None
                            and time.monotonic() - waiting_since > guards.transaction_wait):
                        stopped_by = "transactions"
                        try:
                            holder = _holder(watch, int(waits[-1][1]) if waits else 0)
                        except psycopg.Error:
                            holder = ""
                        proc.send_signal(signal.SIGINT)
                    try:
                        line = _progress(watch)
                    except psycopg.Error:
                        line = ""
                    if waiting_since is not None:
                        line = (f"waiting {time.monotonic() - waiting_since:.0f}s for older transactions to finish "
                                f"(first pid {waits[-1][1] if waits else '?'}; "
                                f"gives up after {guards.transaction_wait:g}s)")
                    beat(item, f"pg_repack: {line or 'running'}", started, result.before)
                    if activity.in_activity() and activity.is_cancelled():
                        raise CancelledError("activity cancelled")
                    if stopped_by is None and cancel_at is not None and datetime.now(timezone.utc) >= cancel_at:
                        stopped_by = "cutoff"
                        proc.send_signal(signal.SIGINT)
                    if stopped_by is None and time.monotonic() - started > guards.statement_timeout:
                        stopped_by = "timeout"
                        proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(poll)
                    except subprocess.TimeoutExpired:
                        pass
            except (CancelledError, KeyboardInterrupt):
                _interrupt(proc)
                _leftovers(watch, item.table)
                raise
            out.seek(0)
            text = out.read().decode(errors="replace")
        result.seconds = time.monotonic() - started
        last = " ".join(line.strip() for line in text.strip().splitlines()[-3:])
        if stopped_by is not None:
            _interrupt(proc)
            try:
                dropped = _leftovers(watch, item.table)
            except psycopg.Error as e:
                dropped = [f"nothing: its trigger and log could not be dropped yet ({str(e).strip()})"]
            result.outcome = {"cutoff": "cancelled-at-cutoff", "transactions": "lock-timeout"}.get(
                stopped_by, "statement-timeout")
            result.detail = {
                "cutoff": "interrupted at the window's cutoff",
                "transactions": f"pg_repack waited over {guards.transaction_wait:g}s (transaction_wait) for older "
                                f"transactions to finish, held by {holder or 'an open transaction'}: interrupted",
            }.get(stopped_by, f"pg_repack ran over {guards.statement_timeout:g}s: interrupted") + (
                f"; dropped {', '.join(dropped)}" if dropped else "")
        elif "due to timeout" in text or "Another pg_repack command may be running" in text:
            result.outcome = "lock-timeout"
            result.detail = (f"a lock was not granted within {guards.lock_timeout:g}s (--wait-timeout, "
                             f"--no-kill-backend: no session was cancelled): {last}")
        elif proc.returncode != 0:
            raise ApplicationError(f"pg_repack {item.table} on {where(db)} exited {proc.returncode}: {last}",
                                   type="RepackFailed")
        with sql_errors(db, f"statistics of {item.table}"):
            result.after = table_stats(watch, item.table, bloat=True)
        if result.outcome == "done":
            b, a = result.before, result.after
            result.detail = (f"rebuilt online in {result.seconds:.1f}s: table+indexes "
                             f"{b.table_bytes + b.index_bytes} -> {a.table_bytes + a.index_bytes} bytes")
        return result
    finally:
        try:
            watch.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def _interrupt(proc: subprocess.Popen) -> None:
    """SIGINT (pg_repack cleans up its trigger and log table), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
