"""Failover on the lab, for real: PostgreSQL streaming replication, the ARM emulator behind the real Azure SDK,
the Kubernetes emulator behind the real client, the Temporal dev server, the CLI as a person runs it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.integration.conftest import explain, printed_report, wait_for

pytestmark = pytest.mark.lab

TERMINAL = {"succeeded", "failed", "aborted", "refused", "planned"}


def sql(dsn: str, query: str, *args):
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as c:
        cur = c.execute(query, args or None)
        return cur.fetchall() if cur.description else None


def timeline(dsn: str) -> int:
    """The timeline the server writes WAL on now (pg_control's lags until the next checkpoint)."""
    if sql(dsn, "SELECT pg_is_in_recovery()")[0][0]:
        return sql(dsn, "SELECT received_tli FROM pg_stat_wal_receiver")[0][0]
    return int(sql(dsn, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0][0], 16)


def wait_status(lab, wid: str, pred, timeout: float = 120, what: str = "status") -> dict:
    last: list[dict] = []

    def check():
        last[:] = [lab.status(wid)]
        if pred(last[0]):
            return last[0]
        # read again when the history grows (at most 2 s later: pending activities are not in it)
        lab.wait_change(wid, 2)
        return None

    try:
        # What `opsflow status --json` prints (test_client_lab runs the command itself), read in this process.
        return wait_for(check, timeout=timeout, interval=0.01, what=what)
    except AssertionError as e:
        r = last[0] if last else {}
        steps = [(s["name"], s["outcome"], s["detail"]) for s in r.get("steps", [])]
        raise AssertionError(f"{e}; last status {r.get('status')}, failure {r.get('failure')}, steps {steps}") from None


def wait_end(
    lab, wid: str, timeout: float = 180, ended=lambda r: r["status"] in TERMINAL, what: str = "the procedure to end"
) -> dict:
    """The status a procedure ended with (`ended` holds), waited for on a long poll for its close event; if it is
    still open after `timeout`, the status says where it is."""
    closed = lab.wait_closed(wid, timeout)
    return wait_status(lab, wid, ended, timeout if closed else 1, what)


def wait_approval(lab, wid: str) -> None:
    """Until the procedure waits at its approval gate: the preflight (and its lag check) has passed.

    A test that pauses a replica's replay does it after this: the lab's archive_timeout (60 s) switches WAL
    segments, and a paused replica is then a whole segment (16 MiB) behind, above the planned-failover limit."""
    wait_status(lab, wid, lambda r: (r.get("waiting_for") or "").startswith("approval"), what="approval wait")


def approve(lab, wid: str) -> None:
    wait_approval(lab, wid)
    lab.cli("approve", wid, "--as", "bob", "--reason", "integration test", check=True)


def traffic_endpoints(lab) -> dict[str, dict]:
    """What Azure Traffic Manager reports, read through the real SDK over HTTPS."""
    from azure.mgmt.trafficmanager import TrafficManagerManagementClient

    from activities.azure.arm import arm_credential
    from opsflow.inventory import load_inventory

    inv = load_inventory(lab.inventory)
    client = TrafficManagerManagementClient(
        arm_credential(inv.azure),
        inv.traffic.subscription_id,
        base_url=inv.azure.arm_endpoint,
        connection_verify=inv.azure.ca_bundle,
    )
    profile = client.profiles.get(inv.traffic.resource_group, inv.traffic.profile)
    return {
        e.name: {"status": e.endpoint_status, "priority": e.priority, "monitor": e.endpoint_monitor_status}
        for e in profile.endpoints
    }


def deployments(lab, region: str) -> dict[str, tuple[int, int]]:
    """spec.replicas and readyReplicas as the real Kubernetes client sees them."""
    from kubernetes import client, config

    api = client.AppsV1Api(config.new_client_from_config(str(lab.root / "kubeconfig"), context=f"lab-{region}"))
    return {
        d.metadata.name: (d.spec.replicas, d.status.ready_replicas or 0)
        for d in api.list_namespaced_deployment("shop").items
    }


def test_planned_failover_moves_the_primary_for_real(lab, worker):
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    sql(east, "INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 500) g")
    dry = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice", "--dry-run")
    planned = [s["name"] for s in dry["steps"] if s["outcome"] == "planned"]

    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice", "--reason", "integration")[
        "workflow_id"
    ]
    wait_status(lab, wid, lambda r: r["status"] == "waiting", what="approval wait")
    refused = lab.cli("approve", wid, "--as", "mallory")
    assert refused.returncode == 1 and "may not approve" in refused.stderr
    self_approval = lab.cli("approve", wid, "--as", "alice")
    assert self_approval.returncode == 1 and "may not approve" in self_approval.stderr
    approve(lab, wid)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    names = [s["name"] for s in report["steps"]]
    assert names[names.index("approval"):] == planned  # the dry run's plan is the run's steps, in order

    # The database moved: rows are on the new primary, it accepts writes, the old one refuses them.
    assert sql(west, "SELECT count(*) FROM orders")[0][0] == 500
    assert sql(west, "SELECT pg_is_in_recovery()")[0][0] is False
    sql(west, "INSERT INTO orders VALUES (501, 'after')")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(east, "INSERT INTO orders VALUES (502, 'old primary')")
    assert timeline(west) == 2

    # Traffic Manager through the Azure SDK: westeurope enabled and first, eastus disabled.
    eps = traffic_endpoints(lab)
    assert eps["shop-westeurope"]["status"] == "Enabled" and eps["shop-westeurope"]["priority"] == 1
    assert eps["shop-eastus"]["status"] == "Disabled"
    # Kubernetes through the real client: westeurope scaled to the inventory's replicas and ready.
    assert deployments(lab, "westeurope") == {"web": (3, 3), "worker": (2, 2)}

    assert report["approval"]["by"] == "bob" and report["rpo_bytes"] == 0 and report["rpo_proven"] is True
    assert report["rto_seconds"] > 0 and report["lag_at_promotion_bytes"] == 0
    md = lab.cli("report", wid, "--markdown", check=True).stdout
    assert "| Promote the replica in westeurope | ok |" in md and "RPO 0 bytes" in md
    from lab.receiver import read_notifications

    texts = [n["body"]["text"] for n in read_notifications(lab.root / "receiver")]
    assert any(t.startswith("Approval needed") for t in texts) and any(
        "Failover of lab from eastus to westeurope done" in t for t in texts
    )
    assert not [e for e in report["events"] if e["action"] == "notify-failed"]
    listed = lab.cli_json("list")
    assert any(r["workflow_id"] == wid and r["status"] == "succeeded" and r["procedure"] == "failover" for r in listed)


