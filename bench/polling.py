"""Control-plane reads during a long wait (issue 8 item 7, issue 12 item 4): a fresh lab, the replica's replay held
for ~60 s while the primary writes, and the real `db.wait_caught_up` activity waiting for it. Prints the cloud
control-plane reads (ARM GET of the flexible servers / RDS DescribeDBInstances, counted at the emulator) and the
SQL polls, per procedure-minute. The budget: one read per server per control_plane_interval (10 s: 12/min for
the two servers).

    python bench/polling.py [--seconds 60] [--interval 10] [--cloud azure|aws] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from temporalio.testing import ActivityEnvironment  # noqa: E402

from activities.database import db_wait_caught_up  # noqa: E402
from opsflow.inventory import load_inventory  # noqa: E402
from opsflow.models import CatchUpRequest, RegionTarget  # noqa: E402


def sql(dsn: str, query: str):
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else None


def control_plane_reads(state: dict) -> int:
    """Reads of the database servers' control plane so far, counted by the emulator."""
    if state.get("azure"):
        ctx = ssl.create_default_context(cafile=state["azure"]["ca_bundle"])
        with urllib.request.urlopen(state["azure"]["arm_endpoint"] + "/_emulator/counts", context=ctx, timeout=10) as r:
            counts = json.loads(r.read())["requests"]
        return sum(
            n for k, n in counts.items() if k.startswith("GET ") and k.split("/")[-2].lower() == "flexibleservers"
        )
    with urllib.request.urlopen(state["aws"]["endpoint_url"] + "/_emulator/counts", timeout=10) as r:
        counts = json.loads(r.read())["requests"]
    return counts.get("rds DescribeDBInstances", 0)


def run(seconds: float, interval: float, cloud: str) -> dict:
    from lab.manage import down, up

    os.environ.setdefault("OPSFLOW_HOME", tempfile.mkdtemp(prefix="opsflow-bench-home-"))
    if cloud == "aws":
        from lab.aws_lab import worker_env

        os.environ.update(worker_env())
    root = Path(tempfile.mkdtemp(prefix="opsflow-bench-polling-")) / "lab"
    state = up(root, with_worker=False, quiet=True, cloud=cloud, default_ports=False)
    try:
        inv = load_inventory(state["inventory"])
        primary, replica = inv.primary_region, next(r for r in inv.regions if r != inv.primary_region)
        pdsn, rdsn = state["regions"][primary]["dsn"], state["regions"][replica]["dsn"]
        sql(pdsn, "create table if not exists bench_polling (id bigserial primary key, body text)")
        deadline = time.monotonic() + 30
        while not sql(rdsn, "select to_regclass('bench_polling') is not null")[0][0]:
            assert time.monotonic() < deadline, "the replica does not replicate"
            time.sleep(0.1)
        sql(rdsn, "select pg_wal_replay_pause()")
        stop = threading.Event()

        def writer() -> None:  # the primary keeps taking writes while the replica is held
            while not stop.is_set():
                sql(pdsn, "insert into bench_polling (body) select repeat('x', 100) from generate_series(1, 50)")
                stop.wait(0.5)

        def release() -> None:
            stop.wait(seconds)
            stop.set()
            sql(rdsn, "select pg_wal_replay_resume()")

        threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=release, daemon=True)]
        req = CatchUpRequest(primary=RegionTarget.of(inv, primary), replica=RegionTarget.of(inv, replica),
                             timeout_seconds=seconds + 300, control_plane_interval=interval)
        env = ActivityEnvironment()
        env.on_heartbeat = lambda *details: None
        before = control_plane_reads(state)
        for t in threads:
            t.start()
        t0 = time.monotonic()
        result = env.run(db_wait_caught_up, req)
        waited = time.monotonic() - t0
        reads = control_plane_reads(state) - before
        minutes = waited / 60
        return {
            "cloud": cloud,
            "catch_up_seconds": round(waited, 1),
            "control_plane_interval_seconds": interval,
            "control_plane_reads": reads,
            "control_plane_reads_per_minute": round(reads / minutes, 1),
            "control_plane_reads_per_minute_budget": round(2 * 60 / interval, 1),
            "sql_polls": result.polls,
            "sql_polls_per_minute": round(result.polls / minutes, 1),
            "activity_counted_control_plane_reads": result.control_plane_reads,
        }
    finally:
        down(root, quiet=True)
        shutil.rmtree(root.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="how long the replica's replay is held (default 60)")
    ap.add_argument("--interval", type=float, default=10, help="control_plane_interval (default 10 s)")
    ap.add_argument("--cloud", choices=["azure", "aws"], default="azure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.seconds, args.interval, args.cloud)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:42} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
