"""Issue 8 on the lab, activity side: long activities stop promptly when cancelled (through a real Temporal dev
server, the way an abort reaches them), the catch-up keeps to its control-plane budget, a failback keeps the old
primary's data and says whether it diverged, and the emergency fence is best effort.

Real parts: PostgreSQL primary + streaming replica behind the ARM emulator (HTTPS, azure-mgmt SDK), the Temporal
dev server, a worker with the production heartbeat throttle."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from activities.database import db_divergence, db_fence_control_plane, db_rebuild_replica, db_wait_caught_up
from lab.ports import free_port
from lab.postgres import Cluster, _set_port
from opsflow.contracts.db import DB_WAIT_CAUGHT_UP
from opsflow.models import CatchUpRequest, DivergenceRequest, RebuildRequest
from tests.conftest import dev_server
from tests.integration.conftest import wait_for
from tests.integration.test_azure import lab, sql  # noqa: F401 - the Azure lab fixture
from tests.integration.test_azure_restore import PG
from worker.main import HEARTBEAT_THROTTLE

pytestmark = pytest.mark.lab


@workflow.defn(name="safety-catch-up", sandboxed=False)
class CatchUpWorkflow:
    @workflow.run
    async def run(self, req: CatchUpRequest) -> None:
        await workflow.execute_activity(
            DB_WAIT_CAUGHT_UP.name,
            req,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )


def control_plane_reads(lab, since: float) -> int:
    """ARM reads of the two servers (GET flexibleServers/<name>) logged by the emulator after `since`."""
    return sum(1 for r in lab.emu.requests() if r["t"] >= since and r["method"] == "GET"
               and r["path"].split("?")[0].rstrip("/").rsplit("/", 2)[-2].lower() == "flexibleservers")


def lsn_behind(lab) -> None:
    """The replica falls behind: its replay paused, the primary writes."""
    sql(lab.primary, "create table if not exists filler (id int)")
    wait_for(lambda: sql(lab.replica, "select to_regclass('filler') is not null")[0][0], 20, what="replication")
    sql(lab.replica, "select pg_wal_replay_pause()")
    sql(lab.primary, "insert into filler select generate_series(1, 1000)")


async def test_an_abort_stops_the_catch_up_within_seconds_and_polling_keeps_to_the_budget(lab):
    lsn_behind(lab)
    req = CatchUpRequest(primary=lab.target("westeurope"), replica=lab.target("northeurope"), timeout_seconds=600,
                         control_plane_interval=3.0)
    async with await dev_server(ui=False) as env:
        queue = f"safety-{uuid.uuid4().hex[:8]}"
        with ThreadPoolExecutor(4) as executor:
            async with Worker(env.client, task_queue=queue, workflows=[CatchUpWorkflow], activities=[db_wait_caught_up],
                              activity_executor=executor, max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                              default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE):
                started = time.time()
                handle = await env.client.start_workflow(
                    CatchUpWorkflow.run, req, id=f"catch-up-{queue}", task_queue=queue
                )

                async def heartbeating() -> bool:
                    desc = await handle.describe()
                    pending = desc.raw_description.pending_activities
                    return bool(pending) and pending[0].HasField("last_heartbeat_time")

                deadline = time.monotonic() + 30
                while not await heartbeating():
                    assert time.monotonic() < deadline, "the catch-up activity never heartbeated"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(9)  # ~10 s of catch-up: what the control plane saw
                waited = time.time() - started
                reads = control_plane_reads(lab, started)
                cancelled_at = time.monotonic()
                await handle.cancel()
                while (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                    assert time.monotonic() - cancelled_at < 20, "the cancelled catch-up did not stop"
                    await asyncio.sleep(0.05)
                stop_seconds = time.monotonic() - cancelled_at
                after = time.time()
                assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    # Each of the two servers at most once per interval (+1: the first poll reads at once).
    budget = 2 * (int(waited // req.control_plane_interval) + 1)
    assert 2 <= reads <= budget, (reads, budget, waited)
    print(f"cancel -> catch-up stopped in {stop_seconds:.2f}s; {reads} control-plane reads in {waited:.1f}s")
    assert stop_seconds < 5, stop_seconds  # heartbeat throttle 2 s + one poll
    # Stopped means stopped: nothing reads ARM for it any more.
    await asyncio.sleep(req.control_plane_interval + 1)
    assert control_plane_reads(lab, after + 0.5) == 0
    sql(lab.replica, "select pg_wal_replay_resume()")


def test_catch_up_uses_one_connection_per_server_with_backoff(lab):
    lsn_behind(lab)
    req = CatchUpRequest(primary=lab.target("westeurope"), replica=lab.target("northeurope"), timeout_seconds=600,
                         control_plane_interval=10.0)

    def resume_later():
        time.sleep(6)
        sql(lab.replica, "select pg_wal_replay_resume()")

    with ThreadPoolExecutor(1) as ex:
        ex.submit(resume_later)
        before = sql(lab.primary, "select count(*) from pg_stat_activity where application_name = 'opsflow'")
        result = db_wait_caught_up(req)
    assert result.lag_bytes == 0 and result.waited_seconds >= 5
    # 0.05 s growing to 2 s: ~11 polls in 6 s, not 120; the control plane once per server (first poll only).
    assert 4 <= result.polls <= 14, result.polls
    assert result.control_plane_reads == 2, result.control_plane_reads
    assert before is not None


def test_rebuild_keeps_the_old_primary_and_reports_its_writes_after_the_split(lab):
    sql(lab.primary, "create table orders (id int primary key, note text); insert into orders values (1, 'before')")
    wait_for(lambda: sql(lab.replica, "select to_regclass('orders') is not null")[0][0]
             and sql(lab.replica, "select count(*) from orders")[0][0] == 1, 20, what="replication of the first row")
    lab.db("northeurope").promote(True)  # the emergency: the old primary keeps running and takes writes (split brain)
    sql(lab.replica, "insert into orders values (2, 'on the new primary')")
    sql(lab.primary, "insert into orders select g, 'diverged' from generate_series(100, 200) g")

    div = db_divergence(DivergenceRequest(old=lab.target("westeurope"), new=lab.target("northeurope")))
    assert div.diverged is True and div.bytes_after_split > 0, div
    assert (div.old_timeline, div.new_timeline) == (1, 2) and div.split_lsn, div

    result = db_rebuild_replica(RebuildRequest(target=lab.target("westeurope"), primary=lab.target("northeurope")))
    assert result.method == "azure-replica", result
    assert result.divergence is not None and result.divergence.diverged is True
    assert result.preserved and "on-demand backup" in result.preserved, result.preserved
    # The backup was taken through the SDK before the server was deleted, and it REALLY holds the diverged rows.
    writes = [(r["method"], r["path"].split("?")[0].split("/pg-weu")[-1]) for r in lab.emu.requests()
              if r["method"] in ("PUT", "DELETE") and f"{PG}/pg-weu" in r["path"] and r["status"] in (200, 201, 202)]
    assert [m for m, _ in writes] == ["PUT", "DELETE", "PUT"] and writes[0][1].startswith("/backups/"), writes
    backup = lab.emu.state()["servers"]["pg-weu"]["on_demand_backups"]
    (entry,) = backup.values()
    port = free_port()
    kept = Cluster(name="kept", datadir=entry["path"] + "/data", port=port, logfile=entry["path"] + "/kept.log")
    (kept.datadir / "standby.signal").unlink(missing_ok=True)
    _set_port(kept.datadir, port)
    kept.start(wait=True)
    try:
        assert sql(kept, "select count(*) from orders where note = 'diverged'")[0][0] == 101
    finally:
        kept.stop("immediate")
    assert sql(lab.primary, "select count(*) from orders where note = 'diverged'")[0][0] == 0  # rebuilt: gone there


def test_emergency_fence_is_best_effort_and_never_raises_for_an_unreachable_region(lab):
    res = db_fence_control_plane(lab.target("westeurope"))
    assert (
        res.fenced and res.method == "azure-read-only-parameter" and "default_transaction_read_only=on" in res.detail
    ), res
    assert sql(lab.primary, "show default_transaction_read_only")[0][0] == "on"

    from opsflow.inventory import AzureConnection

    dead = AzureConnection(
        arm_endpoint="https://127.0.0.1:9", credential="static-token", ca_bundle=str(lab.emu.ca_path)
    )
    t0 = time.monotonic()
    res = db_fence_control_plane(lab.target("westeurope", conn=dead))
    assert not res.fenced and "by hand" in res.detail, res
    assert time.monotonic() - t0 < 30
