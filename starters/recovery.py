"""`opsflow failover`, `opsflow failback`, `opsflow drill`, `opsflow readiness`: the disaster-recovery
procedures. The inventory and the arguments become the procedure's input; opsflow.client starts it under the
environment's lock."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone

from opsflow.client import connect, inventory_path, start_procedure
from opsflow.inventory import Inventory, load_inventory
from starters.common import (
    CliError,
    add_json,
    add_key_argument,
    approver_for,
    emit,
    requester,
    run_started,
    start_signer,
)
from workflows.drill import DrillInput
from workflows.failback import FailbackInput
from workflows.failover import FailoverInput
from workflows.readiness import ReadinessInput

ENV_HELP = "inventory YAML (default: the running lab's)"


def register(sub: argparse._SubParsersAction) -> None:
    f = add_json(sub.add_parser("failover", help="fail the environment over to another region"))
    f.add_argument("--env", help=ENV_HELP)
    f.add_argument("--to", required=True, metavar="REGION")
    f.add_argument("--emergency", action="store_true",
                   help="the old region is down: no drain, no lag wait, forced promotion")
    f.add_argument("--dry-run", action="store_true", help="preflight and print the plan; change nothing")
    f.add_argument("--requester", help="who asks (default: your login)")
    f.add_argument("--reason")
    f.add_argument("--wait", action="store_true", help="follow progress until the end")
    add_key_argument(f)
    f.set_defaults(func=cmd_failover)

    fb = add_json(sub.add_parser(
        "failback", help="return to a recovered region: rebuild its replica, catch up, approve, fail over back"))
    fb.add_argument("--env", help=ENV_HELP)
    fb.add_argument("--to", required=True, metavar="REGION", help="the recovered region")
    fb.add_argument("--dry-run", action="store_true")
    fb.add_argument("--requester")
    fb.add_argument("--reason")
    fb.add_argument("--wait", action="store_true")
    add_key_argument(fb)
    fb.set_defaults(func=cmd_failback)

    d = add_json(sub.add_parser("drill",
                                help="restore test: restore a backup to a scratch target, verify it, delete it; "
                                     "`drill history`: the last drills read back from their stored reports"))
    d.add_argument("action", nargs="?", metavar="history",
                   help="history: the trend across runs (restore time, restore point age, objectives), no drill run")
    d.add_argument("--last", type=int, metavar="N", help="history: how many drills (default: the inventory's "
                   "drill.trend, else 10)")
    d.add_argument("--env", help=ENV_HELP)
    d.add_argument("--source", metavar="REGION", help="default: the inventory's primary region")
    d.add_argument("--point-in-time", metavar="ISO", help="default: the latest restorable time")
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--requester")
    d.add_argument("--reason")
    d.add_argument("--wait", action="store_true")
    add_key_argument(d)
    d.set_defaults(func=cmd_drill)

    r = add_json(sub.add_parser("readiness", help="could the environment fail over now? every region's database, "
                                                   "Kubernetes, traffic and workers checked; nothing changed"))
    r.add_argument("--env", help=ENV_HELP)
    r.add_argument("--dry-run", action="store_true", help="print what would be checked")
    r.add_argument("--requester")
    r.add_argument("--reason")
    r.add_argument("--wait", action="store_true", help="follow until the answer (exit 1: not ready)")
    add_key_argument(r)
    r.set_defaults(func=cmd_readiness)


def dry(args: argparse.Namespace) -> str:
    return " (dry run)" if args.dry_run else ""


async def cmd_failover(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args.env))
    inv.region(args.to)  # unknown region: a clear error before anything starts
    who = requester(args)
    inp = FailoverInput(inventory=inv, to_region=args.to, emergency=args.emergency, dry_run=args.dry_run,
                        requester=who, reason=args.reason or "")
    kind = "EMERGENCY failover" if args.emergency else "Planned failover"
    client = await connect()
    # An emergency preempts routine work (a maintenance window, a canary, a drill): cancelled with its undo first.
    handle = await start_procedure(client, inv, "failover", inp, f"{kind}{dry(args)} of {inv.environment} to {args.to}",
                                   preempt=args.emergency and not args.dry_run,
                                   signer=start_signer(inv, who, args.key))
    for p in handle.preempted:
        print(f"preempted {p.workflow_id} ({p.procedure}): {p.outcome}", file=sys.stderr)
    needs_approval = not inp.dry_run and (not args.emergency or inv.approval.emergency_requires_approval)
    return await run_started(handle, args, f"{kind.lower()} to {args.to}, requested by {who}",
                             approver_for(inv, who) if needs_approval else None)


async def cmd_failback(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args.env))
    inv.region(args.to)
    who = requester(args)
    inp = FailbackInput(inventory=inv, to_region=args.to, dry_run=args.dry_run, requester=who, reason=args.reason or "")
    client = await connect()
    handle = await start_procedure(client, inv, "failback", inp,
                                   f"Failback{dry(args)} of {inv.environment} to {args.to}",
                                   signer=start_signer(inv, who, args.key))
    what = f"failback to {args.to}, requested by {who}; approval comes after the replica has caught up"
    return await run_started(handle, args, what, None if args.dry_run else approver_for(inv, who))


def point_in_time(given: str | None, inv: Inventory) -> datetime | None:
    """--point-in-time: an ISO time with a zone, in the past, within the backups' retention."""
    if not given:
        return None
    try:
        point = datetime.fromisoformat(given.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--point-in-time {given!r} is not an ISO 8601 time (e.g. 2026-11-01T03:00:00Z)") from None
    if point.tzinfo is None:
        raise CliError("--point-in-time needs a time zone (e.g. ...Z or +01:00)")
    if point > datetime.now(timezone.utc):
        raise CliError(f"--point-in-time {point.isoformat()} is in the future")
    if point < datetime.now(timezone.utc) - timedelta(seconds=inv.drill.retention):
        raise CliError(f"--point-in-time {point.isoformat()} is before the retention of "
                       f"{inv.drill.retention / 86400:.0f} days")
    return point


async def cmd_drill(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args.env))
    if args.action == "history":
        return drill_history(inv, args)
    if args.action is not None:
        raise CliError(f"opsflow drill {args.action}: the only word after drill is `history`")
    if args.last is not None:
        raise CliError("--last is for `opsflow drill history`")
    if args.source:
        inv.region(args.source)
    point = point_in_time(args.point_in_time, inv)
    who = requester(args)
    inp = DrillInput(inventory=inv, source_region=args.source, point_in_time=point, dry_run=args.dry_run,
                     requester=who, reason=args.reason or "")
    client = await connect()
    # Under the environment's lock like every procedure: one drill (or anything else) per environment at a time.
    handle = await start_procedure(client, inv, "drill", inp, f"Restore drill{dry(args)} of {inv.environment}",
                                   signer=start_signer(inv, who, args.key))
    return await run_started(handle, args, f"restore drill of {inv.environment}", None)


