#!/usr/bin/env python3
"""Planned failover on the lab: time per step, RTO, orchestration overhead, against the physical limit.

    python bench/failover.py [--runs N] [--json]
    python bench/failover.py --emergency [--runs N] [--primary-alive] [--json]

Each run brings up a FRESH lab in a temporary directory (Temporal dev server, PostgreSQL primary in eastus and
streaming replica in westeurope, the ARM and Kubernetes emulators, a worker), runs a planned failover
eastus -> westeurope the way a person does (`opsflow failover ... --requester alice`, `opsflow approve ... --as
bob` as soon as it waits, `opsflow report ... --json`), and tears the lab down, also on failure or Ctrl-C.
A run that fails is reported and left out of the figures.

Then, with no lab, no Temporal and no emulators, N plain primary+replica pairs measure the PHYSICAL LIMIT:
`SELECT pg_promote(wait => false)` on the replica until the first INSERT commits on it (retried every ms).

The figures (medians over the runs that succeeded; min and max beside them):

- step: the step's start -> end as the report records it (workflow time).
- work: what the step itself had to do. For a step that runs activities: the activities' execution time from
  the workflow history (ActivityTaskStarted -> ActivityTaskCompleted); for the drain: what it waited
  (report.drain_seconds: until the sessions were idle, at most failover.drain; runs before "drain-until-idle": the
  configured drain on a timer); for the approval: nothing (it waits for a person, and the bench answers at once).
- overhead (per step) = step - work: handing the task to the worker and the result back to the workflow.
- RTO: the report's rto_seconds, approval -> traffic moved. The steps inside it (marked *) are maintenance,
  fence, drain, catch-up, promote, traffic. Shown with and without the drain (the lab's inventory
  allows 3 s; production inventories 60 s by default; it ends as soon as no session is in a transaction).
- orchestration overhead = RTO - drain - work of the steps inside the RTO: what Temporal and the
  procedure's bookkeeping add to the work itself. "between steps" is the part of it outside any step
  (RTO - the sum of those steps' times).
- promotion: the report's promotion_seconds (the db.promote activity: the promotion request through the
  Azure API emulator until a write commits), beside the physical limit.
- WRITE OUTAGE: what a client sees. A writer holds a connection to the primary and INSERTs about 200 times a
  second throughout the failover; on an error it reconnects to the other region (what an app does after a switch).
  The figure is the longest gap between two acknowledged writes. Since "drain-before-fence" the drain runs before
  the fence (in-flight work finishes while writes still succeed), so the outage no longer includes it.

--emergency: each run kills the eastus primary (as an outage would; --primary-alive keeps it), waits until the
lab's worker polls the procedure's queues (a worker runs before an outage), and runs an
emergency failover to westeurope (`opsflow failover --emergency`, no approval in the lab's inventory). The
figure is TRAFFIC MOVED: from the workflow's start (WorkflowExecutionStarted in the history) until the traffic
step ended, i.e. Traffic Manager sends clients to westeurope. Beside it, the delays the lab's ARM emulator adds
on purpose to look like Azure (lab/arm_emulator.py settings, written by the lab into arm.json):
`tm_checking_seconds`, how long a newly enabled Traffic Manager endpoint stays CheckingEndpoint before it is
Online (the traffic step waits for Online), and `lro_seconds`, the least time of a long-running operation (the
forced promotion, the control-plane fence). "excluding emulated delays" takes the Traffic Manager check out of
the traffic-moved figure (the promotion runs after the traffic in an emergency). The RTO is the report's
(emergency: from after the preflight until traffic moved and the replica promoted).

Progress goes to stderr; the result to stdout (--json: one JSON object). Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from opsflow.models import FailoverReport  # noqa: E402

SOURCE, TARGET = "eastus", "westeurope"
REQUESTER, APPROVER = "alice", "bob"
RTO_STEPS = ("maintenance", "fence", "drain", "catch-up", "promote", "traffic")  # approval -> traffic moved
CLI_TIMEOUT = 120  # seconds, one CLI command
FAILOVER_TIMEOUT = 300  # seconds, start -> end of one failover


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


class RunFailed(Exception):
    """One failover run did not give a usable report; the run is reported and left out."""


# -- one failover on a fresh lab --------------------------------------------------------------------------


def cli_env(state: dict) -> dict[str, str]:
    """The environment for `opsflow`: the lab's Temporal and nothing else (no TEMPORAL_* of the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    env.update(TEMPORAL_ADDRESS=state["temporal"]["address"], TEMPORAL_NAMESPACE="default", PYTHONPATH=str(ROOT))
    return env


