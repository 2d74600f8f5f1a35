"""`opsflow status ID`, `opsflow report ID`, `opsflow list`: reading procedures, from Temporal's own record (no
worker needed) and the live report when a worker answers."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from temporalio.client import Client, WorkflowHandle

from opsflow.client import (
    ProcedureStatus,
    connect,
    describe_status,
    fetch_report,
    get_handle,
    list_procedures,
    recorded_rules,
)
from opsflow.html_report import to_html
from opsflow.inventory import load_inventory
from opsflow.models import ProcedureReport
from opsflow.report import to_markdown, to_text
from opsflow.report_signatures import ReportCheck, check_report
from opsflow.signing import Keyring
from starters.common import add_json, emit


def register(sub: argparse._SubParsersAction) -> None:
    s = add_json(sub.add_parser("status", help="progress of a procedure"))
    s.add_argument("workflow_id")
    s.set_defaults(func=cmd_status)
    r = add_json(sub.add_parser("report", help="the report of a procedure"))
    r.add_argument("workflow_id")
    r.add_argument("--markdown", action="store_true")
    r.add_argument("--html", metavar="FILE", help="write one self-contained HTML page ('-': standard output): the "
                   "step timeline, the figures, approvals and events with their signatures checked")
    r.add_argument("--env", metavar="INVENTORY", help="with --html: check the signatures against this inventory's "
                   "public keys (default: the inventory the run acted by, read from its history)")
    r.set_defaults(func=cmd_report)
    ls = add_json(sub.add_parser("list", help="procedures, newest first"))
    ls.add_argument("--environment", dest="env_name")
    ls.add_argument("--status", help="e.g. failed, running, waiting")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=cmd_list)


async def cmd_status(args: argparse.Namespace) -> int:
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
        step = f", step {st.step}" if st.step else ""
        out.append(f"{st.procedure} {st.workflow_id}: {st.status or st.temporal_status}{step}")
        if st.summary:
            out.append(f"  {st.summary}")
        closed = f", closed {st.closed_at}" if st.closed_at else ""
        out.append(f"  Temporal: {st.temporal_status}, started {st.started_at}{closed}")
        for pa in st.pending_activities:
            failure = f", last failure: {pa['last_failure']}" if pa["last_failure"] else ""
            out.append(f"  activity {pa['activity']}: {pa['state']}, attempt {pa['attempt']}{failure}")
    if st.note:
        out.append(f"  note: {st.note}")
    for q in st.queues:
        if not q.pollers:
            seen = (f"last poll {q.last_poll_seconds_ago:.0f}s ago" if q.last_poll_seconds_ago is not None
                    else "never polled")
            out.append(f"  ! no worker polls {q.name} ({q.kind} queue; {seen}): "
                       "start one with `opsflow worker --env INVENTORY`")
    return "\n".join(out)


async def cmd_report(args: argparse.Namespace) -> int:
    client = await connect()
    handle = await get_handle(client, args.workflow_id)
    report = await fetch_report(handle, client=client)
    if getattr(args, "html", None):
        check, keys_from = await report_signatures(client, handle, report, getattr(args, "env", None))
        page = to_html(report, check, keys_from=keys_from, generated_at=datetime.now(timezone.utc))
        if args.html == "-":
            sys.stdout.write(page)
        else:
            Path(args.html).write_text(page, encoding="utf-8")
            print(f"wrote {args.html}" + ("" if check is None else
                                          f" (signatures {'verify' if check.ok else 'DO NOT all verify'})"))
    elif args.json:
        emit(report, True)
    elif args.markdown:
        print(to_markdown(report), end="")
    else:
        print(to_text(report))
    return 0


async def report_signatures(client: Client, handle: WorkflowHandle, report: ProcedureReport,
                            env: str | None) -> tuple[ReportCheck | None, str]:
    """The report's signatures checked as `opsflow verify-report` does, against `env`'s public keys or else those
    of the inventory the run acted by (its history); (None, why not) when there are no keys to check against."""
    if env:
        inventory, keys_from = load_inventory(env), f"the public keys in {env}"
    else:
        inventory = await recorded_rules(client, handle)
        keys_from = "the public keys of the inventory the run acted by (its history)"
        if inventory is None:
            return None, "no inventory given (--env) and none recorded in the run's history"
    try:
        return check_report(json.loads(report.model_dump_json()), Keyring.of(inventory)), keys_from
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"a signature record is malformed: {str(e).splitlines()[0]}"


async def cmd_list(args: argparse.Namespace) -> int:
    client = await connect()
    rows = await list_procedures(client, environment=args.env_name, status=args.status, limit=args.limit)
    if args.json:
        emit(rows, True)
    else:
        for r in rows:
            print(f"{r['started_at'][:19]}  {r['workflow_id']:<24} {r['procedure'] or '':<10} "
                  f"{r['environment'] or '':<10} {r['status'] or '':<10} {r['step'] or ''}")
        if not rows:
            print("no procedures")
    return 0
