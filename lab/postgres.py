"""Real PostgreSQL clusters for the lab and the tests: a primary and streaming replicas on loopback.

Everything here runs the PostgreSQL 15 server binaries (initdb, pg_ctl, pg_basebackup); nothing is mocked.
The servers listen on 127.0.0.1 only, trust loopback connections (no passwords in the lab) and keep their
unix sockets off (TCP only), so several labs can run side by side.

PostgreSQL refuses to run as root. When this process is root, the server commands run as the `postgres`
OS user, the cluster directories are handed to it, and the parent directories get the "search" bit (o+x,
never read) so that user can reach them.

Any step that fails or takes too long raises `PostgresLabError` with the tail of the server log.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
        raise PostgresLabError(f"{what}: timed out after {timeout:.0f}s\n{_excerpt(out)}{_log_section(logfile)}") from None
    if p.returncode != 0:
        raise PostgresLabError(f"{what}: {Path(args[0]).name} exited with {p.returncode}\n{_excerpt(p.stdout)}{_log_section(logfile)}")
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


# -- ports ---------------------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (not handed out before by this process)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise PostgresLabError("no free loopback port found")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


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
class Cluster:
    name: str
    datadir: Path
    port: int
    logfile: Path

    def __post_init__(self) -> None:
        self.datadir = Path(self.datadir)
        self.logfile = Path(self.logfile)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

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
        lock = self.datadir / "postmaster.pid"
        if lock.exists():
            # Left by a killed server whose postmaster is gone (or a zombie not yet reaped by PID 1, which
            # PostgreSQL would take for a live postmaster): stale, safe to remove since nothing of it runs.
            lock.unlink()
        if _port_open(self.port):
            raise PostgresLabError(f"cluster {self.name}: port {self.port} on 127.0.0.1 is already in use by another process")
        args = [pg_bin("pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.logfile)]
        args += ["-w", "-t", str(int(START_TIMEOUT))] if wait else ["-W"]
        _run(args, cwd=self.datadir.parent, timeout=START_TIMEOUT + 15, what=f"cluster {self.name}: start", logfile=self.logfile)
        if wait:
            self._wait_accepting(START_TIMEOUT)

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if not self.is_running():
                raise PostgresLabError(f"cluster {self.name}: the server stopped while starting\n{_log_section(self.logfile)}")
            if time.monotonic() > deadline:
                raise PostgresLabError(f"cluster {self.name}: not accepting connections on port {self.port} after {timeout:.0f}s\n{_log_section(self.logfile)}")
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
        return {"name": self.name, "datadir": str(self.datadir), "port": self.port, "logfile": str(self.logfile)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        return cls(name=d["name"], datadir=Path(d["datadir"]), port=int(d["port"]), logfile=Path(d["logfile"]))


# -- configuration -------------------------------------------------------------------------------------------

_CONF_FILE = "opsflow.conf"  # included from postgresql.conf; copied to replicas by pg_basebackup


def _conf_text(port: int, archive_dir: Path | None) -> str:
    lines = [
        "# written by opsflow lab (lab/postgres.py)",
        "listen_addresses = '127.0.0.1'",
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
        target = shlex.quote(str(archive_dir))
        # Never overwrite a segment already archived (an old primary must not clobber the new one's WAL).
        command = f"test ! -f {target}/%f && cp %p {target}/%f"
        lines += ["archive_mode = on", f"archive_command = '{command.replace(chr(39), chr(39) * 2)}'", "archive_timeout = 60"]
    return "\n".join(lines) + "\n"


_HBA = """\
# written by opsflow lab (lab/postgres.py): trust on loopback, TCP only
# TYPE  DATABASE     USER  ADDRESS        METHOD
host    all          all   127.0.0.1/32   trust
host    replication  all   127.0.0.1/32   trust
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


def init_primary(root: Path, name: str, port: int | None = None, archive_dir: Path | None = None) -> Cluster:
    """initdb a new cluster under root/name, configure it for streaming replication and start it."""
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
    return cluster


def create_replica(primary: Cluster, root: Path, name: str, port: int | None = None, slot: str | None = None) -> Cluster:
    """A streaming replica of `primary` under root/name (pg_basebackup -R -X stream), started and streaming."""
    home, datadir, logfile = _cluster_paths(root, name)
    if datadir.exists():
        raise PostgresLabError(f"cluster {name}: {datadir} already exists; remove it or pick another name")
    if not primary.is_running():
        raise PostgresLabError(f"cluster {name}: the primary {primary.name} is not running\n{_log_section(primary.logfile)}")
    _make_dir(home)
    port = port or free_port()
    conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={name}"
    args = [pg_bin("pg_basebackup"), "-d", conninfo, "-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync"]
    if slot:
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"replication slot name {slot!r}: use lower-case letters, digits and '_'")
        args += ["-S", slot]
        if not _slot_exists(primary, slot):
            args += ["-C"]
    try:
        _run(args, cwd=home, timeout=300, what=f"cluster {name}: pg_basebackup from {primary.name}", logfile=primary.logfile)
    except PostgresLabError:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    # -R wrote standby.signal and primary_conninfo; make the latter exactly what we want (application_name).
    auto = datadir / "postgresql.auto.conf"
    kept = [line for line in auto.read_text().splitlines() if not line.startswith(("primary_conninfo", "primary_slot_name"))]
    kept.append(f"primary_conninfo = '{conninfo}'")
    if slot:
        kept.append(f"primary_slot_name = '{slot}'")
    _write_server_file(auto, "\n".join(kept) + "\n")
    if not (datadir / "standby.signal").exists():
        _write_server_file(datadir / "standby.signal", "")
    _set_port(datadir, port)
    replica = Cluster(name=name, datadir=datadir, port=port, logfile=logfile)
    replica.start(wait=True)
    wait_streaming(replica)
    return replica


def _slot_exists(primary: Cluster, slot: str) -> bool:
    import psycopg

    with psycopg.connect(primary.dsn, connect_timeout=5, autocommit=True) as conn:
        return conn.execute("select 1 from pg_replication_slots where slot_name = %s", (slot,)).fetchone() is not None


def wait_streaming(replica: Cluster, timeout: float = 30) -> None:
    """Wait until the replica's WAL receiver streams from its primary."""
    import psycopg

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if not replica.is_running():
            raise PostgresLabError(f"cluster {replica.name}: the server is not running\n{_log_section(replica.logfile)}")
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
            raise PostgresLabError(f"cluster {replica.name}: not streaming after {timeout:.0f}s ({last})\n{_log_section(replica.logfile)}")
        time.sleep(0.1)