def opsflow(state: dict, *args: str) -> dict:
    """Run `opsflow ARGS --json` as a person would (python -m starters.cli) and return its JSON."""
    argv = [sys.executable, "-m", "starters.cli", *args, "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=cli_env(state), cwd=ROOT, timeout=CLI_TIMEOUT)
    if proc.returncode != 0:
        raise RunFailed(
            f"opsflow {' '.join(args)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return json.loads(proc.stdout)


async def approve_and_wait(state: dict, workflow_id: str):
    """Approve as soon as the procedure waits for it (through the CLI), wait for the end, return the history.

    Waiting is done with the Temporal client in this process (a query every 0.2 s, then one long poll for the
    result) rather than by polling `opsflow status` in new processes, which would load the 2 cores the
    procedure is being measured on."""
    from temporalio.client import WorkflowFailureError
    from temporalio.service import RPCError

    from opsflow.client import connect

    client = await connect(state["temporal"]["address"], namespace="default")
    handle = client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + FAILOVER_TIMEOUT
    while True:
        if time.monotonic() > deadline:
            raise RunFailed(f"{workflow_id} never waited for approval within {FAILOVER_TIMEOUT}s")
        try:
            # A query waits for a worker to answer it: keep each short, the worker may still be starting.
            progress = await handle.query("progress", result_type=dict, rpc_timeout=timedelta(seconds=2))
        except RPCError:  # no worker has picked the workflow up yet
            progress = {}
        if (progress.get("waiting_for") or "").startswith("approval"):
            break
        if progress.get("status") in ("succeeded", "failed", "aborted", "refused"):
            raise RunFailed(f"{workflow_id} ended {progress['status']} before the approval: {progress.get('failure')}")
        await asyncio.sleep(0.2)
    await asyncio.to_thread(opsflow, state, "approve", workflow_id, "--as", APPROVER, "--reason", "bench")
    try:
        await asyncio.wait_for(handle.result(), timeout=max(1.0, deadline - time.monotonic()))
    except WorkflowFailureError:
        pass  # the report says why
    except asyncio.TimeoutError:
        raise RunFailed(f"{workflow_id} did not end within {FAILOVER_TIMEOUT}s") from None
    return await handle.fetch_history()


def activity_seconds_per_step(report: FailoverReport, history) -> dict[str, float]:
    """Execution time (ActivityTaskStarted -> its close) of the activities each step ran, by step name.

    An activity belongs to the step whose title is its summary (a step schedules its activity with its title as
    the summary; preflight reads run at once since "preflight-together"), else to the step that began last before
    the activity was scheduled."""
    from temporalio.api.enums.v1 import EventType

    def at(event) -> datetime:
        return event.event_time.ToDatetime(tzinfo=timezone.utc)

    scheduled: dict[int, datetime] = {}
    summary: dict[int, str] = {}
    started: dict[int, datetime] = {}
    ran: list[tuple[datetime, float, str | None]] = []  # (scheduled at, execution seconds, summary)
    closing = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
        EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
        EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    }
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = at(event)
            if event.HasField("user_metadata") and event.user_metadata.HasField("summary"):
                try:
                    summary[event.event_id] = json.loads(event.user_metadata.summary.data)
                except ValueError:
                    pass
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[event.activity_task_started_event_attributes.scheduled_event_id] = at(event)
        elif event.event_type in closing:
            sid = getattr(event, closing[event.event_type]).scheduled_event_id
            if sid in started:
                ran.append((scheduled[sid], (at(event) - started[sid]).total_seconds(), summary.get(sid)))

    steps = sorted((s for s in report.steps if s.started_at), key=lambda s: s.started_at)
    work: dict[str, float] = {}
    for when, seconds, title in ran:
        owner = [s for s in steps if s.started_at <= when]
        named = [s for s in owner if s.title == title]
        owner = named or owner
        if owner:
            work[owner[-1].name] = work.get(owner[-1].name, 0.0) + seconds
    return work


def foreign_workers(history, worker_pid: int) -> tuple[set[str], set[str]]:
    """Workers other than the lab's own that took tasks of this workflow: (only before the procedure got going,
    after that). Every lab polls the same task queue names, and the lab's Temporal takes port 7233 when it is
    free, so a stray worker of an earlier lab can still be polling that address and pick tasks up."""
    worker_events = {
        f"{kind}_task_{what}_event_attributes"
        for kind in ("workflow", "activity")
        for what in ("started", "completed", "failed")
    }
    before: set[str] = set()
    after: set[str] = set()
    going = False  # once a workflow task completed, the procedure runs
    for event in history.events:
        which = event.WhichOneof("attributes")
        identity = getattr(event, which).identity if which in worker_events else ""  # not the CLI's (start, update)
        if identity and identity.split("@", 1)[0] != str(worker_pid):
            (after if going else before).add(identity)
        going = going or event.HasField("workflow_task_completed_event_attributes")
    return before, after


class Writer:
    """A client writing continuously (one connection, reconnecting to the other region on an error); the gaps
    between acknowledged writes are the write outage a client sees."""

    def __init__(self, dsns: list[str]):
        self.dsns, self.acked, self.errors = dsns, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import psycopg

        i, n, conn = 0, 0, None
        try:
            with psycopg.connect(self.dsns[0], autocommit=True) as c:
                c.execute("CREATE TABLE IF NOT EXISTS bench_writes (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        except psycopg.Error:
            pass
        while not self.stop.wait(0.005):
            n += 1
            try:
                conn = conn or psycopg.connect(self.dsns[i], autocommit=True, connect_timeout=2)
                conn.execute("INSERT INTO bench_writes (id) VALUES (%s)", (n,))
                self.acked.append(time.monotonic())
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn, i = None, 1 - i
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.acked, self.acked[1:])), default=0.0)


