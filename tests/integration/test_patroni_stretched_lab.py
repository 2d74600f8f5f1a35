"""`opsflow lab up --database patroni --patroni-layout stretched`: ONE real Patroni cluster (Debian's 3.0) whose
members are the regions (eastus-1 leads, westeurope-1 streams; one etcd). A planned failover is Patroni's own
switchover (POST /switchover): the old leader follows the new one, no rebuild; the failback is the same call back.
Bad input (a candidate that is not a member, that lags, that does not run) is refused before anything changes. One
lab for the module: each test leaves eastus-1 the leader."""

from __future__ import annotations

import os

import httpx
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
def stretched_lab():
    with module_lab(database="patroni", patroni_layout="stretched") as lab:
        yield lab


def members(lab) -> dict[str, tuple[str, str]]:
    """Patroni's view of the one cluster: member -> (role, state), from the first member that answers."""
    for r in ("eastus", "westeurope"):
        try:
            cluster = httpx.get(lab.state["patroni"]["regions"][r]["rest_api"] + "/cluster", timeout=5).json()
        except httpx.HTTPError:
            continue
        return {m["name"]: (m["role"], m.get("state")) for m in cluster["members"]}
    raise AssertionError("no member's REST API answers")


def leader(lab) -> str:
    return next(n for n, (role, _) in members(lab).items() if role in ("leader", "master"))


def targets(lab):
    from opsflow.inventory import load_inventory
    from opsflow.models import RegionTarget

    inv = load_inventory(lab.inventory)
    return RegionTarget.of(inv, "eastus"), RegionTarget.of(inv, "westeurope")


def datadir_id(lab, region: str) -> tuple[int, int]:
    """The data directory's inode and device: a rebuild (Patroni's reinit, a new base backup) replaces it."""
    st = os.stat(lab.state["postgres"][region]["datadir"])
    return st.st_ino, st.st_dev


def test_failover_and_failback_are_patronis_own_switchovers(stretched_lab):
    """The planned failover asks Patroni to switch over from eastus-1 to westeurope-1 (after the fence and the
    catch-up); eastus-1 then streams from westeurope-1 with its data directory as it was; the failback switches
    back; every row kept, one timeline per switchover, one cluster all along."""
    lab = stretched_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    assert leader(lab) == "eastus-1" and members(lab)["westeurope-1"][0] == "replica"
    dirs = {r: datadir_id(lab, r) for r in ("eastus", "westeurope")}
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
    assert leader(lab) == "westeurope-1" and members(lab)["eastus-1"][0] == "replica"
    # the cluster-wide fence was lifted by the promotion: nothing left in the dynamic configuration
    rest = lab.state["patroni"]["regions"]["westeurope"]["rest_api"]
    assert "default_transaction_read_only" not in httpx.get(rest + "/config", timeout=5).json()["postgresql"].get(
        "parameters", {})
    assert streams_from(east, west) and timeline(east) == timeline(west) == start_tli + 1

    fail_back_by_switchover(lab, east, west)
    assert leader(lab) == "eastus-1"
    follows_eastus_again(east, west)
    assert sql(east, "SELECT count(*), count(DISTINCT phase) FROM journal")[0] == (201, 3)
    assert timeline(east) == start_tli + 2  # two switchovers
    assert {r: datadir_id(lab, r) for r in ("eastus", "westeurope")} == dirs  # no rebuild: the same directories


def test_bad_candidates_are_refused_before_anything_changes(stretched_lab):
    """Through the activity (db.promote) as the failover calls it: a member name the cluster does not have, a
    candidate that lags the leader: each a non-retryable error naming what is wrong; eastus-1 still leads, unfenced,
    and westeurope-1 streams again. (A candidate whose WAL receiver is gone could not be staged reliably: under load
    a paused Patroni's replica was seen streaming again before the check, and the switchover went ahead.)"""
    from activities.database import db_promote
    from opsflow.models import PromoteRequest

    lab = stretched_lab
    east, west = targets(lab)

    def refused(target, kind: str) -> str:
        with pytest.raises(ApplicationError) as err:
            db_promote(PromoteRequest(target=target, demote=east))
        assert err.value.type == kind and err.value.non_retryable, err.value
        assert leader(lab) == "eastus-1" and members(lab)["westeurope-1"][0] == "replica"  # nothing changed
        return err.value.message

    wrong = west.model_copy(update={"database": west.database.model_copy(update={"member": "westeurope-9"})})
    assert "'westeurope-9' is not a member of Patroni cluster 'lab-stretched'" in refused(wrong, "PatroniMemberUnknown")

    # Patroni paused (its maintenance mode): else it resumes a paused replay (PostgreSQL 14+) within a second.
    rest = lab.state["patroni"]["regions"]["westeurope"]["rest_api"]
    assert httpx.patch(rest + "/config", json={"pause": True}, timeout=5).status_code == 200
    try:
        wait_for(lambda: httpx.get(rest + "/patroni", timeout=5).json().get("pause") is True, timeout=30,
                 what="westeurope-1's Patroni paused")
        # lagging: westeurope-1's replay paused, rows written after
        sql(lab.dsn("westeurope"), "SELECT pg_wal_replay_pause()")
        try:
            sql(lab.dsn("eastus"), "CREATE TABLE IF NOT EXISTS lagging (id int)")
            sql(lab.dsn("eastus"), "INSERT INTO lagging SELECT generate_series(1, 1000)")
            assert "bytes behind the leader's" in refused(west, "PatroniCandidateLagging")
        finally:
            sql(lab.dsn("westeurope"), "SELECT pg_wal_replay_resume()")
    finally:
        assert httpx.patch(rest + "/config", json={"pause": False}, timeout=5).status_code == 200
    wait_for(lambda: streams_from(lab.dsn("westeurope"), lab.dsn("eastus")), timeout=60,
             what="westeurope-1 streaming again")
    wait_for(lambda: sql(lab.dsn("westeurope"), "SELECT count(*) FROM lagging")[0][0] == 1000,
             what="westeurope-1 replayed the rows")
    assert sql(lab.dsn("eastus"), "SHOW default_transaction_read_only") == [("off",)]


