"""`opsflow verify-report`, `opsflow codec-key`, `opsflow codec-server`: checking a report's signatures against an
inventory's public keys, and the payload-encryption key and codec server. Signing what the CLI sends (`--key`,
ssh-agent) is `starters/common.py`'s."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from opsflow.codec import new_key_line
from opsflow.codec_server import add_arguments as codec_server_arguments, run_from_args as run_codec_server
from opsflow.inventory import load_inventory
from opsflow.signing import Keyring, SignedAction, verify_records


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify-report",
                       help="check every signed approval/action in a report against the inventory's public keys")
    v.add_argument("report", metavar="REPORT.json", help="a report (opsflow report ID --json)")
    v.add_argument("--env", required=True, metavar="INVENTORY", help="the inventory holding the public keys")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=verify_report)
    k = sub.add_parser("codec-key", help="print a new payload-encryption key line (KEY_ID:BASE64)")
    k.add_argument("key_id", nargs="?", default=None, help="default: k<YYYYMMDD>")
    k.set_defaults(func=codec_key)
    c = sub.add_parser("codec-server", help="serve Temporal's codec endpoints (/encode, /decode) for the UI and CLI")
    codec_server_arguments(c)
    c.set_defaults(func=run_codec_server)


def codec_key(args: argparse.Namespace) -> int:
    print(new_key_line(args.key_id or datetime.now(timezone.utc).strftime("k%Y%m%d")))
    return 0


def report_records(report: dict) -> tuple[list[SignedAction], list[str]]:
    """The signed requests a report recorded (start, decisions at gates, control events), and the people's
    actions recorded without a signature. Reports of child procedures (a failback's failover) are included."""
    records: list[SignedAction] = [SignedAction.model_validate(r) for r in report.get("signatures") or []]
    unsigned: list[str] = []
    wid, run_id = report.get("workflow_id", ""), report.get("run_id", "")
    if report.get("start_signature") and report.get("schedule_id"):  # launched by a Schedule its creator signed
        records.append(SignedAction(action="schedule", by=report.get("scheduled_by") or "",
                                    signed_at=report.get("start_signed_at"), signature=report["start_signature"],
                                    environment=report.get("environment", ""), procedure=report.get("procedure", ""),
                                    input_sha256=report.get("start_input_sha256"), nonce=report["schedule_id"]))
    elif report.get("start_signature"):
        records.append(SignedAction(action="start", by=report.get("requester", ""), reason=report.get("reason", ""),
                                    signed_at=report.get("start_signed_at"), signature=report["start_signature"],
                                    environment=report.get("environment", ""), procedure=report.get("procedure", ""),
                                    input_sha256=report.get("start_input_sha256"), nonce=report.get("start_nonce")))
    for d in report.get("approvals") or []:
        action = "approve" if d.get("approved") else "reject"
        if d.get("signature"):
            records.append(SignedAction(action=action, by=d["by"], reason=d.get("reason", ""),
                                        signed_at=d.get("signed_at"), signature=d["signature"], workflow_id=wid,
                                        run_id=run_id, gate=d.get("gate"), full=d.get("full", False)))
        else:
            unsigned.append(f"{action} by {d.get('by')} at gate {d.get('gate')}")
    for e in report.get("events") or []:
        if e.get("signature"):
            records.append(SignedAction(action=e["action"], by=e["by"], reason=e.get("reason", ""),
                                        signed_at=e.get("signed_at"), signature=e["signature"], workflow_id=wid,
                                        run_id=run_id, gate=e.get("gate"), full=e.get("full", False)))
        elif e.get("by") not in (None, "opsflow", "system"):
            unsigned.append(f"{e.get('action')} by {e.get('by')}")
    for value in report.values():
        if isinstance(value, dict) and "approvals" in value and "workflow_id" in value:
            child_records, child_unsigned = report_records(value)
            records += child_records
            unsigned += child_unsigned
    return records, unsigned


def verify_report(args: argparse.Namespace) -> int:
    inv = load_inventory(args.env)
    try:
        data = json.loads(Path(args.report).read_text())
    except OSError as e:
        print(f"error: {args.report}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {args.report} is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"error: {args.report} is not a report (expected a JSON object)", file=sys.stderr)
        return 2
    keyring = Keyring.of(inv)
    try:
        records, unsigned = report_records(data)
    except (ValidationError, KeyError, TypeError, AttributeError) as e:
        print(f"error: {args.report}: a signature record is malformed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    results = verify_records(records, keyring)
    bad = [(r, why) for r, why in results if why]
    # What a doctored report would leave out: the start's signature, the deciding approval among those recorded.
    problems = []
    if keyring.require_signed and not data.get("start_signature"):
        problems.append("the start is not signed (this environment requires it)")
    decided = data.get("approval")
    if decided and decided not in (data.get("approvals") or []):
        problems.append(f"the approval by {decided.get('by')} is not among the recorded approvals")
    if args.json:
        print(json.dumps({"workflow_id": data.get("workflow_id"), "verified": len(results) - len(bad),
                          "failed": [{"action": r.action, "by": r.by, "why": why} for r, why in bad],
                          "unsigned": unsigned, "problems": problems}, indent=2))
    else:
        for r, why in results:
            where = f"gate {r.gate}" if r.gate else (f"{r.procedure} in {r.environment}" if r.action == "start" else "")
            print(f"{'ok ' if why is None else 'BAD'} {r.action:<8} by {r.by:<12} at {r.signed_at.isoformat()} {where}"
                  + (f": {why}" if why else ""))
        for u in unsigned:
            print(f"UNSIGNED {u}")
        for p in problems:
            print(f"BAD {p}")
        without = f"; {len(unsigned)} action(s) without a signature" if unsigned else ""
        print(f"{len(results) - len(bad)} of {len(results)} signatures verify{without}")
    # Unsigned actions are a failure only where the inventory requires signatures.
    return 1 if bad or problems or (unsigned and keyring.require_signed) else 0
