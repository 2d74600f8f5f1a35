"""`opsflow`: start procedures, talk to running ones, read reports, run the lab and the worker.

Every command takes --json. Exit codes: 0 success, 1 the procedure/operation failed or was refused by
the workflow, 2 bad input (nothing changed), 3 another procedure is already running on the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from datetime import timedelta

from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from opsflow.client import (ClientError, ProcedureStatus, connect, describe_status, fetch_report, follow, get_handle, inventory_path,
                            list_procedures, start_procedure)
from opsflow.codec import CodecConfigError
from opsflow.inventory import Inventory, InventoryError, load_inventory
from opsflow.models import ProcedureReport
from opsflow.report import ProgressLines, figures, headline, to_markdown, to_text
from opsflow.signing import Signer
from starters.common import CliError, emit
from starters.security import SigningFailed, add_key_argument, request_signature, start_signer
from starters.security import add_commands as security_commands, run_command as security_command

TERMINAL_OK = {"succeeded", "planned"}


def signed_start(inv: Inventory, procedure: str, inp, args) -> Signer | None:
    """Who signs the start (start_procedure signs the very input it sends), when the inventory asks or --key is given."""
    return start_signer(inv, inp.requester, args.key)


async def follow_printing(handle: WorkflowHandle, as_json: bool) -> int:
    """Print steps as they happen until the procedure ends; then the report."""
    lines = ProgressLines()

    def show(report: ProcedureReport) -> None:
        if not as_json:
            for line in lines.new_lines(report):
                print(line, flush=True)

    report = await follow(handle, show)
    if as_json:
        emit(report, True)
    else:
        print(headline(report))
        for f in figures(report):
            print(f"  {f}")
    return 0 if report.status in TERMINAL_OK else 1


async def cmd_failover(args) -> int:
    from workflows.failover import FailoverInput

    inv = load_inventory(inventory_path(args.env))
    inv.region(args.to)  # unknown region: a clear error before anything starts
    requester = args.requester or getpass.getuser()
    inp = FailoverInput(inventory=inv, to_region=args.to, emergency=args.emergency, dry_run=args.dry_run, requester=requester, reason=args.reason or "")
    kind = "EMERGENCY failover" if args.emergency else "Planned failover"
    client = await connect()
    # An emergency preempts routine work (a maintenance window, a canary, a drill): cancelled with its undo first.
    handle = await start_procedure(client, inv, "failover", inp, f"{kind}{' (dry run)' if args.dry_run else ''} of {inv.environment} to {args.to}",
                                   preempt=args.emergency and not args.dry_run, signer=signed_start(inv, "failover", inp, args))
    for p in handle.preempted:
        print(f"preempted {p.workflow_id} ({p.procedure}): {p.outcome}", file=sys.stderr)
    needs_approval = not inp.dry_run and (not args.emergency or inv.approval.emergency_requires_approval)
    return await run_started(handle, args, f"{kind.lower()} to {args.to}, requested by {requester}", approver_for(inv, requester) if needs_approval else None)


async def run_started(handle: WorkflowHandle, args, what: str, approver_hint: str | None) -> int:
    """After a start: print the id (or --json it), the approval hint, and follow with --wait."""
    if not args.json:
        print(f"started {handle.id} ({what})")
        if approver_hint:
            print(f"  approve with: opsflow approve {handle.id} --as {approver_hint}")
    if args.wait or args.dry_run:
        return await follow_printing(handle, args.json)
    preempted = [vars(p) for p in getattr(handle, "preempted", [])]
    emit({"workflow_id": handle.id, "run_id": handle.result_run_id, **({"preempted": preempted} if preempted else {})}, args.json)
    return 0


def approver_for(inv: Inventory, requester: str) -> str:
    others = [a for a in inv.approval.approvers if not (inv.approval.require_distinct_approver and a == requester)]
    return others[0] if others else "NAME"


async def cmd_failback(args) -> int:
    from workflows.failback import FailbackInput

    inv = load_inventory(inventory_path(args.env))
    inv.region(args.to)
    requester = args.requester or getpass.getuser()
    inp = FailbackInput(inventory=inv, to_region=args.to, dry_run=args.dry_run, requester=requester, reason=args.reason or "")
    client = await connect()
    handle = await start_procedure(client, inv, "failback", inp, f"Failback{' (dry run)' if args.dry_run else ''} of {inv.environment} to {args.to}",
                                   signer=signed_start(inv, "failback", inp, args))
    return await run_started(handle, args, f"failback to {args.to}, requested by {requester}; approval comes after the replica has caught up", None if args.dry_run else approver_for(inv, requester))


async def cmd_drill(args) -> int:
    from datetime import datetime, timezone

    from workflows.drill import DrillInput

    inv = load_inventory(inventory_path(args.env))
    if args.source:
        inv.region(args.source)
    point = None
    if args.point_in_time:
        try:
            point = datetime.fromisoformat(args.point_in_time.replace("Z", "+00:00"))
        except ValueError:
            raise CliError(f"--point-in-time {args.point_in_time!r} is not an ISO 8601 time (e.g. 2026-11-01T03:00:00Z)") from None
        if point.tzinfo is None:
            raise CliError("--point-in-time needs a time zone (e.g. ...Z or +01:00)")
        if point > datetime.now(timezone.utc):
            raise CliError(f"--point-in-time {point.isoformat()} is in the future")
        if point < datetime.now(timezone.utc) - timedelta(seconds=inv.drill.retention):
            raise CliError(f"--point-in-time {point.isoformat()} is before the retention of {inv.drill.retention / 86400:.0f} days")
    requester = args.requester or getpass.getuser()
    inp = DrillInput(inventory=inv, source_region=args.source, point_in_time=point, dry_run=args.dry_run, requester=requester, reason=args.reason or "")
    client = await connect()
    # Under the environment's lock like every procedure: one drill (or anything else) per environment at a time.
    handle = await start_procedure(client, inv, "drill", inp, f"Restore drill{' (dry run)' if args.dry_run else ''} of {inv.environment}",
                                   signer=signed_start(inv, "drill", inp, args))
    return await run_started(handle, args, f"restore drill of {inv.environment}", None)


async def cmd_update(args) -> int:
    from workflows.procedure import Request

    client = await connect()
    handle = await get_handle(client, args.workflow_id)
    try:
        signed = await request_signature(handle, action=args.command, name=args.as_, reason=args.reason or "", key_path=args.key,
                                         gate_id=getattr(args, "gate", None))  # issue 11
        request = Request(by=args.as_, reason=args.reason or "", gate=getattr(args, "gate", None), **signed)
        result = await handle.execute_update(args.command, request,
                                             result_type=dict if args.command in ("approve", "reject") else str)
    except WorkflowUpdateFailedError as e:
        cause = e.cause
        raise CliError(f"{args.command} refused: {cause.message if isinstance(cause, ApplicationError) else cause}", 1) from None
    except RPCError as e:
        raise CliError(f"{args.command} failed: {e.message}", 1) from None
    if args.json:
        emit({"workflow_id": args.workflow_id, "action": args.command, "by": args.as_, "result": result}, True)
    else:
        print(f"{args.command} {args.workflow_id} as {args.as_}: " + (result if isinstance(result, str) else "recorded"))
    return 0


async def cmd_status(args) -> int:
    """From Temporal's own record (no worker needed), with the live report when a worker answers."""
    client = await connect()
    st = await describe_status(client, args.workflow_id)
    if args.json:
        emit(st.as_dict(), True)
        return 0
    print(status_text(st))
    return 0


