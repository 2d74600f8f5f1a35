"""Real PostgreSQL clusters for the lab and the tests: a primary and streaming replicas on loopback.

Everything here runs the PostgreSQL 15 server binaries (initdb, pg_ctl, pg_basebackup); nothing is mocked.
The servers listen on 127.0.0.1 only, trust loopback connections (no passwords in the lab) and keep their
unix sockets off (TCP only), so several labs can run side by side.

PostgreSQL refuses to run as root. When this process is root, the server commands run as the `postgres`
OS user, the cluster directories are handed to it, and the parent directories get the "search" bit (o+x,
never read) so that user can reach them.

Any step that fails or takes too long raises `PostgresLabError` with the tail of the server log.

Beyond a primary and its replicas (init_primary, create_replica), the lab does what the procedures need of a
self-managed PostgreSQL, for real:

- point-in-time recovery: an archiving primary (init_primary(archive_dir=...)) keeps a base backup under
  <root>/base-backups/ (take_base_backup, ensure_base_backup, latest_base_backup, base_backup_for);
  archive_now() makes everything committed so far restorable; restore_to_time() builds a NEW cluster from a
  base backup and the archive, promoted at the target time (earliest_/latest_restorable_time);
- rebuild_replica(): a diverged former primary made a streaming replica of the new primary on its own port
  (pg_rewind, else a fresh pg_basebackup with the old data kept aside);
- drop_cluster(); dump_database() / restore_dump() (pg_dump -Fc, pg_restore) for the dump-in-S3 drill.

Everything takes Cluster objects (or paths) and can be used from another process: Cluster.from_dict(),
cluster_root() and archive_dir_of() recover what a restore needs from a cluster's saved dict.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from lab.ports import free_port

PG_VERSION = "15"
DEFAULT_BINDIR = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")
SERVER_USER = "postgres"  # the OS user the servers run as when we are root
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class PostgresLabError(RuntimeError):
    """A lab PostgreSQL step failed; the message holds what happened and the tail of the server log."""


# -- binaries and users ------------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL 15 server binary (initdb, pg_ctl, ...).

    $OPSFLOW_PG_BINDIR overrides the directory (default /usr/lib/postgresql/15/bin, the Debian layout).
    """
    bindir = Path(os.environ.get("OPSFLOW_PG_BINDIR") or DEFAULT_BINDIR)
    path = bindir / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PostgresLabError(
            f"PostgreSQL {PG_VERSION} server binary {name!r} not found in {bindir}. The lab needs the server "
            f"binaries (initdb, pg_ctl, postgres, pg_basebackup): install them (Debian/Ubuntu: "
            f"apt-get install postgresql-{PG_VERSION}) or point OPSFLOW_PG_BINDIR at their directory."
        )
    return str(path)


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresLabError(
            f"running as root, but there is no {SERVER_USER!r} OS user to run PostgreSQL as "
            f"(PostgreSQL refuses to run as root); create it or run the lab as an ordinary user"
        ) from None


def _server_env() -> dict[str, str]:
    # A clean environment: no PG* variables of the caller (PGPASSWORD, PGHOST ...) leak into the server tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    if _as_root():
        u = _server_user()
        env.update(HOME=u.pw_dir, USER=u.pw_name, LOGNAME=u.pw_name)
    return env