DATABASE = "cloud"  # --database patroni: the planned runs on Patroni clusters
PATRONI_LAYOUT = "per-region"  # --patroni-layout stretched: one Patroni cluster across the regions


def failover_run(base: Path, number: int) -> dict:
    """A fresh lab, one planned failover through the CLI, the lab down again. Returns the run's figures."""
    from lab.manage import down, up
    from opsflow.inventory import load_inventory

    root = base / f"lab-{number}"
    t0 = time.monotonic()
    try:
        state = up(root, with_worker=True, quiet=True, default_ports=False, database=DATABASE,
                   patroni_layout=PATRONI_LAYOUT)
        say(f"  lab up in {time.monotonic() - t0:.1f}s; planned failover {SOURCE} -> {TARGET}")
        t0 = time.monotonic()
        drain = load_inventory(state["inventory"]).failover.drain
        writer = Writer([state["regions"][SOURCE]["dsn"], state["regions"][TARGET]["dsn"]])
        writer.thread.start()
        try:
            started = opsflow(
                state,
                "failover",
                "--env",
                state["inventory"],
                "--to",
                TARGET,
                "--requester",
                REQUESTER,
                "--reason",
                "bench",
            )
            workflow_id = started["workflow_id"]
            history = asyncio.run(approve_and_wait(state, workflow_id))
            acked = len(writer.acked)
            deadline = time.monotonic() + 30
            while len(writer.acked) < acked + 50 and time.monotonic() < deadline:  # writes on the new primary
                time.sleep(0.05)
        finally:
            writer.stop.set()
            writer.thread.join(10)
        report = FailoverReport.model_validate(opsflow(state, "report", workflow_id))
        say(f"  failover {report.status} in {time.monotonic() - t0:.1f}s (start to report)")
        if report.status != "succeeded" or report.rto_seconds is None or report.approval is None:
            raise RunFailed(f"failover {report.status}: {report.failure or 'no RTO in the report'}")
        before, after = foreign_workers(history, state["processes"]["worker"]["pid"])
        if after:
            raise RunFailed(f"a worker that is not the lab's ({', '.join(sorted(after))}) took tasks of the procedure: "
                            f"its timings are not this lab's (a stray worker polling {state['temporal']['address']}?)")
        if before:
            say(
                f"  note: a worker that is not the lab's ({', '.join(sorted(before))}) failed the first workflow "
                f"task(s); "
                f"that delayed the start, not the figures"
            )
        figures = figures_of_run(report, history, drain)
        figures["write_outage_seconds"] = round(writer.longest_gap(), 4)
        figures["foreign_workers_before_start"] = sorted(before)
        figures["emulated_azure_delays"] = emulated_azure_delays(root)
        return figures
    finally:
        t0 = time.monotonic()
        ignore_interrupts(lambda: down(root, quiet=True))
        say(f"  lab down in {time.monotonic() - t0:.1f}s")


