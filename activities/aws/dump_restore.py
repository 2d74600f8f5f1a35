"""The restore drill's dump restore: `S3DumpRestore` (RestoreProvider, method "s3-dump") restores a `pg_dump -Fc`
object from S3 into a scratch database with pg_restore; `upload_dump` puts a dump there."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import make_conninfo
from temporalio.exceptions import ApplicationError

from activities.aws.session import aws_errors, client, utc
from activities.context import heartbeat as _heartbeat
from activities.context import sleep_or_cancelled as _sleep
from activities.postgres.connection import connect, sql_errors, where
from activities.secrets import resolve
from opsflow.inventory import AwsConnection
from opsflow.models import RestoreRequest, RestoreWindow, ScratchTarget

log = logging.getLogger(__name__)


DUMP_TIME_METADATA = "opsflow-dump-time"


def upload_dump(
    conn: AwsConnection | None, bucket: str, key: str, dump_file: str | Path, dump_time: datetime | None = None
) -> str:
    """Put a `pg_dump -Fc` file into s3://bucket/key (multipart when large); returns that URL.

    `dump_time` (when the dump's snapshot was taken; default: the file's modification time) goes into the
    object's metadata as `opsflow-dump-time`: S3DumpRestore takes it as the restore point, which is more exact
    than the object's LastModified (the end of the upload)."""
    key = key.lstrip("/")
    path = Path(dump_file)
    when = utc(dump_time) if dump_time else datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    extra = {"Metadata": {DUMP_TIME_METADATA: when.isoformat()}, "ContentType": "application/octet-stream"}
    with aws_errors(f"S3 object s3://{bucket}/{key}"):
        client(conn, "s3").upload_file(str(path), bucket, key, ExtraArgs=extra)
    return f"s3://{bucket}/{key}"


class S3Dumps:
    """The dumps under drill.dumps (bucket/prefix), for the dump restores (PostgreSQL here, MySQL in
    activities/mysql.py): listed, dated, picked for a point, downloaded with heartbeats."""

    POLL = 1.0

    def __init__(self, request: RestoreRequest):
        drill = request.drill
        if drill.dumps is None:
            raise ApplicationError(f"restore method {request.method} needs drill.dumps (bucket/prefix)",
                                   type="BadInput", non_retryable=True)
        self.request = request
        self.bucket = drill.dumps.bucket
        self.prefix = drill.dumps.prefix.lstrip("/")
        self.conn = request.source.aws or AwsConnection()

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _s3(self) -> Any:
        return client(self.conn, "s3")

    # dumps --------------------------------------------------------------------------------------------
    def objects(self) -> list[dict[str, Any]]:
        objs: list[dict[str, Any]] = []
        with aws_errors(f"S3 dumps under {self.where}"):
            for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                objs += [o for o in page.get("Contents", []) if o.get("Size", 0) > 0 and not o["Key"].endswith("/")]
        if not objs:
            raise ApplicationError(f"no dumps under {self.where}", type="RestoreUnavailable", non_retryable=True)
        return sorted(objs, key=lambda o: (o["LastModified"], o["Key"]))

    def dump_time(self, obj: dict[str, Any]) -> datetime:
        with aws_errors(f"S3 object s3://{self.bucket}/{obj['Key']}"):
            meta = self._s3().head_object(Bucket=self.bucket, Key=obj["Key"]).get("Metadata", {}) or {}
        text = meta.get(DUMP_TIME_METADATA)
        if text:
            try:
                return utc(datetime.fromisoformat(text))
            except ValueError:
                log.warning(
                    "s3://%s/%s: unreadable %s metadata %r; using LastModified",
                    self.bucket,
                    obj["Key"],
                    DUMP_TIME_METADATA,
                    text,
                )
        return utc(obj["LastModified"])

    def window(self) -> RestoreWindow:
        objs = self.objects()
        newest = objs[-1]
        latest = self.dump_time(newest)
        earliest = self.dump_time(objs[0]) if len(objs) > 1 else latest
        return RestoreWindow(
            earliest=min(earliest, latest),
            latest=latest,
            detail=f"s3://{self.bucket}/{newest['Key']} ({newest.get('Size', 0)} bytes; {len(objs)} dump(s))",
        )

    def pick(self, point: datetime) -> tuple[dict[str, Any], datetime]:
        point = utc(point)
        for obj in reversed(self.objects()):
            when = self.dump_time(obj)
            if when <= point:
                return obj, when
        raise ApplicationError(
            f"no dump under {self.where} was taken at or before {point.isoformat()}",
            type="RestoreUnavailable",
            non_retryable=True,
        )

    def download(self, bucket: str, key: str, path: Path, size: int) -> None:
        """boto3's threaded download in a helper thread; this (the activity's) thread heartbeats the progress."""
        seen = [0]
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with aws_errors(f"S3 object s3://{bucket}/{key}"):
                    self._s3().download_file(
                        bucket, key, str(path), Callback=lambda n: seen.__setitem__(0, seen[0] + n)
                    )
            except BaseException as e:  # noqa: BLE001 - re-raised in the activity's thread
                failure.append(e)

        t = threading.Thread(target=run, name=f"download-{key}", daemon=True)
        t.start()
        while True:
            _heartbeat({"phase": "download", "key": key, "bytes": seen[0], "of": size})
            t.join(timeout=self.POLL)
            if not t.is_alive():
                break
        if failure:
            raise failure[0]


