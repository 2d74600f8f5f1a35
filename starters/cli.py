"""`opsflow`: start procedures, talk to running ones, read reports, run the lab and the worker.

Every command takes --json. Exit codes: 0 success, 1 the procedure/operation failed or was refused by
the workflow, 2 bad input (nothing changed), 3 another procedure is already running on the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import json
import sys
import time
from datetime import timedelta

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError

from opsflow.inventory import Inventory, InventoryError, load_inventory
from opsflow.models import ProcedureReport
from opsflow.report import figures, headline, step_line, to_markdown, to_text
from opsflow.temporal import OPS_ENVIRONMENT, OPS_PROCEDURE, OPS_STATUS, OPS_STEP, connect
from opsflow.codec import CodecConfigError
from starters.common import CliError, emit, fetch_report, handle_for, inventory_path
from opsflow.signing import start_memo
from starters.security import SigningFailed, add_key_argument, request_signature, start_signature
from starters.security import add_commands as security_commands, run_command as security_command
from workflows.failover import FailoverInput

TERMINAL_OK = {"succeeded", "planned"}


def environment_workflow_id(inv: Inventory) -> str:
    """One procedure per environment at a time: the id is the environment's, and a second start is refused."""
    return f"opsflow-{inv.environment}"


async def start_procedure(client: Client, inv: Inventory, procedure: str, arg, summary: str, workflow_id: str | None = None,
                          key_path: str | None = None) -> WorkflowHandle:
    wid = workflow_id or environment_workflow_id(inv)
    memo = start_memo(start_signature(inv, procedure, arg.requester, arg.reason or "", key_path))  # issue 11: signed start
    try:
        return await client.start_workflow(
            procedure,
            arg,
            id=wid,
            memo=memo or None,
            task_queue=inv.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=summary,
            static_details=f"requested by {arg.requester}" + (f": {arg.reason}" if arg.reason else ""),
            search_attributes=TypedSearchAttributes([SearchAttributePair(OPS_PROCEDURE, procedure), SearchAttributePair(OPS_ENVIRONMENT, inv.environment)]),
        )
    except WorkflowAlreadyStartedError:
        running = client.get_workflow_handle(wid)
        desc = await running.describe()
        try:
            r = await fetch_report(running)
            what = f"{r.procedure} requested by {r.requester}, {r.status} at step {r.current_step}"
        except Exception:  # a report is a courtesy here; the refusal stands without it
            what = desc.workflow_type
        raise CliError(f"another procedure is running on environment {inv.environment}: {wid} ({what}); one at a time per environment", 3) from None


async def follow(handle: WorkflowHandle, as_json: bool) -> int:
    """Print steps as they happen until the procedure ends; then the report."""
    seen: dict[int, str] = {}
    last_wait = None
    while True:
        desc = await handle.describe()
        running = desc.status == WorkflowExecutionStatus.RUNNING
        try:
            report = await fetch_report(handle)
        except RPCError:
            await asyncio.sleep(0.5)  # the worker may be restarting; the procedure is durable, keep watching
            continue
        if not as_json:
            for i, s in enumerate(report.steps):
                line = step_line(s)
                if seen.get(i) != line and (s.outcome != "running" or seen.get(i) is None):
                    print(line, flush=True)
                    seen[i] = line
            if report.waiting_for and report.waiting_for != last_wait:
                print(f"  ⏸ waiting for {report.waiting_for}", flush=True)
            last_wait = report.waiting_for
        if not running:
            break
        await asyncio.sleep(0.5)
    if as_json:
        emit(report, True)
    else:
        print(headline(report))
        for f in figures(report):
            print(f"  {f}")
    return 0 if report.status in TERMINAL_OK else 1


async def cmd_failover(args) -> int:
    inv = load_inventory(inventory_path(args.env))
    inv.region(args.to)  # unknown region: a clear error before anything starts
    requester = args.requester or getpass.getuser()
    inp = FailoverInput(inventory=inv, to_region=args.to, emergency=args.emergency, dry_run=args.dry_run, requester=requester, reason=args.reason or "")
    kind = "EMERGENCY failover" if args.emergency else "Planned failover"
    client = await connect()
    handle = await start_procedure(client, inv, "failover", inp, f"{kind}{' (dry run)' if args.dry_run else ''} of {inv.environment} to {args.to}", key_path=args.key)
    needs_approval = not inp.dry_run and (not args.emergency or inv.approval.emergency_requires_approval)
    return await run_started(handle, args, f"{kind.lower()} to {args.to}, requested by {requester}", approver_for(inv, requester) if needs_approval else None)


