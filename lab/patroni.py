"""Real Patroni for the lab (`opsflow lab up --database patroni`): Debian's /usr/bin/patroni (3.0.x) on an etcd
(Debian's etcd-server, /usr/bin/etcd, v3 API) on lab ports, one single-member Patroni cluster per region:

    eastus      scope lab-eastus       the primary cluster (its leader is the primary)
    westeurope  scope lab-westeurope   a standby cluster (dynamic configuration `standby_cluster`) whose standby
                                       leader streams from eastus's leader

Both clusters share one etcd under their own scopes (a real deployment has one DCS per region). PostgreSQL
listens on loopback and trusts it (no passwords in the lab, like lab/postgres.py); Patroni runs as the `postgres`
OS user when we are root. The failover moves `standby_cluster` from one cluster's dynamic configuration to the
other's through Patroni's REST API (activities/patroni.py); nothing here knows the procedures. Every leader
archives its WAL into one shared directory, <root>/wal-archive (archiving(): the drill's host-pitr restores from it).

    start(lab, root, say) -> dict[str, Cluster]   etcd, both clusters, westeurope streaming; the lab state's
                                                  "patroni" section (REST URLs, scopes, ports) that
                                                  lab.inventory.lab_inventory turns into provider "patroni"
    kill(lab, region) / restart(lab, region)      a region's Patroni and PostgreSQL die / its Patroni comes back

With `opsflow lab up --database patroni --patroni-layout stretched` the regions are instead members of ONE cluster
(scope lab-stretched, members eastus-1 and westeurope-1, one etcd): a failover is Patroni's own switchover.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import stat
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psycopg
import yaml

from lab.inventory import PRIMARY, REGIONS, replication_address
from lab.postgres import DEFAULT_BINDIR, Cluster, archive_command
from lab.processes import Lab, pick_port, stop_pid
from opsflow.sections import PatroniStandbySettings

PATRONI = "/usr/bin/patroni"
ETCD = "/usr/bin/etcd"
SERVER_USER = "postgres"
START_TIMEOUT = 90.0
# Short loops so a lab switchover takes seconds: Patroni checks ttl >= loop_wait + 2 * retry_timeout.
DCS = {"ttl": 12, "loop_wait": 1, "retry_timeout": 5, "maximum_lag_on_failover": 16 * 1024 * 1024}
PARAMETERS = {
    "max_connections": 100,
    "shared_buffers": "32MB",
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "512MB",
    "wal_log_hints": "on",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "1s",
    "unix_socket_directories": "",
}
HBA = ["host all all 127.0.0.0/8 trust", "host replication all 127.0.0.0/8 trust"]

Say = Callable[..., None]


def archiving(archive: Path) -> dict:
    """Every cluster's leader archives its WAL into ONE shared directory (the drill's host-pitr restores from it,
    across a failover's new timelines); a segment already there is never overwritten (an old leader must not clobber
    the new one's WAL; the same bytes again are a success), lab/postgres.py's archive_command."""
    return {"archive_mode": "on", "archive_command": archive_command(_owned_dir(archive)), "archive_timeout": 60}


def standby_settings(root: Path, region: str) -> dict:
    """What the region's cluster keeps in its standby_cluster whenever it follows the other region (the inventory's
    database.standby_cluster): a slot on the other region's leader, which that cluster keeps permanently
    (permanent_slots()), and the shared WAL archive as a fallback when streaming falls behind."""
    return {"primary_slot_name": f"opsflow_{region}",
            "restore_command": f"cp {shlex.quote(str(root / 'wal-archive'))}/%f %p"}


def permanent_slots(region: str) -> dict:
    """The slots the other regions' standby clusters stream through from this region's cluster (standby_settings()):
    Patroni keeps them on its leader, a standby leader included, so they are there when this region leads."""
    return {f"opsflow_{other}": {"type": "physical"} for other in REGIONS if other != region}


def scope(region: str) -> str:
    return f"lab-{region}"


def _owned_dir(path: Path) -> Path:
    """A directory the postgres OS user owns (when we are root), reachable through its parents (search bit)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        u = pwd.getpwnam(SERVER_USER)
        os.chown(path, u.pw_uid, u.pw_gid)
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
    return path


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups", "--", *argv]


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:  # Patroni answers 503 with a JSON body (e.g. GET /primary on a replica)
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def _wait(what: str, check: Callable[[], bool], lab: Lab, name: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not lab.alive(name):
            raise RuntimeError(f"{name} died while {what} (log {lab.state['processes'][name]['log']})")
        if time.monotonic() > deadline:
            log = Path(lab.state["processes"][name]["log"])
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.exists() else ""
            raise RuntimeError(f"{name}: not {what} after {timeout:.0f}s (log {log}):\n{tail}")
        time.sleep(0.2)


def start_etcd(lab: Lab, root: Path) -> str:
    client, peer = pick_port(), pick_port()
    data = root / "etcd"
    data.mkdir(parents=True, exist_ok=True)
    lab.spawn("etcd", [ETCD, "--name", "lab", "--data-dir", str(data),
                       "--listen-client-urls", f"http://127.0.0.1:{client}",
                       "--advertise-client-urls", f"http://127.0.0.1:{client}",
                       "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                       "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                       "--initial-cluster", f"lab=http://127.0.0.1:{peer}", "--log-level", "warn"])
    lab.wait_port("etcd", client)
    return f"127.0.0.1:{client}"


def _config(region: str, root: Path, etcd: str, rest_port: int, pg_port: int, standby_of: str | None,
            cluster: str | None = None, number: int = 1) -> dict:
    base = _owned_dir(root / "patroni" / (region if number == 1 else f"{region}-{number}"))
    # Patroni's defaults for slots (use_slots), like a production cluster: a standby leader then streams through
    # its primary_slot_name and asks its source for a read-write session (target_session_attrs)
    dcs: dict = {**DCS, "postgresql": {"use_pg_rewind": True,
                                       "parameters": PARAMETERS | archiving(root / "wal-archive")}}
    if cluster is None:  # a cluster per region
        dcs["slots"] = permanent_slots(region)
    if standby_of is not None:
        # what opsflow writes when it demotes a cluster (activities/patroni.py), from the start
        dcs["standby_cluster"] = PatroniStandbySettings(**standby_settings(root, region)).of(standby_of)
    return {
        "scope": cluster or scope(region),
        "namespace": "/opsflow-lab/",
        "name": f"{region}-{number}",
        "restapi": {"listen": f"127.0.0.1:{rest_port}", "connect_address": f"127.0.0.1:{rest_port}"},
        "etcd3": {"hosts": [etcd]},
        "bootstrap": {"dcs": dcs, "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"]},
        "postgresql": {
            "listen": f"127.0.0.1:{pg_port}",
            "connect_address": f"127.0.0.1:{pg_port}",
            "data_dir": str(base / "data"),
            "bin_dir": os.environ.get("OPSFLOW_PG_BINDIR") or str(DEFAULT_BINDIR),
            "pgpass": str(base / "pgpass"),
            "authentication": {"superuser": {"username": "postgres"}, "replication": {"username": "postgres"},
                               "rewind": {"username": "postgres"}},
            "pg_hba": HBA,
            "parameters": {"unix_socket_directories": ""},
        },
        "log": {"level": "WARNING"},
    }


