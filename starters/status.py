"""`opsflow status ID`, `opsflow report ID`, `opsflow list`: reading procedures, from Temporal's own record (no
worker needed) and the live report when a worker answers."""

from __future__ import annotations

import argparse

from opsflow.client import ProcedureStatus, connect, describe_status, fetch_report, get_handle, list_procedures
from opsflow.report import to_markdown, to_text
from starters.common import add_json, emit


def register(sub: argparse._SubParsersAction) -> None:
    s = add_json(sub.add_parser("status", help="progress of a procedure"))
    s.add_argument("workflow_id")
    s.set_defaults(func=cmd_status)
    r = add_json(sub.add_parser("report", help="the report of a procedure"))
    r.add_argument("workflow_id")
    r.add_argument("--markdown", action="store_true")
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
    report = await fetch_report(await get_handle(client, args.workflow_id))
    if args.json:
        emit(report, True)
    elif args.markdown:
        print(to_markdown(report), end="")
    else:
        print(to_text(report))
    return 0


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
