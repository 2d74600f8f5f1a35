"""`opsflow lab up --database patroni`: real Patroni (Debian's 3.0) on etcd, one cluster per region, eastus the
primary cluster and westeurope a standby cluster. The same failover and failback as on the other labs, through
Patroni's REST API: the old cluster becomes a standby cluster of the new one (no rewind, no base backup), and the
failback is the same move back, every row kept; the drill (host-pitr) restores the shared WAL archive. One lab for
the module: each test leaves eastus the primary."""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg
import pytest
from temporalio.exceptions import ApplicationError

from tests.integration.conftest import NEEDS_PATRONI, explain, module_lab, printed_report, wait_for
from tests.integration.test_failover_lab import (
    approve,
    fail_back_by_switchover,
    follows_eastus_again,
    sql,
    streams_from,
    timeline,
    wait_end,
)

pytestmark = NEEDS_PATRONI


@pytest.fixture(scope="module")
def patroni_lab():
    with module_lab(database="patroni") as lab:
        yield lab


def rest(lab, region: str, path: str) -> dict:
    return httpx.get(lab.state["patroni"]["regions"][region]["rest_api"] + path, timeout=5).json()


def processes(lab):
    """The lab's own process table (lab.json), where its Patroni processes are killed and started again."""
    from lab.processes import Lab as Processes

    return Processes(lab.root)


def answers_and(check, *args) -> bool:
    """check(*args), False while the server does not accept connections yet (Patroni is starting it)."""
    try:
        return check(*args)
    except psycopg.OperationalError:
        return False


def promote_attempts(lab, wid: str) -> int:
    """The attempt of db.promote that completed, from the procedure's history (Temporal records the last one)."""
    from opsflow.contracts.db import DB_PROMOTE

    async def read() -> int:
        history = await (await lab._connect()).get_workflow_handle(wid).fetch_history()
        scheduled = {e.event_id for e in history.events
                     if e.activity_task_scheduled_event_attributes.activity_type.name == DB_PROMOTE.name}
        return max(e.activity_task_started_event_attributes.attempt for e in history.events
                   if e.activity_task_started_event_attributes.scheduled_event_id in scheduled)

    return lab._run(read(), timeout=30)


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
    demoted = rest(lab, "eastus", "/config")["standby_cluster"]
    assert demoted["port"] == west_port
    # eastus follows with the settings the inventory gives it as a standby cluster: its slot on westeurope (there
    # because westeurope's cluster keeps it permanently) and the shared WAL archive
    assert demoted["primary_slot_name"] == "opsflow_eastus" and "wal-archive" in demoted["restore_command"]
    wait_for(lambda: sql(west, "SELECT active FROM pg_replication_slots WHERE slot_name = 'opsflow_eastus'")
             == [(True,)], 30, what="eastus streaming through its slot on westeurope")
    assert "standby_cluster" not in rest(lab, "westeurope", "/config")
    # The fence was a dynamic-configuration parameter of eastus' cluster: lifted again, nothing left behind.
    assert "default_transaction_read_only" not in rest(lab, "eastus", "/config")["postgresql"]["parameters"]
    assert streams_from(east, west) and timeline(east) == timeline(west) == start_tli + 1
    fail_back_by_switchover(lab, east, west)
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")
    follows_eastus_again(east, west)
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
    # The fence ends the clients' sessions, not Patroni's own (killing it stalls Patroni's REST API and HA loop).
    east, dsn = RegionTarget.of(inv, "eastus"), patroni_lab.dsn("eastus")
    patronis = "SELECT pid FROM pg_stat_activity WHERE application_name = 'Patroni'"
    before = sql(dsn, patronis)
    with psycopg.connect(dsn, autocommit=True) as client:
        database_provider(east).fence()
        assert client.closed or client.broken or not answers_and(client.execute, "SELECT 1")
    assert before and sql(dsn, patronis) == before and sql(dsn, "SHOW default_transaction_read_only") == [("on",)]
    database_provider(east).unfence()
    s = database_provider(west).status()
    assert (s.role, s.streaming, s.cloud_role, s.cloud_state) == ("replica", True, "standby_leader", "running")
    wrong = west.model_copy(update={"database": west.database.model_copy(update={"scope": "lab-eastus"})})
    from activities.database import db_promote

    with pytest.raises(ApplicationError) as err:
        db_promote(PromoteRequest(target=wrong, demote=RegionTarget.of(inv, "eastus")))
    assert err.value.type == "PatroniScopeMismatch" and err.value.non_retryable
    # eastus would follow through a slot westeurope does not keep: refused, naming the slot and the fix
    settings = east.database.standby_cluster.model_copy(update={"primary_slot_name": "opsflow_missing"})
    slotless = east.model_copy(update={"database": east.database.model_copy(update={"standby_cluster": settings})})
    with pytest.raises(ApplicationError) as err:
        db_promote(PromoteRequest(target=west, demote=slotless))
    assert err.value.type == "PatroniSlotMissing" and err.value.non_retryable
    assert "'opsflow_missing'" in err.value.message and "slots" in err.value.message
    assert "standby_cluster" not in rest(patroni_lab, "eastus", "/config")
    assert leader_role(patroni_lab, "westeurope") == "standby_leader"  # nothing was changed
    assert leader_role(patroni_lab, "eastus") == "leader"