def start(lab: Lab, root: Path, say: Say) -> dict[str, Cluster]:
    """etcd, then the primary cluster in `primary`, then the standby cluster in each other region streaming from
    it (or, with lab.state["patroni_layout"] == "stretched", one cluster whose members are the regions). Returns the
    clusters (Cluster objects over Patroni's data directories: the lab's seed, status and teardown use them);
    lab.state["patroni"] holds what the inventory needs."""
    if lab.state.get("patroni_layout") == "stretched":
        return start_stretched(lab, root, say)
    say("lab: Patroni clusters on etcd (eastus primary, westeurope standby cluster)")
    etcd = start_etcd(lab, root)
    state: dict = {"etcd": etcd, "regions": {}}
    clusters: dict[str, Cluster] = {}
    primary = ""  # the primary cluster's replication address (every member), once it runs
    for region in [PRIMARY, *[r for r in REGIONS if r != PRIMARY]]:
        rest_port, pg_port = pick_port(), pick_port()
        cfg = _config(region, root, etcd, rest_port, pg_port, None if region == PRIMARY else primary)
        if region == PRIMARY:
            what, ready = "leader (GET /primary 200)", lambda rest, port: _get(f"{rest}/primary")[0] == 200
        else:
            what, ready = "a streaming standby leader", \
                lambda rest, port: _get(f"{rest}/patroni")[1].get("role") == "standby_leader" and _streams(port)
        clusters[region], state["regions"][region] = _start_member(lab, root, region, cfg, what, ready)
        state["regions"][region].update(scope=scope(region), standby_cluster=standby_settings(root, region))
        state["regions"][region]["members"] = [
            _more(lab, root, region, etcd, n, None if region == PRIMARY else primary)
            for n in range(2, int(lab.state.get("patroni_members") or 1) + 1)]
        if region == PRIMARY:
            primary = replication_address(state["regions"][region])
    lab.state["patroni"] = state
    lab.save()
    return clusters


def _more(lab: Lab, root: Path, region: str, etcd: str, number: int, standby_of: str | None) -> dict:
    """Another member of a region's cluster (`--patroni-members N`): Patroni clones it from the cluster's leader
    (in a standby cluster: from the standby leader, a cascade) and it streams from it. Returns what the lab keeps
    of it (its PostgreSQL's cluster dict among them, for the teardown)."""
    cfg = _config(region, root, etcd, pick_port(), pick_port(), standby_of, number=number)
    cluster, kept = _start_member(lab, root, region, cfg, f"member {region}-{number} streaming",
                                  lambda rest, port: _get(f"{rest}/patroni")[1].get("role") in ("replica", "standby")
                                  and _streams(port), number)
    return {**kept, "name": f"{region}-{number}", "cluster": cluster.to_dict()}