def test_no_acknowledged_write_is_lost(lab, worker):
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE ledger (id int PRIMARY KEY, at timestamptz DEFAULT now())")
    acknowledged: list[int] = []
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        # An app holding a connection, ~200 writes a second, that reconnects to the other region when its primary
        # ends its session or refuses the write: what an app does after a switch. (The fence must end the session.)
        targets, i, n, conn = [east, west], 0, 0, None
        while not stop.wait(0.005):
            n += 1
            try:
                conn = conn or psycopg.connect(targets[i], autocommit=True, connect_timeout=2)
                conn.execute("INSERT INTO ledger (id) VALUES (%s)", (n,))
                acknowledged.append(n)
            except psycopg.Error as e:
                errors.append(type(e).__name__)
                if conn is not None:
                    conn.close()
                conn, i = None, 1 - i
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    wait_for(lambda: len(acknowledged) > 50, what="writes before the failover")
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid)
    wait_for(
        lambda: (
            sql(west, "SELECT count(*) FROM ledger WHERE id > %s", max(acknowledged[-1:] or [0]) - 1)
            and len(acknowledged) > 0
        ),
        what="writes after",
    )
    before_stop = len(acknowledged)
    wait_for(lambda: len(acknowledged) > before_stop + 20, what="writes on the new primary")
    stop.set()
    t.join(10)
    assert report["status"] == "succeeded", explain(report)
    present = {r[0] for r in sql(west, "SELECT id FROM ledger")}
    lost = [n for n in acknowledged if n not in present]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    assert errors, "the writer never saw the fence: the test did not exercise the switch"