def emergency_run(base: Path, number: int, kill_primary: bool = True) -> dict:
    """A fresh lab, the primary killed, one emergency failover through the CLI. Returns the run's figures."""
    from lab.manage import down, up
    from lab.postgres import Cluster

    root = base / f"lab-{number}"
    t0 = time.monotonic()
    try:
        state = up(root, with_worker=True, quiet=True, default_ports=False)
        say(f"  lab up in {time.monotonic() - t0:.1f}s; emergency failover {SOURCE} -> {TARGET}"
            + (f" ({SOURCE} primary killed)" if kill_primary else ""))
        if kill_primary:
            Cluster.from_dict(state["postgres"][SOURCE]).kill()
        asyncio.run(wait_served(state))
        t0 = time.monotonic()
        started = opsflow(
            state,
            "failover",
            "--env",
            state["inventory"],
            "--to",
            TARGET,
            "--emergency",
            "--requester",
            REQUESTER,
            "--reason",
            "bench",
        )
        history = asyncio.run(wait_for_end(state, started["workflow_id"]))
        report = FailoverReport.model_validate(opsflow(state, "report", started["workflow_id"]))
        say(f"  emergency failover {report.status} in {time.monotonic() - t0:.1f}s (start to report)")
        if report.status != "succeeded" or report.rto_seconds is None:
            raise RunFailed(f"emergency failover {report.status}: {report.failure or 'no RTO in the report'}")
        _, after = foreign_workers(history, state["processes"]["worker"]["pid"])
        if after:
            raise RunFailed(f"a worker that is not the lab's ({', '.join(sorted(after))}) took tasks of the procedure")
        return emergency_figures(report, history, emulated_azure_delays(root))
    finally:
        t0 = time.monotonic()
        ignore_interrupts(lambda: down(root, quiet=True))
        say(f"  lab down in {time.monotonic() - t0:.1f}s")


async def wait_served(state: dict, timeout: float = 60) -> None:
    """Until the lab's worker polls the procedure's queues. The lab comes up with its worker still starting: an
    emergency started at once waited ~0.7 s for its first decision, which a worker running before the emergency
    (the real case) does not cost."""
    from concurrency import wait_pollers

    from opsflow.client import connect
    from opsflow.inventory import load_inventory

    client = await connect(state["temporal"]["address"], namespace="default")
    inv = load_inventory(state["inventory"])
    await wait_pollers(client, inv.all_queues(), timeout, workflow_queues=[inv.task_queue], interval=0.1)


async def wait_for_end(state: dict, workflow_id: str):
    from temporalio.client import WorkflowFailureError

    from opsflow.client import connect

    client = await connect(state["temporal"]["address"], namespace="default")
    handle = client.get_workflow_handle(workflow_id)
    try:
        await asyncio.wait_for(handle.result(), timeout=FAILOVER_TIMEOUT)
    except WorkflowFailureError:
        pass  # the report says why
    except asyncio.TimeoutError:
        raise RunFailed(f"{workflow_id} did not end within {FAILOVER_TIMEOUT}s") from None
    return await handle.fetch_history()


def emergency_figures(report: FailoverReport, history, delays: dict) -> dict:
    start = history.events[0].event_time.ToDatetime(tzinfo=timezone.utc)  # WorkflowExecutionStarted
    by_name = {s.name: s for s in report.steps}
    traffic = by_name.get("traffic")
    if traffic is None or traffic.ended_at is None or traffic.outcome != "ok":
        raise RunFailed("no completed traffic step in the report")
    work = activity_seconds_per_step(report, history)
    moved = (traffic.ended_at - start).total_seconds()
    tm_checking = float(delays.get("tm_checking_seconds") or 0)
    return {
        "workflow_id": report.workflow_id,
        "steps": {
            s.name: {"seconds": s.seconds, "work": work.get(s.name)} for s in report.steps if s.seconds is not None
        },
        "traffic_moved_seconds": round(moved, 4),
        "traffic_moved_excluding_emulated_delays_seconds": round(moved - tm_checking, 4),
        "before_traffic_step_seconds": round((traffic.started_at - start).total_seconds(), 4),
        "rto_seconds": round(report.rto_seconds, 4),
        "promotion_seconds": report.promotion_seconds,
        "rpo_bytes": report.rpo_bytes,
        "emulated_azure_delays": delays,
    }