def _run(args: list[str], *, cwd: Path, timeout: float, what: str, logfile: Path | None = None) -> str:
    """Run a server command (as the postgres user when we are root); raise PostgresLabError on failure."""
    kwargs: dict = {}
    if _as_root():
        u = _server_user()
        kwargs = dict(user=u.pw_uid, group=u.pw_gid, extra_groups=os.getgrouplist(u.pw_name, u.pw_gid))
    try:
        p = subprocess.run(
            args,
            cwd=cwd,
            env=_server_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise PostgresLabError(f"{what}: timed out after {timeout:.0f}s\n"
                               f"{_excerpt(out)}{_log_section(logfile)}") from None
    if p.returncode != 0:
        raise PostgresLabError(f"{what}: {Path(args[0]).name} exited with {p.returncode}\n"
                               f"{_excerpt(p.stdout)}{_log_section(logfile)}")
    return p.stdout


def _excerpt(text: str, lines: int = 20) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return "output:\n" + "\n".join("  " + line for line in text.splitlines()[-lines:]) + "\n"


def log_tail(logfile: Path, lines: int = 30) -> str:
    """The last lines of a server log ('' when there is none)."""
    try:
        with open(logfile, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _log_section(logfile: Path | None) -> str:
    if logfile is None:
        return ""
    tail = log_tail(logfile)
    if not tail:
        return f"server log {logfile}: (empty or missing)"
    return f"server log {logfile} (last lines):\n" + "\n".join("  " + line for line in tail.splitlines())


def _give_to_server_user(path: Path) -> None:
    """Hand a directory we created to the postgres user, and let it reach it through the parents."""
    if not _as_root():
        return
    u = _server_user()
    os.chown(path, u.pw_uid, u.pw_gid)
    for parent in path.resolve().parents:
        st = parent.stat()
        if not st.st_mode & stat.S_IXOTH:
            # Search permission only (no listing), so the postgres user can reach its directories.
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _give_to_server_user(path)
    return path


make_server_dir = _make_dir  # a directory the server user owns (a drill's scratch directory)


# -- ports ---------------------------------------------------------------------------------------------------


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_loopback_host(port: int = 5432) -> str:
    """An address of 127.0.0.0/8 (all loopback on Linux) other than 127.0.0.1 where `port` is free now: a cluster
    can listen there on the port its cloud would use (Azure: 5432), so clients need no lab-only port mapping."""
    for _ in range(200):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        if host in _handed_out_hosts:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out_hosts.add(host)
        return host
    raise PostgresLabError(f"no loopback address with port {port} free found")


_handed_out_hosts: set[str] = set()


# -- processes -----------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running and not a zombie (our PID 1 may not reap the orphaned postmaster)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


# -- the cluster ---------------------------------------------------------------------------------------------


@dataclass
class RebuildInfo:
    """How rebuild_replica() turned a former primary into a replica (attached to the Cluster it returns)."""

    method: str  # "pg_rewind" | "pg_basebackup" | "already-streaming"
    seconds: float
    fallback_reason: str | None = None  # why pg_rewind was not used or did not work
    moved_aside: Path | None = None  # where the old data directory went (pg_basebackup fallback)


@dataclass
class Cluster:
    name: str
    datadir: Path
    port: int
    logfile: Path
    host: str = "127.0.0.1"  # the loopback address it listens on (emulated cloud servers: one of their own, on 5432)
    # Set only on the Cluster returned by rebuild_replica(); not persisted by to_dict(), not compared.
    rebuild: RebuildInfo | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.datadir = Path(self.datadir)
        self.logfile = Path(self.logfile)

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
        except (OSError, IndexError, ValueError):
            return None
        return pid if _alive(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, wait: bool = True) -> None:
        """Start the server (idempotent). With wait, return once it accepts connections (a hot standby:
        once it reached a consistent state)."""
        if self.is_running():
            if wait:
                self._wait_accepting(START_TIMEOUT)
            return
        if not (self.datadir / "PG_VERSION").exists():
            raise PostgresLabError(f"cluster {self.name}: {self.datadir} is not a PostgreSQL data directory")
        self._remove_stale_lock()
        if _port_open(self.port, self.host):
            raise PostgresLabError(f"cluster {self.name}: port {self.port} on {self.host} is already in use "
                                   "by another process")
        args = [pg_bin("pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.logfile)]
        args += ["-w", "-t", str(int(START_TIMEOUT))] if wait else ["-W"]
        _run(args, cwd=self.datadir.parent, timeout=START_TIMEOUT + 15, what=f"cluster {self.name}: start",
             logfile=self.logfile)
        if wait:
            self._wait_accepting(START_TIMEOUT)

    def _remove_stale_lock(self) -> None:
        lock = self.datadir / "postmaster.pid"
        if lock.exists() and not self.is_running():
            # Left by a killed server whose postmaster is gone (or a zombie not yet reaped by PID 1, which
            # PostgreSQL would take for a live postmaster): stale, safe to remove since nothing of it runs.
            lock.unlink()

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open(self.port, self.host):
            if not self.is_running():
                raise PostgresLabError(f"cluster {self.name}: the server stopped while starting\n"
                                       f"{_log_section(self.logfile)}")
            if time.monotonic() > deadline:
                raise PostgresLabError(f"cluster {self.name}: not accepting connections on port {self.port} "
                                       f"after {timeout:.0f}s\n{_log_section(self.logfile)}")
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m smart|fast|immediate (idempotent)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if not self.is_running():
            return
        _run(
            [pg_bin("pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(STOP_TIMEOUT))],
            cwd=self.datadir.parent,
            timeout=STOP_TIMEOUT + 15,
            what=f"cluster {self.name}: stop ({mode})",
            logfile=self.logfile,
        )

    def kill(self) -> None:
        """SIGKILL the postmaster and its processes, like a host that dies (emergency drills).

        The data directory stays as it was; start() afterwards runs crash recovery.
        """
        pid = self.pid()
        if pid is None:
            return
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in [pid, *children]):
            if time.monotonic() > deadline:
                raise PostgresLabError(f"cluster {self.name}: processes still alive 10s after SIGKILL")
            time.sleep(0.02)

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"name": self.name, "datadir": str(self.datadir), "port": self.port, "logfile": str(self.logfile)}
        if self.host != "127.0.0.1":
            d["host"] = self.host
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        return cls(name=d["name"], datadir=Path(d["datadir"]), port=int(d["port"]), logfile=Path(d["logfile"]),
                   host=d.get("host") or "127.0.0.1")


# -- configuration -------------------------------------------------------------------------------------------

_CONF_FILE = "opsflow.conf"  # included from postgresql.conf; copied to replicas by pg_basebackup


def archive_command(archive_dir: Path) -> str:
    """The lab's archive_command, for a WAL archive that several servers share (a primary and the replicas that may
    become primary). A segment already archived is never overwritten (an old primary must not clobber the new one's
    WAL); one archived again with the same bytes is a success, as PostgreSQL's documentation asks ("Continuous
    Archiving"): a promoted replica archives the segments it holds of the old timeline, and a failure there made every
    clean shutdown wait on the archiver's retries (3 s of each switchover). The copy is renamed into place whole."""
    target = shlex.quote(str(archive_dir))
    return (f"if test -f {target}/%f; then cmp -s %p {target}/%f; "
            f"else cp %p {target}/%f.partial && mv {target}/%f.partial {target}/%f; fi")


def _conf_text(port: int, archive_dir: Path | None, host: str = "127.0.0.1") -> str:
    lines = [
        "# written by opsflow lab (lab/postgres.py)",
        f"listen_addresses = '{host}'",
        f"port = {port}",
        "unix_socket_directories = ''",
        "max_connections = 100",
        "shared_buffers = 32MB",
        "wal_level = replica",
        "max_wal_senders = 10",
        "max_replication_slots = 10",
        "wal_keep_size = '512MB'",
        "wal_log_hints = on",
        "hot_standby = on",
        "hot_standby_feedback = on",
        "wal_receiver_status_interval = 1s",
        "wal_retrieve_retry_interval = 1s",
        "log_line_prefix = '%m [%p] %q%a '",
        "log_checkpoints = on",
        "log_connections = off",
    ]
    if archive_dir is not None:
        quoted = archive_command(archive_dir).replace(chr(39), chr(39) * 2)
        lines += ["archive_mode = on", f"archive_command = '{quoted}'", "archive_timeout = 60"]
    return "\n".join(lines) + "\n"


_HBA = """\
# written by opsflow lab (lab/postgres.py): trust on loopback, TCP only
# TYPE  DATABASE     USER  ADDRESS        METHOD
host    all          all   127.0.0.0/8    trust
host    replication  all   127.0.0.0/8    trust
"""


def _write_server_file(path: Path, text: str) -> None:
    path.write_text(text)
    if _as_root():
        u = _server_user()
        os.chown(path, u.pw_uid, u.pw_gid)
    os.chmod(path, 0o600)


def _set_port(datadir: Path, port: int) -> None:
    conf = datadir / _CONF_FILE
    text = conf.read_text()
    text, n = re.subn(r"(?m)^port = \d+$", f"port = {port}", text)
    if n != 1:
        raise PostgresLabError(f"{conf} has no 'port = N' line to rewrite")
    _write_server_file(conf, text)


def _cluster_paths(root: Path, name: str) -> tuple[Path, Path, Path]:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"cluster name {name!r}: use letters, digits, '-', '_' and '.'")
    home = Path(root).resolve() / name
    return home, home / "data", home / "postgres.log"


def init_primary(root: Path, name: str, port: int | None = None, archive_dir: Path | None = None,
                 base_backup: bool | None = None) -> Cluster:
    """initdb a new cluster under root/name, configure it for streaming replication and start it.

    With archive_dir the cluster archives every WAL segment there and, unless base_backup=False, the lab
    keeps a base backup of it under root/base-backups/ (ensure_base_backup): together they make it
    restorable to any point in time from then on (restore_to_time).
    """
    home, datadir, logfile = _cluster_paths(root, name)
    if datadir.exists():
        raise PostgresLabError(f"cluster {name}: {datadir} already exists; remove it or pick another name")
    _make_dir(home)
    port = port or free_port()
    _run(
        [pg_bin("initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "--data-checksums",
         "--locale=C", "--encoding=UTF8", "--no-sync", "--no-instructions"],
        cwd=home, timeout=120, what=f"cluster {name}: initdb",
    )
    if archive_dir is not None:
        archive_dir = Path(archive_dir).resolve()
        _make_dir(archive_dir)
    _write_server_file(datadir / _CONF_FILE, _conf_text(port, archive_dir))
    with open(datadir / "postgresql.conf", "a") as f:
        f.write(f"\ninclude = '{_CONF_FILE}'\n")
    _write_server_file(datadir / "pg_hba.conf", _HBA)
    cluster = Cluster(name=name, datadir=datadir, port=port, logfile=logfile)
    cluster.start(wait=True)
    if base_backup or (base_backup is None and archive_dir is not None):
        ensure_base_backup(cluster, root)
    return cluster


def create_replica(primary: Cluster, root: Path, name: str, port: int | None = None,
                   slot: str | None = None) -> Cluster:
    """A streaming replica of `primary` under root/name (pg_basebackup -R -X stream), started and streaming."""
    home, datadir, logfile = _cluster_paths(root, name)
    if datadir.exists():
        raise PostgresLabError(f"cluster {name}: {datadir} already exists; remove it or pick another name")
    replica = Cluster(name=name, datadir=datadir, port=port or free_port(), logfile=logfile)
    return _basebackup_replica(primary, replica, slot)


def _check_slot_name(slot: str | None) -> None:
    if slot and not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ValueError(f"replication slot name {slot!r}: use lower-case letters, digits and '_'")


def _basebackup_replica(primary: Cluster, replica: Cluster, slot: str | None) -> Cluster:
    """pg_basebackup from primary into replica.datadir (which must not exist), configure, start, wait streaming."""
    _check_slot_name(slot)
    name, datadir = replica.name, replica.datadir
    if not primary.is_running():
        raise PostgresLabError(f"cluster {name}: the primary {primary.name} is not running\n"
                               f"{_log_section(primary.logfile)}")
    _make_dir(datadir.parent)
    args = [pg_bin("pg_basebackup"), "-d", _conninfo_to(primary, name), "-D", str(datadir), "-R", "-X", "stream",
            "-c", "fast", "--no-sync"]
    if slot:
        args += ["-S", slot]
        if not _slot_exists(primary, slot):
            args += ["-C"]
    try:
        _run(args, cwd=datadir.parent, timeout=300, what=f"cluster {name}: pg_basebackup from {primary.name}",
             logfile=primary.logfile)
    except PostgresLabError:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    _configure_standby(replica, primary, slot)
    replica.start(wait=True)
    wait_streaming(replica)
    return replica


def _conninfo_to(primary: Cluster, application_name: str) -> str:
    return f"host={primary.host} port={primary.port} user=postgres application_name={application_name}"


# Settings that must not survive into a replica or a restored server: where it streams from, recovery
# targets of an earlier restore, and the fence (a fenced old primary must not stay read-only after a later
# promotion).
_NOT_INHERITED = ("primary_conninfo", "primary_slot_name", "default_transaction_read_only", "restore_command",
                  "recovery_target", "archive_cleanup_command", "recovery_end_command")


def _rewrite_auto_conf(datadir: Path, extra: list[str]) -> None:
    auto = datadir / "postgresql.auto.conf"
    lines = auto.read_text().splitlines() if auto.exists() else [
        "# Do not edit this file manually!", "# It will be overwritten by the ALTER SYSTEM command."]
    kept = [line for line in lines if not line.strip().startswith(_NOT_INHERITED)]
    _write_server_file(auto, "\n".join(kept + extra) + "\n")


def _configure_standby(replica: Cluster, primary: Cluster, slot: str | None) -> None:
    """Make replica.datadir a standby of primary on replica.port: primary_conninfo (application_name = the
    replica's name), standby.signal, no fence, no recovery.signal."""
    datadir = replica.datadir
    extra = [f"primary_conninfo = '{_conninfo_to(primary, replica.name)}'"]
    if slot:
        extra.append(f"primary_slot_name = '{slot}'")
    _rewrite_auto_conf(datadir, extra)
    _write_server_file(datadir / "standby.signal", "")
    (datadir / "recovery.signal").unlink(missing_ok=True)
    _set_port(datadir, replica.port)


def shutdown_checkpoint_lsn(cluster: Cluster) -> str:
    """The LSN of a cleanly stopped cluster's shutdown checkpoint (pg_controldata): a standby that has replayed
    past it holds every byte the old primary wrote, so the old primary can follow it without pg_rewind (in the
    spirit of CloudNativePG's demotion token). Raises PostgresLabError when the cluster was not shut down
    cleanly (then no such proof exists)."""
    out = _run([pg_bin("pg_controldata"), "-D", str(cluster.datadir)], cwd=cluster.datadir.parent, timeout=30,
               what=f"pg_controldata of {cluster.name}")
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    state = fields.get("Database cluster state", "").strip()
    if state != "shut down":
        raise PostgresLabError(f"cluster {cluster.name}: not shut down cleanly (state {state!r}): no shutdown "
                               "checkpoint to prove a standby has everything")
    return fields["Latest checkpoint location"].strip()


def follow_as_standby(old: Cluster, primary: Cluster, timeout: float = 30) -> None:
    """Start a cleanly stopped former primary as a streaming standby of `primary` (which has replayed old's
    shutdown checkpoint): no rewind, no base backup. The fence and old replication settings are dropped."""
    _configure_standby(old, primary, None)
    old.start(wait=True)
    wait_streaming(old, timeout)


def _slot_exists(primary: Cluster, slot: str) -> bool:
    with psycopg.connect(primary.dsn, connect_timeout=5, autocommit=True) as conn:
        return conn.execute("select 1 from pg_replication_slots where slot_name = %s", (slot,)).fetchone() is not None


def wait_streaming(replica: Cluster, timeout: float = 30) -> None:
    """Wait until the replica's WAL receiver streams from its primary."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if not replica.is_running():
            raise PostgresLabError(f"cluster {replica.name}: the server is not running\n"
                                   f"{_log_section(replica.logfile)}")
        try:
            with psycopg.connect(replica.dsn, connect_timeout=3, autocommit=True) as conn:
                row = conn.execute("select pg_is_in_recovery(), (select status from pg_stat_wal_receiver)").fetchone()
            if not row[0]:
                raise PostgresLabError(f"cluster {replica.name}: not a replica (not in recovery)")
            if row[1] == "streaming":
                return
            last = f"wal receiver status: {row[1] or 'no wal receiver'}"
        except psycopg.Error as e:
            last = f"cannot query: {str(e).strip()}"
        if time.monotonic() > deadline:
            raise PostgresLabError(f"cluster {replica.name}: not streaming after {timeout:.0f}s ({last})\n"
                                   f"{_log_section(replica.logfile)}")
        time.sleep(0.1)


# -- point-in-time recovery: base backups, the WAL archive, restores --------------------------------------
#
# Layout: <root>/base-backups/<UTC stamp>/ holds one base backup: data/ (pg_basebackup -Fp -X stream, with
# PostgreSQL's own backup_label inside) and backup.json (what we know about it, below). A backup is written
# under a temporary name and renamed into place, so a directory with a backup.json is always complete.
# The WAL archive is the directory init_primary(archive_dir=...) archives to.

BASE_BACKUPS = "base-backups"
BACKUP_INFO = "backup.json"
ARCHIVE_TIMEOUT = 60.0
RESTORE_TIMEOUT = 600.0
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def _utc(t: datetime | None) -> datetime | None:
    """Aware UTC datetime; a naive one is taken to be UTC already."""
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _parse_time(text: str) -> datetime:
    return _utc(datetime.fromisoformat(text))


def _connect(cluster_or_dsn: "Cluster | str", timeout: int = 5):
    dsn = cluster_or_dsn.dsn if isinstance(cluster_or_dsn, Cluster) else cluster_or_dsn
    return psycopg.connect(dsn, connect_timeout=timeout, autocommit=True)


def _server_clock(cluster: Cluster) -> datetime:
    with _connect(cluster) as conn:
        return _utc(conn.execute("select clock_timestamp()").fetchone()[0])


def _backups_dir(root: Path) -> Path:
    root = Path(root)
    return root if root.name == BASE_BACKUPS else root / BASE_BACKUPS


def read_base_backup(backup: Path) -> dict:
    """backup.json of a base backup directory, with start_time/end_time as aware datetimes."""
    path = Path(backup) / BACKUP_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PostgresLabError(f"{backup} is not a complete base backup (no readable {BACKUP_INFO}: {e})") from None
    for key in ("start_time", "end_time"):
        info[key] = _parse_time(info[key])
    return info


def take_base_backup(primary: Cluster, dest: Path) -> Path:
    """A plain-format base backup of `primary` (pg_basebackup -Fp -X stream -c fast) into the new directory
    `dest`: dest/data is the data directory (with PostgreSQL's backup_label), dest/backup.json records

        start_time, end_time   the server's clock before the backup started and after it ended (UTC, ISO);
                               end_time is the earliest time this backup can be restored to
        start_lsn, end_lsn, timeline, system_identifier, server_version, source {name, port}, format

    Written under a temporary name and renamed into place: a dest with backup.json is complete. Returns dest.
    """
    dest = Path(dest).resolve()
    if dest.exists():
        raise PostgresLabError(f"base backup: {dest} already exists")
    if not primary.is_running():
        raise PostgresLabError(f"base backup: the cluster {primary.name} is not running\n"
                               f"{_log_section(primary.logfile)}")
    _make_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _make_dir(tmp)
    try:
        with _connect(primary) as conn:
            system_id, version, start_clock = conn.execute(
                "select system_identifier::text, current_setting('server_version'), clock_timestamp() "
                "from pg_control_system()"
            ).fetchone()
        _run(
            [pg_bin("pg_basebackup"), "-d", _conninfo_to(primary, "opsflow_base_backup"), "-D", str(tmp / "data"),
             "-Fp", "-X", "stream", "-c", "fast", "--no-sync"],
            cwd=tmp, timeout=600, what=f"base backup of {primary.name}", logfile=primary.logfile,
        )
        end_clock = _server_clock(primary)
        label = (tmp / "data" / "backup_label").read_text()
        start_lsn = re.search(r"^START WAL LOCATION: (\S+)", label, re.M).group(1)
        timeline_m = re.search(r"^START TIMELINE: (\d+)", label, re.M)
        end_lsn = None
        try:
            ranges = json.loads((tmp / "data" / "backup_manifest").read_text()).get("WAL-Ranges") or []
            end_lsn = ranges[-1]["End-LSN"] if ranges else None
        except (OSError, ValueError, KeyError):
            pass
        info = {
            "format": "plain",
            "start_time": _utc(start_clock).isoformat(),
            "end_time": end_clock.isoformat(),
            "start_lsn": start_lsn,
            "end_lsn": end_lsn,
            "timeline": int(timeline_m.group(1)) if timeline_m else None,
            "system_identifier": system_id,
            "server_version": version,
            "source": {"name": primary.name, "port": primary.port},
        }
        (tmp / BACKUP_INFO).write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def take_tar_base_backup(primary: Cluster, backups: Path) -> Path:
    """A base backup as many self-managed hosts keep them (the drill's host-pitr method restores it):
    `pg_basebackup -Ft -z -X stream` into a new directory <backups>/<UTC stamp>/ holding base.tar.gz, pg_wal.tar.gz
    and backup_manifest, owned by the server user; written under a dot-name and renamed into place. Returns it."""
    backups = _make_dir(Path(backups).resolve())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, tmp = backups / stamp, backups / f".{stamp}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _run([pg_bin("pg_basebackup"), "-d", _conninfo_to(primary, "opsflow_tar_backup"), "-D", str(tmp), "-Ft", "-z",
              "-X", "stream", "-c", "fast", "--no-sync"],
             cwd=backups, timeout=600, what=f"tar base backup of {primary.name}", logfile=primary.logfile)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def list_base_backups(root: Path) -> list[Path]:
    """The complete base backups under <root>/base-backups/ (root may also be that directory), oldest first."""
    d = _backups_dir(root)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / BACKUP_INFO).is_file())


def latest_base_backup(root: Path) -> Path | None:
    """The newest complete base backup under <root>/base-backups/, or None."""
    backups = list_base_backups(root)
    return backups[-1] if backups else None


def base_backup_for(root: Path, target_time: datetime | None) -> Path | None:
    """The newest base backup that can be restored to target_time (its end_time <= target_time); None:
    the newest backup of all. None when there is none that early."""
    target = _utc(target_time)
    for backup in reversed(list_base_backups(root)):
        if target is None or read_base_backup(backup)["end_time"] <= target:
            return backup
    return None


def ensure_base_backup(primary: Cluster, root: Path) -> Path:
    """The newest base backup of this cluster's system under <root>/base-backups/; takes one when there is
    none (or only backups of another system, i.e. another initdb). Returns its directory."""
    latest = latest_base_backup(root)
    if latest is not None:
        with _connect(primary) as conn:
            system_id = conn.execute("select system_identifier::text from pg_control_system()").fetchone()[0]
        if read_base_backup(latest).get("system_identifier") == system_id:
            return latest
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return take_base_backup(primary, _backups_dir(root) / stamp)


def earliest_restorable_time(root: Path) -> datetime | None:
    """The earliest point in time restore_to_time() can reach with the base backups under root: the end of
    the oldest base backup (a restore must replay at least to the end of its backup to be consistent; the
    backup's start time would be optimistic by the backup's duration). None without a base backup."""
    backups = list_base_backups(root)
    return min(read_base_backup(b)["end_time"] for b in backups) if backups else None


def archive_now(primary: Cluster, timeout: float = ARCHIVE_TIMEOUT) -> datetime:
    """Make everything committed so far restorable, and return that point in time T.

    Commits a marker transaction (an xid, no data), switches to a new WAL segment (pg_switch_wal) and waits
    until the archiver has archived the segment. Recovery can only replay archived WAL, and a recovery
    target time is only reached when a later commit exists in the archive: the marker is that commit. T is
    taken inside the marker transaction, before its commit, so restore_to_time(T) stops just before the
    marker and holds every transaction committed before T.
    """
    with _connect(primary) as conn:
        in_recovery, archive_mode = conn.execute(
            "select pg_is_in_recovery(), current_setting('archive_mode')").fetchone()
        if in_recovery:
            raise PostgresLabError(f"archive_now: {primary.name} is a replica; archive on the primary")
        if archive_mode == "off":
            raise PostgresLabError(f"archive_now: {primary.name} does not archive WAL (archive_mode = off); "
                                   f"create it with init_primary(..., archive_dir=...)")
        with conn.transaction():
            # READ WRITE: a fenced primary (default_transaction_read_only) still gets its marker.
            conn.execute("set transaction read write")
            point = _utc(conn.execute("select clock_timestamp(), pg_current_xact_id()").fetchone()[0])
        segment = conn.execute("select pg_walfile_name(pg_switch_wal())").fetchone()[0]
        deadline = time.monotonic() + timeout
        while True:
            last, failed, failed_at = conn.execute(
                "select coalesce(last_archived_wal, ''), last_failed_wal, last_failed_time from pg_stat_archiver"
            ).fetchone()
            if len(last) >= 24 and last[:24] >= segment:
                return point
            if time.monotonic() > deadline:
                why = f"; the archiver last failed on {failed} at {failed_at}" if failed else ""
                raise PostgresLabError(f"archive_now: {segment} of {primary.name} not archived after {timeout:.0f}s "
                                       f"(last archived: {last or 'none'}{why})\n{_log_section(primary.logfile)}")
            time.sleep(0.05)


def cluster_root(cluster: Cluster) -> Path:
    """The root a lab cluster was created under (root/name/data): where its base-backups/ directory lives."""
    return Path(cluster.datadir).resolve().parent.parent


def archive_dir_of(cluster: Cluster) -> Path | None:
    """The WAL archive a lab cluster archives to (from its opsflow.conf), or None when it does not archive.
    With cluster_root() this is all another process (the ARM or AWS emulator) needs to restore a source
    cluster it knows only from Cluster.to_dict()."""
    try:
        text = (Path(cluster.datadir) / _CONF_FILE).read_text()
    except OSError:
        return None
    if not re.search(r"(?m)^archive_mode = on$", text):
        return None
    m = re.search(r"(?m)^archive_command = 'if test -f (.+?)/%f; then", text)  # archive_command()'s
    if not m:
        return None
    return Path(shlex.split(m.group(1).replace("''", "'"))[0])


def _archived_segments(archive_dir: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(archive_dir) if _SEGMENT.match(n))
    except FileNotFoundError:
        raise PostgresLabError(f"WAL archive {archive_dir} does not exist") from None


_COMMIT = re.compile(r"desc: COMMIT(?:_PREPARED)? (?:\d+: )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def last_archived_commit_time(archive_dir: Path, max_segments: int = 16) -> datetime | None:
    """The commit time of the newest transaction in the archive (pg_waldump of the newest segments), or None."""
    archive_dir = Path(archive_dir)
    env = {**_server_env(), "TZ": "UTC"}
    for name in reversed(_archived_segments(archive_dir)[-max_segments:]):
        # pg_waldump stops with an error at the end of the segment's valid WAL (zeros after a switch):
        # its exit status says nothing about the records it did print.
        p = subprocess.run([pg_bin("pg_waldump"), "-p", str(archive_dir), "-r", "Transaction", name],
                           capture_output=True, text=True, env=env, timeout=60)
        times = _COMMIT.findall(p.stdout)
        if times:
            return datetime.fromisoformat(times[-1]).replace(tzinfo=timezone.utc)
    return None


def latest_restorable_time(source: "Cluster | Path") -> datetime | None:
    """The latest point in time a restore can reach.

    A running primary (Cluster): archive_now(primary), i.e. now, made restorable (this writes a marker
    commit and switches WAL). An archive directory (Path): the commit time of its newest transaction; a
    restore to that time holds every transaction committed before it (the newest one itself is left out:
    recovery_target_inclusive = off). None: the archive holds no commit.
    """
    if isinstance(source, Cluster):
        return archive_now(source)
    return last_archived_commit_time(Path(source))


def _copy_as_server_user(src: Path, dest: Path) -> None:
    _run(["cp", "-a", str(src), str(dest)], cwd=dest.parent, timeout=600, what=f"copy {src} to {dest}")


def _recovery_conf(archive_dir: Path, target: datetime | None) -> str:
    restore = f"cp {shlex.quote(str(archive_dir))}/%f %p"
    lines = ["# restore in progress (lab/postgres.py restore_to_time); removed once the server is promoted",
             f"restore_command = '{restore.replace(chr(39), chr(39) * 2)}'",
             "recovery_target_timeline = 'latest'"]
    if target is not None:
        lines += [f"recovery_target_time = '{target.isoformat(sep=' ')}'",
                  "recovery_target_inclusive = off",
                  "recovery_target_action = 'promote'"]
    return "\n".join(lines) + "\n"


def restore_to_time(base_backup: Path, archive_dir: Path, root: Path, name: str, target_time: datetime | None,
                    port: int | None = None, *, timeout: float = RESTORE_TIMEOUT, host: str = "127.0.0.1") -> Cluster:
    """A NEW cluster root/name restored from `base_backup` by replaying the archived WAL up to target_time,
    promoted and writable (its own primary: no archiving, no replicas, not the source's port).

    Semantics: recovery_target_time = target_time, recovery_target_inclusive = off, recovery_target_action
    = promote, recovery_target_timeline = latest. The restored server holds exactly the transactions that
    committed strictly before target_time (a transaction committed at exactly target_time is left out).
    target_time None: replay to the end of the archive. A naive datetime is taken as UTC.

    Only archived WAL can be replayed: call archive_now(source primary) first (latest_restorable_time(primary)
    does, and returns the latest reachable target). Raises PostgresLabError (with the server log's tail)
    when the target is earlier than the base backup's end (earliest_restorable_time), when no commit at or
    after the target is in the archive (the target is not reached: in the future, or not archived yet), or
    when recovery fails; the half-restored data directory is removed then (the log stays).
    Returns once the server is out of recovery and accepts connections.
    """
    base_backup = Path(base_backup).resolve()
    archive_dir = Path(archive_dir).resolve()
    info = read_base_backup(base_backup)
    target = _utc(target_time)
    if not (base_backup / "data" / "PG_VERSION").is_file():
        raise PostgresLabError(f"restore {name}: {base_backup} has no data directory")
    if not archive_dir.is_dir():
        raise PostgresLabError(f"restore {name}: the WAL archive {archive_dir} does not exist")
    if target is not None and target < info["end_time"]:
        raise PostgresLabError(
            f"restore {name}: the point in time {target.isoformat()} is before the base backup "
            f"{base_backup.name} (restorable from {info['end_time'].isoformat()}); pick a later time or an older "
            "base backup"
        )
    home, datadir, logfile = _cluster_paths(root, name)
    if datadir.exists():
        raise PostgresLabError(f"restore {name}: {datadir} already exists; remove it (drop_cluster) "
                               "or pick another name")
    port = port or free_port()
    if _port_open(port, host):
        raise PostgresLabError(f"restore {name}: port {port} on {host} is already in use")
    _make_dir(home)
    cluster = Cluster(name=name, datadir=datadir, port=port, logfile=logfile, host=host)
    what = f"restore {name} from {base_backup.name} to {target.isoformat() if target else 'the end of the archive'}"
    try:
        _copy_as_server_user(base_backup / "data", datadir)
        for leftover in ("standby.signal", "postmaster.pid", "postmaster.opts", "backup_manifest"):
            (datadir / leftover).unlink(missing_ok=True)
        # Its own server: no archiving into the source's archive (a restored timeline there would be followed
        # by later restores), its own port, no fence, no streaming.
        _write_server_file(datadir / _CONF_FILE, _conf_text(port, None, host) + _recovery_conf(archive_dir, target))
        _rewrite_auto_conf(datadir, [])
        _write_server_file(datadir / "recovery.signal", "")
        cluster.start(wait=False)
        _wait_promoted(cluster, timeout, what)
    except BaseException as e:
        try:
            cluster.kill()
        finally:
            shutil.rmtree(datadir, ignore_errors=True)
        if isinstance(e, PostgresLabError):
            raise PostgresLabError(_restore_hint(str(e), cluster, target, archive_dir)) from None
        raise
    # Recovery is over: drop the recovery settings so they cannot apply to this server again.
    _write_server_file(datadir / _CONF_FILE, _conf_text(port, None, host))
    return cluster


def _wait_promoted(cluster: Cluster, timeout: float, what: str) -> None:
    started = time.monotonic()
    deadline = started + timeout
    last = "not started"
    seen = False
    while True:
        if cluster.is_running():
            seen = True
        elif seen or time.monotonic() - started > 15:
            # pg_ctl start -W returns before the postmaster writes its pid file: gone only once it was seen.
            time.sleep(0.2)  # the log line that says why may still be on its way
            raise PostgresLabError(f"{what}: the server stopped during recovery\n{_log_section(cluster.logfile)}")
        if _port_open(cluster.port, cluster.host):
            try:
                with _connect(cluster, timeout=3) as conn:
                    if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                        return
                    replayed = conn.execute("select pg_last_wal_replay_lsn()").fetchone()[0]
                    last = f"in recovery, replayed up to {replayed}"
            except psycopg.Error as e:
                last = str(e).strip()
        if time.monotonic() > deadline:
            raise PostgresLabError(f"{what}: still not promoted after {timeout:.0f}s ({last})\n"
                                   f"{_log_section(cluster.logfile)}")
        time.sleep(0.1)


def _restore_hint(message: str, cluster: Cluster, target: datetime | None, archive_dir: Path) -> str:
    log = log_tail(cluster.logfile, 60)
    if "recovery ended before configured recovery target was reached" in log:
        last = None
        try:
            last = last_archived_commit_time(archive_dir)
        except PostgresLabError:
            pass
        return (f"restore {cluster.name}: the point in time {target.isoformat() if target else '?'} "
                "was not reached: the "
                f"archive holds no transaction committed at or after it (newest archived commit: "
                f"{last.isoformat() if last else 'none'}). A time in the future, or WAL not archived yet: call "
                f"archive_now() on the source primary first.\n{message}")
    if "before consistent recovery point" in log:
        return f"restore {cluster.name}: the point in time is before the end of the base backup.\n{message}"
    return message


# -- rebuilding a former primary as a replica -----------------------------------------------------------


def rebuild_replica(primary: Cluster, old: Cluster, root: Path, *, slot: str | None = None, allow_rewind: bool = True,
                    timeout: float = 60) -> Cluster:
    """Make `old` (a former primary that diverged: fenced, stopped or killed) a streaming replica of
    `primary`, on old's own name, port, data directory and log file.

    1. Already a replica streaming from `primary`: nothing to do (method "already-streaming").
    2. Stop `old` cleanly if it runs. pg_rewind its data directory from `primary` (a killed `old` is first
       taken through crash recovery in single-user mode by pg_rewind itself, never started as a primary),
       configure it as a standby, start it and wait until it streams (method "pg_rewind").
    3. If pg_rewind is not possible or any of that fails: move the old data directory aside to
       <datadir>.diverged-<UTC stamp> (kept, never reused) and take a fresh pg_basebackup (method
       "pg_basebackup").
    Either way: standby.signal, primary_conninfo (application_name = old.name), and the settings that must
    not leak from the old primary or from the source are removed from postgresql.auto.conf: the fence
    (default_transaction_read_only), an old primary_conninfo/slot, restore/recovery settings.

    Returns a Cluster equal to `old` whose `.rebuild` (RebuildInfo) says how: .method, .seconds,
    .fallback_reason, .moved_aside. `root` (the lab's clusters directory) is accepted for symmetry with
    create_replica and not needed: the cluster keeps its own directories (old.datadir is recreated, parents
    included, when it is gone altogether). `timeout`: how long the rewound server may take to stream before
    the fallback is taken. Raises PostgresLabError when even the fresh base backup fails.
    """
    t0 = time.monotonic()
    _check_slot_name(slot)
    target = Cluster(name=old.name, datadir=old.datadir, port=old.port, logfile=old.logfile)
    if target.port == primary.port or target.datadir.resolve() == primary.datadir.resolve():
        raise ValueError(f"rebuild_replica: {old.name} and {primary.name} are the same cluster")
    what = f"rebuild {old.name} as a replica of {primary.name}"
    if not primary.is_running():
        raise PostgresLabError(f"{what}: the primary is not running\n{_log_section(primary.logfile)}")
    with _connect(primary) as conn:
        if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
            raise PostgresLabError(f"{what}: {primary.name} is in recovery, not a primary")
        # pg_rewind reads the source's timeline from its control file, which a recently promoted server
        # updates only with its next checkpoint: without one, pg_rewind sees no divergence ("no rewind
        # required") and the old primary cannot follow the new timeline.
        conn.execute("checkpoint")

    def done(method: str, reason: str | None = None, moved: Path | None = None) -> Cluster:
        target.rebuild = RebuildInfo(method=method, seconds=round(time.monotonic() - t0, 3), fallback_reason=reason,
                                     moved_aside=moved)
        return target

    if target.is_running():
        try:
            with _connect(target, timeout=3) as conn:
                in_recovery, status, sender_port = conn.execute(
                    "select pg_is_in_recovery(), (select status from pg_stat_wal_receiver), "
                    "(select sender_port from pg_stat_wal_receiver)"
                ).fetchone()
            if in_recovery and status == "streaming" and sender_port == primary.port:
                return done("already-streaming")
        except psycopg.Error:
            pass
        try:
            target.stop("fast")
        except PostgresLabError:
            target.kill()  # pg_rewind takes it through crash recovery

    reason: str | None = None
    if not allow_rewind:
        reason = "pg_rewind not allowed by the caller"
    elif not (target.datadir / "PG_VERSION").is_file():
        reason = f"no data directory at {target.datadir}"
    else:
        try:
            target._remove_stale_lock()
            # pg_rewind throws away what the old primary wrote after the split: keep a copy of it first.
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            kept = target.datadir.with_name(f"{target.datadir.name}.before-rewind-{stamp}")
            shutil.copytree(target.datadir, kept, symlinks=True)
            (kept / "postmaster.pid").unlink(missing_ok=True)
            _run([pg_bin("pg_rewind"), "-D", str(target.datadir),
                  "--source-server", _conninfo_to(primary, f"{old.name}_rewind"), "--no-sync"],
                 cwd=target.datadir.parent, timeout=300, what=f"{what}: pg_rewind")
            _configure_standby(target, primary, slot)
            log_start = target.logfile.stat().st_size if target.logfile.exists() else 0
            target.start(wait=True)
            _wait_following(target, timeout, log_start)
            return done("pg_rewind", moved=kept)
        except PostgresLabError as e:
            reason = str(e)
            try:
                target.stop("immediate")
            except PostgresLabError:
                target.kill()

    moved = None
    if target.datadir.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        moved = target.datadir.with_name(f"{target.datadir.name}.diverged-{stamp}")
        os.rename(target.datadir, moved)
        (moved / "postmaster.pid").unlink(missing_ok=True)
    elif not target.datadir.parent.exists():
        _make_dir(target.datadir.parent)
    _basebackup_replica(primary, target, slot)
    return done("pg_basebackup", reason, moved)


_CANNOT_FOLLOW = re.compile(r"forked off current database system timeline \d+ before current recovery point|"
                            r"is not a child of this server's history|requested starting point .* is ahead of|"
                            r"highest timeline \d+ of the primary is behind")


def _wait_following(replica: Cluster, timeout: float, log_start: int) -> None:
    """wait_streaming, but fail at once when the server log says it cannot follow its primary's timeline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_streaming(replica, timeout=1)
            return
        except PostgresLabError:
            if time.monotonic() > deadline:
                raise
        try:
            with open(replica.logfile, "rb") as f:
                f.seek(log_start)
                new = f.read().decode(errors="replace")
        except OSError:
            new = ""
        m = _CANNOT_FOLLOW.search(new)
        if m:
            raise PostgresLabError(f"cluster {replica.name}: cannot follow its primary ({m.group(0)})\n"
                                   f"{_log_section(replica.logfile)}")


# -- removal ----------------------------------------------------------------------------------------------


def drop_cluster(cluster: Cluster) -> None:
    """Stop the cluster (immediate; SIGKILL if that fails) and remove it: its home directory root/name when
    it has the lab's layout (root/name/data), else its data directory and log file. Idempotent."""
    if (cluster.datadir / "PG_VERSION").exists() or cluster.datadir.exists():
        try:
            cluster.stop("immediate")
        except PostgresLabError:
            cluster.kill()
    home = cluster.datadir.parent
    if cluster.datadir.name == "data" and home.name == cluster.name:
        shutil.rmtree(home, ignore_errors=True)
    else:
        shutil.rmtree(cluster.datadir, ignore_errors=True)
        cluster.logfile.unlink(missing_ok=True)


# -- logical dumps ------------------------------------------------------------------------------------------


def _client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def _run_client(args: list[str], what: str, timeout: float) -> str:
    """A client tool (pg_dump, pg_restore) as the current user, with the caller's environment."""
    try:
        p = subprocess.run(args, env=_client_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PostgresLabError(f"{what}: timed out after {timeout:.0f}s") from None
    if p.returncode != 0:
        raise PostgresLabError(f"{what}: {Path(args[0]).name} exited with {p.returncode}\n"
                               f"{_excerpt(p.stderr + p.stdout)}")
    return p.stdout


def _dsn_with(dsn: str, **params: str) -> str:
    return make_conninfo(dsn, **params)


def dump_database(cluster_or_dsn: "Cluster | str", dest_file: Path, *, dbname: str | None = None,
                  timeout: float = 3600) -> Path:
    """pg_dump -Fc of one database into dest_file (written to a temporary name, then renamed: a dest_file
    that exists is complete). The database is the DSN's (a Cluster: 'postgres'), or dbname. Returns dest_file."""
    dsn = cluster_or_dsn.dsn if isinstance(cluster_or_dsn, Cluster) else cluster_or_dsn
    if dbname:
        dsn = _dsn_with(dsn, dbname=dbname)
    dest_file = Path(dest_file)
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_file.with_name(f".{dest_file.name}.partial-{os.getpid()}")
    try:
        _run_client([pg_bin("pg_dump"), "-Fc", "-f", str(tmp), "-d", dsn], f"pg_dump to {dest_file}", timeout)
        os.replace(tmp, dest_file)
    finally:
        tmp.unlink(missing_ok=True)
    return dest_file


def restore_dump(dump_file: Path, dsn: str, dbname: str, *, replace: bool = False, jobs: int = 1,
                 timeout: float = 3600) -> str:
    """Create database `dbname` on the server of `dsn` (connecting to the DSN's own database to do so) and
    pg_restore dump_file into it (--no-owner --no-acl: roles of the source need not exist on a scratch
    server; --exit-on-error). An existing dbname is an error, unless replace=True (dropped first, WITH FORCE).
    Returns the DSN of the restored database."""
    dump_file = Path(dump_file)
    if not dump_file.is_file():
        raise PostgresLabError(f"restore dump: {dump_file} does not exist")
    with _connect(dsn) as conn:
        if replace:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(dbname)))
        try:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(dbname)))
        except pgerrors.DuplicateDatabase:
            raise PostgresLabError(f"restore dump: database {dbname!r} already exists "
                                   "(replace=True drops it first)") from None
    target = _dsn_with(dsn, dbname=dbname)
    args = [pg_bin("pg_restore"), "--no-owner", "--no-acl", "--exit-on-error", "-d", target]
    if jobs > 1:
        args += ["-j", str(jobs)]
    _run_client([*args, str(dump_file)], f"pg_restore of {dump_file.name} into {dbname}", timeout)
    return target
