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

from opsflow.signing import Keyring, SignedAction, Signer, SigningError, verify_records

KEY_HELP = "sign with this private key file (default when the inventory requires signatures: ssh-agent via SSH_AUTH_SOCK)"


def add_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", metavar="PATH", help=KEY_HELP)


class SigningFailed(Exception):
    """Could not sign: a clear message for the terminal (exit 2, nothing was sent)."""


def signer_for(inventory: Any, name: str, key_path: str | None) -> Signer | None:
    # A rollout's own approvers (rollout.approval) sign with the keys listed there.
    keyring = Keyring.of(inventory, getattr(getattr(inventory, "rollout", None), "approval", None))
    if key_path is None and not keyring.require_signed:
        return None
    if key_path is not None and not Path(key_path).expanduser().is_file():
        raise SigningFailed(f"--key {key_path}: no such file")
    return Signer(name=name, key_path=key_path, public_key=keyring.key_of(name))


class _StartSigner(Signer):
    """A Signer whose failures are the CLI's SigningFailed (exit 2, nothing started)."""

    def sign_start(self, **kw: Any) -> dict[str, Any]:
        try:
            return super().sign_start(**kw)
        except SigningError as e:
            raise SigningFailed(str(e)) from None


def start_signer(inventory: Any, requester: str, key_path: str | None) -> Signer | None:
    """Who signs a procedure's start (over the very input sent: opsflow.client.start_procedure), or None when no
    signature is wanted (the inventory does not require one and no --key was given)."""
    signer = signer_for(inventory, requester, key_path)
    return None if signer is None else _StartSigner(**vars(signer))


async def started_inventory(handle: Any) -> Any:
    """The inventory a running procedure acts by (the worker's, as its history recorded it): whose keys sign."""
    from opsflow.client import recorded_rules

    inventory = await recorded_rules(handle._client, handle)
    if inventory is None:
        raise SigningFailed(f"{handle.id} has not taken its rules from the worker yet: try again in a moment")
    return inventory


async def request_signature(handle: Any, *, action: str, name: str, reason: str, key_path: str | None,
                            gate_id: str | None = None, full: bool = False, inventory: Any = None) -> dict[str, Any]:
    """{'signature', 'signed_at'} for a Request to this run (and gate), or {} when none is wanted."""
    inventory = inventory or await started_inventory(handle)
    signer = signer_for(inventory, name, key_path)
    if signer is None:
        return {}
    desc = await handle.describe()
    if gate_id is None and action in ("approve", "reject"):
        gate_id = await open_gate_id(handle)
    try:
        return signer.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=gate_id, action=action, reason=reason, full=full)
    except SigningError as e:
        raise SigningFailed(str(e)) from None


async def open_gate_id(handle: Any) -> str | None:
    """The gate an approval without --gate answers (the signature names it): the one open gate. Gates show in
    the report as running steps titled "Approval: ..." named by the gate id."""
    report = await handle.query("progress", result_type=dict)
    open_gates = [s["name"] for s in report.get("steps") or []
                  if s.get("outcome") == "running" and str(s.get("title", "")).startswith("Approval")]
    if len(open_gates) > 1:
        raise SigningFailed(f"several gates are open ({', '.join(open_gates)}): name one with --gate")
    return open_gates[0] if open_gates else None


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


def report_records(report: dict) -> tuple[list[SignedAction], list[str]]:
    """The signed requests a report recorded (start, decisions at gates, control events), and the people's
    actions recorded without a signature. Reports of child procedures (a failback's failover) are included."""
    records: list[SignedAction] = [SignedAction.model_validate(r) for r in report.get("signatures") or []]
    unsigned: list[str] = []
    wid, run_id = report.get("workflow_id", ""), report.get("run_id", "")
    if report.get("start_signature") and report.get("schedule_id"):  # launched by a Schedule its creator signed
        records.append(SignedAction(action="schedule", by=report.get("scheduled_by") or "", signed_at=report.get("start_signed_at"),
                                    signature=report["start_signature"], environment=report.get("environment", ""),
                                    procedure=report.get("procedure", ""), input_sha256=report.get("start_input_sha256"),
                                    nonce=report["schedule_id"]))
    elif report.get("start_signature"):
        records.append(SignedAction(action="start", by=report.get("requester", ""), reason=report.get("reason", ""),
                                    signed_at=report.get("start_signed_at"), signature=report["start_signature"],
                                    environment=report.get("environment", ""), procedure=report.get("procedure", ""),
                                    input_sha256=report.get("start_input_sha256"), nonce=report.get("start_nonce")))
    for d in report.get("approvals") or []:
        action = "approve" if d.get("approved") else "reject"
        if d.get("signature"):
            records.append(SignedAction(action=action, by=d["by"], reason=d.get("reason", ""), signed_at=d.get("signed_at"),
                                        signature=d["signature"], workflow_id=wid, run_id=run_id, gate=d.get("gate"), full=d.get("full", False)))
        else:
            unsigned.append(f"{action} by {d.get('by')} at gate {d.get('gate')}")
    for e in report.get("events") or []:
        if e.get("signature"):
            records.append(SignedAction(action=e["action"], by=e["by"], reason=e.get("reason", ""), signed_at=e.get("signed_at"),
                                        signature=e["signature"], workflow_id=wid, run_id=run_id, gate=e.get("gate"), full=e.get("full", False)))
        elif e.get("by") not in (None, "opsflow", "system"):
            unsigned.append(f"{e.get('action')} by {e.get('by')}")
    for value in report.values():
        if isinstance(value, dict) and "approvals" in value and "workflow_id" in value:
            child_records, child_unsigned = report_records(value)
            records += child_records
            unsigned += child_unsigned
    return records, unsigned


def verify_report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

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
                          "failed": [{"action": r.action, "by": r.by, "why": why} for r, why in bad], "unsigned": unsigned,
                          "problems": problems}, indent=2))
    else:
        for r, why in results:
            where = f"gate {r.gate}" if r.gate else (f"{r.procedure} in {r.environment}" if r.action == "start" else "")
            print(f"{'ok ' if why is None else 'BAD'} {r.action:<8} by {r.by:<12} at {r.signed_at.isoformat()} {where}" + (f": {why}" if why else ""))
        for u in unsigned:
            print(f"UNSIGNED {u}")
        for p in problems:
            print(f"BAD {p}")
        print(f"{len(results) - len(bad)} of {len(results)} signatures verify" + (f"; {len(unsigned)} action(s) without a signature" if unsigned else ""))
    # Unsigned actions are a failure only where the inventory requires signatures.
    return 1 if bad or problems or (unsigned and keyring.require_signed) else 0
