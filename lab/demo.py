"""`opsflow lab demo`: the lab up, then a planned failover eastus -> westeurope, approved by a second person."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from temporalio.client import WorkflowFailureError

from activities.postgres.server import sql_status
from lab.inventory import lab_database
from lab.manage import print_status, status, up, worker_env
from lab.processes import Lab
from opsflow.client import connect, environment_workflow_id, fetch_report, follow, send_update, start_procedure
from opsflow.inventory import load_inventory
from opsflow.report import ProgressLines, figures, headline
from workflows.failover import FailoverInput
from workflows.maintenance import MaintenanceInput
from workflows.procedure import Procedure, Request

REQUESTER, APPROVER = "alice", "bob"


async def approve_when_asked(handle) -> None:
    while True:
        report = await fetch_report(handle)
        if report.status not in ("running", "waiting", "paused"):
            return
        if report.waiting_for and report.waiting_for.startswith("approval"):
            reason = "demo: rehearsal on the lab"
            print(f"\n  >>> a person would now type:  opsflow approve {handle.id} --as {APPROVER} --reason '{reason}'")
            print(f"  >>> the demo approves as {APPROVER}\n", flush=True)
            await asyncio.sleep(1)
            await send_update(handle, Procedure.approve, Request(by=APPROVER, reason=reason))
            return
        await asyncio.sleep(0.3)


def current_primary(inv) -> str:
    """The region whose database is primary now (a second demo run fails back the other way)."""
    for region, r in inv.regions.items():
        status = sql_status(r.database, region)
        if status.reachable and status.role == "primary" and not status.read_only:
            return region
    raise SystemExit("error: no writable primary in the lab; start afresh: opsflow lab down && opsflow lab demo")


async def demo(state: dict) -> int:
    inv = load_inventory(state["inventory"])
    source = current_primary(inv)
    target = next(r for r in inv.regions if r != source)
    client = await connect()
    inp = FailoverInput(inventory=inv, to_region=target, requester=REQUESTER, reason="opsflow demo")
    handle = await start_procedure(client, inv, "failover", inp,
                                   f"Planned failover of {inv.environment} to {target} (demo)")
    ui = f"{state['temporal']['ui_url']}/namespaces/default/workflows/{handle.id}"
    print(f"\nplanned failover {source} -> {target} started as {handle.id}, requested by {REQUESTER}")
    print(f"watch it in the Temporal UI: {ui}\n", flush=True)
    approver = asyncio.create_task(approve_when_asked(handle))
    lines = ProgressLines()
    report = await follow(handle, lambda r: [print(line, flush=True) for line in lines.new_lines(r)])
    await approver
    print(headline(report))
    for f in figures(report):
        print(f"  {f}")
    code = 0 if report.status == "succeeded" else 1
    if code == 0:
        print_following(inv.regions[target].database, source, target, report)
    print(f"\nreport:      opsflow report {handle.id} --markdown")
    print(f"Temporal UI: {ui}")
    print("the lab stays up; tear it down with: opsflow lab down")
    return code


def print_following(database, source: str, target: str, report) -> None:
    """After the failover: how the old primary follows the new one now, and the command that fails back."""
    provider = database.provider
    if provider == "patroni" and getattr(database, "layout", None) == "stretched":
        provider = "patroni-stretched"
    if report.old_primary_replica:
        how = {"postgres": f"{source} was shut down cleanly and started as a standby of {target}: it streams from "
                           f"{target} without a rebuild (no pg_rewind, no base backup)",
               "patroni": f"{source} is now a Patroni standby cluster whose standby leader streams from {target}",
               "patroni-stretched": f"{source}'s member is now a replica in the same Patroni cluster, streaming from "
                                    f"{target}'s member, the leader (Patroni's own switchover)",
               }.get(provider, f"{source} is now a streaming replica of {target} (switchover)")
        if report.switchover_detail:
            how += f"\n  proof: {report.switchover_detail}"
    else:
        how = f"{source} is fenced, not yet a replica: the failback rebuilds it as one first"
    print(f"\nold primary: {how}")
    print(f"fail back:   opsflow failback --to {source} --requester {REQUESTER}  (then approve as {APPROVER})")


def flavour_refusal(root: Path, database: str, patroni_layout: str = "per-region") -> str | None:
    """Why the demo cannot run with --database `database` (and its Patroni layout) on the lab already running in
    `root`, if it cannot."""
    lab = Lab(root)
    running = lab_database(lab.state)
    if running == "patroni":
        running_layout = lab.state.get("patroni_layout") or "per-region"
        running, wanted = f"patroni --patroni-layout {running_layout}", f"patroni --patroni-layout {patroni_layout}"
    else:
        wanted = database if database != "patroni" else f"patroni --patroni-layout {patroni_layout}"
    if not (lab.state.get("ready") and lab.alive("temporal")) or running == wanted:
        return None
    again = "opsflow lab demo" + ("" if database == "cloud" else f" --database {wanted}")
    return (f"opsflow lab demo: the lab in {root} runs with --database {running}, not {wanted}; take it down "
            f"first (opsflow lab down), then run: {again}")


def drill_schedule(state: dict) -> int:
    """Create the monthly restore-drill schedule and trigger it once, following the run to its report."""
    def opsflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "starters.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **worker_env(state)})

    inv = state["inventory"]
    print("\nthe monthly restore drill on a Temporal Schedule:")
    print(f"  opsflow schedule create monthly-drill --env {inv} --procedure drill "
          "--calendar 'day_of_month=1 hour=3' --timezone UTC")
    created = opsflow("schedule", "create", "monthly-drill", "--env", inv, "--procedure", "drill",
                      "--calendar", "day_of_month=1 hour=3", "--timezone", "UTC")
    if created.returncode not in (0, 2):  # 2: it exists from an earlier demo
        print(created.stderr, end="")
        return created.returncode
    print(f"  opsflow schedule trigger monthly-drill --env {inv}")
    triggered = opsflow("schedule", "trigger", "monthly-drill", "--env", inv, "--json")
    if triggered.returncode != 0:
        print(triggered.stderr, end="")
        return triggered.returncode
    wid = json.loads(triggered.stdout).get("workflow_id")
    print(f"  drill {wid} started; following it")
    launched = asyncio.run(scheduled_run(state, wid))
    if launched.get("status") == "skipped":
        print(f"  skipped: {launched.get('reason')}")
        return 1
    drill = launched["workflow_id"]
    report = json.loads(opsflow("report", drill, "--json").stdout or "{}")
    print(opsflow("report", drill).stdout, end="")
    return 0 if report.get("status") == "succeeded" else 1


async def scheduled_run(state: dict, launch_id: str) -> dict:
    """What a Schedule's launch (workflows/scheduled.py) did, once the procedure it started has ended: the
    procedure runs as its child under the environment's lock id, which is where its report is."""
    client = await connect()
    try:
        return await client.get_workflow_handle(launch_id).result()
    except WorkflowFailureError:  # the procedure failed, and its launch with it
        return {"status": "failed", "workflow_id": environment_workflow_id(load_inventory(state["inventory"]))}


