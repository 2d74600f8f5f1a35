"""The restore drill of self-managed PostgreSQL (method host-pitr) on `opsflow lab up --database self-managed`, for
real: the primary's tar base backup (pg_basebackup -Ft -z) and its WAL archive restored on the host into a scratch
server, checked, stopped and removed; a scratch server a dead worker left is removed by the next drill; a drill with
no base backup fails clearly and makes nothing."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.integration.conftest import explain, wait_for

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


def drill(lab) -> tuple[int, dict]:
    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    return proc.returncode, json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture
def sm_lab(lab_home):
    from lab.manage import up
    from tests.integration.conftest import Lab, lab_root, take_down

    root = lab_root()
    lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, database="self-managed"))
    lab.start_worker()
    yield lab
    lab.stop_workers()
    take_down(root)


def test_host_pitr_drill_restores_checks_and_removes_the_scratch_server(sm_lab):
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
    assert processes_under(scratch / "opsflow-drill-dead0001")

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
    raw = yaml.safe_load(open(lab.inventory))
    raw["drill"].update(restore_point="random", retention=f"{retention:.3f}s")
    open(lab.inventory, "w").write(yaml.safe_dump(raw))
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
    raw = yaml.safe_load(open(lab.inventory))
    raw["drill"]["host"]["base_backups"] = str(empty)
    open(lab.inventory, "w").write(yaml.safe_dump(raw))
    code, bad = drill(lab)
    assert code != 0 and bad["status"] == "failed", explain(bad)
    assert f"no base backup under {empty}" in bad["failure"]
    assert "leftovers" not in [s["name"] for s in bad["steps"]]
    assert list(scratch.iterdir()) == []
