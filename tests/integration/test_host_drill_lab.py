"""The restore drill of self-managed PostgreSQL (method host-pitr) on `opsflow lab up --database self-managed`, for
real: the primary's tar base backup (pg_basebackup -Ft -z) and its WAL archive restored on the host into a scratch
server, checked, stopped and removed; a scratch server a dead worker left is removed by the next drill; a drill with
no base backup fails clearly and makes nothing."""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.integration.conftest import explain, printed_report, wait_for

pytestmark = pytest.mark.lab


def sql(dsn: str, query: str, *args):
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as c:
        cur = c.execute(query, args or None)
        return cur.fetchall() if cur.description else None


def processes_under(path: Path) -> list[str]:
    """Command lines of running processes that name `path` (a scratch server's postmaster names its data dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd:
            found.append(cmd)
    return found


def scratch_servers(scratch: Path) -> list[str]:
    """The postmasters of scratch servers under `scratch` (`postgres -D <scratch>/<name>/data`)."""
    return [cmd for cmd in processes_under(scratch) if cmd.split()[0].endswith("/postgres")]


def drill(lab) -> tuple[int, dict]:
    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    return proc.returncode, printed_report(proc)


@pytest.fixture(scope="module")
def sm_lab():
    """`opsflow lab up --database self-managed` with a worker, shared by this module's tests."""
    from tests.integration.conftest import module_lab

    with module_lab(database="self-managed") as lab:
        yield lab


@pytest.fixture
def inventory(sm_lab):
    """The lab's inventory (the one its worker holds) as a dict to change and write; put back after the test."""
    text = open(sm_lab.inventory).read()
    yield yaml.safe_load(text)
    open(sm_lab.inventory, "w").write(text)


def write(lab, inv: dict) -> None:
    open(lab.inventory, "w").write(yaml.safe_dump(inv))


def test_host_pitr_drill_restores_checks_and_removes_the_scratch_server(sm_lab, inventory):
    from activities.postgres.host_restore import HostPointInTimeRestore
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget, RestoreRequest

    lab = sm_lab
    inv = load_inventory(lab.inventory)
    assert inv.drill.method == "host-pitr" and inv.drill.host is not None
    scratch = Path(inv.drill.host.scratch_dir)
    east = lab.dsn("eastus")

    # A scratch server a dead worker left running (another run of this environment): the next drill removes it.
    dead = HostPointInTimeRestore(RestoreRequest(source=RegionTarget.of(inv, "eastus"), drill=inv.drill,
                                                 method="host-pitr", scratch_name="opsflow-drill-dead0001",
                                                 environment="lab", run_id="a-dead-run"))
    point = dead.window().latest
    dead.start("opsflow-drill-dead0001", point)
    left = wait_for(lambda: (t := dead.status("opsflow-drill-dead0001")).ready and t, timeout=120,
                    what="the leftover scratch server")
    assert sql(left.dsn, "SELECT count(*) FROM lab_orders")[0][0] == 200
    assert scratch_servers(scratch / "opsflow-drill-dead0001")

    # Committed after the newest archived commit: not restorable, and not expected (counted as of the point).
    sql(east, "INSERT INTO lab_orders (total) SELECT 1 FROM generate_series(1, 50)")
    code, report = drill(lab)
    assert code == 0 and report["status"] == "succeeded", explain(report)
    assert report["method"] == "host-pitr" and report["restore_point_chosen"] == "newest"
    assert datetime.fromisoformat(report["restore_point"]) == datetime.fromisoformat(report["window_latest"])
    orders = next(c for c in report["checks"] if c["name"] == "lab_orders")
    assert orders["ok"] and orders["actual"] == orders["expected"] == 200
    assert sql(east, "SELECT count(*) FROM lab_orders")[0][0] == 250
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) == 4
    assert report["restore_seconds"] > 0 and report["scratch_deleted"] is True
    leftovers = next(s for s in report["steps"] if s["name"] == "leftovers")
    assert leftovers["detail"] == "removed opsflow-drill-dead0001"
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)  # every scratch server stopped, removed

    # restore_point random: a point inside the restorable window, restored and counted as of that point. The 50 rows
    # are archived now; the retention starts the window at the seed's newest commit, so it holds them.
    from lab.postgres import Cluster, archive_now

    archive_now(Cluster.from_dict(lab.state["postgres"]["eastus"]))
    seeded = datetime.fromisoformat(report["window_latest"])
    retention = (datetime.now(seeded.tzinfo) - seeded).total_seconds()
    inventory["drill"].update(restore_point="random", retention=f"{retention:.3f}s")
    write(lab, inventory)
    code, second = drill(lab)
    assert code == 0 and second["status"] == "succeeded", explain(second)
    chosen = datetime.fromisoformat(second["restore_point"])
    assert second["restore_point_chosen"] == "random"
    assert seeded - timedelta(seconds=1) <= chosen <= datetime.fromisoformat(second["window_latest"])
    orders = next(c for c in second["checks"] if c["name"] == "lab_orders")
    committed = sql(east, "SELECT count(*) FROM lab_orders WHERE created_at < %s", chosen)[0][0]
    assert orders["ok"] and orders["actual"] == orders["expected"] == committed and 200 <= committed <= 250
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)

    # No base backup where the inventory says: a clear failure before anything is made.
    empty = lab.root / "drill" / "no-backups"
    empty.mkdir()
    inventory["drill"]["host"]["base_backups"] = str(empty)
    write(lab, inventory)
    code, bad = drill(lab)
    assert code != 0 and bad["status"] == "failed", explain(bad)
    assert f"no base backup under {empty}" in bad["failure"]
    assert "leftovers" not in [s["name"] for s in bad["steps"]]
    assert list(scratch.iterdir()) == []