def test_emergency_failover_with_the_old_primary_killed(lab, worker):
    from lab.postgres import Cluster

    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE t (id int)")
    sql(east, "INSERT INTO t SELECT generate_series(1, 100)")
    wait_for(lambda: sql(west, "SELECT count(*) FROM pg_class WHERE relname = 't'")[0][0] == 1, what="replication")
    Cluster.from_dict(lab.state["postgres"]["eastus"]).kill()

    proc = lab.cli(
        "failover", "--to", "westeurope", "--emergency", "--requester", "alice", "--wait", "--json", timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = printed_report(proc)
    assert report["status"] == "succeeded" and report["emergency"] is True
    names = [s["name"] for s in report["steps"]]
    assert names.index("traffic") < names.index("promote") and "drain" not in names and "approval" not in names
    assert report["rpo_bytes"] is not None and report["rpo_proven"] is False
    sql(west, "INSERT INTO t VALUES (101)")
    assert traffic_endpoints(lab)["shop-eastus"]["status"] == "Disabled"


def test_refusals_and_bad_input_change_nothing(lab, worker):
    west = lab.dsn("westeurope")
    unknown = lab.cli("failover", "--to", "mars", "--requester", "alice")
    assert unknown.returncode == 2 and "unknown region 'mars'" in unknown.stderr
    already = lab.cli("failover", "--to", "eastus", "--requester", "alice", "--wait", "--json")
    assert already.returncode == 1 and '"refused"' in already.stdout and "already the primary" in already.stdout
    missing = lab.cli("status", "opsflow-nope")
    assert missing.returncode == 2 and "no procedure with workflow id 'opsflow-nope'" in missing.stderr
    bad = lab.cli("approve", "opsflow-nope", "--as", "bob")
    assert bad.returncode == 2
    assert sql(west, "SELECT pg_is_in_recovery()")[0][0] is True and timeline(west) == 1

    dry = lab.cli("failover", "--to", "westeurope", "--requester", "alice", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert '"planned"' in dry.stdout and "promote" in dry.stdout
    assert sql(west, "SELECT pg_is_in_recovery()")[0][0] is True
    assert traffic_endpoints(lab)["shop-eastus"]["status"] == "Enabled"


def test_one_procedure_per_environment(lab, worker):
    first = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    wait_status(lab, first, lambda r: r["status"] == "waiting", what="approval wait")
    second = lab.cli("failover", "--to", "westeurope", "--requester", "bob")
    assert second.returncode == 3 and "another procedure is running" in second.stderr
    lab.cli("abort", first, "--as", "alice", "--reason", "test", check=True)
    report = wait_end(lab, first)
    assert report["status"] == "aborted"
    assert sql(lab.dsn("eastus"), "SHOW default_transaction_read_only")[0][0] == "off"


# -- switchover first (Azure virtual endpoint) ------------------------------------------------------------------

VIRTUAL_ENDPOINT = "lab-shop-ve"


def with_virtual_endpoint(lab) -> None:
    """Create a virtual endpoint on the primary's server through the real SDK (writer: the primary, reader: the
    replica) and name it in the lab's inventory, the one its worker holds (it reads it again when it changes)."""
    import yaml

    from activities.azure.arm import postgres_client
    from opsflow.inventory import load_inventory

    inv = load_inventory(lab.inventory)
    east, west = inv.region("eastus").database, inv.region("westeurope").database
    client = postgres_client(inv.azure, east.subscription_id)
    body = {"properties": {"endpointType": "ReadWrite", "members": [west.server_name]}}
    client.virtual_endpoints.begin_create(east.resource_group, east.server_name, VIRTUAL_ENDPOINT, body).result()
    raw = yaml.safe_load(open(lab.inventory))
    for region in raw["regions"].values():
        region["database"]["virtual_endpoint"] = VIRTUAL_ENDPOINT
    Path(lab.inventory).write_text(yaml.safe_dump(raw))


def streams_from(dsn: str, primary_dsn: str) -> bool:
    """A standby whose WAL receiver streams from the server at primary_dsn (its port)."""
    port = int(sql(primary_dsn, "SELECT current_setting('port')")[0][0])
    rows = sql(dsn, "SELECT status, sender_port FROM pg_stat_wal_receiver")
    return sql(dsn, "SELECT pg_is_in_recovery()")[0][0] and bool(rows) and rows[0] == ("streaming", port)


@pytest.fixture
def ve_lab(lab_home):
    """`opsflow lab up --virtual-endpoint`: the Azure lab whose servers share a virtual endpoint, named in its
    inventory; with a worker."""
    from lab.manage import up
    from tests.integration.conftest import Lab, lab_root, take_down

    root = lab_root()
    lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, virtual_endpoint=True))
    lab.start_worker()
    yield lab
    lab.stop_workers()
    take_down(root)