async def maintenance_demo(state: dict) -> int:
    """The weekly maintenance window on the lab: its bloated table vacuumed, reindexed, under guards."""
    inv = load_inventory(state["inventory"])
    client = await connect()
    inp = MaintenanceInput(inventory=inv, requester=REQUESTER, reason="opsflow demo")
    handle = await start_procedure(client, inv, "maintenance", inp, f"Maintenance window of {inv.environment} (demo)")
    ui = f"{state['temporal']['ui_url']}/namespaces/default/workflows/{handle.id}"
    print(f"\nmaintenance window started as {handle.id}, requested by {REQUESTER}")
    print(f"watch it in the Temporal UI: {ui}\n", flush=True)
    approver = asyncio.create_task(approve_when_asked(handle))
    lines = ProgressLines()
    report = await follow(handle, lambda r: [print(line, flush=True) for line in lines.new_lines(r)])
    await approver
    print(headline(report))
    for f in figures(report):
        print(f"  {f}")
    code = 0 if report.status == "succeeded" else 1
    print(f"\nreport:      opsflow report {handle.id} --markdown")
    print(f"status page: the receiver's {state['receiver']['dir']}/statuspage.jsonl")
    print("the lab stays up; tear it down with: opsflow lab down")
    return code


def run_demo(root: Path, with_worker: bool = True, cloud: str = "azure", with_drill: bool = False,
             procedure: str = "failover", database: str = "cloud", patroni_layout: str = "per-region") -> int:
    refusal = flavour_refusal(root, database, patroni_layout)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    # Switchover first: Azure's cloud servers under a virtual endpoint, as `opsflow lab up` brings them up.
    state = up(root, with_worker=with_worker, cloud=cloud, database=database, patroni_layout=patroni_layout,
               virtual_endpoint=cloud == "azure" and database == "cloud")
    print_status(status(root))
    code = asyncio.run(maintenance_demo(state) if procedure == "maintenance" else demo(state))
    if with_drill and code == 0:
        code = drill_schedule(state)
    return code