def emulated_azure_delays(root: Path) -> dict:
    """What the lab's ARM emulator adds on purpose, as Azure would: the time a long-running operation (a
    parameter change, a promotion) takes, and how long a Traffic Manager endpoint is 'CheckingEndpoint'."""
    try:
        return json.loads((root / "arm.json").read_text()).get("settings", {})
    except (OSError, ValueError):
        return {}


def figures_of_run(report: FailoverReport, history, drain: float) -> dict:
    work = activity_seconds_per_step(report, history)
    if report.drain_seconds is not None:  # "drain-until-idle": the drain took what it waited, not the configured
        drain = report.drain_seconds
    work["drain"] = drain
    steps = {}
    for s in report.steps:
        if s.seconds is None:
            continue
        steps[s.name] = {"seconds": s.seconds, "work": work.get(s.name) if s.name != "approval" else None}
    rto_end = report.approval.at.timestamp() + report.rto_seconds
    in_rto = [
        s
        for s in report.steps
        if s.started_at
        and s.ended_at
        and s.started_at >= report.approval.at
        and s.ended_at.timestamp() <= rto_end + 1e-6
    ]
    missing = [name for name in RTO_STEPS if name not in {s.name for s in in_rto}]
    if missing:
        raise RunFailed(f"steps missing inside the RTO window: {', '.join(missing)}")
    work_in_rto = sum(work.get(s.name, 0.0) for s in in_rto)  # drain counted as its configured time
    steps_in_rto = sum(s.seconds for s in in_rto)
    return {
        "workflow_id": report.workflow_id,
        "steps": steps,
        "rto_seconds": round(report.rto_seconds, 4),
        "rto_excluding_drain_seconds": round(report.rto_seconds - drain, 4),
        "promotion_seconds": report.promotion_seconds,
        "orchestration_overhead_seconds": round(report.rto_seconds - work_in_rto, 4),
        "between_steps_seconds": round(report.rto_seconds - steps_in_rto, 4),
        "drain_seconds": drain,
    }


# -- the physical limit: a plain primary + replica, no orchestration ----------------------------------------


def physical_limit_run(base: Path, number: int) -> float:
    """Seconds from `SELECT pg_promote(wait => false)` on a streaming replica until an INSERT commits on it."""
    import psycopg

    from lab.postgres import create_replica, init_primary

    root = base / f"pair-{number}"
    try:
        primary = init_primary(root, "primary")
        replica = create_replica(primary, root, "replica")
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE probe (id int)")
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        with psycopg.connect(replica.dsn, autocommit=True) as conn:
            wait_replayed(conn, lsn)  # the replica has the table: the same idle, caught-up state as the lab's
            t0 = time.perf_counter()
            conn.execute("SELECT pg_promote(wait => false)")
            while True:
                try:
                    conn.execute("INSERT INTO probe VALUES (1)")
                    return time.perf_counter() - t0
                except psycopg.errors.ReadOnlySqlTransaction:
                    time.sleep(0.001)
    finally:
        # Every cluster under the pair's directory, also one whose creation was cut short.
        ignore_interrupts(lambda: drop_clusters_under(root))


def drop_clusters_under(root: Path) -> None:
    from lab.postgres import Cluster, drop_cluster

    for datadir in root.glob("*/data"):
        drop_cluster(
            Cluster(name=datadir.parent.name, datadir=datadir, port=0, logfile=datadir.parent / "postgres.log")
        )
    shutil.rmtree(root, ignore_errors=True)


