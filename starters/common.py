"""What every CLI command shares: the --json and --key options, printing, the error that carries an exit code
(opsflow.client's), starting and following a procedure, signing a start or a request, and sending a request to
a running procedure. The command modules build on this; it imports none of them.

When does the CLI sign? When the inventory the procedure runs with requires signatures
(`approval.require_signed`), or when `--key` is given. For a running procedure that inventory is the one its
history recorded (the worker's), so no --env is needed.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from opsflow.client import ClientError, follow, recorded_rules, send_update
from opsflow.inventory import Inventory
from opsflow.models import ProcedureReport
from opsflow.report import ProgressLines, figures, headline
from opsflow.signing import Keyring, Signer, SigningError
from workflows.procedure import Request

CliError = ClientError  # one error type with exit codes for the client API and the CLI
TERMINAL_OK = {"succeeded", "planned"}
KEY_HELP = ("sign with this private key file "
            "(default when the inventory requires signatures: ssh-agent via SSH_AUTH_SOCK)")


class SigningFailed(Exception):
    """Could not sign: a clear message for the terminal (exit 2, nothing was sent)."""


# -- options ---------------------------------------------------------------------------------------------------


def add_json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def add_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", metavar="PATH", help=KEY_HELP)


# -- printing --------------------------------------------------------------------------------------------------


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)


def requester(args: argparse.Namespace) -> str:
    """Who asks: --requester, or the login."""
    return args.requester or getpass.getuser()


def approver_for(inv: Inventory, requester: str) -> str:
    """A name to show in the `approve with:` hint: an approver who may approve this requester's run."""
    others = [a for a in inv.approval.approvers if not (inv.approval.require_distinct_approver and a == requester)]
    return others[0] if others else "NAME"


# -- after a start: the id, the approval hint, following ---------------------------------------------------------


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


async def run_started(handle: WorkflowHandle, args: argparse.Namespace, what: str, approver_hint: str | None) -> int:
    """After a start: print the id (or --json it), the approval hint, and follow with --wait."""
    if not args.json:
        print(f"started {handle.id} ({what})")
        if approver_hint:
            print(f"  approve with: opsflow approve {handle.id} --as {approver_hint}")
    if args.wait or args.dry_run:
        return await follow_printing(handle, args.json)
    preempted = [vars(p) for p in getattr(handle, "preempted", [])]
    extra = {"preempted": preempted} if preempted else {}
    emit({"workflow_id": handle.id, "run_id": handle.result_run_id, **extra}, args.json)
    return 0


# -- signing ---------------------------------------------------------------------------------------------------


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
        return signer.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=gate_id, action=action,
                                   reason=reason, full=full)
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


# -- a person's request to a running procedure -------------------------------------------------------------------


async def send_request(handle: WorkflowHandle, args: argparse.Namespace, update: Callable[..., Any], request: Request,
                       result_type: type) -> Any:
    """Send `request` by the Update method `update` (opsflow.client.send_update); the workflow's refusal is exit 1,
    naming the command (`approve refused: ...`)."""
    try:
        return await send_update(handle, update, request, result_type=result_type)
    except WorkflowUpdateFailedError as e:
        cause = e.cause
        reason = cause.message if isinstance(cause, ApplicationError) else cause
        raise CliError(f"{args.command} refused: {reason}", 1) from None


def show_request_result(args: argparse.Namespace, result: Any, text: str) -> None:
    """What a request's answer prints: the JSON record, or `text`."""
    if args.json:
        emit({"workflow_id": args.workflow_id, "action": args.command, "by": args.as_, "result": result}, True)
    else:
        print(text)