class S3DumpRestore(S3Dumps):
    """RestoreProvider for method "s3-dump": the newest `pg_dump -Fc` object under drill.dumps (bucket/prefix),
    restored with pg_restore into a new database named like the scratch target on drill.scratch_server.

    Dumps: every non-empty object under the prefix. A dump's time is its `opsflow-dump-time` metadata (set by
    upload_dump: when the dump's snapshot was taken), else its LastModified. window(): earliest = the oldest
    dump's time, latest = the newest's. A requested point picks the newest dump at or before it.

    start() is quick (it fits the drill's short start step): it picks the dump, creates the empty database and
    records the choice in the database's comment (`opsflow-restore {json}`). status(), called by restore.wait
    with its long timeout and heartbeats, does the work: under a PostgreSQL advisory lock on the scratch server
    (held by the session of the worker doing it, so it ends with that worker) it downloads the object, drops
    and recreates the database, runs pg_restore (--no-owner --no-acl --exit-on-error, -j up to 4), heartbeating,
    and marks the database complete in its comment. Another worker's status() meanwhile says "restoring"; a
    worker that died leaves no lock, and the next status() starts over. The database is ready when marked
    complete. pg_restore must be installed on the worker (postgresql-client; OPSFLOW_PG_RESTORE overrides the
    path); the scratch server's password comes from drill.scratch_server.password, passed as PGPASSWORD.

    delete(): terminate the database's sessions and DROP DATABASE (WITH (FORCE) on PostgreSQL 13+).
    list_scratch(): databases with the prefix that carry the opsflow-restore comment (no other is touched).
    """

    METHOD = "s3-dump"
    MARKER = "opsflow-restore "

    def __init__(self, request: RestoreRequest):
        if request.drill.dumps is None or request.drill.scratch_server is None:
            raise ApplicationError(
                "restore method s3-dump needs drill.dumps (bucket/prefix) and drill.scratch_server (dsn)",
                type="BadInput",
                non_retryable=True,
            )
        super().__init__(request)
        self.server = request.drill.scratch_server

    # the scratch database -----------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name.encode()) > 63 or not all(c.isalnum() or c in "-_" for c in name):
            raise ApplicationError(
                f"scratch database name {name!r}: use up to 63 letters, digits, '-' and '_'",
                type="BadInput",
                non_retryable=True,
            )

    def _connect(self):
        return connect(self.server, connect_timeout=10)

    def _info(self, conn, name: str) -> dict[str, Any] | None:
        """The database's opsflow-restore record; None when the database does not exist, {} when it has none."""
        row = conn.execute(
            "select shobj_description(oid, 'pg_database') from pg_database where datname = %s", (name,)
        ).fetchone()
        if row is None:
            return None
        text = row[0] or ""
        if not text.startswith(self.MARKER):
            return {}
        try:
            return json.loads(text[len(self.MARKER) :])
        except ValueError:
            return {}

    def _mark(self, conn, name: str, info: dict[str, Any]) -> None:
        conn.execute(
            sql.SQL("comment on database {} is {}").format(
                sql.Identifier(name), sql.Literal(self.MARKER + json.dumps(info))
            )
        )

    def _drop(self, conn, name: str) -> None:
        conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (name,),
        )
        force = conn.info.server_version >= 130000
        conn.execute(
            sql.SQL("drop database if exists {}" + (" with (force)" if force else "")).format(sql.Identifier(name))
        )

    def _scratch_dsn(self, name: str) -> str:
        return make_conninfo(self.server.dsn, dbname=name)

    def _target(self, name: str, info: dict[str, Any], ready: bool, detail: str) -> ScratchTarget:
        point = None
        if info.get("dump_time"):
            point = utc(datetime.fromisoformat(info["dump_time"]))
        return ScratchTarget(
            name=name,
            method=self.METHOD,
            ready=ready,
            dsn=self._scratch_dsn(name) if ready else None,
            restore_point=point,
            detail=detail,
        )

    def start(self, name: str, point: datetime) -> ScratchTarget:
        self._check_name(name)
        with self._connect() as conn, sql_errors(self.server, f"start restore into {name}"):
            info = self._info(conn, name)
            if info is None or not info.get("key"):
                obj, when = self.pick(point)
                info = {
                    "state": "pending",
                    "bucket": self.bucket,
                    "key": obj["Key"],
                    "etag": obj.get("ETag", "").strip('"'),
                    "size": obj.get("Size"),
                    "dump_time": when.isoformat(),
                    "environment": self.request.scratch_environment,
                    "run": self.request.run_id or None,
                }
                try:
                    conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
                except pgerrors.DuplicateDatabase:
                    pass  # a concurrent attempt, or one that died before marking it: the record below is ours now
                self._mark(conn, name, info)
            complete = info.get("state") == "complete"
            return self._target(
                name,
                info,
                complete,
                f"{'restored' if complete else 'to restore'} from s3://{info['bucket']}/{info['key']}",
            )

    def status(self, name: str) -> ScratchTarget:
        self._check_name(name)
        with self._connect() as conn, sql_errors(self.server, f"restore into {name}"):
            info = self._info(conn, name)
            if info is None or not info.get("key"):
                if self.request.point_in_time is None:
                    raise ApplicationError(
                        f"scratch database {name} does not exist on {where(self.server)}",
                        type="AwsNotFound",
                        non_retryable=True,
                    )
                self.start(name, self.request.point_in_time)
                info = self._info(conn, name) or {}
            if info.get("state") == "complete":
                return self._target(name, info, True, f"restored from s3://{info['bucket']}/{info['key']}")
            lock_key = f"opsflow-restore:{name}"
            if not conn.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key,)).fetchone()[0]:
                return self._target(
                    name, info, False, f"restoring from s3://{info['bucket']}/{info['key']} (another worker)"
                )
            try:
                info = self._info(conn, name) or info
                if info.get("state") != "complete":
                    self._restore(conn, name, info)
                    info = {**info, "state": "complete", "restored_at": datetime.now(timezone.utc).isoformat()}
                    self._mark(conn, name, info)
            finally:
                conn.execute("select pg_advisory_unlock(hashtextextended(%s, 0))", (lock_key,))
            return self._target(name, info, True, f"restored from s3://{info['bucket']}/{info['key']}")

    def _restore(self, conn, name: str, info: dict[str, Any]) -> None:
        binary = _pg_restore_binary()
        key = info["key"]
        tmpdir = Path(tempfile.mkdtemp(prefix="opsflow-dump-"))
        started = time.monotonic()
        try:
            path = tmpdir / "dump"
            self.download(info["bucket"], key, path, int(info.get("size") or 0))
            # A clean database: what a dead attempt restored partly goes.
            self._drop(conn, name)
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
            self._mark(conn, name, {**info, "state": "restoring"})
            target = make_conninfo(self.server.dsn, dbname=name, application_name="opsflow-restore")
            env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
            if self.server.password is not None:
                env["PGPASSWORD"] = resolve(self.server.password)
            jobs = max(1, min(4, os.cpu_count() or 1))
            args = [binary, "--no-owner", "--no-acl", "--exit-on-error", "-j", str(jobs), "-d", target, str(path)]
            with open(tmpdir / "pg_restore.log", "w+b") as out:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=die_with_parent,
                )
                try:
                    while proc.poll() is None:
                        _heartbeat({"phase": "pg_restore", "key": key, "seconds": round(time.monotonic() - started, 1)})
                        _sleep(self.POLL)
                finally:
                    if proc.poll() is None:  # cancelled (heartbeat raised) or interrupted: stop it
                        proc.kill()
                        proc.wait()
                out.seek(0)
                output = out.read().decode(errors="replace")
            if proc.returncode != 0:
                tail = "\n".join(output.strip().splitlines()[-15:])
                kind = (
                    "BadInput"
                    if "input file does not appear to be a valid archive" in output or "unsupported version" in output
                    else "RestoreFailed"
                )
                raise ApplicationError(
                    f"pg_restore of s3://{info['bucket']}/{key} into {name} on {where(self.server)} exited with "
                    f"{proc.returncode}:\n{tail}",
                    type=kind,
                    non_retryable=kind == "BadInput",
                )
            log.info("restored s3://%s/%s into %s in %.1fs", info["bucket"], key, name, time.monotonic() - started)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    # delete / list ------------------------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        self._check_name(name)
        with self._connect() as conn, sql_errors(self.server, f"drop scratch database {name}"):
            info = self._info(conn, name)
            if info is None:
                return False
            env = self.request.scratch_environment
            if not info and not name.startswith(self.request.drill.scratch_prefix):
                raise ApplicationError(
                    f"database {name} on {where(self.server)} is not a drill's scratch database; refusing to drop it",
                    type="Refused",
                    non_retryable=True,
                )
            if info.get("environment") not in (None, env):
                raise ApplicationError(
                    f"database {name} on {where(self.server)} is a scratch database of environment "
                    f"{info['environment']}, not {env}; refusing to drop it",
                    type="Refused",
                    non_retryable=True,
                )
            self._drop(conn, name)
        return True

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        """This environment's scratch databases (marked with it) whose name starts with `prefix`, with their run."""
        with self._connect() as conn, sql_errors(self.server, "list scratch databases"):
            rows = conn.execute(
                "select datname, shobj_description(oid, 'pg_database') from pg_database "
                "where starts_with(datname, %s) and shobj_description(oid, 'pg_database') like %s order by 1",
                (prefix, self.MARKER.replace("%", r"\%").replace("_", r"\_") + "%"),
            ).fetchall()
        found: dict[str, str | None] = {}
        for name, text in rows:
            try:
                info = json.loads(text[len(self.MARKER) :])
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("environment") == self.request.scratch_environment:
                found[name] = info.get("run")
        return found


def _pg_restore_binary() -> str:
    found = os.environ.get("OPSFLOW_PG_RESTORE") or shutil.which("pg_restore")
    if not found:
        raise ApplicationError(
            "pg_restore is not installed on this worker (install the PostgreSQL client, e.g. postgresql-client; or "
            "set OPSFLOW_PG_RESTORE)",
            type="WorkerConfig",
            non_retryable=True,
        )
    return found


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the worker dies, so no orphaned pg_restore keeps writing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the advisory lock and the drop before a restore still hold
        pass