def wait_replayed(conn, lsn: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise RunFailed(f"the replica did not replay up to {lsn} within {timeout:.0f}s")
        time.sleep(0.01)


# -- running it all ---------------------------------------------------------------------------------------


def ignore_interrupts(cleanup) -> None:
    """Run a teardown without Ctrl-C or SIGTERM cutting it short (it must not leave servers behind); an
    interrupt that came meanwhile is raised once the teardown is done."""
    came: list[int] = []
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda signum, _frame: came.append(signum)) for sig in watched}
    try:
        cleanup()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        raise KeyboardInterrupt


def interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def attempt(what: str, number: int, runs: int, fn, *args):
    """Run one measurement; a failure is reported and returned as such, never raised (Ctrl-C is)."""
    say(f"{what} {number}/{runs}")
    t0 = time.monotonic()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of one run: report it, go on with the next
        say(f"  FAILED after {time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}")
        return {"ok": False, "run": number, "error": f"{type(e).__name__}: {e}"}
    say(f"  done in {time.monotonic() - t0:.1f}s")
    return {"ok": True, "run": number, "result": result}


def stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def summarize(runs: list[dict], pairs: list[dict], requested: int) -> dict:
    ok = [r["result"] for r in runs if r["ok"]]
    order: list[str] = []
    for r in ok:
        order += [name for name in r["steps"] if name not in order]
    steps = {}
    for name in order:
        seen = [r["steps"][name] for r in ok if name in r["steps"]]
        secs = [s["seconds"] for s in seen]
        work = [s["work"] for s in seen if s["work"] is not None]
        overhead = [s["seconds"] - s["work"] for s in seen if s["work"] is not None]
        steps[name] = {
            "in_rto": name in RTO_STEPS,
            "seconds": stats(secs),
            "work_seconds": stats(work),
            "overhead_seconds": stats(overhead),
        }
    figure = lambda key: stats([r[key] for r in ok])  # noqa: E731
    return {
        "scenario": f"planned failover {SOURCE} -> {TARGET}, fresh lab per run",
        "runs_requested": requested,
        "runs_ok": len(ok),
        "failed_runs": [{"run": r["run"], "error": r["error"]} for r in runs if not r["ok"]],
        "drain_seconds": ok[0]["drain_seconds"] if ok else None,
        "emulated_azure_delays": ok[0]["emulated_azure_delays"] if ok else None,
        "steps": steps,
        "rto_seconds": figure("rto_seconds"),
        "rto_excluding_drain_seconds": figure("rto_excluding_drain_seconds"),
        "orchestration_overhead_seconds": figure("orchestration_overhead_seconds"),
        "between_steps_seconds": figure("between_steps_seconds"),
        "promotion_seconds": figure("promotion_seconds"),
        "write_outage_seconds": figure("write_outage_seconds"),
        "physical_limit_seconds": stats([p["result"] for p in pairs if p["ok"]]),
        "physical_limit_failed": [{"pair": p["run"], "error": p["error"]} for p in pairs if not p["ok"]],
        "per_run": [
            {
                "run": r["run"],
                **({k: v for k, v in r["result"].items() if k != "steps"} if r["ok"] else {"error": r["error"]}),
            }
            for r in runs
        ],
    }


def summarize_emergency(runs: list[dict], requested: int, kill_primary: bool) -> dict:
    ok = [r["result"] for r in runs if r["ok"]]
    order: list[str] = []
    for r in ok:
        order += [name for name in r["steps"] if name not in order]
    steps = {}
    for name in order:
        seen = [r["steps"][name] for r in ok if name in r["steps"]]
        steps[name] = {"seconds": stats([x["seconds"] for x in seen]), "work_seconds": stats([x["work"] for x in seen]),
                       "overhead_seconds": stats([x["seconds"] - x["work"] for x in seen if x["work"] is not None])}
    figure = lambda key: stats([r[key] for r in ok])  # noqa: E731
    return {
        "scenario": f"emergency failover {SOURCE} -> {TARGET}"
        + (f" with the {SOURCE} primary killed" if kill_primary else "")
        + ", fresh lab per run",
        "runs_requested": requested,
        "runs_ok": len(ok),
        "failed_runs": [{"run": r["run"], "error": r["error"]} for r in runs if not r["ok"]],
        "emulated_azure_delays": ok[0]["emulated_azure_delays"] if ok else None,
        "steps": steps,
        "traffic_moved_seconds": figure("traffic_moved_seconds"),
        "traffic_moved_excluding_emulated_delays_seconds": figure("traffic_moved_excluding_emulated_delays_seconds"),
        "before_traffic_step_seconds": figure("before_traffic_step_seconds"),
        "rto_seconds": figure("rto_seconds"),
        "promotion_seconds": figure("promotion_seconds"),
        "per_run": [
            {
                "run": r["run"],
                **({k: v for k, v in r["result"].items() if k != "steps"} if r["ok"] else {"error": r["error"]}),
            }
            for r in runs
        ],
    }


