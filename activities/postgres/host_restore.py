"""Restore drill method host-pitr, for self-managed PostgreSQL: a base backup plus the archived WAL, on the host
where they live (drill.host).

restore.start picks the newest base backup that ends before the restore point and makes the scratch directory
<scratch_dir>/<scratch name> with a mark (environment, run, backup, point) that the next drill's leftover clean-up
reads. restore.wait (bounded by drill.restore_timeout, heartbeating) does the rest, one idempotent phase at a
time, each leaving a file behind it in the scratch directory so a retried or taken-over wait resumes: the backup
extracted into data/ (`tar -xf` of base.tar[.gz] and pg_wal.tar[.gz], or a copy of a plain backup), then
configured (postgresql.auto.conf: restore_command reading the archive, recovery_target_time, promote at the target,
archive_mode off so nothing is ever written into the source's archive, TCP only, logging to a file,
small shared_buffers), then started on a random free port (another port when it is taken), then replayed to the
target and promoted: ready. restore.verify runs the drill's checks over SQL at drill.host.address. restore.delete
(always owed) stops the scratch server (immediate) and removes its directory.

Every program runs through the drill.host.run prefix (as database.host.run does: ssh, runuser, or nothing), each
argument checked to hold nothing a remote shell would split or expand, each command bounded. No secret is written
anywhere: the checks connect as the source's user with the source's password (a restore copies the roles).

The restorable window: from the oldest base backup's end (its backup_manifest's modification time, which
pg_basebackup writes last) to the newest commit in the archive (pg_waldump of the newest segments). A restore to
that newest commit's time holds every transaction committed before it (recovery_target_inclusive off; the commit
itself is the target that ends the replay).
"""

from __future__ import annotations

import json
import random
import re
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.context import check_cancelled
from activities.postgres.connection import connect
from activities.postgres.host import run_on_host
from opsflow.inventory import PostgresDatabase
from opsflow.models import RestoreRequest, RestoreWindow, ScratchTarget

