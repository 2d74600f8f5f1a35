#!/usr/bin/env python3
"""Many concurrent procedures on ONE worker process serving many environments.

    python bench/concurrency.py [--procedures 1000] [--environments 100] [--json]
                                [--activity-threads N] [--max-concurrent-activities N] [--max-cached-workflows N]
                                [--max-concurrent-workflow-tasks N] [--polls N] [--workflow-polls N]
                                [--shared-queues none|workflow|all]

A fresh lab (Temporal dev server, PostgreSQL primary + streaming replica, ARM and Kubernetes emulators; no lab
worker). The bench writes --environments inventories, copies of the lab's with their own `environment:` name
(so their own task queues: `opsflow-<env>` and `opsflow-<env>-<region>`) pointing at the same databases and
emulators, and starts ONE worker process for all of them (bench/fleet_worker.py: one client, one activity thread
pool, one Temporal worker per task queue). Then it starts --procedures procedures at once, round-robin over the
environments, alternating dry-run planned failovers and dry-run drills: they run the real preflight activities
(database status over SQL and ARM, Kubernetes, Traffic Manager, restore window, checks, the poller check) and
change nothing. Workflow ids are the bench's own (`bench-<env>-<n>`), so many run per environment.

Printed: completed (ended as planned), failed (anything else; the first reasons are listed), peak_worker_rss_mb
(the worker process's VmRSS, sampled every 0.2 s), wall_seconds (first start request -> last result),
p50/p99_seconds (each procedure's start request -> its result), throughput_per_second, and the load average.

--shared-queues workflow gives every inventory the same `workflow_task_queue` (one workflow worker and one
workflow cache for the whole fleet); --shared-queues all also one queue per region name (`opsflow-fleet-eastus`),
shared by the environments in that region: 3 Temporal workers instead of 300, and the activity slots a queue
takes on bounded by the thread pool that runs them.

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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

START_TIMEOUT = 120  # seconds for the worker to say it is ready
RUN_TIMEOUT = 1800  # seconds for all procedures


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (and of its waited-for children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def lab_pids(state: dict) -> dict[str, int]:
    return {name: p["pid"] for name, p in state.get("processes", {}).items() if p.get("pid")}


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.samples = pid, every, 0.0, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            mb = rss_mb(self.pid)
            if mb is None:
                return
            self.peak = max(self.peak, mb)
            self.samples.append((time.monotonic(), mb))


def replica_caught_up(state: dict) -> None:
    """The lab's start ends with a WAL segment switch (archiving for drills): until the next commit is replayed the
    replica looks a whole segment (16 MB) behind, above the lab's lag limit for a planned failover. Commit
    something and wait until the replica has replayed it, so the preflights see the replica as it is."""
    import psycopg
    from failover import wait_replayed

    with psycopg.connect(state["regions"]["eastus"]["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_marker (at timestamptz)")
        conn.execute("INSERT INTO bench_marker VALUES (now())")
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    with psycopg.connect(state["regions"]["westeurope"]["dsn"], autocommit=True) as conn:
        wait_replayed(conn, lsn)


def write_inventories(state: dict, count: int, folder: Path, shared_queue: str | None) -> list[str]:
    base = yaml.safe_load(Path(state["inventory"]).read_text())
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        env = f"fleet-{i:03d}"
        inv = json.loads(json.dumps(dict(base, environment=env)))
        # The product's default lag limit (the lab's is 16 MB): all environments share one database pair here, and an
        # archive_timeout WAL switch on the idle lab primary makes the replica look a whole 16 MB segment behind.
        inv.setdefault("failover", {})["max_planned_lag_bytes"] = 64 * 1024 * 1024
        if shared_queue in ("workflow", "all"):
            inv["workflow_task_queue"] = "opsflow-fleet"
        if shared_queue == "all":
            for region, r in inv["regions"].items():
                r["task_queue"] = f"opsflow-fleet-{region}"
        (folder / f"{env}.yaml").write_text(yaml.safe_dump(inv, sort_keys=False))
        names.append(env)
    return names


async def wait_pollers(
    client, queues: list[str], timeout: float, workflow_queues: list[str] | tuple = (), interval: float = 0.5
) -> None:
    """Until a worker polls each of `queues` for activities and each of `workflow_queues` for workflow tasks."""
    from temporalio.api.enums.v1 import TaskQueueType

    from activities.temporal_queues import queue_pollers

    deadline = time.monotonic() + timeout
    left = [(q, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY) for q in queues]
    left += [(q, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW) for q in workflow_queues]
    while left:
        left = [(q, kind) for q, kind in left if not await queue_pollers(client, q, (kind,))]
        if left and time.monotonic() > deadline:
            raise RuntimeError(f"no poller on {len(left)} queue(s), e.g. {left[0][0]}")
        if left:
            await asyncio.sleep(interval)


async def run_procedures(state: dict, inv_dir: Path, procedures: int) -> dict:
    from temporalio.client import WorkflowFailureError

    from opsflow.client import connect
    from opsflow.inventory import load_inventory
    from workflows.drill import DrillInput
    from workflows.failover import FailoverInput

    client = await connect(state["temporal"]["address"], namespace="default")
    inventories = [load_inventory(p) for p in sorted(inv_dir.glob("*.yaml"))]
    queues = sorted({q for inv in inventories for q in inv.all_queues()})
    await wait_pollers(client, queues, 120)
    say(f"  all {len(queues)} task queues have pollers; starting {procedures} procedures at once")

    async def one(n: int) -> tuple[str, float, str | None]:
        inv = inventories[n % len(inventories)]
        wid = f"bench-{inv.environment}-{n}"
        t0 = time.monotonic()
        try:
            if n % 2 == 0:
                handle = await client.start_workflow(
                    "failover",
                    FailoverInput(
                        inventory=inv, to_region="westeurope", dry_run=True, requester="alice", reason="bench"
                    ),
                    id=wid,
                    task_queue=inv.task_queue,
                    result_type=dict,
                )
            else:
                handle = await client.start_workflow(
                    "drill",
                    DrillInput(inventory=inv, dry_run=True, requester="alice", reason="bench"),
                    id=wid,
                    task_queue=inv.task_queue,
                    result_type=dict,
                )
            report = await handle.result()
            status = report.get("status")
            return (
                "failover" if n % 2 == 0 else "drill",
                time.monotonic() - t0,
                None if status == "planned" else f"ended {status}",
            )
        except WorkflowFailureError as e:
            cause = e.cause
            return (
                "failover" if n % 2 == 0 else "drill",
                time.monotonic() - t0,
                f"{type(cause).__name__}: {cause}"[:300],
            )
        except Exception as e:  # noqa: BLE001 - one procedure's failure is counted, not raised
            return ("failover" if n % 2 == 0 else "drill", time.monotonic() - t0, f"{type(e).__name__}: {e}"[:300])

    t0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(procedures))), RUN_TIMEOUT)
    wall = time.monotonic() - t0
    return {"results": results, "wall": wall, "histories": await history_shape(client, inventories, procedures)}


async def history_shape(client, inventories: list, procedures: int) -> dict:
    """What procedures cost the server and where they waited, from a sample of histories (every 10th
    procedure): events, search-attribute upserts, workflow tasks, activities per procedure (medians), and the
    waits: activity scheduled -> started (waiting for a worker slot), started -> completed (execution), workflow
    task scheduled -> started (waiting for the worker to take the next workflow task)."""
    from temporalio.api.enums.v1 import EventType as E

    def at(e) -> float:
        return e.event_time.ToMicroseconds() / 1e6

    shape: dict[str, dict] = {}
    slow: list[dict] = []
    waits: dict[str, list[float]] = {
        "activity_wait": [],
        "activity_run": [],
        "workflow_task_wait": [],
        "workflow_task_run": [],
    }
    for n in range(0, procedures, 10) if procedures > 20 else range(procedures):
        for kind_n in (n, n + 1):
            if kind_n >= procedures:
                continue
            inv = inventories[kind_n % len(inventories)]
            try:
                history = await client.get_workflow_handle(f"bench-{inv.environment}-{kind_n}").fetch_history()
            except Exception:  # noqa: BLE001 - a figure we can do without
                continue
            kind = "failover" if kind_n % 2 == 0 else "drill"
            types = [e.event_type for e in history.events]
            row = {"events": len(types), "upserts": types.count(E.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES),
                   "workflow_tasks": types.count(E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED),
                   "activities": types.count(E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)}
            for k, v in row.items():
                shape.setdefault(kind, {}).setdefault(k, []).append(v)
            sched, started, wft, kinds = {}, {}, None, {}
            for e in history.events:
                if e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                    sched[e.event_id] = at(e)
                    kinds[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
                elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                    sid = e.activity_task_started_event_attributes.scheduled_event_id
                    started[sid] = at(e)
                    waits["activity_wait"].append(at(e) - sched[sid])
                    a = e.activity_task_started_event_attributes
                    if a.attempt > 1 or at(e) - sched[sid] > 5:
                        slow.append(
                            {
                                "activity": kinds[sid],
                                "attempt": a.attempt,
                                "wait_seconds": round(at(e) - sched[sid], 2),
                                "last_failure": a.last_failure.message[:200] if a.HasField("last_failure") else None,
                            }
                        )
                elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                    sid = e.activity_task_completed_event_attributes.scheduled_event_id
                    if sid in started:
                        waits["activity_run"].append(at(e) - started[sid])
                elif e.event_type == E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                    wft = at(e)
                elif e.event_type == E.EVENT_TYPE_WORKFLOW_TASK_STARTED and wft is not None:
                    waits["workflow_task_wait"].append(at(e) - wft)
                    wft = at(e)
                elif e.event_type == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and wft is not None:
                    waits["workflow_task_run"].append(at(e) - wft)
    out = {kind: {k: statistics.median(v) for k, v in rows.items()} for kind, rows in shape.items()}
    out["waits_seconds"] = {
        k: {"median": round(statistics.median(v), 3), "p90": round(pct(v, 0.9), 3), "max": round(max(v), 3)}
        for k, v in waits.items()
        if v
    }
    out["slow_or_retried_activities"] = sorted(slow, key=lambda x: -x["wait_seconds"])[:8]
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    import failover as fb

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procedures", type=int, default=1000)
    p.add_argument("--environments", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--activity-threads", type=int, default=32, help="the worker's one activity thread pool (default 32)"
    )
    p.add_argument("--max-concurrent-activities", type=int, default=16, help="per task queue (default 16)")
    p.add_argument("--max-cached-workflows", type=int, default=500, help="per workflow queue (default 500)")
    p.add_argument(
        "--max-concurrent-workflow-tasks",
        type=int,
        default=20,
        help="per workflow queue (default 20, as opsflow worker's; the SDK's 100)",
    )
    p.add_argument("--polls", type=int, default=4, help="long polls per queue and task type (default 4)")
    p.add_argument(
        "--lean-show",
        action="store_true",
        help="run the procedures with the proposed show() fix (bench/lean_workflows.py)",
    )
    p.add_argument("--workflow-polls", type=int, default=20, help="workflow task polls per workflow queue (default 20)")
    p.add_argument(
        "--shared-queues",
        choices=["none", "workflow", "all"],
        default="all",
        help="one workflow queue for every environment (workflow), and one queue per region name for every environment "
        "(all, the default: README 'Fleets'); none: queues per environment",
    )
    args = p.parse_args()

    signal.signal(signal.SIGTERM, interrupt)
    base = Path(tempfile.mkdtemp(prefix="opsflow-bench-fleet-"))
    os.environ["OPSFLOW_HOME"] = str(base / "home")
    for key in [k for k in os.environ if k.startswith("TEMPORAL_")]:
        del os.environ[key]
    from lab.manage import down, up

    root = base / "lab"
    worker = None
    sampler = None
    settings = {
        k: getattr(args, k)
        for k in (
            "activity_threads",
            "max_concurrent_activities",
            "max_cached_workflows",
            "max_concurrent_workflow_tasks",
            "polls",
            "workflow_polls",
            "shared_queues",
            "lean_show",
        )
    }
    try:
        try:
            t0 = time.monotonic()
            state = up(root, with_worker=False, quiet=True, default_ports=False)
            say(f"lab up in {time.monotonic() - t0:.1f}s")
            replica_caught_up(state)
            inv_dir = base / "inventories"
            write_inventories(state, args.environments, inv_dir, args.shared_queues)
            env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
            env.update(
                TEMPORAL_ADDRESS=state["temporal"]["address"], TEMPORAL_NAMESPACE="default", PYTHONPATH=str(ROOT)
            )
            argv = [
                sys.executable,
                str(ROOT / "bench" / "fleet_worker.py"),
                "--inventories",
                str(inv_dir),
                "--activity-threads",
                str(args.activity_threads),
                "--max-concurrent-activities",
                str(args.max_concurrent_activities),
                "--max-cached-workflows",
                str(args.max_cached_workflows),
                "--polls",
                str(args.polls),
            ]
            if args.lean_show:
                argv.append("--lean-show")
            if args.workflow_polls:
                argv += ["--workflow-polls", str(args.workflow_polls)]
            if args.max_concurrent_workflow_tasks:
                argv += ["--max-concurrent-workflow-tasks", str(args.max_concurrent_workflow_tasks)]
            log = open(base / "worker.log", "w")
            worker = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, text=True)
            t0 = time.monotonic()
            line = worker.stdout.readline()  # "ready: ..." (blocks until the worker built its workers)
            if not line.startswith("ready"):
                raise RuntimeError(f"the fleet worker did not start: {(base / 'worker.log').read_text()[-2000:]}")
            idle_rss = rss_mb(worker.pid)
            say(f"  fleet worker {line.strip()} in {time.monotonic() - t0:.1f}s, RSS {idle_rss:.0f} MB")
            pids = {"fleet-worker": worker.pid, **lab_pids(state)}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            bench_cpu = time.process_time()
            sampler = RssSampler(worker.pid)
            sampler.start()
            out = asyncio.run(run_procedures(state, inv_dir, args.procedures))
            load = os.getloadavg()
            sampler.done.set()
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in pids.items()
                   if cpu_before[name] is not None and cpu_seconds(pid) is not None}
            cpu["bench-client"] = round(time.process_time() - bench_cpu, 1)
        finally:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            fb.ignore_interrupts(lambda: down(root, quiet=True))
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)

    results = out["results"]
    durations = [d for _, d, err in results if err is None]
    failures = [err for _, _, err in results if err is not None]
    reasons: dict[str, int] = {}
    for f in failures:
        reasons[f] = reasons.get(f, 0) + 1
    summary = {
        "procedures": args.procedures,
        "environments": args.environments,
        "kinds": "dry-run planned failovers and dry-run drills, alternating",
        "completed": len(durations),
        "failed": len(failures),
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]),
        "peak_worker_rss_mb": round(sampler.peak, 1) if sampler else None,
        "idle_worker_rss_mb": round(idle_rss, 1) if idle_rss else None,
        "wall_seconds": round(out["wall"], 2),
        "p50_seconds": round(pct(durations, 0.5), 2) if durations else None,
        "p99_seconds": round(pct(durations, 0.99), 2) if durations else None,
        "throughput_per_second": round(len(durations) / out["wall"], 2),
        "history_per_procedure": out["histories"],
        "cpu_seconds_during_run": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        "worker_settings": settings,
        "load_average_at_end": [round(x, 2) for x in load],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:<24}{v}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