async def run_started(handle: WorkflowHandle, args, what: str, approver_hint: str | None) -> int:
    """After a start: print the id (or --json it), the approval hint, and follow with --wait."""
    if not args.json:
        print(f"started {handle.id} ({what})")
        if approver_hint:
            print(f"  approve with: opsflow approve {handle.id} --as {approver_hint}")
    if args.wait or args.dry_run:
        return await follow(handle, args.json)
    emit({"workflow_id": handle.id, "run_id": handle.result_run_id}, args.json)
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
    handle = await start_procedure(client, inv, "failback", inp, f"Failback{' (dry run)' if args.dry_run else ''} of {inv.environment} to {args.to}", key_path=args.key)
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
    handle = await start_procedure(client, inv, "drill", inp, f"Restore drill{' (dry run)' if args.dry_run else ''} of {inv.environment}", workflow_id=f"opsflow-drill-{inv.environment}", key_path=args.key)
    return await run_started(handle, args, f"restore drill of {inv.environment}", None)


async def cmd_update(args) -> int:
    from workflows.procedure import Request

    client = await connect()
    handle = await handle_for(client, args.workflow_id)
    try:
        signed = await request_signature(handle, action=args.command, name=args.as_, reason=args.reason or "", key_path=args.key,
                                         gate_id=getattr(args, "gate", None))  # issue 11
        result = await handle.execute_update(args.command, Request(by=args.as_, reason=args.reason or "", **signed), result_type=dict if args.command in ("approve", "reject") else str)
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
    client = await connect()
    report = await fetch_report(await handle_for(client, args.workflow_id))
    if args.json:
        emit(report, True)
        return 0
    print(to_text(report))
    if report.waiting_for:
        print(f"  waiting for: {report.waiting_for}")
    return 0


async def cmd_report(args) -> int:
    client = await connect()
    report = await fetch_report(await handle_for(client, args.workflow_id))
    if args.json:
        emit(report, True)
    elif args.markdown:
        print(to_markdown(report), end="")
    else:
        print(to_text(report))
    return 0


async def cmd_list(args) -> int:
    client = await connect()
    query = "OpsProcedure IS NOT NULL"
    if args.env_name:
        query += f" AND OpsEnvironment = '{args.env_name}'"
    if args.status:
        query += f" AND OpsStatus = '{args.status}'"
    rows = []
    async for wf in client.list_workflows(query, limit=args.limit):
        sa = wf.typed_search_attributes
        rows.append({
            "workflow_id": wf.id,
            "run_id": wf.run_id,
            "procedure": sa.get(OPS_PROCEDURE),
            "environment": sa.get(OPS_ENVIRONMENT),
            "status": sa.get(OPS_STATUS),
            "step": sa.get(OPS_STEP),
            "temporal_status": wf.status.name.lower() if wf.status else None,
            "started_at": wf.start_time.isoformat() if wf.start_time else None,
        })
    if args.json:
        emit(rows, True)
    else:
        for r in rows:
            print(f"{r['started_at'][:19]}  {r['workflow_id']:<24} {r['procedure'] or '':<10} {r['environment'] or '':<10} {r['status'] or '':<10} {r['step'] or ''}")
        if not rows:
            print("no procedures")
    return 0


def cmd_lab(args) -> int:
    from lab import manage

    return manage.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsflow", description="Durable operations procedures on Temporal.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, json_flag=True):
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    from lab.manage import add_arguments as lab_arguments
    from worker.main import add_arguments as worker_arguments

    lab = sub.add_parser("lab", help="the local rehearsal lab: up, status, down")
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
        u = common(sub.add_parser(name, help="override a failback's window wait" if name == "override" else f"{name} a running procedure"))
        u.add_argument("workflow_id")
        u.add_argument("--as", dest="as_", required=True, metavar="NAME")
        u.add_argument("--reason", required=(name == "reject"))
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
    except CliError as e:
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
