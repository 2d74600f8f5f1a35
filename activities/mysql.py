"""MySQL/MariaDB, for the restore test of method s3-mysqldump: a scratch server the worker starts for one drill, a
`mysqldump` file from S3 loaded into it, row counts and SQL checks, and the server stopped and its data directory
removed whatever happens (success, a failed check, an error, a cancellation).

Queries go through PyMySQL; the server and the load use the MariaDB (or MySQL) programs on the worker, Debian's
mariadb-server: `mariadbd`, `mariadb-install-db` and the `mariadb` client (OPSFLOW_MARIADBD, OPSFLOW_MARIADB_INSTALL_DB
and OPSFLOW_MARIADB override their paths). Scratch servers live under OPSFLOW_MYSQL_SCRATCH_DIR (default: the
temporary directory's opsflow-mysql), one directory per drill named like its scratch target, with a mark
(environment, run, the dump) that the next drill's leftover cleanup reads."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pymysql
from temporalio.exceptions import ApplicationError

from activities.aws.dump_restore import S3Dumps, die_with_parent
from activities.aws.session import utc
from activities.context import check_cancelled, heartbeat, sleep_or_cancelled
from activities.secrets import resolve
from opsflow.inventory import MysqlSource
from opsflow.models import CheckResult, MysqlRestoreResult, RestoreRequest, RestoreWindow, ScratchTarget

SCRATCH_DIR_ENV = "OPSFLOW_MYSQL_SCRATCH_DIR"
MARK = "opsflow-scratch.json"


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_DIR_ENV) or Path(tempfile.gettempdir()) / "opsflow-mysql")


def program(name: str, env: str, *places: str) -> str:
    found = os.environ.get(env) or shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)
    if not found:
        raise ApplicationError(f"{name} is not installed on this worker (install mariadb-server, or set {env})",
                               type="WorkerConfig", non_retryable=True)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def quote(name: str) -> str:
    """A table name (`table` or `schema.table`) quoted for MySQL."""
    return ".".join("`" + part.replace("`", "``") + "`" for part in name.split("."))


class ScratchServer:
    """A MariaDB/MySQL server of its own for one drill: data directory `root/name/data`, a free loopback port,
    root without a password on loopback only. stop() works from a fresh object too (after a worker crash): it
    reads the pid file and kills only a server whose command line names this data directory."""

    START_TIMEOUT = 120.0

    def __init__(self, root: Path, name: str):
        if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 63:
            raise ApplicationError(f"scratch server name {name!r}: use up to 63 letters, digits, '-' and '_'",
                                   type="BadInput", non_retryable=True)
        self.name = name
        self.dir = root / name
        self.datadir = self.dir / "data"
        self.pidfile = self.dir / "mariadbd.pid"
        self.errlog = self.dir / "error.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.version = ""

    # the mark: which environment and run made it ------------------------------------------------------------
    def mark(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / MARK).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def start(self, mark: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARK).write_text(json.dumps(mark))
        install = program("mariadb-install-db", "OPSFLOW_MARIADB_INSTALL_DB", "/usr/bin/mariadb-install-db",
                          "/usr/bin/mysql_install_db")
        args = [install, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
                "--skip-test-db", "--skip-name-resolve"]
        if os.geteuid() == 0:
            args.append("--user=root")
        with open(self.dir / "install.log", "wb") as log:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        if done.returncode != 0:
            raise ApplicationError(f"mariadb-install-db for {self.name} exited with {done.returncode}:\n"
                                   f"{_tail(self.dir / 'install.log')}", type="RestoreFailed")
        for _ in range(3):  # a free port may be taken by someone else before the server binds it: another one
            if self._start_server():
                return
        raise ApplicationError(f"scratch server {self.name} did not start:\n{_tail(self.errlog)}", type="RestoreFailed")

    def _start_server(self) -> bool:
        daemon = program("mariadbd", "OPSFLOW_MARIADBD", "/usr/sbin/mariadbd", "/usr/sbin/mysqld")
        self.port = _free_port()
        args = [daemon, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}", "--bind-address=127.0.0.1",
                f"--socket={self.dir / 'sock'}", f"--pid-file={self.pidfile}", f"--log-error={self.errlog}",
                "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--max-allowed-packet=256M",
                "--character-set-server=utf8mb4"]
        if os.geteuid() == 0:
            args.append("--user=root")
        # SIGKILLed with the worker (no orphan holding the port); a crashed run's directory goes at the next drill
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True)
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in _tail(self.errlog, 40) or "Bind on TCP/IP" in _tail(self.errlog, 40):
                    return False
                raise ApplicationError(f"scratch server {self.name} exited with {self.proc.returncode}:\n"
                                       f"{_tail(self.errlog)}", type="RestoreFailed")
            try:
                with self.connect() as conn, conn.cursor() as cur:
                    cur.execute("select version()")
                    self.version = cur.fetchone()[0]
                return True
            except pymysql.err.OperationalError:
                sleep_or_cancelled(0.2, {"phase": "starting the scratch server", "port": self.port},
                                   what=f"starting {self.name}")
        raise ApplicationError(f"scratch server {self.name} did not accept connections within "
                               f"{self.START_TIMEOUT:.0f}s:\n{_tail(self.errlog)}", type="RestoreFailed")

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=database,
                               connect_timeout=5, autocommit=True)

    def load(self, database: str, dump: Path) -> None:
        """The dump into `database` with the mariadb client (what a DBA runs), heartbeating while it loads."""
        client = program("mariadb", "OPSFLOW_MARIADB", "/usr/bin/mariadb", "/usr/bin/mysql")
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"create database if not exists {quote(database)}")
        args = [client, "--no-defaults", "--protocol=tcp", "-h", "127.0.0.1", "-P", str(self.port), "-u", "root",
                "--binary-mode", "--batch", database]
        started = time.monotonic()
        with open(dump, "rb") as source, open(self.dir / "load.log", "w+b") as out:
            proc = subprocess.Popen(args, stdin=source, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
            try:
                while proc.poll() is None:
                    sleep_or_cancelled(0.5, {"phase": "loading the dump", "seconds": round(time.monotonic() - started)},
                                       what=f"loading the dump into {self.name}")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise ApplicationError(f"loading the dump into {self.name} ({database}) exited with {proc.returncode}:\n"
                                   f"{_tail(self.dir / 'load.log')}", type="BadInput", non_retryable=True)

    def stop(self) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and remove its directory. False: nothing was there."""
        if not self.dir.exists():
            return False
        pid = self.proc.pid if self.proc is not None else self._pid_from_file()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self._alive(pid):
                    time.sleep(0.1)
                if self._alive(pid):
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.proc is not None:
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
        return True

    def _alive(self, pid: int) -> bool:
        if self.proc is not None and self.proc.pid == pid:
            return self.proc.poll() is None
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def _pid_from_file(self) -> int | None:
        """The pid of a server left by a crashed run: only when that process is a server of this data directory
        (a pid reused by another process is never signalled)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if f"--datadir={self.datadir}".encode() in cmdline else None


def _source(source: MysqlSource, database: str) -> pymysql.connections.Connection:
    try:
        return pymysql.connect(host=source.host, port=source.port, user=source.user,
                               password=resolve(source.password) if source.password else "", database=database,
                               connect_timeout=10, autocommit=True, init_command="set time_zone = '+00:00'")
    except pymysql.err.OperationalError as e:
        raise ApplicationError(f"MySQL source {source.host}:{source.port}: {e.args[-1]}", type="DatabaseUnreachable"
                               ) from None


def _count(conn, table: str, column: str | None = None, before: datetime | None = None) -> int | None:
    """Rows of `table` (committed before `before` by `column`, in UTC, when given); None when the table is missing."""
    query = f"select count(*) from {quote(table)}"
    params: tuple = ()
    if column and before is not None:
        query += f" where {quote(column)} < %s"
        params = (utc(before).replace(tzinfo=None),)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return int(cur.fetchone()[0])
    except pymysql.err.ProgrammingError as e:
        if e.args and e.args[0] == 1146:  # ER_NO_SUCH_TABLE
            return None
        raise


class MysqlDumpRestore(S3Dumps):
    """RestoreProvider for method s3-mysqldump. window(): the dumps under drill.dumps; restore_and_verify(): the
    drill's restore, verification and clean-up in one activity, since the scratch server lives on the worker that
    runs it; delete()/scratch_runs(): this worker's scratch servers (what a crashed run left)."""

    METHOD = "s3-mysqldump"

    def __init__(self, request: RestoreRequest):
        if request.drill.mysql is None:
            raise ApplicationError("restore method s3-mysqldump needs drill.mysql (database)", type="BadInput",
                                   non_retryable=True)
        super().__init__(request)
        self.mysql = request.drill.mysql
        self.root = scratch_root()

    def window(self) -> RestoreWindow:
        return super().window()

    def start(self, name: str, point: datetime) -> ScratchTarget:
        raise ApplicationError("s3-mysqldump restores with restore.mysql_dump", type="BadInput", non_retryable=True)

    status = start

    def validate(self) -> None:
        """Before anything is created: every table a row count names exists on the source."""
        if not self.request.drill.row_counts or self.mysql.source is None:
            return
        with _source(self.mysql.source, self.mysql.database) as conn:
            missing = [c.table for c in self.request.drill.row_counts if _count(conn, c.table, None) is None]
        if missing:
            raise ApplicationError(f"unknown table(s) {', '.join(repr(t) for t in missing)} on the MySQL source "
                                   f"{self.mysql.source.host}:{self.mysql.source.port}/{self.mysql.database}",
                                   type="BadInput", non_retryable=True)

    def restore_and_verify(self) -> MysqlRestoreResult:
        request = self.request
        assert request.point_in_time is not None
        obj, when = self.pick(request.point_in_time)
        server = ScratchServer(self.root, request.scratch_name)
        url = f"s3://{self.bucket}/{obj['Key']}"
        started = time.monotonic()
        try:
            server.start({"environment": request.scratch_environment, "run": request.run_id or None, "dump": url,
                          "dump_time": when.isoformat()})
            heartbeat({"phase": "download", "key": obj["Key"]})
            dump = server.dir / "dump"
            self.download(self.bucket, obj["Key"], dump, int(obj.get("Size") or 0))
            dump = _gunzipped(dump)
            check_cancelled("restoring the dump")
            server.load(self.mysql.database, dump)
            dump.unlink()
            restore_seconds = time.monotonic() - started
            heartbeat({"phase": "verify"})
            checks = self.verify(server, when)
            target = ScratchTarget(name=request.scratch_name, method=self.METHOD, ready=True, restore_point=when,
                                   detail=f"{url} ({obj.get('Size', 0)} bytes) loaded into {server.version} on this "
                                          f"worker ({socket.gethostname()}) in {restore_seconds:.1f}s")
        finally:
            server.stop()
        return MysqlRestoreResult(scratch=target, restore_seconds=restore_seconds, checks=checks,
                                  cleaned=not server.dir.exists())

    def verify(self, server: ScratchServer, dump_time: datetime) -> list[CheckResult]:
        drill, database = self.request.drill, self.mysql.database
        results: list[CheckResult] = []
        with server.connect(database) as scratch:
            if drill.row_counts and self.mysql.source is not None:
                with _source(self.mysql.source, database) as source:
                    for c in drill.row_counts:
                        expected = _count(source, c.table, c.timestamp_column, dump_time if c.timestamp_column
                                          else None)
                        actual = _count(scratch, c.table)
                        if actual is None or expected is None:
                            results.append(CheckResult(kind="row_count", name=c.table, ok=False, expected=expected,
                                                       detail="table missing from the restore" if actual is None
                                                       else "table missing from the source"))
                            continue
                        results.append(CheckResult(
                            kind="row_count", name=c.table, ok=abs(expected - actual) <= c.tolerance,
                            expected=expected, actual=actual,
                            detail=f"{actual} rows restored, {expected} expected"
                                   + (f" (±{c.tolerance})" if c.tolerance else "")))
            for check in drill.checks:
                try:
                    with scratch.cursor() as cur:
                        cur.execute(check.query)
                        row = cur.fetchone()
                    value = row[0] if row else None
                    ok = value in (1, True)
                    detail = "true" if ok else f"returned {value!r}, not true"
                except pymysql.err.MySQLError as e:
                    ok, detail = False, f"error: {e.args[-1] if e.args else e}"
                results.append(CheckResult(kind="sql", name=check.name, ok=ok, detail=detail))
            with scratch.cursor() as cur:
                cur.execute("select table_name from information_schema.tables where table_schema = %s", (database,))
                present = {r[0] for r in cur.fetchall()}
        for obj in drill.schema_objects:
            found = obj.split(".")[-1] in present
            results.append(CheckResult(kind="schema", name=obj, ok=found, detail="present" if found else "missing"))
        return results

    def delete(self, name: str) -> bool:
        server = ScratchServer(self.root, name)
        mark = server.mark()
        if mark is not None and mark.get("environment") not in (None, self.request.scratch_environment):
            raise ApplicationError(f"scratch server {name} belongs to environment {mark['environment']}, not "
                                   f"{self.request.scratch_environment}; refusing to delete it", type="Refused",
                                   non_retryable=True)
        return server.stop()

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        """This environment's scratch servers on this worker (marked with it) whose name starts with `prefix`."""
        found: dict[str, str | None] = {}
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(prefix):
                mark = ScratchServer(self.root, path.name).mark()
                if mark is not None and mark.get("environment") == self.request.scratch_environment:
                    found[path.name] = mark.get("run")
        return found


def _gunzipped(path: Path) -> Path:
    """A gzip dump (mysqldump | gzip, the usual upload) decompressed beside it; a plain one as it is."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path
    plain = path.with_suffix(".sql")
    with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
    path.unlink()
    return plain