def autoscaler(lab, region: str, name: str = "web") -> tuple[int, int, bool]:
    """An HPA's minReplicas and maxReplicas, and whether it keeps values from before a failover (read as kubectl)."""
    from kubernetes import client, config

    from activities.kubernetes import AUTOSCALER_BEFORE

    api = client.AutoscalingV2Api(config.new_client_from_config(str(lab.root / "kubeconfig"), context=f"lab-{region}"))
    h = api.read_namespaced_horizontal_pod_autoscaler(name, "shop")
    return h.spec.min_replicas, h.spec.max_replicas, AUTOSCALER_BEFORE in (h.metadata.annotations or {})


def test_switchover_failover_and_failback_without_a_rebuild(ve_lab):
    """On `opsflow lab up --virtual-endpoint` the planned failover switches over (the old primary streams from the
    new one, no other command), and the failback is the same move the other way: no rebuild, every row kept.
    The lab's clusters run an HPA on web (eastus min 3 max 10, westeurope min 1 max 2): the failover raises
    westeurope's to the inventory's 3 replicas and lowers eastus's; the failback restores both."""
    from opsflow.inventory import load_inventory

    lab = ve_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    assert {r.database.virtual_endpoint for r in load_inventory(lab.inventory).regions.values()} == {"lab-shop"}
    sql(east, "CREATE TABLE journal (id int PRIMARY KEY, phase text)")
    sql(east, "INSERT INTO journal SELECT g, 'before' FROM generate_series(1, 100) g")

    hpas_before = {r: autoscaler(lab, r) for r in ("eastus", "westeurope")}
    assert hpas_before == {"eastus": (3, 10, False), "westeurope": (1, 2, False)}
    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == []
    # the HPAs follow: westeurope's floor is the inventory's replicas (its max 2 would have scaled web back)
    assert autoscaler(lab, "westeurope") == (3, 3, True) and autoscaler(lab, "eastus") == (1, 10, True)
    assert [(a["region"], a["min_before"], a["max_before"], a["min_after"], a["max_after"], a["action"])
            for a in report["autoscalers"]] == [("westeurope", 1, 2, 3, 3, "raised"),
                                                ("eastus", 3, 10, 1, 10, "lowered")]
    assert deployments(lab, "westeurope")["web"] == (3, 3)
    assert streams_from(east, west)  # eastus is westeurope's replica, at once
    assert sql(east, "SHOW default_transaction_read_only")[0][0] == "off"  # the fence did not follow it
    names = [s["name"] for s in report["steps"]]
    assert names.index("maintenance") < names.index("drain") < names.index("fence") < names.index("promote")
    assert "old-replica" in names
    back = fail_back_by_switchover(lab, east, west)
    assert {r: autoscaler(lab, r) for r in ("eastus", "westeurope")} == hpas_before  # restored, nothing kept
    assert {(a["region"], a["action"]) for a in back["failover"]["autoscalers"]} == {
        ("eastus", "restored"), ("westeurope", "restored")}
    assert sql(east, "SELECT pg_is_in_recovery()")[0][0] is False
    follows_eastus_again(east, west)
    from lab.postgres import Cluster

    for region in ("eastus", "westeurope"):  # no data directory was moved aside or rebuilt
        datadir = Cluster.from_dict(lab.state["postgres"][region]).datadir
        assert not list(datadir.parent.glob(f"{datadir.name}.diverged-*"))