def status_text(st: ProcedureStatus) -> str:
    out = []
    if st.report:
        out.append(to_text(st.report))
        if st.report.waiting_for:
            out.append(f"  waiting for: {st.report.waiting_for}")
    else:
        out.append(f"{st.procedure} {st.workflow_id}: {st.status or st.temporal_status}" + (f", step {st.step}" if st.step else ""))
        if st.summary:
            out.append(f"  {st.summary}")
        out.append(f"  Temporal: {st.temporal_status}, started {st.started_at}" + (f", closed {st.closed_at}" if st.closed_at else ""))
        for pa in st.pending_activities:
            failure = f", last failure: {pa['last_failure']}" if pa["last_failure"] else ""
            out.append(f"  activity {pa['activity']}: {pa['state']}, attempt {pa['attempt']}{failure}")
    if st.note:
        out.append(f"  note: {st.note}")
    for q in st.queues:
        if not q.pollers:
            seen = f"last poll {q.last_poll_seconds_ago:.0f}s ago" if q.last_poll_seconds_ago is not None else "never polled"
            out.append(f"  ! no worker polls {q.name} ({q.kind} queue; {seen}): start one with `opsflow worker --env INVENTORY`")
    return "\n".join(out)


async def cmd_report(args) -> int:
    client = await connect()
    report = await fetch_report(await get_handle(client, args.workflow_id))
    if args.json:
        emit(report, True)
    elif args.markdown:
        print(to_markdown(report), end="")
    else:
        print(to_text(report))
    return 0


async def cmd_list(args) -> int:
    client = await connect()
    rows = await list_procedures(client, environment=args.env_name, status=args.status, limit=args.limit)
    if args.json:
        emit(rows, True)
    else:
        for r in rows:
            print(f"{r['started_at'][:19]}  {r['workflow_id']:<24} {r['procedure'] or '':<10} {r['environment'] or '':<10} {r['status'] or '':<10} {r['step'] or ''}")
        if not rows:
            print("no procedures")
    return 0


