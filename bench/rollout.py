#!/usr/bin/env python3
"""Canary rollouts on the lab's real traffic, measured at a client of the proxy.

    python bench/rollout.py [--runs N] [--rps R] [--router nginx [--workload host]] [--json]

One lab with the rollout stage (`opsflow lab up --rollout`: the Kubernetes emulator, one real app process per
deployment, a real NGINX splitting traffic by the HTTPRoute's weights, a real Prometheus scraping the apps, the
stage's own steady load) and a worker, in a temporary directory, torn down at the end (also on failure or Ctrl-C).
The lab's inventory as it comes (analysis every 5 s over 1 s samples, error rate limit 5 %, steps 25/50/100, bake
15 s), approvals by its quorum (carol, dave) as soon as it waits. `--router nginx` runs the stage's NGINX as plain
NGINX (the worker writes its upstream file); `--workload host` as well puts the app outside Kubernetes (each role's
process started, checked and stopped by the worker through lab/host_app.py).

Beside the stage's load, the bench's own CLIENT sends R requests a second (default 40) through NGINX from 4
threads on keep-alive connections, and records each request's send time, answer time, HTTP status and the
`X-Version` of the app that answered (a refused connection is retried and counted apart, not as a 5xx).

Per run, N of each (default 3):

- FAULTY IMAGE: `opsflow canary --image registry.lab/shop:faulty-2 --auto-promote` (the faulty app answers ~15 %
  of its requests 500). Figures: the share of the client's requests answered 5xx from the canary's start (the
  create-canary step's start, workflow time on this machine's clock) to its removal (the end of the undo that
  deletes it) -- goal <= 2 % --, the 5xx count and the requests in that span, and the share from the first
  weight's move to the removal (the canary's time with traffic, which a wait before it does not dilute); seconds
  from the canary's start to the rollback's end (canary removed), and from the first canary traffic (weight-25's
  end) to the weight back at 0 (the undo's end).
- ABORT DURING A BAKE: a healthy image (`...:healthy-3`, steps 25/100, bake 60 s); once the bake runs and the
  client has had 5 answers from the canary, `abort` (by carol, through the Update the CLI sends). Figure: seconds
  from the abort until the last request the canary answered (its answer time at the client) -- goal <= 2 s --; the
  client listens on until the rollout has ended and 2 s more.

Medians of the runs, min and max beside them. Progress on stderr, result on stdout (--json: one JSON object).
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APPROVERS = ("carol", "dave")  # the lab's rollout quorum (lab/rollout.py inventory_section)
HEALTHY_OTHER = "registry.lab/shop:healthy-3"  # a healthy build the stable does not run


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Client:
    """Steady requests through the proxy; every answer recorded as (sent, answered, status, version)."""

    def __init__(self, proxy: str, rps: float, threads: int = 4):
        u = urlsplit(proxy)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.rps, self.n = rps, threads
        self.log: list[tuple[float, float, int, str]] = []
        self.refused = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def start(self) -> Client:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def run(self) -> None:
        conn, interval, next_at = None, self.n / self.rps, time.monotonic()
        while not self.stop.is_set():
            sent = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                with self.lock:
                    self.log.append((sent, time.time(), r.status, r.headers.get("X-Version") or "?"))
            except (OSError, http.client.HTTPException):
                conn = None  # NGINX closed a keep-alive connection at a reload: a new one, not an answer
                with self.lock:
                    self.refused += 1
                continue
            next_at += interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - interval)

    def between(self, start: float, end: float) -> list[tuple[float, float, int, str]]:
        with self.lock:
            return [e for e in self.log if start <= e[0] <= end]


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["name"] == name)


async def start_and_approve(state: dict, *args: str) -> tuple[object, str]:
    """`opsflow canary ARGS` (the CLI, as a person runs it), then each approver as soon as it waits."""
    from temporalio.client import Client as TemporalClient

    from lab.manage import worker_env
    from opsflow.client import send_update
    from opsflow.temporal import DATA_CONVERTER
    from workflows.procedure import Procedure, Request

    env = {**os.environ, **worker_env(state), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "starters.cli", "canary", *args, "--requester", "alice", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    wid = json.loads(out.stdout)["workflow_id"]
    client = await TemporalClient.connect(state["temporal"]["address"], data_converter=DATA_CONVERTER)
    handle = client.get_workflow_handle(wid)
    for who in APPROVERS:
        await wait_progress(handle, lambda p: (p.get("waiting_for") or "").startswith("approval"), "the approval")
        await send_update(handle, Procedure.approve, Request(by=who, reason="bench"))
    return handle, wid


async def wait_progress(handle, pred, what: str, timeout: float = 120) -> dict:
    from datetime import timedelta

    deadline = time.monotonic() + timeout
    while True:
        try:
            p = await handle.query("progress", result_type=dict, rpc_timeout=timedelta(seconds=2))
        except Exception:  # noqa: BLE001 - not picked up by the worker yet
            p = {}
        if pred(p):
            return p
        if p.get("status") in ("refused", "failed", "aborted", "succeeded") or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: the rollout is {p.get('status')} ({p.get('failure')})")
        await asyncio.sleep(0.1)


async def result_of(handle) -> dict:
    from temporalio.client import WorkflowFailureError

    try:
        result = await handle.result()
    except WorkflowFailureError as e:  # the report rides in the failure
        details = getattr(e.cause, "details", None)
        result = details[0] if details else {"status": "failed", "failure": str(e.cause), "steps": []}
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else result


async def faulty_run(state: dict, client: Client, steps: str | None) -> dict:
    image = state["rollout"]["images"]["faulty"]
    handle, _ = await start_and_approve(state, "--image", image, "--auto-promote",
                                        *(("--steps", steps) if steps else ()))
    report = await result_of(handle)
    if not report.get("rolled_back"):
        raise RuntimeError(f"the faulty canary was not rolled back: {report['status']} {report.get('failure')}")
    start = ts(step(report, "create-canary")["started_at"])
    removed = ts(step(report, "undo:k8s.delete_canary")["ended_at"])
    first = next(s["name"] for s in report["steps"] if s["name"].startswith("weight-"))
    undo = next(s["name"] for s in report["steps"] if s["name"] in ("undo:router.set_weight", "undo:k8s.set_weight"))
    traffic, zero = ts(step(report, first)["ended_at"]), ts(step(report, undo)["ended_at"])
    failed = next(a for a in report["analysis"] if a["verdict"] == "fail")
    time.sleep(0.5)  # the last requests of the span answered
    span = client.between(start, removed)
    errors = sum(1 for e in span if e[2] >= 500)
    canary_version = image.rsplit(":", 1)[1]
    exposed = client.between(traffic, removed)  # from the first weight's move: the canary's time with traffic
    return {"share_5xx": errors / len(span) if span else 0.0, "errors_5xx": errors, "requests": len(span),
            "share_5xx_with_traffic": sum(1 for e in exposed if e[2] >= 500) / len(exposed) if exposed else 0.0,
            "canary_answers": sum(1 for e in span if e[3] == canary_version),
            "start_to_rollback_seconds": removed - start, "traffic_to_weight0_seconds": zero - traffic,
            "traffic_to_failed_look_seconds": ts(failed["end"]) - traffic, "failed_at_weight": failed["weight"],
            "reason": report.get("rollback_reason")}


async def abort_run(state: dict, client: Client) -> dict:
    from opsflow.client import send_update
    from workflows.procedure import Procedure, Request

    version = HEALTHY_OTHER.rsplit(":", 1)[1]
    handle, _ = await start_and_approve(state, "--image", HEALTHY_OTHER, "--steps", "25,100", "--bake", "60s",
                                        "--auto-promote")
    await wait_progress(handle, lambda p: p.get("current_step") == "bake-25", "the bake")
    baked = time.time()
    deadline = time.monotonic() + 60
    while sum(1 for e in client.between(baked - 5, time.time()) if e[3] == version) < 5:
        if time.monotonic() > deadline:
            raise RuntimeError("the canary answered no request in its bake")
        await asyncio.sleep(0.1)
    aborted = time.time()
    await send_update(handle, Procedure.abort, Request(by="carol", reason="bench: abort during a bake"))
    report = await result_of(handle)
    await asyncio.sleep(2)
    after = [e for e in client.between(aborted - 1, time.time()) if e[3] == version and e[1] >= aborted]
    last = max((e[1] for e in after), default=aborted)
    return {"abort_to_last_canary_answer_seconds": last - aborted, "canary_answers_after_abort": len(after),
            "status": report["status"], "rolled_back": report.get("rolled_back")}


def median_min_max(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rps", type=float, default=40.0, help="the bench client's requests per second")
    parser.add_argument("--steps", help="the canary's weights for the faulty image (default: the lab inventory's, "
                        "25,50,100); e.g. 5,25,50,100, the house default")
    parser.add_argument("--only", choices=("faulty", "abort"), help="one of the two measures")
    parser.add_argument("--router", choices=("httproute", "nginx"), default="httproute",
                        help="the lab's router (opsflow lab up --router)")
    parser.add_argument("--workload", choices=("kubernetes", "host"), default="kubernetes",
                        help="host: the app outside Kubernetes (with --router nginx; opsflow lab up --workload)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.workload == "host" and args.router != "nginx":
        parser.error("--workload host runs behind plain NGINX: add --router nginx")

    from lab.manage import down, up

    root = Path(tempfile.mkdtemp(prefix="opsflow-bench-rollout-")) / "lab"
    os.environ["OPSFLOW_HOME"] = str(root.parent / "home")
    os.environ.pop("TEMPORAL_ADDRESS", None)
    say(f"lab up in {root} (rollout stage)")
    faulty: list[dict] = []
    aborts: list[dict] = []
    client = None
    try:
        state = up(root, with_worker=True, quiet=True, default_ports=False, rollout=True, router=args.router,
                   workload=args.workload)
        client = Client(state["rollout"]["proxy"], args.rps).start()
        for n in range(1, args.runs + 1):
            for kind, fn, out in (("faulty", faulty_run, faulty), ("abort", abort_run, aborts)):
                if args.only not in (None, kind):
                    continue
                time.sleep(6)  # the last run's canary out of the 5 s rate windows of the analysis
                try:
                    r = asyncio.run(fn(state, client, args.steps) if kind == "faulty" else fn(state, client))
                except Exception as e:  # noqa: BLE001 - a failed run is said and left out of the figures
                    say(f"{kind} run {n}: failed: {e}; left out")
                    continue
                out.append(r)
                say(f"{kind} run {n}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in r.items()))
    finally:
        if client is not None:
            client.close()
        down(root, quiet=True)
    if not faulty and not aborts:
        say("no run succeeded")
        return 1
    result: dict = {"runs": args.runs, "client_rps": args.rps, "client_refused": client.refused if client else 0,
                    "router": args.router, "workload": args.workload}
    if faulty:
        result["faulty"] = {"runs": len(faulty), **{k: median_min_max([r[k] for r in faulty]) for k in (
            "share_5xx", "errors_5xx", "requests", "share_5xx_with_traffic", "start_to_rollback_seconds",
            "traffic_to_weight0_seconds",
            "traffic_to_failed_look_seconds")}, "steps": args.steps or "25,50,100 (the lab's)",
                            "reason": faulty[-1]["reason"]}
    if aborts:
        result["abort"] = {"runs": len(aborts), **{k: median_min_max([r[k] for r in aborts]) for k in (
            "abort_to_last_canary_answer_seconds", "canary_answers_after_abort")}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"canary rollouts on the lab ({args.router} router, {args.workload} workload), measured at a client of the "
          f"proxy ({args.rps:.0f} req/s), median [min-max]:")
    if faulty:
        f = result["faulty"]
        print(f"  faulty image ({f['runs']} run(s), steps {f['steps']}), canary start -> removal:")
        print(f"    client requests answered 5xx  {f['share_5xx']['median']:8.2%}  "
              f"[{f['share_5xx']['min']:.2%}-{f['share_5xx']['max']:.2%}]  (goal <= 2 %; "
              f"{f['errors_5xx']['median']:.0f} of {f['requests']['median']:.0f})")
        w = f["share_5xx_with_traffic"]
        print(f"    ... from the first weight's move only {w['median']:8.2%}  [{w['min']:.2%}-{w['max']:.2%}]")
        for key, label in (("start_to_rollback_seconds", "start -> rolled back (s)"),
                           ("traffic_to_failed_look_seconds", "first canary traffic -> failing look (s)"),
                           ("traffic_to_weight0_seconds", "first canary traffic -> weight 0 (s)")):
            s = f[key]
            print(f"    {label:<37} {s['median']:6.2f}  [{s['min']:.2f}-{s['max']:.2f}]")
        print(f"    rolled back for: {f['reason']}")
    if aborts:
        a = result["abort"]["abort_to_last_canary_answer_seconds"]
        print(f"  abort during a bake ({result['abort']['runs']} run(s)):")
        print(f"    abort -> last request the canary answered (s) {a['median']:6.2f}  [{a['min']:.2f}-{a['max']:.2f}]"
              "  (goal <= 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
