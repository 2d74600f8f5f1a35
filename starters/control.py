"""`opsflow approve|reject|pause|resume|abort|override ID --as NAME`: a person's request to a running procedure,
sent by the kernel's Update method (`Procedure.approve`, ...), signed where the procedure's inventory asks."""

from __future__ import annotations

import argparse

from temporalio.service import RPCError

from opsflow.client import connect, get_handle
from starters.common import CliError, add_json, add_key_argument, request_signature, send_request, show_request_result
from workflows.procedure import Procedure, Request

UPDATES = {
    "approve": Procedure.approve,
    "reject": Procedure.reject,
    "pause": Procedure.pause,
    "resume": Procedure.resume,
    "abort": Procedure.abort,
    "override": Procedure.override,
}
OVERRIDE_HELP = "override a window wait or a freeze (failback, maintenance, canary; by an approver)"


def register(sub: argparse._SubParsersAction) -> None:
    for name, update in UPDATES.items():
        u = add_json(sub.add_parser(name, help=OVERRIDE_HELP if name == "override" else f"{name} a running procedure"))
        u.add_argument("workflow_id")
        u.add_argument("--as", dest="as_", required=True, metavar="NAME")
        u.add_argument("--reason", required=(name == "reject"))
        if name in ("approve", "reject"):
            u.add_argument("--gate", metavar="ID", help="the gate this answers (default: the one open)")
        add_key_argument(u)
        u.set_defaults(func=cmd_update, update=update)


async def cmd_update(args: argparse.Namespace) -> int:
    client = await connect()
    handle = await get_handle(client, args.workflow_id)
    gate = getattr(args, "gate", None)
    try:
        signed = await request_signature(handle, action=args.command, name=args.as_, reason=args.reason or "",
                                         key_path=args.key, gate_id=gate)  # issue 11
        request = Request(by=args.as_, reason=args.reason or "", gate=gate, **signed)
        result = await send_request(handle, args, args.update, request,
                                    result_type=dict if args.command in ("approve", "reject") else str)
    except RPCError as e:
        raise CliError(f"{args.command} failed: {e.message}", 1) from None
    show_request_result(args, result, f"{args.command} {args.workflow_id} as {args.as_}: "
                        + (result if isinstance(result, str) else "recorded"))
    return 0