HOLD = """#!/bin/sh
# drill.host.run for the tests: `pg_ctl status` waits while the hold file exists (the restore-wait step is then
# blocked with its scratch server running), everything else runs at once
case " $* " in *" status "*) while [ -e {hold} ]; do sleep 0.05; done ;; esac
exec "$@"
"""


def held(lab, inventory: dict, tmp: Path) -> Path:
    """The inventory's drill.host.run behind a hold (HOLD); returns the hold file (it exists: holding)."""
    hold, script = tmp / "hold", tmp / "run-held"
    script.write_text(HOLD.format(hold=hold))
    script.chmod(0o755)
    tmp.chmod(0o755)
    hold.touch()
    inventory["drill"]["host"]["run"] = [str(script), *inventory["drill"]["host"]["run"]]
    inventory["drill"]["heartbeat_timeout"] = "5s"  # a killed worker's wait is taken over within seconds
    write(lab, inventory)
    return hold


def until_scratch_server_runs(lab, wid: str, scratch: Path) -> None:
    from tests.integration.test_failover_lab import wait_status

    wait_status(lab, wid, lambda r: r.get("current_step") == "restore-wait", what="the restore-wait step")
    wait_for(lambda: scratch_servers(scratch), timeout=60, what="the scratch server running")


def test_an_aborted_drill_stops_and_removes_its_scratch_server(sm_lab, inventory, tmp_path):
    from tests.integration.test_failover_lab import wait_end

    lab = sm_lab
    scratch = Path(inventory["drill"]["host"]["scratch_dir"])
    hold = held(lab, inventory, tmp_path)
    wid = lab.cli_json("drill", "--requester", "alice")["workflow_id"]
    until_scratch_server_runs(lab, wid, scratch)
    lab.cli("abort", wid, "--as", "alice", "--reason", "test", check=True)
    hold.unlink()
    report = wait_end(lab, wid)
    assert report["status"] == "aborted", explain(report)
    assert report["scratch_deleted"] is True
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)


def test_a_worker_killed_mid_restore_is_replaced_and_the_drill_completes(sm_lab, inventory, tmp_path):
    from tests.integration.test_failover_lab import wait_end

    lab = sm_lab
    scratch = Path(inventory["drill"]["host"]["scratch_dir"])
    hold = held(lab, inventory, tmp_path)
    wid = lab.cli_json("drill", "--requester", "alice")["workflow_id"]
    until_scratch_server_runs(lab, wid, scratch)
    (started,) = [p.name for p in scratch.glob("*/start-*.log")]  # one start, on this port
    port = started.split("-")[2].removesuffix(".log")
    for worker in list(lab.workers):
        lab.kill_worker(worker)
    lab.workers.clear()
    lab.start_worker()
    hold.unlink()
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    assert all(c["ok"] for c in report["checks"]) and report["scratch_deleted"] is True
    wait = next(s for s in report["steps"] if s["name"] == "restore-wait")
    assert wait["detail"].endswith(f"promoted on 127.0.0.1:{port}")  # the same server, taken over: not redone
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)


