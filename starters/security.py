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
from opsflow.codec_server import add_arguments as codec_server_arguments
from opsflow.codec_server import run_from_args as run_codec_server
from opsflow.inventory import load_inventory
from opsflow.report_signatures import check_report
from opsflow.signing import Keyring


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
        check = check_report(data, keyring)
    except (ValidationError, KeyError, TypeError, AttributeError) as e:
        print(f"error: {args.report}: a signature record is malformed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    results, bad, unsigned, problems = check.results, check.bad, check.unsigned, check.problems
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
    return 0 if check.ok else 1
