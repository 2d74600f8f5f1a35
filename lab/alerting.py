"""The lab's alerting stage (`opsflow lab up --alerts`): a real Prometheus and a real Alertmanager (Debian's
prometheus-alertmanager) in front of `opsflow alert-receiver`, the way a team runs them (README "Running opsflow as
a team").

    signals      python -m lab.alerting: /metrics with `lab_region_degraded{region}`, 1 while <dir>/degraded-<region>
                 exists (flip it: `touch <lab>/alerting/degraded-eastus`), and the worker's metrics when it runs
    prometheus   scrapes them every second; the lab's rule RegionDegraded fires at once; alerts go to Alertmanager
    alertmanager routes RegionDegraded by webhook (with the receiver's bearer token) to the receiver; repeats every
                 few seconds (repeat_interval), so the lab shows a repeat starting nothing
    receiver     `opsflow alert-receiver` as the inventory's alerts.requester ("alertmanager", an operator of the
                 failover with its own SSH key, which signs the start): a planned failover to westeurope, waiting
                 at its approval gate

`inventory_section` adds the alerts section and the operators to the lab's inventory.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lab.inventory import PRIMARY, REGIONS
from lab.processes import Lab, pick_port

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
REQUESTER = "alertmanager"  # the receiver's name in the lab's inventory (alerts.requester, an operator)
ALERT = "RegionDegraded"
# Alertmanager's pace in the lab: the first notification at once, a repeat of a firing alert every 2 s (a team's
# config says hours: deploy/alertmanager/alertmanager.yml).
GROUP_WAIT, GROUP_INTERVAL, REPEAT_INTERVAL = "0s", "1s", "2s"


def inventory_section(state: dict) -> dict:
    """The lab inventory's additions: the alert routes, and who may start a failover (the receiver with its key)."""
    standby = next(r for r in REGIONS if r != PRIMARY)
    return {
        "operators": {"failover": ["alice", "bob", "carol",
                                   {"name": REQUESTER, "ssh_key": state["alerting"]["public_key"]}]},
        "alerts": {"requester": REQUESTER,
                   "routes": [{"alertname": ALERT, "match": {"region": PRIMARY}, "procedure": "failover",
                               "to": standby}]},
    }


def new_key(folder: Path) -> str:
    """The receiver's own ed25519 key (OpenSSH private key file, 0600); -> the public key line."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = folder / "receiver.key"
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{pub} {REQUESTER}@lab"


def prepare(lab: Lab, root: Path) -> None:
    """Before the inventory is written: the stage's folder, ports and the receiver's key."""
    d = root / "alerting"
    d.mkdir(parents=True, exist_ok=True)
    lab.state["alerting"] = {
        "dir": str(d), "key": str(d / "receiver.key"), "public_key": new_key(d),
        "signals": f"http://127.0.0.1:{pick_port()}", "prometheus": f"http://127.0.0.1:{pick_port()}",
        "alertmanager": f"http://127.0.0.1:{pick_port()}", "receiver": f"http://127.0.0.1:{pick_port()}/alerts",
        "token_file": str(d / "receiver.token"),
    }
    token = Path(lab.state["alerting"]["token_file"])
    token.touch(mode=0o600)
    token.write_text(secrets.token_urlsafe(24) + "\n")


def port_of(url: str) -> int:
    return int(url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def host_of(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


def start(lab: Lab, env: dict) -> None:
    """After the inventory is written: signals, Alertmanager, Prometheus and the receiver (its Temporal client's
    environment in `env`)."""
    a = lab.state["alerting"]
    d = Path(a["dir"])
    scrape = [host_of(a["signals"])] + ([host_of(lab.state["worker_metrics"])] if lab.state.get("worker_metrics")
                                        else [])
    (d / "rules.yml").write_text(f"""groups:
  - name: lab
    interval: 1s
    rules:
      - alert: {ALERT}
        expr: lab_region_degraded == 1
        labels: {{severity: page}}
        annotations: {{summary: "{{{{ $labels.region }}}} is degraded (the lab's signal)"}}
""")
    (d / "prometheus.yml").write_text(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{d}/rules.yml"]
alerting:
  alertmanagers: [{{static_configs: [{{targets: ["{host_of(a['alertmanager'])}"]}}]}}]
scrape_configs:
  - job_name: lab
    static_configs: [{{targets: {scrape}}}]
""")
    (d / "alertmanager.yml").write_text(f"""route:
  receiver: on-call
  group_by: [alertname, region]
  group_wait: {GROUP_WAIT}
  group_interval: {GROUP_INTERVAL}
  repeat_interval: {REPEAT_INTERVAL}
  routes:
    - receiver: opsflow
      matchers: ['alertname="{ALERT}"']
      continue: true
receivers:
  - name: on-call
  - name: opsflow
    webhook_configs:
      - url: {a['receiver']}
        send_resolved: true
        http_config: {{authorization: {{credentials_file: {a['token_file']}}}}}
""")
    lab.spawn("alert-signals", [sys.executable, "-m", "lab.alerting", "--dir", str(d), "--port",
                                str(port_of(a["signals"]))])
    lab.spawn("alertmanager", [ALERTMANAGER, f"--config.file={d}/alertmanager.yml", f"--storage.path={d}/am-data",
                               f"--web.listen-address={host_of(a['alertmanager'])}", "--cluster.listen-address=",
                               "--log.level=warn"])
    lab.spawn("alert-prometheus", [PROMETHEUS, f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
                                   f"--web.listen-address={host_of(a['prometheus'])}", "--log.level=warn",
                                   "--rules.alert.resend-delay=1s", "--storage.tsdb.retention.time=1d"])
    lab.spawn("alert-receiver", [sys.executable, "-m", "starters.cli", "alert-receiver", "--env",
                                 lab.state["inventory"], "--key", a["key"], "--token-file", a["token_file"],
                                 "--port", str(port_of(a["receiver"])), "--state", str(d / "receiver-state.json")],
              env=env)
    for name, url in (("alert-signals", a["signals"]), ("alertmanager", a["alertmanager"]),
                      ("alert-prometheus", a["prometheus"]), ("alert-receiver", a["receiver"])):
        lab.wait_port(name, port_of(url))


def restart_receiver(root: Path, env: dict, forget: bool = False) -> None:
    """Stop the receiver and start it again (a pod rescheduled); `forget`: without its state file (an emptyDir)."""
    lab = Lab(root)
    argv = lab.state["processes"]["alert-receiver"]["argv"]
    lab.stop_process("alert-receiver")
    if forget:
        (Path(lab.state["alerting"]["dir"]) / "receiver-state.json").unlink(missing_ok=True)
    lab.spawn("alert-receiver", argv, env=env)
    lab.wait_port("alert-receiver", port_of(lab.state["alerting"]["receiver"]))


def degrade(state: dict, region: str, on: bool = True) -> None:
    """Flip the lab's signal: RegionDegraded fires for `region` (or stops)."""
    flag = Path(state["alerting"]["dir"]) / f"degraded-{region}"
    flag.touch() if on else flag.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the lab's signals for Prometheus (lab_region_degraded)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            lines = ["# TYPE lab_region_degraded gauge"] + [
                f'lab_region_degraded{{region="{r}"}} {int((args.dir / f"degraded-{r}").exists())}' for r in REGIONS]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