def drill_history(inv: Inventory, args: argparse.Namespace) -> int:
    """The last drills of the environment, read back from their stored reports where the worker keeps them (the
    inventory's S3 bucket, else its reports directory): the same reading the drill's report does."""
    from activities.reports import drill_history as read_history
    from opsflow.models import DrillHistoryRequest
    from opsflow.report import trend_summary, trend_text

    for flag in ("source", "point_in_time", "requester", "reason"):
        if getattr(args, flag):
            raise CliError(f"--{flag.replace('_', '-')} is for starting a drill, not for `opsflow drill history`")
    last = args.last if args.last is not None else (inv.drill.trend_runs or 10)
    if last < 1:
        raise CliError(f"--last {last}: give at least 1")
    runs = read_history(DrillHistoryRequest(environment=inv.environment, reports_dir=inv.reports_dir,
                                            store=inv.reports, aws=inv.aws, limit=last))
    where = (f"s3://{inv.reports.s3.bucket}/{inv.reports.s3.prefix}" if inv.reports.s3 is not None
             else inv.reports_dir)
    emit({"environment": inv.environment, "read_from": where, "summary": trend_summary(runs),
          "drills": [r.model_dump(mode="json") for r in runs]}, args.json,
         f"restore drills of {inv.environment} (from {where}):\n" + (trend_text(runs) if runs else trend_summary(runs)))
    return 0


async def cmd_readiness(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args.env))
    who = requester(args)
    inp = ReadinessInput(inventory=inv, dry_run=args.dry_run, requester=who, reason=args.reason or "")
    client = await connect()
    handle = await start_procedure(client, inv, "readiness", inp, f"Readiness{dry(args)} of {inv.environment}",
                                   signer=start_signer(inv, who, args.key))
    return await run_started(handle, args, f"readiness check of {inv.environment}", None)
