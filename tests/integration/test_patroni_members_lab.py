"""`opsflow lab up --database patroni --patroni-members 2`: each region's Patroni cluster has two members, as
production clusters do (eastus-1 leads, eastus-2 its replica; westeurope-1 the standby leader, westeurope-2 cascading
from it), and the inventory's SQL follows whichever member leads (`sql_target: leader`: GET /cluster's leader host
and port, with the dsn's user and database). Patroni moves eastus's leadership to eastus-2 first, so the inventory's
dsn (eastus-1's) reaches a replica: the planned failover and the failback still switch over, every member follows, no
rebuild, every row kept."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import NEEDS_PATRONI, explain, module_lab, wait_for
from tests.integration.test_failover_lab import approve, sql, wait_end

pytestmark = [
    pytest.mark.lab,
    NEEDS_PATRONI,
]


@pytest.fixture(scope="module")
def members_lab():
    with module_lab(database="patroni", patroni_members=2) as lab:
        yield lab


def roles(lab, region: str) -> dict[str, str]:
    """Patroni's view of a region's cluster: member -> role."""
    r = lab.state["patroni"]["regions"][region]
    for url in [r["rest_api"], *(m["rest_api"] for m in r["members"])]:
        try:
            return {m["name"]: m["role"] for m in httpx.get(url + "/cluster", timeout=5).json()["members"]}
        except httpx.HTTPError:
            continue
    raise AssertionError(f"no member of {region} answers")


def dsns(lab, region: str) -> dict[str, str]:
    """Each member's own dsn (the inventory names the first's)."""
    r = lab.state["patroni"]["regions"][region]
    return {f"{region}-1": r["dsn"], **{m["name"]: m["dsn"] for m in r["members"]}}


def count(dsn: str) -> int:
    try:
        return sql(dsn, "SELECT count(*) FROM members")[0][0]
    except Exception:  # noqa: BLE001 - not replayed there yet, or restarting
        return -1


def test_failover_and_failback_follow_the_leader_whichever_member_it_is(members_lab):
    lab = members_lab
    assert roles(lab, "eastus") == {"eastus-1": "leader", "eastus-2": "replica"}
    assert roles(lab, "westeurope") == {"westeurope-1": "standby_leader", "westeurope-2": "replica"}
    east, west = dsns(lab, "eastus"), dsns(lab, "westeurope")

    # Patroni moves eastus's leadership within its cluster: the inventory's dsn now reaches a replica.
    rest = lab.state["patroni"]["regions"]["eastus"]["rest_api"]
    moved = httpx.post(rest + "/switchover", json={"leader": "eastus-1", "candidate": "eastus-2"}, timeout=60)
    assert moved.status_code == 200, moved.text
    wait_for(lambda: roles(lab, "eastus") == {"eastus-1": "replica", "eastus-2": "leader"}, timeout=90,
             what="eastus-2 leading")
    wait_for(lambda: sql(east["eastus-2"], "SELECT NOT pg_is_in_recovery()")[0][0], what="eastus-2 writable")
    sql(east["eastus-2"], "CREATE TABLE members (id int PRIMARY KEY)")
    sql(east["eastus-2"], "INSERT INTO members SELECT generate_series(1, 100)")
    wait_for(lambda: all(count(d) == 100 for d in west.values()), timeout=90, what="westeurope's members replaying")

    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid, timeout=300)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == [], explain(report)
    assert roles(lab, "westeurope") == {"westeurope-1": "leader", "westeurope-2": "replica"}
    wait_for(lambda: sorted(roles(lab, "eastus").values()) == ["replica", "standby_leader"], timeout=90,
             what="eastus a standby cluster of westeurope")
    sql(west["westeurope-1"], "INSERT INTO members SELECT generate_series(101, 150)")
    wait_for(lambda: all(count(d) == 150 for d in [*east.values(), west["westeurope-2"]]), timeout=90,
             what="every other member following westeurope-1")

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=300)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"], explain(back)
    assert roles(lab, "westeurope") == {"westeurope-1": "standby_leader", "westeurope-2": "replica"}
    leader = next(m for m, role in roles(lab, "eastus").items() if role == "leader")
    sql(east[leader], "INSERT INTO members VALUES (151)")
    wait_for(lambda: all(count(d) == 151 for d in [*east.values(), *west.values()]), timeout=90,
             what="every member with every row")
