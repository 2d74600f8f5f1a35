"""The CLI's security glue: `--key PATH` for every command that acts, signing through ssh-agent or the key,
and the commands `verify-report`, `codec-server`, `codec-key`. starters/cli.py only calls in here.

When does the CLI sign? When the inventory the procedure runs with requires signatures
(`approval.require_signed`), or when `--key` is given. For a running procedure that inventory is read from
the workflow's own start input (what its validators check against), so no --env is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from opsflow.signing import Keyring, Signer, SigningError, verify_records

KEY_HELP = "sign with this private key file (default when the inventory requires signatures: ssh-agent via SSH_AUTH_SOCK)"


def add_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", metavar="PATH", help=KEY_HELP)


class SigningFailed(Exception):
    """Could not sign: a clear message for the terminal (exit 2, nothing was sent)."""


def signer_for(inventory: Any, name: str, key_path: str | None) -> Signer | None:
    keyring = Keyring.of(inventory)
    if key_path is None and not keyring.require_signed:
        return None
    if key_path is not None and not Path(key_path).expanduser().is_file():
        raise SigningFailed(f"--key {key_path}: no such file")
    return Signer(name=name, key_path=key_path, public_key=keyring.key_of(name))


def start_signature(inventory: Any, procedure: str, requester: str, reason: str, key_path: str | None) -> dict[str, Any]:
    """{'signature', 'signed_at'} to put into a procedure's start input, or {} when none is wanted."""
    signer = signer_for(inventory, requester, key_path)
    if signer is None:
        return {}
    try:
        return signer.sign_start(environment=inventory.environment, procedure=procedure, reason=reason)
    except SigningError as e:
        raise SigningFailed(str(e)) from None


async def started_inventory(handle: Any) -> Any:
    """The inventory a running procedure was started with (its first history event's input)."""
    from opsflow.inventory import Inventory

    async for event in handle.fetch_history_events(page_size=1):
        payloads = list(event.workflow_execution_started_event_attributes.input.payloads)
        [arg] = await handle._client.data_converter.decode(payloads[:1], [dict])
        return Inventory.model_validate(arg["inventory"])
    raise SigningFailed(f"{handle.id}: no history")


async def request_signature(handle: Any, *, action: str, name: str, reason: str, key_path: str | None,
                            gate_id: str | None = None, full: bool = False, inventory: Any = None) -> dict[str, Any]:
    """{'signature', 'signed_at'} for a Request to this run (and gate), or {} when none is wanted."""
    inventory = inventory or await started_inventory(handle)
    signer = signer_for(inventory, name, key_path)
    if signer is None:
        return {}
    desc = await handle.describe()
    try:
        return signer.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=gate_id, action=action, reason=reason, full=full)
    except SigningError as e:
        raise SigningFailed(str(e)) from None


# -- verify-report, codec-key, codec-server ----------------------------------------------------------------


def add_commands(sub: Any) -> None:
    v = sub.add_parser("verify-report", help="check every signed approval/action in a report against the inventory's public keys")
    v.add_argument("report", metavar="REPORT.json", help="a report (opsflow report ID --json)")
    v.add_argument("--env", required=True, metavar="INVENTORY", help="the inventory holding the public keys")
    v.add_argument("--json", action="store_true")
    k = sub.add_parser("codec-key", help="print a new payload-encryption key line (KEY_ID:BASE64)")
    k.add_argument("key_id", nargs="?", default=None, help="default: k<YYYYMMDD>")
    from opsflow.codec_server import add_arguments

    add_arguments(sub.add_parser("codec-server", help="serve Temporal's codec endpoints (/encode, /decode) for the UI and CLI"))


def run_command(args: argparse.Namespace) -> int | None:
    """Run one of this module's commands; None when the command is not one of them."""
    if args.command == "verify-report":
        return verify_report(args)
    if args.command == "codec-key":
        from datetime import datetime, timezone

        from opsflow.codec import new_key_line

        print(new_key_line(args.key_id or datetime.now(timezone.utc).strftime("k%Y%m%d")))
        return 0
    if args.command == "codec-server":
        from opsflow.codec_server import run_from_args

        return run_from_args(args)
    return None


def verify_report(args: argparse.Namespace) -> int:
    from opsflow.inventory import load_inventory

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
    records = data.get("signatures") or []
    try:
        results = verify_records(records, Keyring.of(inv))
    except ValueError as e:
        print(f"error: {args.report}: a signature record is malformed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    unsigned = [f"{d.get('by')} {'approved' if d.get('approved') else 'rejected'}" for d in _decisions(data)
                if not any(r.action in ("approve", "reject") and r.by == d.get("by") for r, bad in results if bad is None)]
    bad = [(r, why) for r, why in results if why]
    if args.json:
        print(json.dumps({"workflow_id": data.get("workflow_id"), "verified": len(results) - len(bad),
                          "failed": [{"action": r.action, "by": r.by, "why": why} for r, why in bad], "unsigned_decisions": unsigned}, indent=2))
    else:
        for r, why in results:
            where = f"gate {r.gate}" if r.gate else (f"{r.procedure} in {r.environment}" if r.action == "start" else "")
            print(f"{'ok ' if why is None else 'BAD'} {r.action:<8} by {r.by:<12} at {r.signed_at.isoformat()} {where}" + (f": {why}" if why else ""))
        for u in unsigned:
            print(f"UNSIGNED {u}")
        print(f"{len(results) - len(bad)} of {len(results)} signatures verify" + (f"; {len(unsigned)} decision(s) without a signature" if unsigned else ""))
    return 0 if not bad and not unsigned and (results or not Keyring.of(inv).require_signed) else 1


def _decisions(report: dict) -> list[dict]:
    """Approval decisions in a report, whatever the kernel calls them (gates' decisions, or the single approval)."""
    out: list[dict] = []
    for gate in (report.get("gates") or {}).values() if isinstance(report.get("gates"), dict) else report.get("gates") or []:
        out += [d for d in (gate.get("decisions") or []) if isinstance(d, dict)]
    if not out and isinstance(report.get("approval"), dict):
        out.append(report["approval"])
    return out