def test_a_hole_in_the_wal_archive_fails_the_drill_clearly_and_removes_the_scratch_server(sm_lab, inventory, tmp_path):
    """What a drill is for: an archive that cannot replay to the restore point (segments lost) is a failed drill
    that says so (the scratch server's own words), and the scratch server is removed all the same."""
    from lab.postgres import Cluster, archive_now, make_server_dir

    lab = sm_lab
    east = lab.dsn("eastus")
    for n in range(3):  # segments of their own after the base backup's WAL
        sql(east, "INSERT INTO lab_orders (total) VALUES (%s)", n)
        sql(east, "SELECT pg_switch_wal()")
    archive_now(Cluster.from_dict(lab.state["postgres"]["eastus"]))
    archive = Path(inventory["drill"]["host"]["wal_archive"])
    holed = make_server_dir(tmp_path / "holed-archive")
    newest = max(p for p in archive.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name))
    shutil.copy2(newest, holed)  # only the newest segment: the WAL from the backup's end up to it is lost
    os.chmod(holed / newest.name, 0o644)
    inventory["drill"]["host"]["wal_archive"] = str(holed)
    write(lab, inventory)
    code, report = drill(lab)
    assert code != 0 and report["status"] == "failed", explain(report)
    assert "stopped before the restore was done" in report["failure"]
    assert "recovery ended before configured recovery target was reached" in report["failure"]
    assert report["scratch_deleted"] is True
    scratch = Path(inventory["drill"]["host"]["scratch_dir"])
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)


RECORD = """#!/bin/sh
# drill.host.run for the crash test: every command the drill runs on the host, one line each, then run
echo "$*" >> {log}
exec "$@"
"""


@pytest.mark.crash
async def test_drill_survives_a_kill_at_every_boundary(sm_lab, inventory, tmp_path):
    """SIGKILL the workflow or region worker at every activity boundary of a host-pitr drill (and in the middle of
    its long steps): it completes, the scratch server was started once and removed, nothing is left on the host."""
    from tests.integration.conftest import fast_recovery
    from tests.integration.crash_kit import Workers, run_killing_at_every_boundary

    lab = sm_lab
    lab.stop_workers()
    lab.workers.clear()
    log, script = tmp_path / "commands.log", tmp_path / "run-recorded"
    script.write_text(RECORD.format(log=log))
    script.chmod(0o755)
    tmp_path.chmod(0o777)
    inventory["drill"]["host"]["run"] = [str(script), *inventory["drill"]["host"]["run"]]
    write(lab, inventory)
    workers = Workers(lab, fast_recovery(lab))
    workers.start_all()
    wid = lab.cli_json("drill", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False, spare=())
    assert report["status"] == "succeeded", explain(report)
    assert report["_kills"]["long_steps"] >= 1, report["_kills"]
    assert report["scratch_deleted"] is True and all(c["ok"] for c in report["checks"])
    commands = log.read_text().splitlines()
    name = report["scratch_name"]
    assert len([c for c in commands if " start -D " in c and name in c]) == 1  # one scratch server started
    assert [c for c in commands if c.endswith(f"rm -rf {inventory['drill']['host']['scratch_dir']}/{name}")]
    scratch = Path(inventory["drill"]["host"]["scratch_dir"])
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)


def test_after_a_failover_the_drill_restores_the_new_primary_on_its_new_timeline(sm_lab, inventory):
    """After `opsflow failover --to westeurope` (a switchover: eastus follows it) westeurope archives its new timeline
    into the same archive; the drill restores the base backup of the old timeline and follows the new one to the
    newest commit, counted against westeurope."""
    from lab.postgres import Cluster, archive_now
    from tests.integration.test_failover_lab import approve, wait_end

    lab = sm_lab
    if not [w for w in lab.workers if w.poll() is None]:
        lab.start_worker()
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    assert wait_end(lab, wid)["status"] == "succeeded"
    west = lab.dsn("westeurope")
    sql(west, "INSERT INTO lab_orders (total) SELECT 2 FROM generate_series(1, 30)")
    archive_now(Cluster.from_dict(lab.state["postgres"]["westeurope"]))
    code, report = drill(lab)
    assert code == 0 and report["status"] == "succeeded", explain(report)
    assert report["source_region"] == "westeurope"
    orders = next(c for c in report["checks"] if c["name"] == "lab_orders")
    assert orders["ok"] and orders["actual"] == orders["expected"] == sql(west, "SELECT count(*) FROM lab_orders")[0][0]
    scratch = Path(inventory["drill"]["host"]["scratch_dir"])
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)
