"""The crash suite on real Patroni's emergency path (issue 20): eastus dies (its Patroni and PostgreSQL SIGKILLed),
and the emergency failover to westeurope runs with the worker SIGKILLed at every activity boundary and in the middle
of each long step, the promotion among them (`standby_cluster: null` in westeurope's dynamic configuration). It
completes once: one promotion (the timeline moves by exactly one), westeurope writable with every row it had
replayed, and the old cluster's fence left to a person, saying how (its REST API is down), once. The machinery is
tests/integration/crash_kit.py's."""

from __future__ import annotations

import pytest

from lab import patroni
from opsflow.contracts.db import DB_PROMOTE
from tests.integration.conftest import NEEDS_PATRONI, explain, fast_recovery, module_lab, wait_for
from tests.integration.crash_kit import Workers, run_killing_at_every_boundary
from tests.integration.test_failover_lab import sql, timeline
from tests.integration.test_patroni_lab import leader_role, processes

pytestmark = [
    pytest.mark.lab,
    pytest.mark.crash,
    NEEDS_PATRONI,
]


@pytest.fixture(scope="module")
def patroni_crash_lab():
    """A Patroni lab (a cluster per region) without a worker of its own: the crash kit's two are the only ones."""
    with module_lab(worker=False, database="patroni") as lab:
        yield lab


async def test_patroni_emergency_failover_survives_a_kill_at_every_boundary(patroni_crash_lab):
    lab = patroni_crash_lab
    inventory = fast_recovery(lab)
    lab.inventory = inventory
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE emergency (id int PRIMARY KEY)")
    sql(east, "INSERT INTO emergency SELECT generate_series(1, 300)")
    wait_for(lambda: sql(west, "SELECT to_regclass('emergency') IS NOT NULL")[0][0], what="the table replicated")
    wait_for(lambda: sql(west, "SELECT count(*) FROM emergency")[0][0] == 300, what="the rows replayed")
    tli = timeline(west)
    patroni.kill(processes(lab), "eastus")  # the region dies
    workers = Workers(lab, inventory)
    workers.start_all()

    wid = lab.cli_json("failover", "--env", inventory, "--to", "westeurope", "--emergency", "--requester", "alice")[
        "workflow_id"]
    report = await run_killing_at_every_boundary(lab, workers, wid, approve=False)
    assert report["status"] == "succeeded", explain(report)
    assert report["_boundaries"] >= 5 and DB_PROMOTE.name in report["_kinds"], report["_kills"]
    assert not report["switchover"] and leader_role(lab, "westeurope") == "leader"
    assert timeline(west) == tli + 1  # one promotion, whatever was killed
    hints = [r for r in report["remaining"] if "fence the old primary in eastus" in r]
    assert len(hints) == 1 and "patronictl" in hints[0] and "standby_cluster" in hints[0], report["remaining"]
    sql(west, "INSERT INTO emergency VALUES (301)")  # writable, every replayed row kept
    assert sql(west, "SELECT count(*) FROM emergency")[0][0] == 301