def print_emergency(s: dict) -> None:
    def mmm(st: dict | None) -> str:
        return f"median {st['median']:6.2f} s  (min {st['min']:.2f}, max {st['max']:.2f}, n={st['n']})" if st else "n/a"

    print(f"{s['scenario']}: {s['runs_ok']} of {s['runs_requested']} runs succeeded")
    for f in s["failed_runs"]:
        print(f"  run {f['run']} FAILED (left out): {f['error']}")
    if not s["runs_ok"]:
        return
    print()
    print(f"{'step':<20}{'median':>8}{'work':>8}{'overhead':>9}   (seconds; work: activity execution from the history)")
    for name, st in s["steps"].items():
        w, o = st["work_seconds"], st["overhead_seconds"]
        print(
            f"{name:<20}{st['seconds']['median']:8.2f}"
            f"{w['median'] if w else float('nan'):8.2f}{o['median'] if o else float('nan'):9.2f}"
        )
    print()
    d = s["emulated_azure_delays"] or {}
    for label, key, note in (
        (
            "TRAFFIC MOVED (start -> traffic step done)",
            "traffic_moved_seconds",
            "WorkflowExecutionStarted -> traffic step end",
        ),
        (
            "  excluding the emulator's deliberate delays",
            "traffic_moved_excluding_emulated_delays_seconds",
            f"minus {d.get('tm_checking_seconds', '?')} s Traffic Manager endpoint checking",
        ),
        (
            "  of which before the traffic step",
            "before_traffic_step_seconds",
            "preflight of both regions, traffic check, poller check",
        ),
        ("RTO (report: after preflight -> promoted)", "rto_seconds", ""),
        (
            "promotion (forced, through ARM)",
            "promotion_seconds",
            f"includes the emulator's {d.get('lro_seconds', '?')} s operation time",
        ),
    ):
        print(f"{label:<46}{mmm(s[key])}   {note}".rstrip())
    print(
        f"the lab's ARM emulator adds on purpose, as Azure would: {d.get('tm_checking_seconds', '?')} s of Traffic "
        f"Manager endpoint checking (inside the traffic step), {d.get('lro_seconds', '?')} s per long-running "
        "operation (promotion, control-plane fence; after the traffic)"
    )


