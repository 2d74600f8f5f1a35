"""A canary outside Kubernetes on the lab (`opsflow lab up --rollout --router nginx --workload host`): the app's
instances are real processes that the worker starts, checks and stops with the inventory's commands
(lab/host_app.py, as a Compose service or a systemd unit would be), plain NGINX splits real requests by the upstream
file the worker writes, Prometheus judges. The router's and the workload's activities run on their own queue, served
by a second worker started with `--router-queue` (the worker on the NGINX host); the first serves the workflows and
the regions only.

One lab for the module; the rollouts run one after another."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Lab, module_lab, wait_for
from tests.integration.test_rollout_lab import prometheus_total, run_rollout, served
from tests.integration.test_rollout_nginx_lab import servers, upstream

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def host_lab():
    with module_lab(worker=False, rollout=True, router="nginx", workload="host") as lab:
        lab.start_worker("--region", "eastus", "--region", "westeurope")  # workflows and regions, not the router's
        queue = lab.state["rollout"]["queue"]
        routers = [lab.start_worker("--router-queue", queue)]  # the last is the one running (tests restart it)
        log = lab.root / "worker-1.log"
        wait_for(lambda: log.exists() and f"task queues {queue}\n" in log.read_text(), 60, what="the router worker")
        yield lab, routers


def host(lab: Lab, role: str) -> tuple[int, str]:
    """What the host says of a role's instance (the script the worker runs): exit status, last line."""
    p = subprocess.run([sys.executable, "-m", "lab.host_app", "--dir", str(Path(lab.root) / "rollout" / "host"),
                        "check", role], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout.strip().splitlines()[-1]


def served_at_once(lab: Lab, n: int, clients: int = 4) -> Counter:
    """`served` by a few clients at once: n requests within about a second, well inside the first look of a bake
    (a faulty canary may be rolled back at that look)."""
    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(lambda _: served(lab, n // clients), range(clients)), Counter())


def activities(lab: Lab, wid: str, attempts: bool = False) -> list[tuple]:
    """(activity type, task queue, identity of the worker that started it[, attempt]) from the run's history."""
    async def read():
        client = await lab._connect()
        scheduled, out = {}, []
        async for e in client.get_workflow_handle(wid).fetch_history_events():
            if e.HasField("activity_task_scheduled_event_attributes"):
                a = e.activity_task_scheduled_event_attributes
                scheduled[e.event_id] = (a.activity_type.name, a.task_queue.name)
            elif e.HasField("activity_task_started_event_attributes"):
                a = e.activity_task_started_event_attributes
                out.append((*scheduled[a.scheduled_event_id], a.identity, *([a.attempt] if attempts else [])))
        return out

    return lab._run(read(), timeout=60)


def restart_router_worker(lab: Lab, routers: list) -> None:
    """SIGKILL the worker on the "NGINX host" and start another, serving the same queue."""
    queue = lab.state["rollout"]["queue"]
    lab.kill_worker(routers[-1])
    log = Path(lab.root) / f"worker-{len(lab.workers)}.log"
    routers.append(lab.start_worker("--router-queue", queue))
    wait_for(lambda: log.exists() and f"task queues {queue}\n" in log.read_text(), 60, what="the new worker")


def the_router_worker_ran_the_host_and_router_steps(lab: Lab, router, wid: str) -> Counter:
    queue, ran = lab.state["rollout"]["queue"], activities(lab, wid)
    mine = [(name, q, who) for name, q, who in ran if name.startswith(("router.", "k8s."))]
    assert mine and all(q == queue and who.startswith(f"{router.pid}@") for _, q, who in mine), mine
    others = [(name, q, who) for name, q, who in ran if not name.startswith(("router.", "k8s."))]
    assert others and not any(q == queue or who.startswith(f"{router.pid}@") for _, q, who in others), others
    return Counter(name for name, _, _ in mine)


def test_a_healthy_host_canary_takes_a_quarter_of_real_requests_then_is_promoted(host_lab):
    lab, routers = host_lab
    images, s = lab.state["rollout"]["images"], servers(lab)
    old, new = host(lab, "stable")[1], images["healthy"]
    assert host(lab, "canary")[0] == 3 and set(upstream(lab)) == {s["stable"]}  # stable alone, as a person had it
    split: dict = {}

    def at_25(wid: str) -> None:  # during the bake at 25 %: the canary process runs; what a client of NGINX gets
        wait_for(lambda: lab.status(wid)["current_step"] == "bake-25", 90, what="the bake at 25 %")
        split["canary"] = host(lab, "canary")
        split["seen"] = served(lab, 200)
        split["wid"] = wid

    report = run_rollout(lab, "canary", "--image", new, "--steps", "25,100", "--bake", "15s", "--auto-promote",
                         during=at_25)
    assert report["status"] == "succeeded", report.get("failure")
    assert split["canary"] == (0, new), split
    seen, v = split["seen"], new.rsplit(":", 1)[1]
    print(f"host canary at 25 %: {seen[v]} of 200 client requests reached it ({dict(seen)})")
    assert sum(seen.values()) == 200 and 0.17 < seen[v] / 200 < 0.33, seen
    judged = [a for a in report["analysis"] if a["kind"] != "interval"]
    assert judged and judged[0]["verdict"] == "pass" and judged[0]["canary_requests"] > 20, judged
    assert prometheus_total(lab, "web-canary") > 20  # Prometheus scraped the canary process's own counters
    # promoted: stable's instance serves the new image, the canary's is stopped, NGINX sends everything to stable
    assert host(lab, "stable") == (0, new) and host(lab, "canary")[0] == 3 and old != new
    after = upstream(lab)
    assert after[s["stable"]].startswith("weight=100") and after[s["canary"]] == "down", after
    wait_for(lambda: served(lab, 20) == Counter({v: 20}), 30, what="the new stable alone behind NGINX")
    ran = the_router_worker_ran_the_host_and_router_steps(lab, routers[-1], split["wid"])
    assert ran["k8s.create_canary"] == 1 and ran["k8s.set_image"] == 1 and ran["k8s.delete_canary"] == 1, ran


def test_a_faulty_host_canary_judged_against_a_fresh_baseline_is_rolled_back_and_both_stopped(host_lab):
    lab, routers = host_lab
    images, s = lab.state["rollout"]["images"], servers(lab)
    inv = yaml.safe_load(open(lab.inventory))
    inv["rollout"]["analysis"]["baseline"] = "fresh"  # both workers read their inventory again when it changes
    Path(lab.inventory).write_text(yaml.safe_dump(inv, sort_keys=False))
    stable = host(lab, "stable")[1]
    split: dict = {}

    def at_25(wid: str) -> None:
        wait_for(lambda: lab.status(wid)["current_step"] == "bake-25", 90, what="the bake at 25 %")
        split["before"], split["seen"], split["wid"] = upstream(lab), served_at_once(lab, 160), wid
        split["after"], split["baseline"] = upstream(lab), host(lab, "baseline")

    report = run_rollout(lab, "canary", "--image", images["faulty"], "--steps", "25,50,100", "--bake", "15s",
                         "--auto-promote", during=at_25)
    assert report["status"] == "failed" and report["rolled_back"], report.get("failure")
    assert "error-rate" in report["rollback_reason"], report["rollback_reason"]
    v = images["faulty"].rsplit(":", 1)[1]
    seen = split["seen"]
    reached = seen[v] + seen[f"{v}:500"]
    print(f"faulty host canary at 25 %: {reached} of 160 client requests reached it, {seen[f'{v}:500']} got a 500")
    assert split["before"] == split["after"] and split["after"][s["canary"]].startswith("weight=25"), split
    assert sum(seen.values()) == 160 and 0.15 < reached / 160 < 0.35, seen  # stable 50 %, baseline 25 %
    undo = [st["name"] for st in report["steps"] if st["outcome"] == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary", "undo:k8s.delete_canary"], undo
    assert split["baseline"] == (0, stable), split  # the fresh baseline: a process of stable's image
    failed = [a for a in report["analysis"] if a["verdict"] == "fail"][-1]
    assert failed["baseline_requests"] > 10 and prometheus_total(lab, "web-baseline") > 10, failed
    assert host(lab, "canary")[0] == 3 == host(lab, "baseline")[0]  # both stopped
    assert host(lab, "stable") == (0, stable)  # stable untouched
    after = upstream(lab)
    assert after[s["stable"]].startswith("weight=100") and after[s["canary"]] == "down" == after[s["baseline"]], after
    wait_for(lambda: served(lab, 20) == Counter({stable.rsplit(":", 1)[1]: 20}), 30, what="stable alone")
    the_router_worker_ran_the_host_and_router_steps(lab, routers[-1], split["wid"])


def abort_to_weight_zero(lab: Lab, wid: str) -> tuple[float, float]:
    """Seconds from the abort's acceptance to the router's weight 0 done (the history's own times): the part of an
    abort opsflow owns, without the CLI's start-up."""
    async def read():
        client = await lab._connect()
        events = [e async for e in client.get_workflow_handle(wid).fetch_history_events()]
        last = max(i for i, e in enumerate(events) if e.HasField("workflow_execution_update_accepted_event_attributes"))
        done = next(e for e in events[last:] if e.HasField("activity_task_completed_event_attributes"))
        accepted = events[last].event_time.ToDatetime().replace(tzinfo=timezone.utc)
        zero = done.event_time.ToDatetime().replace(tzinfo=timezone.utc)
        return accepted.timestamp(), (zero - accepted).total_seconds()

    return lab._run(read(), timeout=60)


def test_an_abort_during_a_bake_stops_the_canary_process_on_a_restarted_router_worker(host_lab):
    """The worker on the NGINX host is killed during the bake and started again; an abort then sends everything to
    stable and stops the canary's process, both run by the new worker."""
    lab, routers = host_lab
    images, s = lab.state["rollout"]["images"], servers(lab)
    inv = yaml.safe_load(open(lab.inventory))
    inv["rollout"]["analysis"]["baseline"] = "stable"
    Path(lab.inventory).write_text(yaml.safe_dump(inv, sort_keys=False))
    stable, image = host(lab, "stable")[1], images["healthy"].rsplit(":", 1)[0] + ":healthy-4"
    got: dict = {}

    def abort_in_bake(wid: str) -> None:
        wait_for(lambda: lab.status(wid)["current_step"] == "bake-25", 90, what="the bake at 25 %")
        restart_router_worker(lab, routers)
        assert served_at_once(lab, 80)["healthy-4"] > 5  # the canary still has its share
        sent, got["sent"] = time.monotonic(), time.time()
        lab.cli("abort", wid, "--as", "alice", "--reason", "stopped by hand", check=True)
        returned, got["looks"] = time.monotonic(), []
        wait_for(lambda: got["looks"].append(1) or "healthy-4" not in served(lab, 20), 30,
                 what="no request to the canary")
        got["seconds"], got["returned"], got["wid"] = time.monotonic() - sent, returned - sent, wid

    report = run_rollout(lab, "canary", "--image", image, "--steps", "25,100", "--bake", "60s", "--auto-promote",
                         during=abort_in_bake)
    accepted, zero = abort_to_weight_zero(lab, got["wid"])  # the abort: the last Update; the undo's first: weight
    print(f"host canary: abort during the bake at 25 %: accepted {accepted - got['sent']:.2f} s after `opsflow abort` "
          f"was run, weight 0 in NGINX {zero:.2f} s after that; the CLI returned after {got['returned']:.1f} s; "
          f"{len(got['looks'])} look(s) of 20 requests until none reached the canary ({got['seconds']:.1f} s)")
    assert report["status"] == "aborted" and report["rolled_back"], report
    undo = [st["name"] for st in report["steps"] if st["outcome"] == "compensated"]
    assert undo == ["undo:router.set_weight", "undo:k8s.delete_canary"], undo
    assert host(lab, "canary")[0] == 3 and host(lab, "stable") == (0, stable)
    after = upstream(lab)
    assert after[s["stable"]].startswith("weight=100") and after[s["canary"]] == "down", after
    ran = activities(lab, got["wid"])
    undone = [who for name, q, who in ran if name in ("router.set_weight", "k8s.delete_canary")][-2:]
    assert all(who.startswith(f"{routers[-1].pid}@") for who in undone), ran  # the new worker on the NGINX host


def test_a_router_worker_killed_while_it_starts_the_canary_starts_it_once(host_lab):
    """The worker on the NGINX host dies while the canary's start runs on the host; the retry, on a new worker,
    finds the instance the first start made (its `check`) and starts nothing; the canary is promoted."""
    lab, routers = host_lab
    d = Path(lab.root) / "rollout" / "host"
    image = lab.state["rollout"]["images"]["healthy"].rsplit(":", 1)[0] + ":healthy-5"
    starts, got = d / "starts.log", {}
    before = starts.read_text().splitlines()

    def canary_starts() -> list[str]:
        return [line for line in starts.read_text().splitlines()[len(before):] if line.startswith("canary ")]

    def kill_in_start(wid: str) -> None:
        got["wid"] = wid
        wait_for(lambda: canary_starts(), 60, what="the canary's start on the host")
        restart_router_worker(lab, routers)  # the start is held open (hold-start): the worker dies inside it
        (d / "hold-start").unlink()

    (d / "hold-start").touch()
    try:
        report = run_rollout(lab, "canary", "--image", image, "--steps", "25,100", "--bake", "15s", "--auto-promote",
                             during=kill_in_start)
    finally:
        (d / "hold-start").unlink(missing_ok=True)
    assert report["status"] == "succeeded", report.get("failure")
    created = [(who, attempt) for name, _, who, attempt in activities(lab, got["wid"], attempts=True)
               if name == "k8s.create_canary"]
    assert len(created) == 1 and created[0][1] >= 2 and created[0][0].startswith(f"{routers[-1].pid}@"), created
    assert len(canary_starts()) == 1, canary_starts()  # one canary process, though its start ran twice
    assert host(lab, "stable") == (0, image) and host(lab, "canary")[0] == 3