def cmd_lab(args) -> int:
    try:
        from lab import cli as lab_cli
    except ImportError:
        raise ClientError("the lab is not installed here (it ships in a source checkout: pip install -e '.[lab]')") from None
    return lab_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsflow", description="Durable operations procedures on Temporal.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, json_flag=True):
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    from worker.main import add_arguments as worker_arguments

    lab = sub.add_parser("lab", help="the local rehearsal lab: up, status, down")
    try:  # the `lab` subcommand is the only way from the CLI into lab/; a production image ships without it
        from lab.cli import add_arguments as lab_arguments
    except ImportError:
        lab.add_argument("lab_command", nargs="?", help="(the lab is not installed here)")
    else:
        lab_arguments(lab)

    worker_arguments(sub.add_parser("worker", help="run a worker for the inventory's task queues"))

    f = common(sub.add_parser("failover", help="fail the environment over to another region"))
    f.add_argument("--env", help="inventory YAML (default: the running lab's)")
    f.add_argument("--to", required=True, metavar="REGION")
    f.add_argument("--emergency", action="store_true", help="the old region is down: no drain, no lag wait, forced promotion")
    f.add_argument("--dry-run", action="store_true", help="preflight and print the plan; change nothing")
    f.add_argument("--requester", help="who asks (default: your login)")
    f.add_argument("--reason")
    f.add_argument("--wait", action="store_true", help="follow progress until the end")
    add_key_argument(f)

    fb = common(sub.add_parser("failback", help="return to a recovered region: rebuild its replica, catch up, approve, fail over back"))
    fb.add_argument("--env", help="inventory YAML (default: the running lab's)")
    fb.add_argument("--to", required=True, metavar="REGION", help="the recovered region")
    fb.add_argument("--dry-run", action="store_true")
    fb.add_argument("--requester")
    fb.add_argument("--reason")
    fb.add_argument("--wait", action="store_true")
    add_key_argument(fb)

    d = common(sub.add_parser("drill", help="restore test: restore a backup to a scratch target, verify it, delete it"))
    d.add_argument("--env", help="inventory YAML (default: the running lab's)")
    d.add_argument("--source", metavar="REGION", help="default: the inventory's primary region")
    d.add_argument("--point-in-time", metavar="ISO", help="default: the latest restorable time")
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--requester")
    d.add_argument("--reason")
    d.add_argument("--wait", action="store_true")
    add_key_argument(d)

    for name in ("approve", "reject", "pause", "resume", "abort", "override"):
        what = "override a window wait or a freeze (failback, maintenance, canary; by an approver)"
        u = common(sub.add_parser(name, help=what if name == "override" else f"{name} a running procedure"))
        u.add_argument("workflow_id")
        u.add_argument("--as", dest="as_", required=True, metavar="NAME")
        u.add_argument("--reason", required=(name == "reject"))
        if name in ("approve", "reject"):
            u.add_argument("--gate", metavar="ID", help="the gate this answers (default: the one open)")
        add_key_argument(u)

    s = common(sub.add_parser("status", help="progress of a procedure"))
    s.add_argument("workflow_id")
    r = common(sub.add_parser("report", help="the report of a procedure"))
    r.add_argument("workflow_id")
    r.add_argument("--markdown", action="store_true")
    ls = common(sub.add_parser("list", help="procedures, newest first"))
    ls.add_argument("--environment", dest="env_name")
    ls.add_argument("--status", help="e.g. failed, running, waiting")
    ls.add_argument("--limit", type=int, default=50)

    # -- opsflow schedule ... (starters/schedules.py) --
    from starters.schedules import add_arguments as schedule_arguments

    schedule_arguments(sub.add_parser("schedule", help="procedures on a Temporal Schedule: create, list, describe, pause, trigger, backfill, delete"))
    security_commands(sub)  # verify-report, codec-key, codec-server (starters/security.py)
    from starters import rollout  # opsflow canary|bluegreen|promote|rollback

    rollout.add_arguments(sub)

    from starters import maintenance  # opsflow maintenance ... (starters/maintenance.py)
    maintenance.add_arguments(sub.add_parser("maintenance", help="the weekly maintenance window: one environment or a fleet"))
    return p


COMMANDS = {
    "failover": cmd_failover,
    "failback": cmd_failback,
    "drill": cmd_drill,
    "override": cmd_update,
    "approve": cmd_update,
    "reject": cmd_update,
    "pause": cmd_update,
    "resume": cmd_update,
    "abort": cmd_update,
    "status": cmd_status,
    "report": cmd_report,
    "list": cmd_list,
}

# -- opsflow schedule ... (starters/schedules.py) --
from starters.schedules import run as cmd_schedule  # noqa: E402

COMMANDS["schedule"] = cmd_schedule
from starters import rollout as _rollout  # noqa: E402

COMMANDS.update(dict.fromkeys(_rollout.COMMANDS, _rollout.run))

from starters.maintenance import run as cmd_maintenance  # noqa: E402

COMMANDS["maintenance"] = cmd_maintenance


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "lab":
            return cmd_lab(args)
        if args.command == "worker":
            from worker.main import run_from_args

            return run_from_args(args)
        if (code := security_command(args)) is not None:
            return code
        return asyncio.run(COMMANDS[args.command](args))
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (InventoryError, SigningFailed, CodecConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RPCError as e:
        print(f"error: Temporal: {e.message}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError, RuntimeError) as e:
        if "connect" in str(e).lower() or "transport" in str(e).lower():
            print(f"error: cannot reach Temporal ({e}); is the lab up (opsflow lab up) or TEMPORAL_ADDRESS set?", file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """The console script. Exits without interpreter shutdown: a short-lived temporalio client can abort
    while Python finalizes (temporalio/sdk-python#300), losing piped --json output."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