def test_worker_killed_after_the_demotion_another_finishes_the_switchover(patroni_lab):
    """The worker is SIGKILLed once the promotion has demoted eastus (its configuration names westeurope) and
    before it returns: a second worker's attempt finds the demotion done and completes it; one failover, no
    rebuild, eastus following. Then back, as the module found it."""
    from activities.patroni import PatroniCluster
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget
    from tests.integration.conftest import FAST_RESTART
    from tests.integration.test_failover_lab import wait_status

    lab = patroni_lab
    first = lab.workers[-1]
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    wait_status(lab, wid, lambda r: r["current_step"] == "promote", what="the promotion")
    wait_for(lambda: "standby_cluster" in rest(lab, "eastus", "/config"), timeout=30, what="eastus demoted")
    lab.kill_worker(first)
    lab.start_worker(*FAST_RESTART)
    report = wait_end(lab, wid, timeout=180)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == []
    assert promote_attempts(lab, wid) == 2  # the kill hit the promotion: its second attempt finished it
    assert (leader_role(lab, "westeurope"), leader_role(lab, "eastus")) == ("leader", "standby_leader")
    assert answers_and(streams_from, lab.dsn("eastus"), lab.dsn("westeurope"))

    inv = load_inventory(lab.inventory)
    east, west = RegionTarget.of(inv, "eastus"), RegionTarget.of(inv, "westeurope")
    PatroniCluster(west).fence()
    assert PatroniCluster(east).promote(False, demote=west).switchover
    PatroniCluster(west).unfence()
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")


def test_a_promotion_retried_after_the_demotion_picks_up_where_it_was(patroni_lab):
    """A worker that died after demoting the old cluster: the retried promotion finds it already following (no
    second PATCH), proves the replay and promotes; retried once more, it is already the primary. Then back."""
    from activities.patroni import PatroniCluster
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget

    lab = patroni_lab
    inv = load_inventory(lab.inventory)
    east, west = RegionTarget.of(inv, "eastus"), RegionTarget.of(inv, "westeurope")
    E, W = PatroniCluster(east), PatroniCluster(west)
    E.fence()
    W._demote(E)  # the first attempt got this far
    assert leader_role(lab, "eastus") == "standby_leader" and leader_role(lab, "westeurope") == "standby_leader"
    demoted_to = E.config()["standby_cluster"]
    first = W.promote(False, demote=east)
    assert not first.already_primary and first.switchover and first.old_primary_role == "standby_leader"
    assert E.config()["standby_cluster"] == demoted_to  # found as the first attempt left it
    again = W.promote(False, demote=east)
    assert again.already_primary and again.switchover
    E.unfence()
    assert answers_and(streams_from, lab.dsn("eastus"), lab.dsn("westeurope"))
    # back as the module found it: eastus leads
    W.fence()
    assert E.promote(False, demote=west).switchover
    W.unfence()
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")