def print_text(s: dict) -> None:
    def fmt(v: float | None, width: int = 7) -> str:
        if v is None:
            return f"{'-':>{width}}"
        return f"{0.0 if abs(v) < 0.005 else v:{width}.2f}"  # no "-0.00" from float rounding

    def mmm(st: dict | None) -> str:
        if not st:
            return "n/a"
        return f"median {fmt(st['median'], 6)} s  (min {fmt(st['min'], 0)}, max {fmt(st['max'], 0)}, n={st['n']})"

    print(f"{s['scenario']}: {s['runs_ok']} of {s['runs_requested']} runs succeeded")
    for f in s["failed_runs"]:
        print(f"  run {f['run']} FAILED (left out): {f['error']}")
    if not s["runs_ok"]:
        return
    print()
    print(
        f"{'step':<17}{'RTO':>4} {'median':>7} {'min':>7} {'max':>7}   {'work':>7} {'overhead':>8}"
        "   (seconds; work and overhead: medians)"
    )
    for name, st in s["steps"].items():
        sec, work, over = st["seconds"], st["work_seconds"], st["overhead_seconds"]
        note = (
            "  waits for the approver (the bench approves at once)"
            if name == "approval"
            else ("  until the sessions are idle (at most failover.drain)" if name == "drain" else "")
        )
        print(f"{name:<17}{'*' if st['in_rto'] else '':>4} {fmt(sec['median'])} {fmt(sec['min'])} {fmt(sec['max'])}   "
              f"{fmt(work['median'] if work else None)} {fmt(over['median'] if over else None, 8)}{note}")
    print(
        "* inside the RTO (approval -> traffic moved).  work: activity execution time from the history.  "
        "overhead = step - work"
    )
    print()
    drain = s["drain_seconds"]
    figures = [
        ("RTO (approval -> traffic moved)", s["rto_seconds"], "the report's rto_seconds"),
        (f"RTO excluding the drain ({drain:g} s)", s["rto_excluding_drain_seconds"], ""),
        (
            "orchestration overhead in the RTO",
            s["orchestration_overhead_seconds"],
            "= RTO - drain - work of the * steps",
        ),
        ("  of which between steps", s["between_steps_seconds"], "= RTO - sum of the * steps' times"),
        (
            "promotion (db.promote through ARM)",
            s["promotion_seconds"],
            "the report's promotion_seconds: request -> first write",
        ),
        (
            "WRITE OUTAGE a client sees",
            s["write_outage_seconds"],
            "longest gap between acknowledged writes of a continuous writer",
        ),
        (
            "PHYSICAL LIMIT (pg_promote -> 1st INSERT)",
            s["physical_limit_seconds"],
            "plain primary+replica, no Temporal, no emulators",
        ),
    ]
    for label, st, note in figures:
        print(f"{label:<44}{mmm(st)}   {note}".rstrip())
    for f in s["physical_limit_failed"]:
        print(f"  pair {f['pair']} FAILED (left out): {f['error']}")
    delays = s.get("emulated_azure_delays") or {}
    if delays:
        print(
            f"the lab's ARM emulator adds, as Azure would: {delays.get('lro_seconds', '?')} s per long-running "
            "operation (fence parameter, "
            f"promotion), {delays.get('tm_checking_seconds', '?')} s of Traffic Manager endpoint checking"
        )
    print()
    print("per run:  " + "   ".join(f"#{r['run']} RTO {r['rto_seconds']:.2f}s, outage {r['write_outage_seconds']:.2f}s"
                                    if "rto_seconds" in r else f"#{r['run']} failed" for r in s["per_run"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="failover runs, and primary+replica pairs for the physical limit (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--emergency", action="store_true", help="emergency failover with the primary killed: time until traffic moved"
    )
    parser.add_argument(
        "--primary-alive", action="store_true", help="with --emergency: do not kill the old primary first"
    )
    parser.add_argument("--database", choices=["cloud", "patroni"], default="cloud",
                        help="planned runs on `opsflow lab up --database patroni` (Patroni clusters)")
    parser.add_argument("--patroni-layout", choices=["per-region", "stretched"], default="per-region",
                        help="with --database patroni: one cluster per region, or one stretched across them")
    args = parser.parse_args()
    global DATABASE, PATRONI_LAYOUT
    DATABASE, PATRONI_LAYOUT = args.database, args.patroni_layout
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    # SIGTERM tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    base = Path(tempfile.mkdtemp(prefix="opsflow-bench-"))
    # The lab notes itself as "the current lab" under $OPSFLOW_HOME: keep that away from a lab the person runs.
    os.environ["OPSFLOW_HOME"] = str(base / "home")
    for key in [k for k in os.environ if k.startswith("TEMPORAL_")]:
        del os.environ[key]  # the worker and the CLI talk to the bench's lab only
    if args.emergency:
        try:
            runs = [
                attempt("emergency failover run", i, args.runs, emergency_run, base, i, not args.primary_alive)
                for i in range(1, args.runs + 1)
            ]
        except KeyboardInterrupt:
            say("interrupted; everything started was stopped")
            return 130
        finally:
            shutil.rmtree(base, ignore_errors=True)
        summary = summarize_emergency(runs, args.runs, not args.primary_alive)
        print(json.dumps(summary, indent=2)) if args.json else print_emergency(summary)
        return 0 if summary["runs_ok"] else 1
    try:
        runs = [attempt("failover run", i, args.runs, failover_run, base, i) for i in range(1, args.runs + 1)]
        pairs = [
            attempt("physical limit, primary+replica pair", i, args.runs, physical_limit_run, base, i)
            for i in range(1, args.runs + 1)
        ]
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(runs, pairs, args.runs)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary)
    return 0 if summary["runs_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
