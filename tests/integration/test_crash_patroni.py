"""The crash suite on real Patroni (issue 20): the worker SIGKILLed at every activity boundary of a planned failover
and of the failback (its own steps and its child's, the failover back), and in the middle of each long step (the
promotion among them), on both Patroni layouts: a cluster per region (`opsflow lab up --database patroni`, the old
cluster demoted to a standby cluster) and one cluster stretched across the regions (`--patroni-layout stretched`,
Patroni's own POST /switchover). Each run completes; one promotion each way (the timeline moves by exactly one), the
old primary follows the new one, no data directory is replaced (no rebuild), every row kept. The machinery is
tests/integration/crash_kit.py's."""

from __future__ import annotations

import os

import pytest

from opsflow.contracts.db import DB_PROMOTE
from tests.integration.conftest import NEEDS_PATRONI, explain, fast_recovery, module_lab, wait_for
from tests.integration.crash_kit import Workers, run_killing_at_every_boundary, run_killing_at_every_boundary_with_child
from tests.integration.test_crash_boundaries import setup_data
from tests.integration.test_failover_lab import sql, streams_from, timeline

pytestmark = [
    pytest.mark.lab,
    pytest.mark.crash,
    NEEDS_PATRONI,
]


@pytest.fixture(scope="module", params=["per-region", "stretched"])
def patroni_crash_lab(request):
    """A Patroni lab without a worker of its own: the crash kit's two workers are the only ones (a third would take
    steps the kills then miss)."""
    with module_lab(worker=False, database="patroni", patroni_layout=request.param) as lab:
        yield lab


def datadirs(lab) -> dict[str, int]:
    """Each region's data directory inode: a rebuild (a new base backup, Patroni's reinit) replaces it."""
    return {r: os.stat(lab.state["postgres"][r]["datadir"]).st_ino for r in ("eastus", "westeurope")}


async def test_patroni_failover_and_failback_survive_a_kill_at_every_boundary(patroni_crash_lab):
    lab = patroni_crash_lab
    inventory = fast_recovery(lab)
    lab.inventory = inventory
    setup_data(lab)
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    tli, dirs = timeline(east), datadirs(lab)
    workers = Workers(lab, inventory)
    workers.start_all()

    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--requester", "alice")["workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=True)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == [], explain(report)
    assert report["_boundaries"] >= 8 and report["_kills"]["long_steps"] >= 2, report["_kills"]
    assert DB_PROMOTE.name in report["_long"], report["_long"]  # killed in the middle of the switchover itself
    assert timeline(west) == tli + 1  # one promotion, whatever was killed
    wait_for(lambda: streams_from(east, west), what="eastus streaming from westeurope")

    fid = lab.cli_json("failback", "--env", inventory, "--to", "eastus", "--requester", "alice")["workflow_id"]
    back = await run_killing_at_every_boundary_with_child(lab, workers, fid, approve=True)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"], explain(back)
    assert back["_boundaries"] >= 5, back["_kills"]
    assert timeline(east) == tli + 2  # one promotion back
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    assert sql(east, "SELECT count(*) FROM orders")[0][0] == 500
    assert datadirs(lab) == dirs  # no rebuild either way