def test_emergency_with_eastus_dead_then_it_rejoins_and_fails_back(patroni_lab):
    """eastus dies (Patroni and PostgreSQL SIGKILLed): the emergency promotes westeurope alone and leaves the old
    cluster's fence to a person, saying how (its REST API is down). Done as it says (patronictl against its DCS),
    eastus comes back as a standby cluster following westeurope; the failback switches back, every row kept."""
    import subprocess

    from lab import patroni

    lab = patroni_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE emergency (id int PRIMARY KEY)")
    sql(east, "INSERT INTO emergency SELECT generate_series(1, 100)")
    wait_for(lambda: sql(west, "SELECT to_regclass('emergency') IS NOT NULL")[0][0], what="the table replicated")
    wait_for(lambda: sql(west, "SELECT count(*) FROM emergency")[0][0] == 100, what="the rows replayed")
    patroni.kill(processes(lab), "eastus")

    proc = lab.cli("failover", "--to", "westeurope", "--emergency", "--requester", "alice", "--wait", "--json")
    report = printed_report(proc)
    assert proc.returncode == 0 and report["status"] == "succeeded", explain(report)
    assert not report["switchover"] and leader_role(lab, "westeurope") == "leader"
    hint = next(r for r in report["remaining"] if "fence the old primary in eastus" in r)
    assert "patronictl" in hint and "standby_cluster" in hint
    sql(west, "INSERT INTO emergency VALUES (101)")

    # What the report asks of a person, before eastus comes back: make it a standby cluster of westeurope.
    regions = lab.state["patroni"]["regions"]
    port = regions["westeurope"]["port"]
    subprocess.run(["patronictl", "-c", regions["eastus"]["config"], "edit-config", "--force",
                    "-s", "standby_cluster.host=127.0.0.1", "-s", f"standby_cluster.port={port}",
                    "-s", "standby_cluster.create_replica_methods=[basebackup]"], check=True, capture_output=True)
    patroni.restart(processes(lab), "eastus")
    try:
        wait_for(lambda: answers_and(streams_from, east, west), timeout=90, what="eastus streaming from westeurope")
    except AssertionError as e:
        log = Path(processes(lab).state["processes"]["patroni-eastus"]["log"]).read_text(errors="replace")
        raise AssertionError(f"{e}\neastus' Patroni log:\n" + "\n".join(log.splitlines()[-40:])) from None

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=240)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")
    sql(east, "INSERT INTO emergency VALUES (102)")
    assert sql(east, "SELECT count(*) FROM emergency")[0][0] == 102
    wait_for(lambda: sql(west, "SELECT count(*) FROM emergency")[0][0] == 102, what="westeurope following eastus")


def test_drill_restores_the_shared_archive_and_removes_its_scratch_server(patroni_lab):
    """The drill's host-pitr on Patroni: the eastus leader's tar base backup (taken at `lab up`) and the WAL every
    leader archived into the one shared archive, replayed (across the earlier tests' failovers' timelines) into a
    scratch server as of the newest archived commit; its checks' rows as of that point; the server removed."""
    drill_as_of_the_newest_archived_commit(patroni_lab)


def drill_as_of_the_newest_archived_commit(lab) -> None:
    """50 rows archived (a commit after them), 30 more not: `opsflow drill` succeeds restoring eastus as of the newest
    archived commit (the 50 in, the 30 out) and leaves no scratch server (shared with the stretched layout's test)."""
    from datetime import datetime

    from lab.postgres import Cluster, archive_now
    from opsflow.inventory import load_inventory
    from tests.integration.test_host_drill_lab import processes_under

    drill = load_inventory(lab.inventory).drill
    assert drill.method == "host-pitr" and drill.host is not None
    scratch = Path(drill.host.scratch_dir)
    east = lab.dsn("eastus")
    sql(east, "INSERT INTO lab_orders (total) SELECT 1 FROM generate_series(1, 50)")
    archive_now(Cluster.from_dict(lab.state["postgres"]["eastus"]))  # those 50 restorable: a commit after them
    archived = sql(east, "SELECT count(*) FROM lab_orders")[0][0]
    sql(east, "INSERT INTO lab_orders (total) SELECT 1 FROM generate_series(1, 30)")  # after it: not restorable

    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=400)
    report = printed_report(proc)
    assert proc.returncode == 0 and report["status"] == "succeeded", explain(report)
    assert report["method"] == "host-pitr" and report["source_region"] == "eastus"
    assert datetime.fromisoformat(report["restore_point"]) == datetime.fromisoformat(report["window_latest"])
    orders = next(c for c in report["checks"] if c["name"] == "lab_orders")
    assert orders["ok"] and orders["actual"] == orders["expected"] == archived >= 250, orders
    assert sql(east, "SELECT count(*) FROM lab_orders")[0][0] == archived + 30
    assert all(c["ok"] for c in report["checks"]) and report["scratch_deleted"] is True
    assert list(scratch.iterdir()) == [] and not processes_under(scratch)  # the scratch server stopped, removed


