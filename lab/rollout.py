"""The lab's rollout stage: real app processes, a real NGINX splitting real traffic, a real Prometheus, load.

One process (`python -m lab.rollout ...`), started by `opsflow lab up --rollout`, plays the parts a cluster
would: the kubelet (it runs one `lab.app` process per deployment of the Kubernetes emulator that has
replicas, with the deployment's image; a new image gets a new process and the old one stops once NGINX no
longer sends it traffic), the Gateway API implementation (it renders the HTTPRoute's backendRefs — service
name and weight — into an NGINX upstream: a service selects the deployments whose pod labels match its
selector and that have a ready replica, as endpoints do; then `nginx -s reload`), and Prometheus service
discovery (a file_sd target list, one target per app process). A load generator sends steady requests
through NGINX. NGINX and Prometheus run as this user with their own prefix and data directory in the lab.

The Kubernetes API is polled every ~0.25 s over plain HTTP (the emulator has no watch).

With `--router nginx` (`opsflow lab up --rollout --router nginx`) NGINX is plain NGINX in front of services
outside Kubernetes: each deployment's process has a fixed port (web, web-canary, web-baseline; a new image's
process takes the port over, SO_REUSEPORT), nginx.conf includes `upstream.conf`, and that file is opsflow's: the
worker writes it, runs `nginx -t` and reloads (activities/nginx.py). The stage writes it once, stable alone, as a
person would have, and never follows the HTTPRoute.

With `--workload host` as well, the app runs outside Kubernetes: no process follows the emulator's deployments;
each role's instance is started, checked and stopped by `lab/host_app.py`, the script the inventory's host workload
runs through the worker (the stage starts stable with it at the start and stops every role at the end).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.request import urlopen

from lab.ports import free_port

if TYPE_CHECKING:  # the stage runs as its own process (python -m lab.rollout), without the runner's imports
    from lab.processes import Lab

log = logging.getLogger("lab.rollout")

IMAGE_REPO = "registry.lab/shop"
IMAGES = {"healthy": f"{IMAGE_REPO}:healthy-2", "faulty": f"{IMAGE_REPO}:faulty-2", "slow": f"{IMAGE_REPO}:slow-2"}
STABLE_IMAGE = f"{IMAGE_REPO}:healthy-1"
APP = "web"
NAMESPACE = "shop"
NGINX = "/usr/sbin/nginx"
PROMETHEUS = "/usr/bin/prometheus"


def serves(port: int, version: str) -> bool:
    """The port answers with `version` (a new image's process has taken over a fixed port)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().headers.get("X-Version") == version
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- what the lab manager calls ----------------------------------------------------------------------------


def seed_additions(seed: dict) -> dict:
    """The rollout stage's objects in a region's emulator seed: the app runs the stable image, and the
    HTTPRoute `web` sends all of the service `web`'s traffic to it."""
    for d in seed.get("deployments", []):
        if d["name"] == APP:
            d["image"] = STABLE_IMAGE
    seed.setdefault("httproutes", []).append({"name": APP, "namespace": NAMESPACE,
                                              "backends": [{"name": APP, "port": 80, "weight": 100}]})
    return seed


ROLES = {"stable": APP, "canary": f"{APP}-canary", "baseline": f"{APP}-baseline"}  # the nginx router's servers


def start(lab: Lab, root: Path, kube_url: str, region: str, router: str = "httproute",
          workload: str = "kubernetes") -> dict:
    """Start the stage as a lab process; returns what `opsflow lab status` shows under `rollout`."""
    proxy_port, prom_port = free_port(), free_port()
    ports = {name: free_port() for name in ROLES.values()} if router == "nginx" else {}
    host_dir = root / "rollout" / "host"
    lab.spawn("rollout", [sys.executable, "-m", "lab.rollout", "--dir", str(root / "rollout"), "--kube", kube_url,
                          "--namespace", NAMESPACE, "--route", APP, "--proxy-port", str(proxy_port),
                          "--prometheus-port", str(prom_port),
                          *(a for name, p in ports.items() for a in ("--app-port", f"{name}={p}")),
                          *(["--host-dir", str(host_dir)] if workload == "host" else [])])
    lab.wait_port("rollout", prom_port, what="prometheus")
    lab.wait_port("rollout", proxy_port, what="nginx")
    d = root / "rollout" / "nginx"
    nginx = [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
    return {"images": dict(IMAGES), "stable_image": STABLE_IMAGE, "app": APP, "namespace": NAMESPACE, "region": region,
            "route": APP, "prometheus": f"http://127.0.0.1:{prom_port}", "proxy": f"http://127.0.0.1:{proxy_port}",
            "state": str(root / "rollout" / "state.json"), "router": router,
            **({"nginx": {"upstream_file": str(d / "upstream.conf"), "upstream": APP,
                          "servers": {role: [f"127.0.0.1:{ports[name]}"] for role, name in ROLES.items()},
                          "test": [NGINX, "-t", "-q", *nginx[1:]], "reload": [*nginx, "-s", "reload"]}}
               if router == "nginx" else {}),
            **({"workload": {"kind": "host", "run": [], "timeout": "30s",
                             **{verb: [sys.executable, "-m", "lab.host_app", "--dir", str(host_dir), verb, "{role}",
                                       *(["{image}"] if verb == "start" else [])]
                                for verb in ("start", "check", "stop")}},
                "queue": f"opsflow-lab-{region}-lb"}  # the worker on the "NGINX host" (--router-queue)
               if workload == "host" else {})}


def inventory_section(rollout: dict, receiver: str | None = None) -> dict:
    """The lab inventory's `rollout:` section for the stage; with the lab's receiver, HTTP checks in every bake:
    a smoke GET through the proxy (non-critical: it may reach either version) and the receiver's webhook gate
    (critical; it fails while <receiver dir>/fail-rollout exists)."""
    requests = 'sum(rate(http_requests_total{deployment="{deployment}"}[5s]))'
    errors = 'sum(rate(http_requests_total{deployment="{deployment}",status=~"5.."}[5s]))'
    p95 = ('histogram_quantile(0.95, sum by (le) '
           '(rate(http_request_duration_seconds_bucket{deployment="{deployment}"}[5s])))')
    return {
        "apps": {APP: {"region": rollout["region"], "deployment": APP, "container": APP, "service": APP,
                       "router": ({"kind": "nginx", **rollout["nginx"],
                                   **({"queue": rollout["queue"]} if rollout.get("queue") else {})}
                                  if rollout.get("router") == "nginx"
                                  else {"kind": "httproute", "name": rollout["route"]}),
                       **({"workload": rollout["workload"]} if rollout.get("workload") else {})}},
        "analysis": {
            "prometheus": rollout["prometheus"],
            "interval": "5s",
            "step": "1s",
            "min_requests": 20,
            "requests": 'sum(increase(http_requests_total{deployment="{deployment}"}[{interval}]))',
            "metrics": [
                {"name": "error-rate", "query": f"{errors} / {requests}", "max": 0.05, "direction": "increase",
                 "critical": True, "missing": "zero", "effect": 0.1},
                {"name": "p95-latency", "query": p95, "max": 0.25, "direction": "increase"},
            ],
        },
        "steps": [25, 50, 100],
        "bake": "15s",
        "approval": {"approvers": {"platform-lead": ["carol"], "qa": ["dave"]}, "require": ["platform-lead", "qa"]},
        "rollback_window": "20s",
        **({"checks": [
            {"name": "smoke", "url": rollout["proxy"] + "/", "status": 200, "critical": False, "timeout": 5},
            {"name": "rollout-gate", "kind": "webhook", "url": f"{receiver}/gate/rollout", "timeout": 5},
        ]} if receiver else {}),
    }


# -- the stage itself -------------------------------------------------------------------------------------------


@dataclass
class AppProcess:
    deployment: str
    image: str
    port: int
    proc: subprocess.Popen

    @property
    def version(self) -> str:
        return self.image.rsplit(":", 1)[-1]


@dataclass
class Stage:
    root: Path
    kube: str
    namespace: str
    route: str
    proxy_port: int
    prom_port: int
    app_ports: dict[str, int] = field(default_factory=dict)  # the nginx router: each deployment's fixed port
    host_dir: Path | None = None  # the host workload: lab/host_app.py runs the instances, not the emulator
    apps: dict[str, AppProcess] = field(default_factory=dict)
    retiring: list[AppProcess] = field(default_factory=list)
    rendered: str = ""
    targets: str = ""
    nginx: subprocess.Popen | None = None
    prometheus: subprocess.Popen | None = None

    # -- kubernetes ---------------------------------------------------------------------------------------
    def _list(self, path: str) -> list[dict]:
        with urlopen(f"{self.kube}{path}", timeout=5) as r:
            return json.loads(r.read())["items"]

    def observe(self) -> tuple[list[dict], dict[str, dict], list[dict]]:
        ns = self.namespace
        deployments = self._list(f"/apis/apps/v1/namespaces/{ns}/deployments")
        services = {s["metadata"]["name"]: s for s in self._list(f"/api/v1/namespaces/{ns}/services")}
        routes = [r for r in self._list(f"/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/httproutes")
                  if r["metadata"]["name"] == self.route]
        return deployments, services, routes

    # -- the kubelet's part --------------------------------------------------------------------------------
    def run_apps(self, deployments: list[dict]) -> None:
        wanted = {}
        for d in deployments:
            if (d["spec"].get("replicas") or 0) > 0:
                wanted[d["metadata"]["name"]] = d["spec"]["template"]["spec"]["containers"][0]["image"]
        for name, image in wanted.items():
            cur = self.apps.get(name)
            if cur is not None and cur.image == image and cur.proc.poll() is None:
                continue
            port = self.app_ports.get(name) or free_port()
            proc = subprocess.Popen([sys.executable, "-m", "lab.app", "--port", str(port), "--deployment", name,
                                     "--image", image],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None)
            deadline = time.monotonic() + 15
            version = image.rsplit(":", 1)[-1]
            while time.monotonic() < deadline and proc.poll() is None and not (
                    serves(port, version) if name in self.app_ports else port_open(port)):
                time.sleep(0.05)
            log.info("app %s runs %s on port %d (pid %d)", name, image, port, proc.pid)
            if cur is not None:
                self.retiring.append(cur)
            self.apps[name] = AppProcess(name, image, port, proc)
        for name in [n for n in self.apps if n not in wanted]:
            self.retiring.append(self.apps.pop(name))

    def stop_retired(self) -> None:
        """After NGINX has reloaded without them: old processes stop (their last scrape is kept in Prometheus)."""
        for app in self.retiring:
            app.proc.terminate()
            try:
                app.proc.wait(5)
            except subprocess.TimeoutExpired:
                app.proc.kill()
            log.info("app %s (%s) on port %d stopped", app.deployment, app.image, app.port)
        self.retiring.clear()

    # -- the gateway's part --------------------------------------------------------------------------------
    def endpoints(self, service: dict | None, deployments: list[dict]) -> list[AppProcess]:
        if service is None:
            return []
        selector = service["spec"].get("selector") or {}
        out = []
        for d in deployments:
            labels = d["spec"]["template"].get("metadata", {}).get("labels", {})
            ready = (d.get("status") or {}).get("readyReplicas", 0)
            app = self.apps.get(d["metadata"]["name"])
            if selector and all(labels.get(k) == v for k, v in selector.items()) and ready > 0 and app is not None:
                out.append(app)
        return out

    def render(self, deployments: list[dict], services: dict[str, dict], routes: list[dict]) -> str:
        servers, split = [], []
        for route in routes:
            for rule in route["spec"].get("rules", [])[:1]:
                for ref in rule.get("backendRefs", []):
                    weight = int(ref.get("weight", 1))
                    for app in self.endpoints(services.get(ref["name"]), deployments):
                        split.append(f"{ref['name']}={weight}->{app.deployment}:{app.version}")
                        if weight > 0:
                            servers.append(f"    server 127.0.0.1:{app.port} weight={weight} max_fails=0;")
        d = self.root / "nginx"
        upstream = "\n".join(servers) if servers else "    server 127.0.0.1:1 down;"
        backends = ", ".join(split) or "no backends"
        return f"""# rendered by lab.rollout from HTTPRoute {self.namespace}/{self.route}: {backends}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream route {{
{upstream}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{self.proxy_port};
    location / {{
      proxy_pass http://route;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream off;
    }}
  }}
}}
"""

    def apply(self, config: str) -> None:
        d = self.root / "nginx"
        (d / "nginx.conf").write_text(config)
        nginx = [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        if self.nginx is None:
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
            self.nginx = subprocess.Popen(nginx, stdin=subprocess.DEVNULL)
        else:
            subprocess.run([*nginx, "-s", "reload"], check=True, capture_output=True)
        self.rendered = config
        log.info("nginx: %s", config.splitlines()[0])

    # -- prometheus ----------------------------------------------------------------------------------------
    def write_targets(self) -> None:
        targets = json.dumps([{"targets": [f"127.0.0.1:{a.port}"], "labels": {"lab_deployment": a.deployment}}
                              for a in sorted(self.apps.values(), key=lambda a: a.deployment)], indent=1)
        if targets == self.targets:
            return
        path = self.root / "prometheus" / "targets.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(targets)
        os.replace(tmp, path)
        self.targets = targets

    def start_prometheus(self) -> None:
        d = self.root / "prometheus"
        d.mkdir(parents=True, exist_ok=True)
        (d / "targets.json").write_text("[]")
        (d / "prometheus.yml").write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: lab-app
    scrape_interval: 1s
    scrape_timeout: 900ms
    file_sd_configs:
      - files: ["{d}/targets.json"]
        refresh_interval: 1s
""")
        self.prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={d}/prometheus.yml",
                                            f"--storage.tsdb.path={d}/data",
                                            f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn",
                                            "--storage.tsdb.retention.time=1d"], stdin=subprocess.DEVNULL)

    # -- the loop ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"apps": {a.deployment: {"image": a.image, "port": a.port, "pid": a.proc.pid}
                         for a in self.apps.values()},
                "nginx": self.rendered.splitlines()[0] if self.rendered else None}

    def render_fixed(self) -> str:
        """The nginx router: nginx.conf includes upstream.conf, which opsflow's worker writes (stable alone at first,
        as a person would have it)."""
        d = self.root / "nginx"
        upstream = d / "upstream.conf"
        if not upstream.exists():
            server = f"127.0.0.1:{self.app_ports[APP]}"
            upstream.write_text(f"upstream {APP} {{\n    server {server};\n    keepalive 16;\n}}\n")
        conf = self.render([], {}, [])
        head = "# plain NGINX: the upstream is opsflow's file (the nginx router), not the HTTPRoute\n"
        route = "  upstream route {\n    server 127.0.0.1:1 down;\n    keepalive 16;\n  }\n"
        conf = conf.split("\n", 1)[1].replace(route, f"  include {upstream};\n")
        # a server that refuses (a process taking over its port) is retried on another; a 500 is the answer
        return head + conf.replace("proxy_pass http://route;", f"proxy_pass http://{APP};").replace(
            "proxy_next_upstream off;", "proxy_next_upstream error;")

    def start_host(self) -> None:
        """The host workload: the roles' fixed ports for lab/host_app.py, stable started with it (as a unit that was
        running before opsflow came), and Prometheus told of every role's port (a stopped one is just down)."""
        from lab import host_app

        assert self.host_dir is not None
        self.host_dir.mkdir(parents=True, exist_ok=True)
        ports = {role: self.app_ports[name] for role, name in ROLES.items()}
        (self.host_dir / "ports.json").write_text(json.dumps(ports))
        if host_app.start(self.host_dir, "stable", STABLE_IMAGE) != 0:
            raise RuntimeError("the host workload's stable instance did not start")
        path = self.root / "prometheus" / "targets.json"
        path.write_text(json.dumps([{"targets": [f"127.0.0.1:{p}"], "labels": {"lab_deployment": ROLES[r]}}
                                    for r, p in ports.items()], indent=1))

    def stop_host(self) -> None:
        from lab import host_app

        for role in ROLES:
            host_app.stop(self.host_dir, role)

    def step(self) -> None:
        if self.host_dir is not None:  # the worker runs the instances (lab/host_app.py); nothing to follow
            return
        deployments, services, routes = self.observe()
        self.run_apps(deployments)
        self.write_targets()
        if self.app_ports:  # the nginx router: opsflow's worker writes the upstream and reloads
            state = self.root / "state.json"
            if not state.exists() or json.loads(state.read_text()) != self.state():
                state.write_text(json.dumps(self.state(), indent=1))
            if self.retiring:
                self.stop_retired()
            return
        config = self.render(deployments, services, routes)
        if config != self.rendered:
            self.apply(config)
            state = self.root / "state.json"
            state.write_text(json.dumps(self.state(), indent=1))
        if self.retiring:
            time.sleep(0.3)  # let NGINX's old worker finish its requests to them
            self.stop_retired()

    def stop(self) -> None:
        if self.host_dir is not None:
            self.stop_host()
        self.retiring.extend(self.apps.values())
        self.apps.clear()
        for p in (self.nginx, self.prometheus):
            if p is not None and p.poll() is None:
                p.terminate()
        self.stop_retired()
        for p in (self.nginx, self.prometheus):
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def load(proxy_port: int, rps: float, stop: threading.Event, threads: int = 8) -> list[threading.Thread]:
    """Steady requests through the proxy: `threads` clients, each at rps/threads (a slow answer delays only its own)."""
    def client() -> None:
        conn = None
        interval = threads / rps
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=5)
                conn.request("GET", "/")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn = None
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - interval)

    out = [threading.Thread(target=client, daemon=True, name=f"load-{i}") for i in range(threads)]
    for t in out:
        t.start()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.rollout")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--kube", required=True, help="the Kubernetes emulator's URL")
    p.add_argument("--namespace", default=NAMESPACE)
    p.add_argument("--route", default=APP, help="the HTTPRoute the proxy follows")
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--prometheus-port", type=int, required=True)
    p.add_argument("--rps", type=float, default=40.0, help="load generator: requests per second through the proxy")
    p.add_argument("--app-port", action="append", default=[], metavar="DEPLOYMENT=PORT",
                   help="the nginx router: a deployment's fixed port (NGINX's upstream file names it)")
    p.add_argument("--host-dir", type=Path, help="the host workload: lab/host_app.py's directory (with --app-port)")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args.dir / "nginx").mkdir(parents=True, exist_ok=True)
    stage = Stage(args.dir, args.kube, args.namespace, args.route, args.proxy_port, args.prometheus_port,
                  {n: int(p) for n, p in (a.split("=", 1) for a in args.app_port)}, host_dir=args.host_dir)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    stage.start_prometheus()
    if stage.host_dir is not None:
        stage.start_host()
    stage.apply(stage.render_fixed() if stage.app_ports else stage.render([], {}, []))
    load(args.proxy_port, args.rps, done)
    try:
        while not done.is_set():
            try:
                stage.step()
            except Exception:  # keep reconciling, as a controller would
                log.exception("rollout stage step failed")
            for proc, what in ((stage.nginx, "nginx"), (stage.prometheus, "prometheus")):
                if proc is not None and proc.poll() is not None:
                    log.error("%s exited with %s", what, proc.returncode)
                    done.set()
            done.wait(0.25)
    finally:
        stage.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
