"""Cloud faults (issue 8, crash and fault suite): the ARM and Kubernetes emulators answer 20 % of API requests
with 429 + Retry-After, 503 or a dropped connection; a planned failover, the failback and the restore drill each
still complete, on the real SDK clients' retries and Temporal's."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Lab, lab_root, printed_report
from tests.integration.test_crash import arm_admin
from tests.integration.test_failover_lab import sql, wait_end, wait_status
from tests.integration.test_procedures_lab import failover

pytestmark = [pytest.mark.lab, pytest.mark.crash]


@pytest.fixture
def faulty_lab(lab_home):
    import shutil

    from lab.manage import down, up

    root = lab_root()
    state = up(root, with_worker=False, quiet=True, default_ports=False, faults=0.2)
    lab = Lab(root, state)
    yield lab
    lab.stop_workers()
    down(root, quiet=True)
    shutil.rmtree(root.parent, ignore_errors=True)


def test_failover_failback_and_drill_complete_with_a_fifth_of_cloud_requests_failing(faulty_lab):
    lab = faulty_lab
    lab.start_worker()
    east = lab.dsn("eastus")
    sql(east, "CREATE TABLE journal (id int PRIMARY KEY)")
    sql(east, "INSERT INTO journal SELECT generate_series(1, 100)")

    report = failover(lab, "westeurope")
    assert report["rpo_bytes"] == 0

    wid = lab.cli_json("failback", "--to", "eastus", "--requester", "alice")["workflow_id"]
    wait_status(
        lab,
        wid,
        lambda r: (r.get("waiting_for") or "").startswith("approval"),
        timeout=300,
        what="the failback's approval",
    )
    lab.cli("approve", wid, "--as", "bob", "--reason", "faults rehearsal", check=True)
    report = wait_end(lab, wid, timeout=400)
    assert report["status"] == "succeeded", (report["failure"], report["steps"])
    assert sql(east, "SELECT pg_is_in_recovery()")[0][0] is False

    proc = lab.cli("drill", "--requester", "alice", "--wait", "--json", timeout=600)
    drill = printed_report(proc)
    assert drill["status"] == "succeeded" and drill["scratch_deleted"] is True, (drill["failure"], drill["steps"])

    injected = arm_admin(lab, "/_emulator/counts")["random_faults"]
    assert sum(injected.values()) >= 10, injected  # the faults really happened, of every kind
    assert all(n > 0 for n in injected.values()), injected
