#!/usr/bin/env python3
"""Per-step orchestration overhead: what a step costs beyond its activity's own work, and where it goes.

    python bench/overhead.py [--runs N] [--steps N] [--failovers N] [--json]

1. No-op steps. A fresh lab (its Temporal dev server; no lab worker) and a worker inside this process on a
   bench task queue run `bench-steps` (bench/bench_workflows.py): N no-op steps through the kernel's
   `Procedure.step`, with the kernel's own `show()` ("full") and with variants of it, plus `bench-raw`, the
   same no-op activities without the kernel (the floor Temporal itself sets). The variants run interleaved,
   one workflow at a time, --runs workflows each.
2. Real steps. --failovers planned failovers, each on a fresh lab (bench/failover.py's run): each step's
   time from the report minus its activities' execution time from the workflow history.

A step's time is what the procedure records: from the workflow task that begins it (and schedules the
activity) to the workflow task that sees the result (`workflow.now()` is the workflow task's start). From the
history, each no-op step splits into:
- wft: the workflow task that schedules the activity (worker: activation, sandbox, show(), commands; server:
  persisting them, search-attribute upserts included) - WorkflowTaskStarted -> WorkflowTaskCompleted
- dispatch: ActivityTaskScheduled -> ActivityTaskStarted (matching to a polling worker)
- activity: ActivityTaskStarted -> ActivityTaskCompleted (the server stamps Started when it hands the task to
  a polling worker: delivery, the worker's thread pool, the no-op itself, the result reported back)
- pickup: ActivityTaskCompleted -> the next WorkflowTaskStarted (a new workflow task, matched to the worker)
A no-op activity's own time is nil (microseconds), so for no-op steps overhead = the step's whole time.
For the failover's real steps (where the activity does work) overhead = step - (ActivityTaskStarted ->
ActivityTaskCompleted), as bench/failover.py counts it; that leaves out the activity round trip (see "activity"
above), so it is lower than the no-op figure for the same kernel.

Progress goes to stderr; the figures to stdout (--json: one JSON object). Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = {
    "full": "the kernel as it is (main: details on every step begin/end, upsert when OpsStep/OpsStatus change)",
    "changed": "details every time, upsert only when OpsStep/OpsStatus change (proposed fix)",
    "details": "current details only, no upsert",
    "upsert": "upsert only, no current details",
    "none": "no show() at all",
    "raw": "no kernel: workflow.execute_activity in a loop (Temporal's floor)",
    "local": "no kernel: workflow.execute_local_activity in a loop",
}


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def ms_stats(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    ms = [s * 1000 for s in seconds]
    return {"median": round(statistics.median(ms), 2), "p95": round(pct(ms, 0.95), 2), "min": round(min(ms), 2),
            "max": round(max(ms), 2), "n": len(ms)}


# -- the history of one no-op workflow, step by step ----------------------------------------------------------


def steps_from_history(history) -> dict:
    """Per activity: step, work, wft, dispatch, pickup (seconds) as described in the module docstring."""
    from temporalio.api.enums.v1 import EventType as E

    def at(event) -> float:
        return event.event_time.ToDatetime(tzinfo=timezone.utc).timestamp()

    wft_started: float | None = None
    wft_span: dict[int, float] = {}  # WorkflowTaskCompleted event id -> its processing time
    wft_start_of: dict[int, float] = {}  # WorkflowTaskCompleted event id -> its WorkflowTaskStarted time
    pending: dict[int, dict] = {}  # scheduled event id -> partial record
    waiting_pickup: list[dict] = []
    done: list[dict] = []
    upserts = 0
    first_wft = closed = None
    for ev in history.events:
        t = at(ev)
        if ev.event_type == E.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            wft_started = t
            first_wft = first_wft or t
            for rec in waiting_pickup:
                rec["pickup"] = t - rec["completed_at"]
                rec["step"] = t - rec["begun_at"]
                done.append(rec)
            waiting_pickup = []
        elif ev.event_type == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            wft_span[ev.event_id] = t - (wft_started or t)
            wft_start_of[ev.event_id] = wft_started or t
        elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            by = ev.activity_task_scheduled_event_attributes.workflow_task_completed_event_id
            pending[ev.event_id] = {
                "scheduled_at": t,
                "begun_at": wft_start_of.get(by, t),
                "wft": wft_span.get(by, 0.0),
            }
        elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            rec = pending[ev.activity_task_started_event_attributes.scheduled_event_id]
            rec["started_at"] = t
        elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            rec = pending.pop(ev.activity_task_completed_event_attributes.scheduled_event_id)
            rec["completed_at"] = t
            rec["dispatch"] = rec["started_at"] - rec["scheduled_at"]
            rec["work"] = t - rec["started_at"]
            waiting_pickup.append(rec)
        elif ev.event_type == E.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            upserts += 1
        elif ev.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            closed = t
    return {"steps": done, "upserts": upserts, "events": len(history.events),
            "total": (closed - first_wft) if closed and first_wft else None}


# -- no-op steps on the lab's Temporal -----------------------------------------------------------------------


async def noop_bench(state: dict, runs: int, steps: int, variants: list[str]) -> dict:
    from bench_workflows import RawInput, RawWorkflow, StepsInput, StepsWorkflow, noop
    from temporalio.worker import Worker

    from opsflow.client import connect
    from opsflow.inventory import load_inventory

    inv = load_inventory(state["inventory"])
    client = await connect(state["temporal"]["address"], namespace="default")
    queue = f"bench-overhead-{uuid.uuid4().hex[:8]}"
    per_variant: dict[str, list[dict]] = {v: [] for v in variants}
    with ThreadPoolExecutor(max_workers=8) as pool:
        async with Worker(
            client, task_queue=queue, workflows=[StepsWorkflow, RawWorkflow], activities=[noop], activity_executor=pool
        ):
            for run in range(runs + 1):  # run 0 warms up (imports in the sandbox, first polls) and is left out
                for v in variants:
                    wid = f"bench-{v}-{run}-{uuid.uuid4().hex[:6]}"
                    if v in ("raw", "local"):
                        handle = await client.start_workflow(
                            "bench-raw",
                            RawInput(steps=steps, local=v == "local", queue=queue),
                            id=wid,
                            task_queue=queue,
                        )
                    else:
                        handle = await client.start_workflow(
                            "bench-steps",
                            StepsInput(inventory=inv, steps=steps, show=v, queue=queue),
                            id=wid,
                            task_queue=queue,
                        )
                    await handle.result()
                    if run:
                        per_variant[v].append(steps_from_history(await handle.fetch_history()))
                say(f"  no-op run {run}/{runs}" + (" (warm-up, left out)" if not run else ""))
    out = {}
    for v, histories in per_variant.items():
        recs = [r for h in histories for r in h["steps"]]
        if v == "local":  # no activity events: the whole run divided by its steps
            per_step = [h["total"] / steps for h in histories if h["total"]]
            out[v] = {"what": VARIANTS[v], "step_ms": ms_stats(per_step), "overhead_ms": ms_stats(per_step)}
            continue
        out[v] = {
            "what": VARIANTS[v],
            "step_ms": ms_stats([r["step"] for r in recs]),
            "overhead_ms": ms_stats([r["step"] for r in recs]),  # a no-op's own time is nil
            "step_minus_history_work_ms": ms_stats([r["step"] - r["work"] for r in recs]),
            "activity_ms": ms_stats([r["work"] for r in recs]),
            "wft_ms": ms_stats([r["wft"] for r in recs]),
            "dispatch_ms": ms_stats([r["dispatch"] for r in recs]),
            "pickup_ms": ms_stats([r["pickup"] for r in recs]),
            "history_events_per_step": round(statistics.median(h["events"] for h in histories) / steps, 1),
            "upserts_per_step": round(statistics.median(h["upserts"] for h in histories) / steps, 1),
        }
    return out


def inventory_conversion(state: dict) -> dict:
    """What converting the whole inventory costs (it travels in every procedure's input, decoded at each start
    and at each replay after the workflow left the cache)."""
    from bench_workflows import StepsInput

    from opsflow.inventory import load_inventory
    from opsflow.temporal import DATA_CONVERTER

    inv = load_inventory(state["inventory"])
    value = StepsInput(inventory=inv, steps=1, queue="q")
    conv = DATA_CONVERTER.payload_converter
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        payloads = conv.to_payloads([value])
        conv.from_payloads(payloads, [StepsInput])
    return {"payload_bytes": len(payloads[0].data), "encode_decode_ms": round((time.perf_counter() - t0) / n * 1000, 3)}


# -- real steps: planned failovers ------------------------------------------------------------------------------


def failover_overheads(base: Path, count: int) -> dict:
    import failover as fb

    runs = [fb.attempt("failover run", i, count, fb.failover_run, base, i) for i in range(1, count + 1)]
    per_step: dict[str, list[float]] = {}
    every: list[float] = []
    for r in runs:
        if not r["ok"]:
            continue
        for name, st in r["result"]["steps"].items():
            if st["work"] is None or name == "drain":  # the approval waits for a person; the drain is a timer
                continue
            over = st["seconds"] - st["work"]
            per_step.setdefault(name, []).append(over)
            every.append(over)
    return {
        "runs_ok": sum(r["ok"] for r in runs),
        "failed_runs": [r["error"] for r in runs if not r["ok"]],
        "overhead_ms": ms_stats(every),
        "per_step_overhead_ms_median": {name: round(statistics.median(v) * 1000, 1) for name, v in per_step.items()},
    }


# -- running it all -------------------------------------------------------------------------------------------


def interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    import failover as fb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="no-op workflows per variant (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="no-op steps per workflow (default 20)")
    parser.add_argument(
        "--failovers",
        type=int,
        default=1,
        help="planned failovers on fresh labs for the real steps (default 1; 0: none)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if "full" not in variants:
        variants.insert(0, "full")

    signal.signal(signal.SIGTERM, interrupt)
    base = Path(tempfile.mkdtemp(prefix="opsflow-bench-overhead-"))
    os.environ["OPSFLOW_HOME"] = str(base / "home")
    for key in [k for k in os.environ if k.startswith("TEMPORAL_")]:
        del os.environ[key]
    from lab.manage import down, up

    try:
        root = base / "lab-noop"
        try:
            t0 = time.monotonic()
            state = up(root, with_worker=False, quiet=True, default_ports=False)
            say(
                f"lab up in {time.monotonic() - t0:.1f}s; {args.runs} x {args.steps} no-op steps per variant: "
                f"{', '.join(variants)}"
            )
            noop = asyncio.run(noop_bench(state, args.runs, args.steps, variants))
            conversion = inventory_conversion(state)
        finally:
            fb.ignore_interrupts(lambda: down(root, quiet=True))
        real = failover_overheads(base, args.failovers) if args.failovers > 0 else None
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)

    full = noop["full"]["overhead_ms"]
    summary = {
        "per_step_overhead_ms_median": full["median"],
        "per_step_overhead_ms_p95": full["p95"],
        "measured_on": f"{args.runs} x {args.steps} no-op steps through Procedure.step "
        "on the lab's Temporal dev server",
        "failover_per_step_overhead_ms_median": real["overhead_ms"]["median"] if real and real["overhead_ms"] else None,
        "failover_per_step_overhead_ms_p95": real["overhead_ms"]["p95"] if real and real["overhead_ms"] else None,
        "variants": noop,
        "inventory_conversion": conversion,
        "failover": real,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary)
    return 0


def print_text(s: dict) -> None:
    def m(st: dict | None, key: str = "median") -> str:
        return f"{st[key]:8.1f}" if st else f"{'-':>8}"

    print(
        "per-step orchestration overhead (no-op steps, kernel as is): "
        f"median {s['per_step_overhead_ms_median']:.1f} ms, "
        f"p95 {s['per_step_overhead_ms_p95']:.1f} ms   [{s['measured_on']}]"
    )
    if s["failover_per_step_overhead_ms_median"] is not None:
        print(
            "per-step orchestration overhead (planned failover's real steps): "
            f"median {s['failover_per_step_overhead_ms_median']:.1f} ms, "
            f"p95 {s['failover_per_step_overhead_ms_p95']:.1f} ms"
        )
    print()
    print(
        f"{'variant':<9}{'overhead':>9}{'p95':>9}{'wft':>9}{'dispatch':>9}{'activity':>9}{'pickup':>9}"
        f"{'events':>8}{'upserts':>8}   (ms per step; medians)"
    )
    for name, v in s["variants"].items():
        print(
            f"{name:<9}{m(v['overhead_ms'])} {m(v['overhead_ms'], 'p95')}{m(v.get('wft_ms'))} "
            f"{m(v.get('dispatch_ms'))} {m(v.get('activity_ms'))} {m(v.get('pickup_ms'))}"
            f"{v.get('history_events_per_step', '-'):>8}{v.get('upserts_per_step', '-'):>8}   {v['what']}"
        )
    c = s["inventory_conversion"]
    print(
        f"\nthe lab inventory in a workflow input: {c['payload_bytes']} bytes, "
        f"{c['encode_decode_ms']:.2f} ms to encode+decode (once per start/replay)"
    )
    if s["failover"]:
        print("\nplanned failover, overhead per step (ms, median over runs): "
              + ", ".join(f"{k} {v:.0f}" for k, v in s["failover"]["per_step_overhead_ms_median"].items()))
        for e in s["failover"]["failed_runs"]:
            print(f"  failover run FAILED (left out): {e}")
    print(f"\nload average during the run: {', '.join(f'{x:.2f}' for x in s['load_average'])}")


if __name__ == "__main__":
    sys.exit(main())