def test_emergency_with_eastus_dead_then_it_rejoins_and_fails_back(stretched_lab):
    """eastus dies (its Patroni and PostgreSQL SIGKILLed): the emergency makes westeurope-1 the leader (POST
    /failover, or Patroni did already); `fence-old` sets nothing (a fence in the one cluster's configuration would
    reach the new leader): the leader lock keeps eastus-1 a replica. Restarted, it rejoins as westeurope-1's replica
    on its own, and the failback switches back: every row kept."""

    from lab import patroni
    from lab.processes import Lab as Processes

    lab = stretched_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE emergency (id int PRIMARY KEY)")
    sql(east, "INSERT INTO emergency SELECT generate_series(1, 100)")
    wait_for(lambda: sql(west, "SELECT to_regclass('emergency') IS NOT NULL")[0][0], what="the table replicated")
    wait_for(lambda: sql(west, "SELECT count(*) FROM emergency")[0][0] == 100, what="the rows replayed")
    patroni.kill(Processes(lab.root), "eastus")

    proc = lab.cli("failover", "--to", "westeurope", "--emergency", "--requester", "alice", "--wait", "--json")
    report = printed_report(proc)
    assert proc.returncode == 0 and report["status"] == "succeeded", explain(report)
    assert not report["switchover"] and leader(lab) == "westeurope-1"
    fence = next(s for s in report["steps"] if s["name"] == "fence-old")
    assert fence["outcome"] == "ok" and "leader lock" in fence["detail"], fence
    assert not [r for r in report["remaining"] if "eastus" in r and "fence" in r], report["remaining"]
    sql(west, "INSERT INTO emergency VALUES (101)")

    patroni.restart(Processes(lab.root), "eastus")
    wait_for(lambda: answers(streams_from, east, west), timeout=90, what="eastus-1 rejoining as westeurope-1's replica")
    assert members(lab)["eastus-1"][0] == "replica"

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=240)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    assert leader(lab) == "eastus-1"
    sql(east, "INSERT INTO emergency VALUES (102)")
    assert sql(east, "SELECT count(*) FROM emergency")[0][0] == 102
    wait_for(lambda: answers(streams_from, west, east) and sql(west, "SELECT count(*) FROM emergency")[0][0] == 102,
             timeout=60, what="westeurope-1 following eastus-1")



def test_drill_restores_the_shared_archive_and_removes_its_scratch_server(stretched_lab):
    """The drill's host-pitr on the stretched cluster: the same as on the per-region layout (both members archive
    into the one shared archive; the earlier tests' switchovers and failover are timelines the replay follows)."""
    from tests.integration.test_patroni_lab import drill_as_of_the_newest_archived_commit

    drill_as_of_the_newest_archived_commit(stretched_lab)


def test_lab_demo_on_the_stretched_cluster_leaves_eastus_a_replica_of_westeurope(stretched_lab):
    """`opsflow lab demo --database patroni --patroni-layout stretched`, as the README says: on this lab (the demo's
    `lab up` finds it up) the planned failover with approval, and how the old leader follows; a demo asking for the
    other layout is refused, naming both. Last in the module: it leaves westeurope-1 the leader."""
    lab = stretched_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    other = lab.cli("lab", "demo", "--database", "patroni", "--no-worker", "--dir", str(lab.root))
    assert other.returncode == 2, other.stderr
    assert ("runs with --database patroni --patroni-layout stretched, not patroni --patroni-layout per-region"
            in other.stderr) and "opsflow lab down" in other.stderr

    demo = lab.cli("lab", "demo", "--database", "patroni", "--patroni-layout", "stretched", "--no-worker",
                   "--dir", str(lab.root), timeout=300)
    assert demo.returncode == 0, f"stdout:\n{demo.stdout}\nstderr:\n{demo.stderr}"
    assert "planned failover eastus -> westeurope started" in demo.stdout
    assert "old primary: eastus's member is now a replica in the same Patroni cluster" in demo.stdout
    assert "fail back:   opsflow failback --to eastus --requester alice" in demo.stdout
    assert leader(lab) == "westeurope-1"
    wait_for(lambda: answers(streams_from, east, west), timeout=60, what="eastus-1 following westeurope-1")

def answers(check, *args) -> bool:
    """check(*args), False while the server does not accept connections yet (Patroni is starting it)."""
    import psycopg

    try:
        return check(*args)
    except psycopg.OperationalError:
        return False
