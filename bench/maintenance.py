#!/usr/bin/env python3
"""The maintenance window against running the DBA's tool directly on the same tables: `vacuumdb` for a
vacuum-analyze task, `pg_repack` for a repack task (the online rebuild).

    python bench/maintenance.py [--runs N] [--tables T] [--rows R] [--kinds vacuum-analyze,repack] [--json]

One lab (Temporal dev server, PostgreSQL primary + streaming replica, emulators, a worker) in a temporary
directory, torn down at the end (also on failure or Ctrl-C). Each run, twice over the same freshly bloated
tables (T tables of R rows, three quarters deleted, autovacuum off):

- procedure: `opsflow maintenance` with a `vacuum-analyze` task on those tables (approved at once, no backup,
  no status page, no maintenance mode: the table work and what the procedure adds to it). Measured from the
  first table step's start to the last health check's end in the report (workflow time), and the whole run.
- vacuumdb: `vacuumdb --analyze --table ... ` on the same tables, one session, wall time.
- repack (`--kinds` has it): the procedure with a `repack` task on the same tables (pg_repack under its guards:
  extension and key checks, replication lag before each table, --wait-timeout/--no-kill-backend) against
  `pg_repack --table ... --wait-timeout 5 --no-kill-backend` run directly; here the heap bloat goes, as it does
  not with VACUUM.
- bloat before/after of both (dead + free space of the heap, btree index bloat; pgstattuple where installed, else
  the catalogue estimate): VACUUM makes dead space free space but gives none back, so the table figure barely
  moves -- what REINDEX or an online rebuild would take back.

ratio = procedure tables phase / vacuumdb. The procedure adds per table: a Temporal activity round trip, the
statistics before/after (which waits for the statistics collector to show the VACUUM), the progress watcher,
and a health check (primary, replica lag, smoke URLs). Medians of the runs, min and max beside them.
Progress on stderr, result on stdout. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def seed(dsn: str, tables: list[str], rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in tables:
            c.execute(f"DROP TABLE IF EXISTS {t}")
            c.execute(
                f"CREATE TABLE {t} (id bigint PRIMARY KEY, payload text NOT NULL) WITH (autovacuum_enabled = false)"
            )
            c.execute(f"INSERT INTO {t} SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, %s) g", (rows,))
            c.execute(f"DELETE FROM {t} WHERE id % 4 <> 0")
            c.execute(f"ANALYZE {t}")  # statistics, as a live table has: the bloat estimate reads them
        # the replica's hot_standby_feedback must have passed the deletes, else VACUUM keeps them (recently dead)
        xid = c.execute("select txid_current()").fetchone()[0]
        deadline = time.monotonic() + 60
        while not c.execute(
            "select bool_and(backend_xmin is null or backend_xmin::text::bigint > %s) from pg_stat_replication", (xid,)
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica's xmin feedback did not pass the deletes")
            time.sleep(0.1)


def bloat_of(dsn: str, tables: list[str]) -> dict:
    """Mean table bloat (dead + free space) and index bloat of the tables, and the method (pgstattuple or the
    catalogue estimate), as the procedure's report measures them (activities/postgres/bloat.py)."""
    from activities.postgres.bloat import has_pgstattuple, index_bloat, table_bloat

    with psycopg.connect(dsn, autocommit=True) as c:
        for t in tables:
            c.execute(f"ANALYZE {t}")  # the estimate reads pg_stats and reltuples
        measured = has_pgstattuple(c)
        heap = [table_bloat(c, *t.split("."), measured)[0] for t in tables]
        index = [b.bloat for t in tables for b in index_bloat(c, *t.split("."), measured)]
    return {"table": statistics.mean(heap), "index": statistics.mean(index),
            "method": "pgstattuple" if measured else "estimate"}


def report_bloat(report: dict, when: str) -> dict:
    """The procedure's own figures (its report), unknown (NaN) where the table had no statistics yet."""
    stats = [i[when] for i in report["items"] if i.get(when) and i[when].get("bloat_method")]
    heap = [s["table_bloat"] for s in stats if s["table_bloat"] is not None]
    index = [b["bloat"] for s in stats for b in s["indexes"] if b["bloat"] is not None]
    return {"table": statistics.mean(heap) if heap else float("nan"),
            "index": statistics.mean(index) if index else float("nan"), "method": stats[0]["bloat_method"]}