def member_clusters(state: dict) -> list[Cluster]:
    """The PostgreSQL of every member beyond a region's first (its first is in state["postgres"])."""
    regions = (state.get("patroni") or {}).get("regions") or {}
    return [Cluster.from_dict(m["cluster"]) for r in regions.values() for m in r.get("members") or []]


def _start_member(lab: Lab, root: Path, region: str, cfg: dict, what: str,
                  ready: Callable[[str, int], bool], number: int = 1) -> tuple[Cluster, dict]:
    """Write a member's configuration, start its Patroni and wait until `ready(rest_api, pg_port)`. Returns its
    cluster and what lab.state["patroni"]["regions"] keeps of it."""
    suffix = "" if number == 1 else f"-{number}"
    path = root / "patroni" / f"{region}{suffix}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.chmod(path, 0o644)
    name = f"patroni-{region}{suffix}"
    lab.spawn(name, _as_server_user([PATRONI, str(path)]))
    rest, port = f"http://{cfg['restapi']['listen']}", int(cfg["postgresql"]["listen"].rsplit(":", 1)[1])
    _wait(what, lambda: ready(rest, port), lab, name)
    cluster = Cluster(name=name, datadir=Path(cfg["postgresql"]["data_dir"]), port=port,
                      logfile=Path(lab.state["processes"][name]["log"]))
    return cluster, {"rest_api": rest, "port": port, "dsn": cluster.dsn, "config": str(path)}


STRETCHED_SCOPE = "lab-stretched"


def member(region: str) -> str:
    return f"{region}-1"


def start_stretched(lab: Lab, root: Path, say: Say) -> dict[str, Cluster]:
    """One Patroni cluster (scope lab-stretched) whose members are the regions, one DCS (etcd) across them: eastus-1
    bootstraps and leads, westeurope-1 clones it (pg_basebackup, Patroni's default) and streams from the leader."""
    say("lab: one Patroni cluster stretched across the regions on etcd (eastus-1 leader, westeurope-1 replica)")
    etcd = start_etcd(lab, root)
    state: dict = {"etcd": etcd, "layout": "stretched", "scope": STRETCHED_SCOPE, "regions": {}}
    clusters: dict[str, Cluster] = {}
    for region in [PRIMARY, *[r for r in REGIONS if r != PRIMARY]]:
        cfg = _config(region, root, etcd, pick_port(), pick_port(), None, cluster=STRETCHED_SCOPE)
        if region == PRIMARY:
            what, ready = "leader (GET /primary 200)", lambda rest, port: _get(f"{rest}/primary")[0] == 200
        else:
            what, ready = "a streaming replica", lambda rest, port: _get(f"{rest}/replica")[0] == 200 and _streams(port)
        clusters[region], state["regions"][region] = _start_member(lab, root, region, cfg, what, ready)
        state["regions"][region].update(scope=STRETCHED_SCOPE, member=member(region))
    lab.state["patroni"] = state
    lab.save()
    return clusters


def _streams(port: int) -> bool:
    """Whether the server on `port` runs a streaming WAL receiver (Patroni 3.0's /patroni does not say)."""
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2) as c:
            return c.execute("select status = 'streaming' from pg_stat_wal_receiver").fetchone() == (True,)
    except psycopg.Error:
        return False


def kill(lab: Lab, region: str) -> None:
    """The region dies: its Patroni (SIGKILL) and its PostgreSQL (SIGKILL, in a session of its own), every member."""
    members = (lab.state["patroni"]["regions"][region].get("members") or [])
    for name in [f"patroni-{region}", *(f"patroni-{m['name']}" for m in members)]:
        info = lab.state["processes"].pop(name)
        lab.save()
        try:
            os.killpg(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_pid(info["pid"], timeout=5)  # reaps it
    for cluster in [Cluster.from_dict(lab.state["postgres"][region]), *(Cluster.from_dict(m["cluster"])
                                                                        for m in members)]:
        cluster.kill()


def restart(lab: Lab, region: str) -> None:
    """The region comes back: its Patroni started again on the same configuration; returns once its REST API
    answers (what Patroni then does with PostgreSQL is its own decision)."""
    r = lab.state["patroni"]["regions"][region]
    for name, m in [(f"patroni-{region}", r), *((f"patroni-{m['name']}", m) for m in r.get("members") or [])]:
        lab.spawn(name, _as_server_user([PATRONI, m["config"]]))
        _wait("answering on its REST API", lambda m=m: _get(f"{m['rest_api']}/patroni")[0] != 0, lab, name)
