"""`opsflow lab demo --procedure canary`: the lab with its rollout stage, then a canary of the healthy image
(promoted) and one of the faulty image (rolled back automatically), each approved by a platform lead and QA."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lab.manage import down, print_status, status, up
from opsflow.client import connect, fetch_report, follow, send_update, start_procedure
from opsflow.inventory import load_inventory
from opsflow.report import ProgressLines
from workflows.canary import RolloutInput
from workflows.procedure import Procedure, Request

APPROVERS = (("carol", "platform-lead"), ("dave", "qa"))


async def approve_when_asked(handle) -> None:
    while True:
        report = await fetch_report(handle)
        if report.status not in ("running", "waiting", "paused"):
            return
        if report.current_step == "approval" and report.status == "waiting":
            for name, role in APPROVERS:
                print(f"\n  >>> the {role} would type:  opsflow approve {handle.id} --as {name}", flush=True)
                await send_update(handle, Procedure.approve, Request(by=name, reason=f"demo: {role}"))
            return
        await asyncio.sleep(0.3)


async def one(client, inv, image: str, ui: str) -> int:
    inp = RolloutInput(inventory=inv, image=image, strategy="canary", steps=[25, 50, 100], bake=15, auto_promote=True,
                       requester="alice", reason="opsflow demo")
    handle = await start_procedure(client, inv, "canary", inp, f"Canary of {image} (demo)")
    print(f"\ncanary of {image} started as {handle.id}; UI: {ui}/namespaces/default/workflows/{handle.id}\n",
          flush=True)
    approver = asyncio.create_task(approve_when_asked(handle))
    lines = ProgressLines()
    await follow(handle, lambda r: [print(line, flush=True) for line in lines.new_lines(r)])
    await approver
    report = await fetch_report(handle)
    code = 0 if report.status == "succeeded" else 1
    for a in report.analysis:  # type: ignore[attr-defined]
        figures = ", ".join(f"{m.name} {m.verdict} (canary {m.canary:.4g} vs stable {m.baseline:.4g})"
                            for m in a.metrics if m.canary is not None and m.baseline is not None)
        print(f"  analysis at {a.weight} % ({a.kind}): {a.verdict} — {figures}")
    return code


async def demo(state: dict) -> int:
    inv = load_inventory(state["inventory"])
    client = await connect()
    images, ui = state["rollout"]["images"], state["temporal"]["ui_url"]
    healthy = await one(client, inv, images["healthy"], ui)
    print("\nnow a faulty image (≥ 10 % HTTP 5xx): the analysis rolls it back by itself")
    faulty = await one(client, inv, images["faulty"], ui)
    print(f"\nPrometheus: {state['rollout']['prometheus']}   proxy: {state['rollout']['proxy']}")
    print("the lab stays up; tear it down with: opsflow lab down")
    return 0 if healthy == 0 and faulty == 1 else 1


def run_canary_demo(root: Path, with_worker: bool = True, cloud: str = "azure") -> int:
    state = up(root, with_worker=with_worker, cloud=cloud, rollout=True)
    if not state.get("rollout"):  # a lab from an earlier demo without the rollout stage
        down(root, quiet=True)
        state = up(root, with_worker=with_worker, cloud=cloud, rollout=True)
    print_status(status(root))
    return asyncio.run(demo(state))