def vacuumdb_seconds(dsn: str, tables: list[str]) -> float:
    from lab.postgres import pg_bin

    argv = [pg_bin("vacuumdb"), "--analyze", "--dbname", dsn, *[a for t in tables for a in ("--table", t)]]
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - started


def pg_repack_seconds(dsn: str, tables: list[str]) -> float:
    """`pg_repack` itself on the same tables (the connection in libpq's environment, as the activity passes it)."""
    from activities.postgres.repack import client_binary, client_env
    from opsflow.inventory import PostgresDatabase

    binary = client_binary()
    if binary is None:
        raise RuntimeError("pg_repack is not installed (scripts/setup.sh installs postgresql-15-repack)")
    argv = [binary, "--wait-timeout", "5", "--no-kill-backend", *[a for t in tables for a in ("--table", t)]]
    started = time.monotonic()
    env = client_env(PostgresDatabase(provider="postgres", dsn=dsn))
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.monotonic() - started


DIRECT = {"vacuum-analyze": ("vacuumdb --analyze", vacuumdb_seconds), "repack": ("pg_repack", pg_repack_seconds)}


async def procedure_seconds(state: dict, inventory: Path) -> tuple[float, float, dict]:
    from temporalio.client import Client, WorkflowFailureError

    from opsflow.client import send_update
    from opsflow.temporal import DATA_CONVERTER
    from workflows.procedure import Procedure, Request

    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    env.update(TEMPORAL_ADDRESS=state["temporal"]["address"], TEMPORAL_NAMESPACE="default", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "starters.cli",
            "maintenance",
            "--env",
            str(inventory),
            "--requester",
            "alice",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    wid = json.loads(out.stdout)["workflow_id"]
    client = await Client.connect(state["temporal"]["address"], namespace="default", data_converter=DATA_CONVERTER)
    handle = client.get_workflow_handle(wid)
    deadline = time.monotonic() + 300
    while True:
        try:
            p = await handle.query("progress", result_type=dict, rpc_timeout=timedelta(seconds=2))
        except Exception:  # noqa: BLE001 - the worker has not picked it up yet
            p = {}
        if (p.get("waiting_for") or "").startswith("approval"):
            break
        if p.get("status") in ("refused", "failed", "aborted") or time.monotonic() > deadline:
            raise RuntimeError(f"the maintenance did not reach its approval: {p.get('status')} {p.get('failure')}")
        await asyncio.sleep(0.1)
    await send_update(handle, Procedure.approve, Request(by="bob", reason="bench"))
    try:
        result = await handle.result()
    except WorkflowFailureError as e:  # the report rides in the failure
        result = (
            e.cause.details[0]
            if getattr(e.cause, "details", None)
            else {"status": "failed", "failure": str(e.cause), "steps": []}
        )
    report = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
    steps = report["steps"]
    from datetime import datetime

    def t(s: str) -> datetime:
        return datetime.fromisoformat(s)

    table_steps = [s for s in steps if ":" in s["name"] and not s["name"].startswith("preflight")]
    phase = (t(table_steps[-1]["ended_at"]) - t(table_steps[0]["started_at"])).total_seconds()
    total = (t(report["ended_at"]) - t(report["started_at"])).total_seconds()
    return phase, total, report


def median_min_max(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tables", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--kinds", default="vacuum-analyze,repack", help="the window's tasks compared: "
                        "vacuum-analyze (against vacuumdb) and/or repack (against pg_repack)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in DIRECT]
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(DIRECT)}")

    from lab.manage import down, start_worker, up
    from lab.processes import Lab

    tables = [f"public.bench_t{i}" for i in range(1, args.tables + 1)]
    root = Path(tempfile.mkdtemp(prefix="opsflow-bench-maint-")) / "lab"
    os.environ["OPSFLOW_HOME"] = str(root.parent / "home")
    say(f"lab up in {root}")
    state = up(root, with_worker=False, quiet=True, default_ports=False)  # the worker reads the bench's rules
    results: dict[str, dict] = {}
    try:
        lab = Lab(root)
        inventory = Path(state["inventory"])
        dsn = state["regions"]["eastus"]["dsn"]
        for kind in kinds:
            label, direct_seconds = DIRECT[kind]
            inv = yaml.safe_load(inventory.read_text())
            inv["maintenance"].update(
                tasks=[{"kind": kind, "tables": tables}],
                status_page=None,
                maintenance_mode=False,
                backup={"take": False, "verify": False},
            )
            # The worker holds the rules a procedure runs by: the bench's inventory is the one it reads.
            inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
            if lab.alive("worker"):
                lab.stop_process("worker")
            start_worker(lab)
            runs: list[dict] = []
            bloat: list[dict] = []  # per run: (before, after) of the procedure and of the tool
            for n in range(1, args.runs + 1):
                seed(dsn, tables, args.rows)
                phase, total, report = asyncio.run(procedure_seconds(state, inventory))
                if report["status"] != "succeeded" or any(i["outcome"] != "done" for i in report["items"]):
                    say(f"{kind} run {n}: the procedure {report['status']}: {report.get('failure')} "
                        f"{[(i['key'], i['outcome'], i['detail']) for i in report['items'] if i['outcome'] != 'done']}"
                        "; left out")
                    continue
                seed(dsn, tables, args.rows)
                tool_before = bloat_of(dsn, tables)
                direct = direct_seconds(dsn, tables)
                tool_after = bloat_of(dsn, tables)
                runs.append({"procedure_tables_seconds": phase, "procedure_total_seconds": total,
                             "tool_seconds": direct, "ratio": phase / direct})
                bloat.append({"procedure": (report_bloat(report, "before"), report_bloat(report, "after")),
                              "tool": (tool_before, tool_after)})
                say(f"{kind} run {n}: procedure tables phase {phase:.2f}s (whole run {total:.2f}s), {label} "
                    f"{direct:.2f}s, ratio {phase / direct:.1f}")
            if runs:
                results[kind] = {
                    "tool": label, "runs": len(runs),
                    **{k: median_min_max([r[k] for r in runs]) for k in runs[0]},
                    "per_table_overhead_seconds": statistics.median(
                        [(r["procedure_tables_seconds"] - r["tool_seconds"]) / args.tables for r in runs]),
                    "bloat": {who: {when: {k: statistics.median(b[who][i][k] for b in bloat)
                                           for k in ("table", "index")} | {"method": bloat[0][who][i]["method"]}
                                    for i, when in enumerate(("before", "after"))}
                              for who in ("procedure", "tool")}}
    finally:
        down(root, quiet=True)
    if not results:
        say("no run succeeded")
        return 1
    result = {"tables": args.tables, "rows_per_table": args.rows, "kinds": results}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for kind, r in results.items():
        print(f"maintenance window ({kind}) vs {r['tool']}, {args.tables} tables x {args.rows} rows (3/4 dead), "
              f"{r['runs']} run(s), median [min-max]:")
        for key, label in (
            ("tool_seconds", r["tool"]),
            ("procedure_tables_seconds", "procedure, tables phase"),
            ("procedure_total_seconds", "procedure, whole run"),
            ("ratio", "ratio tables phase / tool"),
        ):
            s = r[key]
            print(f"  {label:<32} {s['median']:8.2f}  [{s['min']:.2f}-{s['max']:.2f}]")
        print(f"  overhead per table (median)      {r['per_table_overhead_seconds']:8.2f} s")
        for who, name in (("procedure", "procedure"), ("tool", r["tool"])):  # heap and btree bloat
            b = r["bloat"][who]
            print(f"  bloat, {name:<18} table {b['before']['table']:.0%} -> {b['after']['table']:.0%}, "
                  f"indexes {b['before']['index']:.0%} -> {b['after']['index']:.0%} ({b['after']['method']})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