def test_emergency_switchover_with_the_old_primary_killed_then_failback(ve_lab):
    """Emergency on `--virtual-endpoint`: Switchover/Forced with eastus killed; Azure (the emulator) makes the old
    primary a replica of the new one (pg_rewind), unfenced; the failback switches back without a rebuild."""

    from lab.postgres import Cluster

    lab = ve_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    sql(east, "CREATE TABLE t (id int)")
    sql(east, "INSERT INTO t SELECT generate_series(1, 100)")
    wait_for(lambda: sql(west, "SELECT count(*) FROM pg_class WHERE relname = 't'")[0][0] == 1, what="replication")
    wait_for(lambda: sql(west, "SELECT count(*) FROM t")[0][0] == 100, what="replayed")
    Cluster.from_dict(lab.state["postgres"]["eastus"]).kill()

    proc = lab.cli("failover", "--to", "westeurope", "--emergency", "--requester", "alice", "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = printed_report(proc)
    assert report["status"] == "succeeded" and report["switchover"], explain(report)
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["fence-old"]["outcome"] == "skipped"
    sql(west, "INSERT INTO t VALUES (101)")
    wait_for(lambda: streams_from(east, west), what="eastus streaming from westeurope after the forced switchover")

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=240)
    assert back["status"] == "succeeded", explain(back)
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    # the emergency raised westeurope's HPA and left eastus's (its deployments went to zero); the failback restores
    assert {r: autoscaler(lab, r) for r in ("eastus", "westeurope")} == {"eastus": (3, 10, False),
                                                                         "westeurope": (1, 2, False)}
    assert {(a["region"], a["action"]) for a in back["failover"]["autoscalers"]} == {
        ("eastus", "unchanged"), ("westeurope", "restored")}
    sql(east, "INSERT INTO t VALUES (102)")  # writable: no fence followed it back
    assert sql(east, "SELECT count(*) FROM t")[0][0] == 102


@pytest.fixture
def sm_lab(lab_home):
    """`opsflow lab up --database self-managed`: the clusters as provider postgres whose hosts the worker reaches;
    with a worker."""
    from lab.manage import up
    from tests.integration.conftest import Lab, lab_root, take_down

    root = lab_root()
    lab = Lab(root, up(root, with_worker=False, quiet=True, default_ports=False, database="self-managed"))
    lab.start_worker()
    yield lab
    lab.stop_workers()
    take_down(root)