METHOD = "host-pitr"
MARK = "opsflow-drill.json"
_SAFE = re.compile(r"^[A-Za-z0-9_./@%+=:,-]+$")  # nothing a remote shell splits or expands
_NAME = re.compile(r"^[a-z][a-z0-9-]{2,80}$")
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_COMMIT = re.compile(r"desc: COMMIT(?:_PREPARED)? (?:\d+: )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
_BIND = re.compile(r"could not bind|could not create any TCP/IP sockets|Address already in use")
_START_LOG = re.compile(r"^start-(\d+)-(\d+)\.log$")  # one per start attempt: its number, its port
START_ATTEMPTS = 5
WALDUMP_SEGMENTS = 16  # how far back the newest commit is looked for (16 segments: 256 MiB of WAL)


def _bad(message: str, kind: str = "BadInput") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class HostPointInTimeRestore:
    """RestoreProvider for method host-pitr (activities/providers.py)."""

    def __init__(self, request: RestoreRequest):
        if request.drill.host is None:
            raise _bad("restore method host-pitr needs drill.host (base_backups, wal_archive, scratch_dir)")
        self.request, self.host = request, request.drill.host
        self.base = self.host.base_backups.rstrip("/") or "/"
        self.archive = self.host.wal_archive.rstrip("/") or "/"
        self.scratch = self.host.scratch_dir.rstrip("/") or "/"

    # -- commands on the host -------------------------------------------------------------------------------------

    def _run(self, args: list[str], what: str, *, timeout: float | None = None, input: str | None = None,
             check: bool = True) -> Any:
        for arg in args:
            if not _SAFE.match(arg):
                raise _bad(f"{what}: refusing to pass {arg!r} to the host (a remote shell would split or expand it)")
        p = run_on_host(self.host, args, what, timeout=timeout, input=input)
        if check and p.returncode != 0:
            tail = " | ".join(p.stdout.strip().splitlines()[-3:])
            raise ApplicationError(f"{what} on the host: exit {p.returncode}: {tail}", type="HostCommandFailed")
        return p

    def _tool(self, name: str) -> str:
        return f"{self.host.bin_dir.rstrip('/')}/{name}"

    def _ls(self, path: str, what: str) -> list[str] | None:
        p = self._run(["ls", "-1", "-A", path], what, check=False)
        return p.stdout.split() if p.returncode == 0 else None

    def _dir(self, name: str) -> str:
        if not _NAME.match(name):
            raise _bad(f"scratch target name {name!r}: lowercase letters, digits and hyphens only")
        return f"{self.scratch}/{name}"

    def _mark(self, name: str) -> dict | None:
        p = self._run(["cat", f"{self._dir(name)}/{MARK}"], f"read the mark of {name}", check=False)
        if p.returncode != 0:
            return None
        try:
            mark = json.loads(p.stdout)
        except ValueError:
            return None
        return mark if isinstance(mark, dict) else None

    # -- the backups and the archive ------------------------------------------------------------------------------

    def backups(self) -> dict[str, datetime]:
        """The complete base backups (a directory holding backup_manifest) and when each ended."""
        names = self._ls(self.base, "list the base backups")
        if names is None:
            raise _bad(f"no base backup directory {self.base} on the host (drill.host.base_backups)", "NoBaseBackup")
        dirs = [n for n in names if _SAFE.match(n) and not n.startswith(".")]
        found: dict[str, datetime] = {}
        if dirs:
            # GNU stat's %.9Y: the modification time to the nanosecond (a commit a moment after the backup is
            # after it)
            p = self._run(["stat", "-c", "%.9Y:%n", *[f"{self.base}/{d}/backup_manifest" for d in dirs]],
                          "read the base backups' manifests", check=False)
            for line in p.stdout.splitlines():
                stamp, _, path = line.partition(":")
                if re.fullmatch(r"\d+(\.\d+)?", stamp) and path.endswith("/backup_manifest"):
                    found[path[len(self.base) + 1:-len("/backup_manifest")]] = datetime.fromtimestamp(
                        float(stamp), timezone.utc)
        if not found:
            raise _bad(f"no base backup under {self.base} on the host (a directory per backup holding "
                       f"backup_manifest, made by pg_basebackup -D {self.base}/<name> -Ft or -Fp)", "NoBaseBackup")
        return found

    def newest_commit(self) -> datetime | None:
        segments = self._ls(self.archive, "list the WAL archive")
        if segments is None:
            raise _bad(f"no WAL archive {self.archive} on the host (drill.host.wal_archive)", "NoWalArchive")
        for segment in sorted(s for s in segments if _SEGMENT.match(s))[-WALDUMP_SEGMENTS:][::-1]:
            check_cancelled("reading the WAL archive")
            # pg_waldump ends with an error at the end of a segment's valid WAL: its exit status says nothing of
            # the records it printed
            p = self._run(["env", "TZ=UTC", self._tool("pg_waldump"), "-p", self.archive, "-r", "Transaction",
                           segment], f"pg_waldump {segment}", check=False)
            times = _COMMIT.findall(p.stdout)
            if times:
                return datetime.fromisoformat(times[-1]).replace(tzinfo=timezone.utc)
        return None

    def window(self) -> RestoreWindow:
        backups = self.backups()
        newest = self.newest_commit()
        earliest = min(backups.values())
        if newest is None or newest < earliest:
            raise _bad(f"the WAL archive {self.archive} holds no commit after the oldest base backup ended "
                       f"({earliest.isoformat()}): is archive_command archiving there?", "NoArchivedCommit")
        name = max(backups, key=lambda n: backups[n])
        return RestoreWindow(earliest=earliest, latest=newest,
                             detail=f"{len(backups)} base backup(s) under {self.base} (newest {name}), WAL archive "
                                    f"{self.archive}")

    # -- the scratch server ---------------------------------------------------------------------------------------

    def start(self, name: str, point: datetime) -> ScratchTarget:
        """The scratch directory and its mark; the restore itself runs in status() (restore.wait, heartbeating)."""
        scratch, mark = self._dir(name), self._mark(name)
        if mark is None:
            backups = self.backups()
            before = {n: t for n, t in backups.items() if t <= point}
            if not before:
                raise _bad(f"no base backup under {self.base} ended by {point.isoformat()} (the oldest ended "
                           f"{min(backups.values()).isoformat()})", "NoBaseBackup")
            backup = max(before, key=lambda n: before[n])
            mark = {"environment": self.request.scratch_environment, "run": self.request.run_id or None,
                    "backup": backup, "backup_end": before[backup].isoformat(), "point": point.isoformat()}
            self._run(["mkdir", "-p", scratch], f"make {scratch}")
            self._run(["tee", f"{scratch}/{MARK}"], f"mark {scratch}", input=json.dumps(mark) + "\n")
        return ScratchTarget(name=name, method=METHOD, ready=False, restore_point=point,
                             detail=f"restoring base backup {mark['backup']} and the archived WAL to {mark['point']}")

    def status(self, name: str) -> ScratchTarget:
        scratch, mark = self._dir(name), self._mark(name)
        if mark is None:
            raise _bad(f"scratch target {name} is gone from {self.scratch} on the host", "RestoreFailed")
        point = datetime.fromisoformat(mark["point"])
        data = f"{scratch}/data"
        files = set(self._ls(scratch, f"list {scratch}") or [])

        def waiting(detail: str) -> ScratchTarget:
            return ScratchTarget(name=name, method=METHOD, ready=False, restore_point=point, detail=detail)

        if "extracted" not in files:
            self._extract(mark["backup"], data)
            self._run(["touch", f"{scratch}/extracted"], "mark extracted")
        if "configured" not in files:
            self._configure(data, point)
            self._run(["touch", f"{scratch}/configured"], "mark configured")
        starts = sorted((int(m[1]), int(m[2]), f) for f in files if (m := _START_LOG.match(f)))
        if not starts:
            return waiting(self._launch(scratch, data, 1))
        attempt, port, log = starts[-1]
        running = self._run([self._tool("pg_ctl"), "status", "-D", data], "pg_ctl status", check=False)
        if running.returncode != 0:
            tail = self._run(["tail", "-n", "15", f"{scratch}/{log}"], "read the scratch server's log",
                             check=False).stdout.strip()
            if _BIND.search(tail) and attempt < START_ATTEMPTS:
                return waiting(self._launch(scratch, data, attempt + 1))
            raise _bad(f"the scratch server {name} stopped before the restore was done:\n{tail}", "RestoreFailed")
        dsn = self.dsn(port)
        try:
            with connect(self._scratch_db(dsn), connect_timeout=3) as conn:
                in_recovery, replayed = conn.execute(
                    "select pg_is_in_recovery(), pg_last_xact_replay_timestamp()").fetchone()
        except (ApplicationError, psycopg.Error) as e:
            if isinstance(e, ApplicationError) and e.non_retryable:
                raise
            return waiting(f"scratch server on port {port} starting ({str(e).splitlines()[0][:120]})")
        if in_recovery:
            return waiting(f"replaying archived WAL to {point.isoformat()} on port {port}"
                           + (f"; replayed to {replayed.isoformat()}" if replayed else ""))
        return ScratchTarget(name=name, method=METHOD, ready=True, dsn=dsn, restore_point=point,
                             detail=f"base backup {mark['backup']} and the archived WAL replayed to "
                                    f"{point.isoformat()}, promoted on {self.host.address}:{port}")

    def _extract(self, backup: str, data: str) -> None:
        """The base backup into an empty data/ (a partial one from a crashed attempt is removed first)."""
        src = f"{self.base}/{backup}"
        contents = self._ls(src, f"list base backup {backup}")
        if contents is None:
            raise _bad(f"base backup {src} is gone from the host", "NoBaseBackup")
        self._run(["rm", "-rf", data], f"clear {data}")
        self._run(["mkdir", "-m", "700", data], f"make {data}")
        budget = self.request.drill.restore_timeout
        base_tar = next((f for f in sorted(contents) if re.match(r"^base\.tar(\.gz|\.lz4|\.zst)?$", f)), None)
        if base_tar is not None:
            self._run(["tar", "-xf", f"{src}/{base_tar}", "-C", data], f"extract {backup}/{base_tar}", timeout=budget)
            wal_tar = next((f for f in sorted(contents) if re.match(r"^pg_wal\.tar(\.gz|\.lz4|\.zst)?$", f)), None)
            if wal_tar is not None:
                self._run(["tar", "-xf", f"{src}/{wal_tar}", "-C", f"{data}/pg_wal"], f"extract {backup}/{wal_tar}",
                          timeout=budget)
        elif "PG_VERSION" in contents:
            self._run(["cp", "-a", f"{src}/.", data], f"copy {backup}", timeout=budget)
        else:
            raise _bad(f"base backup {src}: neither base.tar[.gz] (pg_basebackup -Ft) nor a data directory "
                       "(pg_basebackup -Fp)", "NoBaseBackup")
        self._run(["chmod", "700", data], f"chmod {data}")

    def _configure(self, data: str, point: datetime) -> None:
        """Recovery to the point, then a server of its own: nothing archived (the source's archive never sees a
        scratch timeline), no standby of anything, small memory, its log in a file the drill reads."""
        contents = set(self._ls(data, f"list {data}") or [])
        if "postgresql.conf" not in contents:  # Debian keeps it in /etc: the backup has none
            self._run(["touch", f"{data}/postgresql.conf"], "postgresql.conf")
        if "pg_hba.conf" not in contents:  # the checks connect over TCP with the source's user and password
            self._run(["tee", f"{data}/pg_hba.conf"], "pg_hba.conf",
                      input="local all all peer\nhost all all 0.0.0.0/0 scram-sha-256\n"
                            "host all all ::/0 scram-sha-256\n")
        self._run(["rm", "-f", f"{data}/standby.signal", f"{data}/postmaster.pid"], "standby.signal")
        restore = f"cp {self.archive}/%f %p"
        settings = {
            "listen_addresses": self.host.address,
            # Its own pg_hba.conf, not the source's: Patroni's postgresql.conf names the source's by absolute path.
            "hba_file": f"{data}/pg_hba.conf",
            "unix_socket_directories": "",  # TCP only: a deep scratch directory overflows a socket path's 107 bytes
            "archive_mode": "off",
            "restore_command": restore,
            "recovery_target_time": point.astimezone(timezone.utc).isoformat(sep=" "),
            "recovery_target_inclusive": "off",
            "recovery_target_action": "promote",
            "recovery_target_timeline": "latest",
            "hot_standby": "on",
            "primary_conninfo": "",
            "primary_slot_name": "",
            "synchronous_standby_names": "",
            "shared_buffers": self.host.shared_buffers,
            "logging_collector": "off",
            "log_destination": "stderr",
            "cluster_name": "opsflow-drill",
        }
        text = "# opsflow drill (host-pitr): a scratch restore; removed with its directory\n" + "".join(
            f"{k} = {_quote(v)}\n" for k, v in settings.items())
        self._run(["tee", "-a", f"{data}/postgresql.auto.conf"], "postgresql.auto.conf", input=text)
        self._run(["touch", f"{data}/recovery.signal"], "recovery.signal")

    def _launch(self, scratch: str, data: str, attempt: int) -> str:
        low, high = self.host.ports
        port = random.SystemRandom().randint(low, high)
        self._run(["tee", "-a", f"{data}/postgresql.auto.conf"], "port", input=f"port = {port}\n")
        log = f"{scratch}/start-{attempt}-{port}.log"
        self._run([self._tool("pg_ctl"), "start", "-D", data, "-l", log, "-W"], "pg_ctl start")
        return f"scratch server starting on port {port} (attempt {attempt})"

    def dsn(self, port: int) -> str:
        """The source's user and database, at the scratch server."""
        source = conninfo_to_dict(getattr(self.request.source.database, "dsn", None) or "")
        params = {k: v for k, v in source.items() if k in ("user", "dbname", "sslmode", "sslrootcert")}
        return make_conninfo("", host=self.host.address, port=str(port), **params)

    def _scratch_db(self, dsn: str) -> PostgresDatabase:
        return PostgresDatabase(provider="postgres", dsn=dsn,
                                password=getattr(self.request.source.database, "password", None))

    def delete(self, name: str) -> bool:
        """Stop the scratch server (immediate: nothing in it is kept) and remove its directory. False: gone."""
        scratch, mark = self._dir(name), self._mark(name)
        if mark is not None and mark.get("environment") not in (None, self.request.scratch_environment):
            raise _bad(f"scratch target {name} belongs to environment {mark['environment']}, not "
                       f"{self.request.scratch_environment}; refusing to delete it", "Refused")
        files = self._ls(scratch, f"list {scratch}")
        if files is None:
            return False
        if "data" in files:
            data = f"{scratch}/data"
            if self._run([self._tool("pg_ctl"), "status", "-D", data], "pg_ctl status", check=False).returncode == 0:
                self._run([self._tool("pg_ctl"), "stop", "-D", data, "-m", "immediate", "-w", "-t", "60"],
                          f"stop {name}")
        self._run(["rm", "-rf", scratch], f"remove {scratch}", timeout=max(self.host.command_timeout, 600))
        return True

    def list_scratch(self, prefix: str) -> list[str]:
        return sorted(self.scratch_runs(prefix))

    def scratch_runs(self, prefix: str) -> dict[str, str | None]:
        """This environment's scratch directories (marked with it) whose name starts with `prefix`."""
        found: dict[str, str | None] = {}
        for entry in self._ls(self.scratch, f"list {self.scratch}") or []:
            if entry.startswith(prefix) and _NAME.match(entry):
                mark = self._mark(entry)
                if mark is not None and mark.get("environment") == self.request.scratch_environment:
                    found[entry] = mark.get("run")
        return found

