"""`opsflow canary`, `opsflow bluegreen`, `opsflow promote ID --as NAME [--full]`, `opsflow rollback ID --as NAME`.

A thin layer: the inventory and arguments become a `RolloutInput`, the workflow does the rest; promote and
rollback are the rollout's Update methods (`Rollout.promote`, `Rollout.rollback`)."""

from __future__ import annotations

import argparse

from opsflow.client import connect, get_handle, inventory_path, start_procedure
from opsflow.inventory import load_inventory, parse_duration
from starters.common import (
    CliError,
    SigningFailed,
    add_key_argument,
    request_signature,
    requester,
    run_started,
    send_request,
    show_request_result,
    start_signer,
)
from workflows.canary import Rollout, RolloutInput
from workflows.procedure import Request

STARTS = (("canary", "canary rollout: weight steps, bakes, statistical analysis, automatic rollback"),
          ("bluegreen", "blue-green deployment: the other colour, switch, rollback window"))
UPDATES = (("promote", Rollout.promote,
            "canary: next step now (--full: straight to 100 %%); blue-green: end the rollback window"),
           ("rollback", Rollout.rollback,
            "roll back now: the previous version takes all traffic (blue-green: switch back)"))


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _steps(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps are weights in percent, e.g. 5,25,50,100 (got {value!r})") from None


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in STARTS:
        p = sub.add_parser(name, help=text)
        p.add_argument("--env", help="inventory YAML (default: the running lab's)")
        p.add_argument("--image", required=True, help="the new image, e.g. registry/shop:1.2.3")
        p.add_argument("--app", help="the app in rollout.apps (default: the only one)")
        if name == "canary":
            p.add_argument("--steps", type=_steps, help="weights in percent, e.g. 5,25,50,100 (100: the promotion)")
            p.add_argument("--bake", type=_duration, help="time per weight, e.g. 10m")
            p.add_argument("--auto-promote", action="store_true",
                           help="promote after the last weight passes, without a person")
        p.add_argument("--override", action="store_true",
                       help="outside a window or in a freeze: wait for an approver's override")
        p.add_argument("--dry-run", action="store_true", help="preflight and print the plan; change nothing")
        p.add_argument("--requester", help="who asks (default: your login)")
        p.add_argument("--reason")
        p.add_argument("--wait", action="store_true", help="follow progress until the end")
        p.add_argument("--json", action="store_true")
        add_key_argument(p)
        p.set_defaults(func=start)
    for name, update, text in UPDATES:
        u = sub.add_parser(name, help=text)
        u.add_argument("workflow_id")
        u.add_argument("--as", dest="as_", required=True, metavar="NAME")
        u.add_argument("--reason")
        if name == "promote":
            u.add_argument("--full", action="store_true", help="straight to 100 %%")
        u.add_argument("--json", action="store_true")
        add_key_argument(u)
        u.set_defaults(func=send, update=update)


async def start(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args.env))
    if inv.rollout is None:
        raise CliError("the inventory has no rollout: section")
    try:
        app, _ = inv.rollout.app(args.app)
    except ValueError as e:
        raise CliError(str(e)) from None
    who = requester(args)
    inp = RolloutInput(inventory=inv, image=args.image, app=app, strategy=args.command,
                       steps=getattr(args, "steps", None), bake=getattr(args, "bake", None),
                       auto_promote=getattr(args, "auto_promote", False), override=args.override,
                       dry_run=args.dry_run, requester=who, reason=args.reason or "")
    client = await connect()
    kind = "Canary" if args.command == "canary" else "Blue-green"
    dry = " (dry run)" if args.dry_run else ""
    handle = await start_procedure(client, inv, args.command, inp, f"{kind}{dry} of {args.image} on {app}",
                                   signer=start_signer(inv, who, args.key))
    policy = inv.rollout.approval or inv.approval
    hint = ", ".join(policy.require) if policy.require else None
    return await run_started(handle, args, f"{args.command} of {args.image} on {app}, requested by {who}",
                             f"NAME (one per role: {hint})" if hint else "NAME")


async def send(args: argparse.Namespace) -> int:
    client = await connect()
    handle = await get_handle(client, args.workflow_id)
    full = getattr(args, "full", False)
    try:
        signed = await request_signature(handle, action=args.command, name=args.as_, reason=args.reason or "",
                                         key_path=args.key, full=full)
    except SigningFailed as e:
        raise CliError(f"cannot sign the {args.command}: {e}") from None
    req = Request(by=args.as_, reason=args.reason or "", full=full, **signed)
    result = await send_request(handle, args, args.update, req, result_type=str)
    show_request_result(args, result, f"{args.command} {args.workflow_id} as {args.as_}: {result}")
    return 0