def test_self_managed_switchover_and_failback_without_a_rebuild(sm_lab):
    """On `opsflow lab up --database self-managed` the planned failover shuts eastus down cleanly, proves westeurope
    replayed its shutdown checkpoint, promotes, and starts eastus as westeurope's standby (no other command); the
    failback is the same move the other way: no rebuild, every row kept, the same data directories."""
    from lab.postgres import Cluster
    from opsflow.inventory import load_inventory

    lab = sm_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    assert {r.database.provider for r in load_inventory(lab.inventory).regions.values()} == {"postgres"}
    sql(east, "CREATE TABLE journal (id int PRIMARY KEY, phase text)")
    sql(east, "INSERT INTO journal SELECT g, 'before' FROM generate_series(1, 100) g")

    wid = lab.cli_json("failover", "--to", "westeurope", "--requester", "alice")["workflow_id"]
    approve(lab, wid)
    report = wait_end(lab, wid)
    assert report["status"] == "succeeded", explain(report)
    assert report["switchover"] and report["old_primary_replica"] and report["remaining"] == []
    assert report["drain_ended"] == "sessions idle" and report["drain_seconds"] < 3  # not the lab's 3 s drain
    assert "past the shutdown checkpoint" in report["switchover_detail"]
    assert streams_from(east, west)  # eastus is westeurope's standby, at once
    assert sql(east, "SHOW default_transaction_read_only")[0][0] == "off"  # the fence did not follow it
    names = [s["name"] for s in report["steps"]]
    assert names.index("fence") < names.index("catch-up") < names.index("shut-down") < names.index("promote")
    assert names.index("promote") < names.index("old-replica")
    fail_back_by_switchover(lab, east, west)
    assert sql(east, "SELECT pg_is_in_recovery()")[0][0] is False
    assert sql(east, "SELECT count(*) FROM journal")[0][0] == 200  # every row kept
    follows_eastus_again(east, west)
    for region in ("eastus", "westeurope"):  # no data directory was moved aside or rebuilt
        datadir = Cluster.from_dict(lab.state["postgres"][region]).datadir
        assert not list(datadir.parent.glob(f"{datadir.name}.diverged-*"))


def test_lab_demo_on_self_managed_postgres_leaves_eastus_streaming_from_westeurope(sm_lab):
    """`opsflow lab demo --database self-managed`, as the README says: on this lab (the demo's `lab up` finds it up)
    the planned failover with approval, then what the old primary does now and the failback's command; a demo asking
    for another flavour is refused, naming both and `opsflow lab down`."""
    lab = sm_lab
    east, west = lab.dsn("eastus"), lab.dsn("westeurope")
    other = lab.cli("lab", "demo", "--database", "patroni", "--no-worker", "--dir", str(lab.root))
    assert other.returncode == 2 and "runs with --database self-managed, not patroni" in other.stderr
    assert "opsflow lab down" in other.stderr

    demo = lab.cli("lab", "demo", "--database", "self-managed", "--no-worker", "--dir", str(lab.root), timeout=300)
    assert demo.returncode == 0, f"stdout:\n{demo.stdout}\nstderr:\n{demo.stderr}"
    assert "planned failover eastus -> westeurope started" in demo.stdout
    assert "the demo approves as bob" in demo.stdout
    assert "old primary: eastus was shut down cleanly and started as a standby of westeurope" in demo.stdout
    assert "past the shutdown checkpoint" in demo.stdout
    assert "fail back:   opsflow failback --to eastus --requester alice" in demo.stdout
    assert streams_from(east, west)
    assert sql(west, "SELECT pg_is_in_recovery()")[0][0] is False


def fail_back_by_switchover(lab, east: str, west: str) -> dict:
    """After a switchover eastus -> westeurope: rows 101-200 written on westeurope reach eastus (its replica now),
    then the failback switches back, with no rebuild and no restandby. The failback's report."""
    sql(west, "INSERT INTO journal SELECT g, 'on westeurope' FROM generate_series(101, 200) g")
    wait_for(lambda: sql(east, "SELECT count(*) FROM journal")[0][0] == 200, what="eastus replaying westeurope")

    fid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice", "--reason", "switch back")["workflow_id"]
    approve(lab, fid)
    back = wait_end(lab, fid, timeout=240)
    assert back["status"] == "succeeded", explain(back)
    steps = {s["name"]: s for s in back["steps"]}
    assert steps["rebuild"]["outcome"] == "skipped" and steps["restandby"]["outcome"] == "skipped"
    assert back["rebuild_method"] == "none (streaming)" and back["failover"]["switchover"]
    return back


def follows_eastus_again(east: str, west: str) -> None:
    """After the failback: a row written on eastus reaches westeurope, which streams from it again."""
    sql(east, "INSERT INTO journal VALUES (201, 'after failback')")
    wait_for(lambda: streams_from(west, east), what="westeurope streaming from eastus")
    wait_for(lambda: sql(west, "SELECT count(*) FROM journal")[0][0] == 201, what="westeurope replaying eastus")
