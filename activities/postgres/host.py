"""The host of a self-managed PostgreSQL server (provider "postgres" with `host` in the inventory): a switchover
without a rebuild, in the spirit of CloudNativePG's demotion token.

The old primary (fenced) is shut down cleanly; its shutdown checkpoint ("Latest checkpoint location" in
pg_controldata) is the last WAL record it wrote. A standby that has replayed past it holds every byte, so after its
promotion the old primary can start as its standby (standby.signal + primary_conninfo) with no pg_rewind and no base
backup: its WAL ends exactly where the new timeline forks. When that cannot be proven (no clean shutdown, the replica
does not get there in time) the old primary is started again as it was (fenced) and the failover takes the
standalone path; the failback then rebuilds.

pg_ctl and pg_controldata run through the inventory's command prefix (`host.run`, e.g. ssh; [] on the worker's own
host), as the server's OS user, each bounded by `host.command_timeout` and heartbeating while it runs. Nothing
here holds a secret: primary_conninfo is the replica's own, pointed at the new primary (a password in it stays on
the database hosts).
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.commands import run_bounded
from activities.context import heartbeat, sleep_or_cancelled
from activities.postgres.connection import connect, dsn_of, redact, sql_errors, where
from activities.postgres.server import sql_status, sql_streams_from
from opsflow.models import DbStatus, RegionTarget, ShutdownResult, lsn_to_int

POLL = 0.05
CLEAN = ("shut down", "shut down in recovery")  # pg_controldata's states after a clean shutdown


def host_of(target: RegionTarget) -> Any:
    db = target.database
    host = getattr(db, "host", None) if db.provider == "postgres" else None
    if host is None:
        raise ApplicationError(
            f"{target.region}: the inventory gives no host access for this database (database.host: run, data_dir); "
            "a switchover without a rebuild needs it",
            type="HostAccessMissing",
            non_retryable=True,
        )
    return host


def _host_env() -> dict[str, str]:
    # The worker's environment (ssh finds its keys) without PG* variables; C locale: pg_controldata's field names.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C")
    env.pop("LANG", None)
    return env


def run_on_host(host: Any, args: list[str], what: str, *, timeout: float | None = None,
                input: str | None = None) -> subprocess.CompletedProcess:
    """Run a program on the database's host through the inventory's prefix, heartbeating; bounded (by `timeout`,
    default host.command_timeout). `input` (small: a configuration file's lines) is written to its stdin. The output
    goes to a temporary file, not a pipe: a long one (pg_waldump's) never blocks the program."""
    limit = host.command_timeout if timeout is None else timeout
    p = run_bounded([*host.run, *args], what, limit, env=_host_env(), input=input, poll=0.1)
    return subprocess.CompletedProcess(p.args, p.returncode, redact(p.stdout, None), None)


def _check(p: subprocess.CompletedProcess, what: str) -> str:
    if p.returncode != 0:
        tail = " | ".join(line for line in p.stdout.strip().splitlines()[-3:])
        raise ApplicationError(f"{what}: exit {p.returncode}: {tail}", type="HostCommandFailed")
    return p.stdout


def _tool(host: Any, name: str) -> str:
    return f"{host.bin_dir.rstrip('/')}/{name}"


def _pg_ctl_dir(host: Any) -> str:
    # pg_ctl finds the data directory from a configuration-only directory itself (postgres -C data_directory)
    return host.config_dir or host.data_dir


def server_running(host: Any) -> bool:
    """pg_ctl status: 0 running, 3 not running; 4 (no data directory) is an inventory error."""
    p = run_on_host(host, [_tool(host, "pg_ctl"), "status", "-D", _pg_ctl_dir(host)], "pg_ctl status")
    if p.returncode == 4:
        raise ApplicationError(f"pg_ctl status: {host.data_dir} is not a data directory on the host",
                               type="HostConfig", non_retryable=True)
    if p.returncode not in (0, 3):
        _check(p, "pg_ctl status")
    return p.returncode == 0


def controldata(host: Any) -> dict[str, str]:
    out = _check(run_on_host(host, [_tool(host, "pg_controldata"), "-D", host.data_dir], "pg_controldata"),
                 "pg_controldata")
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def start_server(host: Any) -> None:
    """pg_ctl start -w (idempotent): returns once it accepts connections (a hot standby: once consistent)."""
    if server_running(host):
        return
    log = host.log_file or f"{host.data_dir.rstrip('/')}/opsflow-pg_ctl.log"
    timeout = str(max(1, int(host.command_timeout) - 5))
    _check(run_on_host(host, [_tool(host, "pg_ctl"), "start", "-D", _pg_ctl_dir(host), "-l", log, "-w", "-t", timeout],
                       "pg_ctl start"), "pg_ctl start")


def stop_server(host: Any) -> None:
    """pg_ctl stop -m fast -w: sessions ended, a shutdown checkpoint written and sent to the standbys."""
    timeout = str(max(1, int(host.command_timeout) - 5))
    args = [_tool(host, "pg_ctl"), "stop", "-D", _pg_ctl_dir(host), "-m", "fast", "-w", "-t", timeout]
    _check(run_on_host(host, args, "pg_ctl stop"), "pg_ctl stop")


# -- the activities' bodies ---------------------------------------------------------------------------------------


def shut_down_for_switchover(target: RegionTarget, replica: RegionTarget, timeout: float) -> ShutdownResult:
    """Shut the fenced old primary down cleanly and prove that `replica` has replayed past its shutdown checkpoint.
    Not proven (no clean shutdown, or the replica does not get there within `timeout`): the old primary is started
    again as it was (a fenced primary) and proven=False says why. Idempotent: a cleanly stopped server is read."""
    host, db, t0 = host_of(target), target.database, time.monotonic()
    if server_running(host):
        with connect(db) as conn, sql_errors(db, "shutdown"):
            if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                raise ApplicationError(f"{target.region} ({where(db)}) is a replica, not the primary to shut down",
                                       type="NotPrimary", non_retryable=True)
            try:
                conn.execute("checkpoint")  # most dirty pages written now: the shutdown checkpoint is short
            except psycopg.errors.InsufficientPrivilege:
                pass
        stop_server(host)
    fields = controldata(host)
    state = fields.get("Database cluster state", "?")

    def not_proven(why: str, replay: str | None = None) -> ShutdownResult:
        start_server(host)  # today's path: the old primary runs again, fenced; the failover promotes standalone
        return ShutdownResult(proven=False, checkpoint_lsn=fields.get("Latest checkpoint location"), replay_lsn=replay,
                              seconds=round(time.monotonic() - t0, 3), detail=why)

    if state not in CLEAN:
        return not_proven(f"{target.region} was not shut down cleanly (pg_controldata: {state!r}): no shutdown "
                          "checkpoint proves the replica has every byte")
    checkpoint = fields["Latest checkpoint location"]
    want, replay, last = lsn_to_int(checkpoint) or 0, None, "not read yet"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(replica.database, connect_timeout=3) as conn:
                in_recovery, replay = conn.execute(
                    "select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text").fetchone()
            if not in_recovery:
                return not_proven(f"{replica.region} is not in recovery: it cannot be proven to hold {checkpoint}")
            if (lsn_to_int(replay) or 0) > want:
                return ShutdownResult(proven=True, checkpoint_lsn=checkpoint, replay_lsn=replay,
                                      seconds=round(time.monotonic() - t0, 3),
                                      detail=f"{replica.region} replayed {replay}, past the shutdown checkpoint "
                                             f"{checkpoint} of {target.region}")
            last = f"replayed {replay}"
        except ApplicationError as e:
            if e.non_retryable:
                raise
            last = e.message
        if time.monotonic() > deadline:
            return not_proven(f"{replica.region} did not replay past the shutdown checkpoint {checkpoint} of "
                              f"{target.region} within {timeout:.0f}s ({last})", replay)
        heartbeat({"phase": "waiting for the replica to replay the shutdown checkpoint", "checkpoint": checkpoint,
                   "replay": replay})
        sleep_or_cancelled(POLL)


def start_again(target: RegionTarget) -> DbStatus:
    """Start the server as it was (idempotent): the undo of a shutdown, before any promotion."""
    start_server(host_of(target))
    return sql_status(target.database, target.region)


def replication_conninfo(primary: RegionTarget, application_name: str) -> str:
    """How the old primary reaches the new one: the new primary's own primary_conninfo (the replication role and
    its settings, as it used them as a replica), pointed at the new primary's host and port from the inventory.
    Without one readable: the inventory's DSN (user, host, port; a password then comes from the host's .pgpass)."""
    target = conninfo_to_dict(dsn_of(primary.database))
    own = ""
    try:
        with connect(primary.database) as conn:
            row = conn.execute("select setting from pg_settings where name = 'primary_conninfo'").fetchone()
            own = (row[0] if row else "") or ""
    except (ApplicationError, psycopg.Error):
        own = ""
    params = {k: v for k, v in conninfo_to_dict(own).items() if k not in ("host", "hostaddr", "port", "dbname")} \
        if own else {k: v for k, v in target.items() if k in ("user", "sslmode", "sslrootcert")}
    for key in ("host", "hostaddr", "port"):
        if target.get(key):
            params[key] = target[key]
    params["application_name"] = application_name
    return make_conninfo("", **params)


def follow(target: RegionTarget, primary: RegionTarget, timeout: float) -> DbStatus:
    """Start the cleanly shut down old primary as a standby of `primary` and wait until it streams from it; the
    fence is lifted (a standby takes no writes; a switchover back must find it writable). Idempotent: a standby
    already streaming from `primary` is only checked. Refused (non-retryable) when it runs as a primary or was
    not shut down cleanly: then it may hold WAL the new primary lacks, and only a rebuild is safe."""
    host, db = host_of(target), target.database
    if server_running(host):
        with connect(db) as conn, sql_errors(db, "follow"):
            if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                raise ApplicationError(
                    f"{target.region} runs as a primary: it cannot follow {primary.region} without a rewind "
                    "(fail back with a rebuild)", type="FollowRefused", non_retryable=True)
    else:
        state = controldata(host).get("Database cluster state", "?")
        if state not in CLEAN:
            raise ApplicationError(
                f"{target.region} was not shut down cleanly (pg_controldata: {state!r}): it may hold WAL "
                f"{primary.region} lacks; rebuild it", type="FollowRefused", non_retryable=True)
        _check(run_on_host(host, ["touch", f"{host.data_dir.rstrip('/')}/standby.signal"], "standby.signal"),
               "standby.signal")
        start_server(host)
    conninfo = replication_conninfo(primary, target.region)
    with connect(db) as conn, sql_errors(db, "follow"):
        conn.execute(sql.SQL("alter system set primary_conninfo = {}").format(sql.Literal(conninfo)))
        conn.execute("alter system reset primary_slot_name")
        conn.execute("alter system reset default_transaction_read_only")
        conn.execute("select pg_reload_conf()")
    deadline, last = time.monotonic() + timeout, "not read yet"
    while True:
        try:
            if sql_streams_from(db, primary.database):
                status = sql_status(db, target.region)
                if not status.read_only:
                    return status
                last = "still read-only (the reload has not reached it)"
            else:
                last = "not streaming yet"
        except ApplicationError as e:
            if e.non_retryable:
                raise
            last = e.message
        if time.monotonic() > deadline:
            raise ApplicationError(f"{target.region} does not stream from {primary.region} after {timeout:.0f}s "
                                   f"({last})", type="NotStreaming")
        heartbeat({"phase": "waiting to stream", "last": last})
        sleep_or_cancelled(0.1)
