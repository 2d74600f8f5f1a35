"""`opsflow lab up --database patroni`: real Patroni (Debian's 3.0) on etcd, one cluster per region, eastus the
primary cluster and westeurope a standby cluster. The same failover and failback as on the other labs, through
Patroni's REST API: the old cluster becomes a standby cluster of the new one (no rewind, no base backup), and the
failback is the same move back, every row kept. One lab for the module: each test leaves eastus the primary."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from tests.integration.conftest import Lab, explain, take_down, wait_for
from tests.integration.test_failover_lab import approve, sql, streams_from, timeline, wait_end

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/bin/patroni") and os.path.exists("/usr/bin/etcd")),
    reason="Debian's patroni and etcd-server are not installed (scripts/setup.sh installs them)",
)


@pytest.fixture(scope="module")
def patroni_lab():
    from lab.manage import up

    root = Path(tempfile.mkdtemp(prefix="opsflow-lab-test-")) / "lab"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPSFLOW_HOME", str(root.parent / "home"))
        mp.delenv("TEMPORAL_ADDRESS", raising=False)
        lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, database="patroni"))
        lab.start_worker()
        yield lab
        lab.stop_workers()
        take_down(root)


def rest(lab, region: str, path: str) -> dict:
    return httpx.get(lab.state["patroni"]["regions"][region]["rest_api"] + path, timeout=5).json()


def leader_role(lab, region: str) -> str:
    return rest(lab, region, "/cluster")["members"][0]["role"]


def test_switchover_failover_and_failback_through_patroni(patroni_lab):
    """The planned failover demotes eastus to a standby cluster of westeurope (its dynamic configuration), then
    promotes westeurope; eastus streams from it at once, unfenced; the failback is the same move back."""
    lab = patroni_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")
    start_tli = timeline(east)
    sql(east, "CREATE TABLE journal (id int PRIMARY KEY, phase text)")
    sql(east, "INSERT INTO journal SELECT g, 'before' FROM generate_series(1, 100) g")

    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == []
    assert report["rpo_bytes"] == 0 and report["rpo_proven"]
    names = [s["name"] for s in report["steps"]]
    assert names.index("fence") < names.index("catch-up") < names.index("promote") < names.index("old-replica")
    # Patroni's own state says what happened: westeurope leads, eastus is a standby cluster following it.
    assert (leader_role(lab, "westeurope"), leader_role(lab, "eastus")) == ("leader", "standby_leader")
    west_port = lab.state["patroni"]["regions"]["westeurope"]["port"]
    assert rest(lab, "eastus", "/config")["standby_cluster"]["port"] == west_port
    assert "standby_cluster" not in rest(lab, "westeurope", "/config")
    # The fence was a dynamic-configuration parameter of eastus' cluster: lifted again, nothing left behind.
    assert "default_transaction_read_only" not in rest(lab, "eastus", "/config")["postgresql"]["parameters"]
    assert streams_from(east, west) and timeline(east) == timeline(west) == start_tli + 1
    sql(west, "INSERT INTO journal SELECT g, 'on westeurope' FROM generate_series(101, 200) g")
    wait_for(lambda: sql(east, "SELECT count(*) FROM journal")[0][0] == 200, what="eastus replaying westeurope")

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice", "--reason", "switch back")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=240)
    assert back["status"] == "succeeded", explain(back)
    steps = {s["name"]: s for s in back["steps"]}
    assert steps["rebuild"]["outcome"] == "skipped" and steps["restandby"]["outcome"] == "skipped"
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")
    sql(east, "INSERT INTO journal VALUES (201, 'after failback')")
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    wait_for(lambda: sql(west, "SELECT count(*) FROM journal")[0][0] == 201, what="westeurope replaying eastus")
    assert sql(east, "SELECT count(*), count(DISTINCT phase) FROM journal")[0] == (201, 3)
    assert timeline(east) == start_tli + 2  # two promotions, no rebuild: one data directory each, never replaced
    ids = {r: rest(lab, r, "/patroni")["database_system_identifier"] for r in ("eastus", "westeurope")}
    assert ids["eastus"] == ids["westeurope"]


def test_provider_reads_patroni_and_refuses_another_cluster(patroni_lab):
    """The provider's status carries Patroni's view (the leader's role and state); an inventory whose scope is not
    the cluster the REST API serves is refused before anything is changed (non-retryable)."""
    from activities.providers import database_provider
    from opsflow.inventory import load_inventory
    from opsflow.models import PromoteRequest, RegionTarget

    inv = load_inventory(patroni_lab.inventory)
    west = RegionTarget.of(inv, "westeurope")
    s = database_provider(west).status()
    assert (s.role, s.streaming, s.cloud_role, s.cloud_state) == ("replica", True, "standby_leader", "running")
    wrong = west.model_copy(update={"database": west.database.model_copy(update={"scope": "lab-eastus"})})
    from activities.database import db_promote

    with pytest.raises(ApplicationError) as err:
        db_promote(PromoteRequest(target=wrong, demote=RegionTarget.of(inv, "eastus")))
    assert err.value.type == "PatroniScopeMismatch" and err.value.non_retryable
    assert leader_role(patroni_lab, "westeurope") == "standby_leader"  # nothing was changed
    assert leader_role(patroni_lab, "eastus") == "leader"
