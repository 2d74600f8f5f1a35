"""`opsflow maintenance`: the weekly maintenance window for one environment, or a fleet of them.

    opsflow maintenance --env prod.yaml [--region R] [--dry-run] [--wait] [--json] [--requester NAME]
                        [--reason TEXT]
    opsflow maintenance --env a.yaml --env b.yaml ... [--max-concurrency N] [--max-errors M]

One environment runs as `opsflow-<env>` (one procedure per environment at a time). Several run as a fleet
workflow whose children are `opsflow-<env>`: at most N at once, and no new one after M have failed.
"""

from __future__ import annotations

import argparse

from opsflow.client import connect, inventory_path, start_procedure
from opsflow.inventory import load_inventory
from opsflow.procedures import fleet_workflow_id
from starters.common import CliError, add_key_argument, approver_for, requester, run_started, start_signer
from workflows.maintenance import FleetInput, MaintenanceInput


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("maintenance", help="the weekly maintenance window: one environment or a fleet")
    parser.add_argument("--env", action="append",
                        help="inventory YAML, repeatable for a fleet (default: the running lab's)")
    parser.add_argument("--region", metavar="REGION",
                        help="the region whose database to maintain (default: the current primary)")
    parser.add_argument("--dry-run", action="store_true", help="preflight and print the plan; change nothing")
    parser.add_argument("--wait", action="store_true", help="follow progress until the end")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--requester", help="who asks (default: your login)")
    add_key_argument(parser)
    parser.add_argument("--reason")
    parser.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                        help="fleet: environments at once (default 1)")
    parser.add_argument("--max-errors", type=int, default=1, metavar="M",
                        help="fleet: no new environment after M failed (default 1)")
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    paths = [inventory_path(p) for p in (args.env or [None])]
    invs = [load_inventory(p) for p in paths]
    for path, inv in zip(paths, invs):
        if inv.maintenance is None:
            raise CliError(f"{path}: the inventory has no maintenance: section")
        if args.region:
            inv.region(args.region)  # unknown region: a clear error before anything starts
    if len({i.environment for i in invs}) != len(invs):
        raise CliError("the same environment is named twice")
    if args.max_concurrency < 1 or args.max_errors < 1:
        raise CliError("--max-concurrency and --max-errors must be at least 1")
    who = requester(args)
    dry = " (dry run)" if args.dry_run else ""
    client = await connect()
    if len(invs) == 1:
        inv = invs[0]
        inp = MaintenanceInput(inventory=inv, region=args.region, dry_run=args.dry_run, requester=who,
                               reason=args.reason or "")
        handle = await start_procedure(client, inv, "maintenance", inp, f"Maintenance window{dry} of {inv.environment}",
                                       signer=start_signer(inv, who, args.key))
        return await run_started(handle, args, f"maintenance of {inv.environment}, requested by {who}",
                                 None if args.dry_run else approver_for(inv, who))
    envs = [i.environment for i in invs]
    fleet = FleetInput(inventories=invs, region=args.region, dry_run=args.dry_run, requester=who,
                       reason=args.reason or "", max_concurrency=args.max_concurrency, max_errors=args.max_errors)
    handle = await start_procedure(client, invs[0], "maintenance-fleet", fleet,
                                   f"Maintenance{dry} of {len(invs)} environments: {', '.join(envs)}",
                                   workflow_id=fleet_workflow_id(envs), signer=start_signer(invs[0], who, args.key))
    if not args.json:
        print("  each environment runs as opsflow-<env> and waits for its own approval: "
              + ", ".join(f"opsflow-{e}" for e in envs))
    return await run_started(handle, args,
                             f"maintenance of {len(invs)} environments, at most {args.max_concurrency} at once", None)