def test_a_fence_removal_patroni_took_while_postgres_was_down_is_patched_again(patroni_lab):
    """Patroni 3.0 takes a change of the dynamic configuration that arrives while its PostgreSQL does not run for
    applied, without writing it to postgresql.conf: under load, the unfence of a demoted old primary restarting as a
    standby leader met that, and the cluster stayed read-only into the failback. Made on purpose here, on the primary
    (a standby's recovery settings would make Patroni rewrite postgresql.conf at times): Patroni paused, eastus'
    PostgreSQL stopped, its fence lifted in the configuration, PostgreSQL started again by hand on its old
    postgresql.conf. The provider's unfence finds the fence still there and PATCHes it again (spelled "off")."""
    import json

    from activities.patroni import FENCE_PARAMETER, PatroniCluster, _fence_patch
    from lab.postgres import Cluster
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget

    lab = patroni_lab
    E = PatroniCluster(RegionTarget.of(load_inventory(lab.inventory), "eastus"))
    east, pg = lab.dsn("eastus"), Cluster.from_dict(lab.state["postgres"]["eastus"])
    pg.logfile = pg.datadir.parent / "started-by-hand.log"  # a file of the server's OS user (Patroni's is root's)
    cache = pg.datadir / "patroni.dynamic.json"

    def taken() -> bool:  # what Patroni has taken of the dynamic configuration (its cache, written every loop)
        return FENCE_PARAMETER not in json.loads(cache.read_text())["postgresql"]["parameters"]

    E.fence()
    E.patch_config({"pause": True})  # Patroni leaves PostgreSQL alone (stopped, started by hand)
    try:
        wait_for(lambda: rest(lab, "eastus", "/patroni").get("pause") is True, 15, what="Patroni paused")
        pg.stop("fast")
        wait_for(lambda: rest(lab, "eastus", "/patroni")["state"] != "running", 15, what="seen stopped")
        E.patch_config(_fence_patch(False))
        wait_for(taken, 15, what="the removal taken by Patroni while PostgreSQL is down")
        pg.start()
        wait_for(lambda: rest(lab, "eastus", "/patroni")["state"] == "running", 30, what="seen running")
        # the lost change: nothing in the configuration, yet PostgreSQL is read-only
        assert FENCE_PARAMETER not in rest(lab, "eastus", "/config")["postgresql"]["parameters"]
        assert sql(east, "SHOW default_transaction_read_only") == [("on",)]
        E.unfence()
        assert sql(east, "SHOW default_transaction_read_only") == [("off",)]
    finally:
        E.patch_config({"pause": None})
    assert rest(lab, "eastus", "/config")["postgresql"]["parameters"][FENCE_PARAMETER] == "off"  # PATCHed again
    E.patch_config(_fence_patch(False))  # the default again, as the module found it
    wait_for(lambda: FENCE_PARAMETER not in rest(lab, "eastus", "/config")["postgresql"]["parameters"], 15,
             what="the configuration as the module found it")
    wait_for(lambda: answers_and(streams_from, lab.dsn("westeurope"), east), 30, what="westeurope streaming again")
    assert (leader_role(lab, "eastus"), leader_role(lab, "westeurope")) == ("leader", "standby_leader")


def test_rebuild_is_idempotent_and_refuses_a_cluster_promoted_on_its_own(patroni_lab):
    """rebuild_replica on a standby cluster already following is success without a change. A cluster that came back
    leading on its own (eastus killed, westeurope promoted, eastus restarted with nothing to tell it: Patroni
    promotes it again, on the same timeline id with another history) is refused, non-retryable, before anything is
    changed: Patroni's rewind check would take the two histories for one. Last in the module: it leaves a split."""
    from activities.patroni import PatroniCluster
    from lab import patroni
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget

    lab = patroni_lab
    inv = load_inventory(lab.inventory)
    east, west = RegionTarget.of(inv, "eastus"), RegionTarget.of(inv, "westeurope")
    assert PatroniCluster(west).rebuild_replica(east).method == "already-streaming"

    patroni.kill(processes(lab), "eastus")
    assert not PatroniCluster(west).promote(force=True).already_primary
    patroni.restart(processes(lab), "eastus")
    tli = timeline(lab.dsn("westeurope"))
    wait_for(lambda: PatroniCluster(east).status().model_dump(include={"role", "timeline"})
             == {"role": "primary", "timeline": tli}, timeout=90, what="eastus leading again on its own")
    with pytest.raises(ApplicationError) as err:
        PatroniCluster(east).rebuild_replica(west)
    assert err.value.type == "RebuildNotSupported" and err.value.non_retryable
    assert "patronictl reinit" in err.value.message
    assert "standby_cluster" not in rest(lab, "eastus", "/config")  # nothing was changed

