"""`opsflow lab up|status|down|demo`: the command line of the lab (starters/cli.py hands `opsflow lab` here).

Every `opsflow` command builds this parser, so this module imports only the standard library at its top; the
runner (lab/manage.py) and the demos are imported when a `lab` command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

COMMANDS = (("up", "start the lab"), ("status", "show the lab"), ("down", "stop the lab and remove its directory"),
            ("demo", "lab up, then a planned failover with approval"))


def default_dir() -> Path:
    return Path(os.environ.get("OPSFLOW_LAB_DIR") or f"/tmp/opsflow-lab-{os.getuid()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    for name, text in COMMANDS:
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=None, help=f"lab directory (default {default_dir()})")
        p.add_argument("--json", action="store_true")
        if name in ("up", "demo"):
            p.add_argument("--no-worker", action="store_true", help="do not start a worker (tests run their own)")
            p.add_argument("--cloud", choices=["azure", "aws"], default="azure",
                           help="emulated cloud: Azure (ARM) or AWS (moto)")
            p.add_argument("--faults", type=float, default=0.0, metavar="FRACTION",
                           help="answer this fraction of cloud API requests with 429/503/dropped connections "
                                "(e.g. 0.2)")
            p.add_argument("--rollout", action="store_true",
                           help="also the rollout stage: app processes, NGINX, Prometheus, load")
            p.add_argument("--router", choices=["httproute", "nginx"], default="httproute",
                           help="with --rollout: what splits the canary's traffic: the HTTPRoute (NGINX follows it, "
                                "as a gateway would), or plain NGINX whose upstream file opsflow writes")
            p.add_argument("--workload", choices=["kubernetes", "host"], default="kubernetes",
                           help="with --rollout --router nginx: the app as Deployments of the Kubernetes emulator, or "
                                "as instances on a host that the worker starts, checks and stops (lab/host_app.py)")
            p.add_argument("--database", choices=["cloud", "self-managed", "patroni"], default="cloud",
                           help="cloud: the cloud's managed servers (Azure flexible server, RDS); self-managed: "
                                "provider postgres whose hosts the worker reaches (switchovers without a "
                                "rebuild); patroni: real Patroni clusters on etcd (eastus primary, westeurope "
                                "standby cluster), provider 'patroni' (Azure lab for the traffic)")
            p.add_argument("--patroni-layout", choices=["per-region", "stretched"], default="per-region",
                           help="with --database patroni: a Patroni cluster per region (standby clusters), or "
                                "ONE cluster whose members are the regions (Patroni's own switchover)")
            if name == "up":
                p.add_argument("--patroni-members", type=int, choices=[1, 2, 3], default=1,
                               help="with --database patroni (per-region): members in each region's cluster (Patroni "
                                    "clones them from the leader; the inventory's SQL follows whichever leads)")
                p.add_argument("--encrypt", action="store_true",
                               help="encrypt Temporal payloads (a lab key; a codec server for the UI)")
                p.add_argument("--alerts", action="store_true",
                               help="also Prometheus, Alertmanager and opsflow alert-receiver: an alert requests a "
                                    "failover that waits for approval (lab/alerting.py)")
                p.add_argument("--virtual-endpoint", action=argparse.BooleanOptionalAction, default=None,
                               help="Azure: a virtual endpoint over the two servers, named in the inventory: "
                                    "failovers are switchovers (the old primary becomes the replica). The default "
                                    "with the Azure cloud servers; --no-virtual-endpoint for the standalone "
                                    "promotion and the failback's rebuild")
        if name == "demo":
            p.add_argument("--drill", action="store_true",
                           help="then create the monthly restore-drill schedule and trigger it once")
            p.add_argument("--procedure", choices=["failover", "maintenance", "canary"], default="failover",
                           help="what the demo shows")


def main(args: argparse.Namespace) -> int:
    # Start-up time: the runner and the demos bring psycopg, boto3, the emulators and the workflows, which no other
    # `opsflow` command needs.
    from lab import demo, manage, rollout_demo

    root = (args.dir or default_dir()).resolve()
    if args.lab_command == "up":
        if args.virtual_endpoint and args.cloud != "azure":
            print("opsflow lab up: --virtual-endpoint is an Azure feature (not with --cloud aws)", file=sys.stderr)
            return 2
        if args.workload == "host" and not (args.rollout and args.router == "nginx"):
            print("opsflow lab up: --workload host runs behind plain NGINX: add --rollout --router nginx",
                  file=sys.stderr)
            return 2
        if args.patroni_layout != "per-region" and args.database != "patroni":
            print("opsflow lab up: --patroni-layout is for --database patroni", file=sys.stderr)
            return 2
        if args.patroni_members != 1 and (args.database != "patroni" or args.patroni_layout != "per-region"):
            print("opsflow lab up: --patroni-members is for --database patroni (per-region layout)", file=sys.stderr)
            return 2
        if args.database != "cloud" and (args.cloud != "azure" or args.virtual_endpoint):
            print(f"opsflow lab up: --database {args.database} runs with the Azure lab's traffic (not with --cloud aws "
                  "or --virtual-endpoint)", file=sys.stderr)
            return 2
        if args.virtual_endpoint is None:  # switchover first: what a team would set up on Azure today
            args.virtual_endpoint = args.cloud == "azure" and args.database == "cloud"
        manage.up(root, with_worker=not args.no_worker, quiet=args.json, cloud=args.cloud, faults=args.faults,
                  encrypt=args.encrypt, rollout=args.rollout, virtual_endpoint=args.virtual_endpoint,
                  router=args.router, alerts=args.alerts, database=args.database,
                  patroni_layout=args.patroni_layout, workload=args.workload,
                  patroni_members=args.patroni_members)
        s = manage.status(root)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            manage.print_status(s)
            print(f"  tear down with: opsflow lab down{'' if root == default_dir().resolve() else f' --dir {root}'}")
        return 0
    if args.lab_command == "status":
        s = manage.status(root)
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            manage.print_status(s)
        return 0 if s.get("up") else 1
    if args.lab_command == "down":
        manage.down(root, quiet=args.json)
        if args.json:
            print(json.dumps({"down": True, "dir": str(root)}))
        return 0
    if args.lab_command == "demo":
        if args.patroni_layout != "per-region" and args.database != "patroni":
            print("opsflow lab demo: --patroni-layout is for --database patroni", file=sys.stderr)
            return 2
        if args.database != "cloud" and (args.cloud != "azure" or args.procedure != "failover"):
            print(f"opsflow lab demo: --database {args.database} is for the failover demo on the Azure lab (not with "
                  "--cloud aws or --procedure maintenance|canary)", file=sys.stderr)
            return 2
        if args.procedure == "canary":
            return rollout_demo.run_canary_demo(root, with_worker=not args.no_worker, cloud=args.cloud)
        return demo.run_demo(root, with_worker=not args.no_worker, cloud=args.cloud, with_drill=args.drill,
                             procedure=args.procedure, database=args.database, patroni_layout=args.patroni_layout)
    raise AssertionError(args.lab_command)
