#!/usr/bin/env python3
"""Failback after a planned failover on the lab: the switchover path against the rebuild path, side by side.

    python bench/failback.py [--runs N] [--rows N[,N...]] [--paths P,...] [--json]

Each run brings up a FRESH lab in a temporary directory: `opsflow lab up` for the rebuild path (Azure, standalone
promotion), `--virtual-endpoint` for Azure's switchover, `--database self-managed` for the self-managed
switchover (provider postgres with host access: clean shutdown, shutdown-checkpoint proof, the old primary
started as a standby), writes some rows, runs a planned failover eastus -> westeurope and then the failback to eastus
the way a person does (`opsflow failover|failback ... --requester alice`, `opsflow approve ... --as bob` as soon as
it waits), and tears the lab down. The paths alternate run by run (rebuild, switchover, self-managed, rebuild, ...)
so that the machine's load falls on all alike. `--paths` picks some. `--rows` sizes the database: the rebuild path
copies it (twice: the rebuild and the restandby), a switchover copies nothing, so the ratio grows with the size; on
the lab's RAM disk a copy runs at ~150 MB/s, far faster than an Azure replica's creation.

The figures (medians over the runs that succeeded; min and max beside them):

- failback: the failback's report, started -> ended (workflow time), minus the time it waited for the approval
  (the bench approves at once; a person would not).
- rebuild: the `rebuild` step (rebuild path: Azure's on-demand backup, delete, create as a replica; switchover
  path: skipped) plus `restandby` (the region left rebuilt as a replica; switchover path: skipped).
- failover back: the child failover (its drain included: until the sessions are idle, at most the lab's 3 s).

Progress goes to stderr, with each run's steps (failback and failover back: start after the report's start, and
seconds), which is where to look for where the seconds go; the result to stdout (--json: one JSON object). Nothing
here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from failover import REQUESTER, RunFailed, approve_and_wait, attempt, ignore_interrupts, opsflow, say, stats  # noqa: E402

from opsflow.models import FailbackReport, FailoverReport  # noqa: E402

PATHS = ("rebuild", "switchover", "self-managed")
LAB_FLAGS = {"rebuild": {}, "switchover": {"virtual_endpoint": True}, "self-managed": {"database": "self-managed"}}


def step_times(report) -> str:
    """Each step's start (from the report's start) and seconds, as the report records them (workflow time)."""
    return ", ".join(f"{s.name} @{(s.started_at - report.started_at).total_seconds():.2f}+{s.seconds:.2f}"
                     for s in report.steps if s.seconds is not None)


def failback_run(base: Path, number: int, path: str, rows: int = 50000) -> dict:
    """A fresh lab, a planned failover, the failback, the lab down. Returns the failback's figures."""
    import psycopg

    from lab.manage import down, up

    root = base / f"lab-{number}-{path}"
    try:
        state = up(root, with_worker=True, quiet=True, default_ports=False, **LAB_FLAGS[path])
        east = state["regions"]["eastus"]["dsn"]
        with psycopg.connect(east, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_rows (id int PRIMARY KEY, pad text)")
            conn.execute("INSERT INTO bench_rows SELECT g, repeat('x', 200) FROM generate_series(1, %s) g", (rows,))
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        inv = state["inventory"]
        wid = opsflow(state, "failover", "--env", inv, "--to", "westeurope", "--requester", REQUESTER)["workflow_id"]
        asyncio.run(approve_and_wait(state, wid))
        failover = FailoverReport.model_validate(opsflow(state, "report", wid))
        if failover.status != "succeeded":
            raise RunFailed(f"failover {failover.status}: {failover.failure}")
        say(f"  {path}: failover done (switchover: {failover.switchover}); failback to eastus")
        fid = opsflow(state, "failback", "--env", inv, "--to", "eastus", "--requester", REQUESTER)["workflow_id"]
        asyncio.run(approve_and_wait(state, fid))
        report = FailbackReport.model_validate(opsflow(state, "report", fid))
        if report.status != "succeeded" or report.ended_at is None:
            raise RunFailed(f"failback {report.status}: {report.failure}")
        steps = {s.name: s for s in report.steps}
        waited = steps["approval"].seconds or 0.0
        total = (report.ended_at - report.started_at).total_seconds() - waited
        rebuild = sum(steps[n].seconds or 0.0 for n in ("rebuild", "restandby") if n in steps)
        say(f"  {path}: failback in {total:.1f}s (rebuild {rebuild:.1f}s, {report.rebuild_method})")
        say("    failback steps: " + step_times(report))
        if report.failover is not None:
            say("    failover back:  " + step_times(report.failover))
        return {"path": path, "database_mb": round(size / 2**20, 1), "failback_seconds": round(total, 3),
                "rebuild_seconds": round(rebuild, 3),
                "failover_back_seconds": steps["failover"].seconds, "rebuild_method": report.rebuild_method}
    finally:
        ignore_interrupts(lambda: down(root, quiet=True))


def summarize(runs: list[dict], paths: list[str]) -> dict:
    """Per path: the medians (min, max) of the runs that succeeded, the failures; the speed-ups over the rebuild."""
    summary: dict = {}
    for path in paths:
        ok = [r["result"] for r in runs if r["path"] == path and r["ok"]]
        summary[path] = {key: stats([r[key] for r in ok]) for key in ("database_mb", "failback_seconds",
                                                                       "rebuild_seconds", "failover_back_seconds")}
        summary[path]["runs_ok"] = len(ok)
        summary[path]["failed"] = [r["error"] for r in runs if r["path"] == path and not r["ok"]]
    rb = summary.get("rebuild", {}).get("failback_seconds")
    summary["speedup"] = {p: round(rb["median"] / summary[p]["failback_seconds"]["median"], 2) for p in paths
                          if p != "rebuild" and rb and summary[p]["failback_seconds"]}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="failbacks per path and size (default 3)")
    parser.add_argument("--rows", default="50000",
                        help="rows of ~250 bytes written before the failover, or several sizes, comma-separated "
                             "(default 50000, ~28 MB; 8000000 is ~2 GB; the report prints the database's size): the "
                             "rebuild copies them, a switchover does not")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths: choose among {', '.join(PATHS)}")
    try:
        sizes = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        parser.error(f"--rows: whole numbers, comma-separated (got {args.rows!r})")
    if not sizes or min(sizes) < 1:
        parser.error("--rows: at least one size, each at least 1")
    summaries: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="opsflow-bench-failback-", dir="/dev/shm") as tmp:
        for rows in sizes:
            runs: list[dict] = []
            for i in range(args.runs):
                for path in paths:
                    say(f"{rows} rows: run {i + 1}/{args.runs}, {path} path")
                    runs.append({"path": path, **attempt(f"{path} failback", i + 1, args.runs, failback_run,
                                                         Path(tmp), i + 1, path, rows)})
            summaries[rows] = summarize(runs, paths)
    if args.json:
        print(json.dumps(summaries[sizes[0]] if len(sizes) == 1 else {str(k): v for k, v in summaries.items()},
                         indent=2))
        return 0
    print("failback after a planned failover eastus -> westeurope, fresh lab per run (medians; min-max)")
    for rows, summary in summaries.items():
        print(f"{rows} rows:")
        for path in paths:
            s = summary[path]
            line = "   ".join(
                f"database {v['median']:.0f} MB" if k == "database_mb" else
                f"{k.removesuffix('_seconds').replace('_', ' ')} {v['median']:.2f} s ({v['min']:.2f}-{v['max']:.2f})"
                for k, v in s.items()
                if isinstance(v, dict) and v
            )
            print(f"  {path:<12} n={s['runs_ok']}  {line}")
            for e in s["failed"]:
                print(f"    FAILED (left out): {e}")
        for path, x in summary["speedup"].items():
            print(f"  the {path} path is {x}x faster than the rebuild path (failback medians)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
