"""Self-managed switchover (provider "postgres" whose host the inventory reaches) and the drain that ends when the
sessions are idle, on the time-skipping server: the old primary is shut down cleanly, the replica must replay its
shutdown checkpoint before the promotion, the old primary then follows the new one; not proven, the failover goes on
standalone and says so; the failback after it switches back without a rebuild."""

from __future__ import annotations

from opsflow.client import send_update
from opsflow.contracts.db import DB_FOLLOW, DB_PROMOTE, DB_SHUT_DOWN, DB_START
from opsflow.models import FailoverReport
from tests.workflow.test_failover_switchover import approved, switched_back
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting
from workflows.procedure import Procedure, Request


def DATABASES(region: str) -> dict:  # noqa: N802 - the inventory fixture's (tests/workflow/conftest.py)
    """Both regions self-managed, each host reached over ssh."""
    return {"host": {"run": ["ssh", "-o", "BatchMode=yes", f"postgres@db-{region}"],
                     "data_dir": "/var/lib/postgresql/15/main"}}


async def test_planned_failover_shuts_down_proves_promotes_and_the_old_primary_follows(running, world, inventory):
    report = await approved(running, inventory)
    assert report.status == "succeeded" and report.switchover and report.old_primary_replica
    assert report.remaining == [] and "replayed past the shutdown checkpoint" in report.switchover_detail
    names = [s.name for s in report.steps]
    order = ["drain", "fence", "catch-up", "shut-down", "promote", "traffic", "scale-up", "old-replica", "notify"]
    assert [n for n in names if n in order] == order
    assert world.calls.index(DB_SHUT_DOWN.name) < world.calls.index(DB_PROMOTE.name) < world.calls.index(DB_FOLLOW.name)
    assert world.stopped == set() and "eastus" not in world.fenced  # running again, as a standby, unfenced
    assert world.status_of("eastus").role == "replica" and world.rebuilds == []
    steps = {s.name: s for s in report.steps}
    assert steps["old-replica"].outcome == "ok" and steps["old-replica"].detail == "replica, streaming"
    assert any("the old primary is now a replica" in text for _, text, _ in world.notifications)


async def test_not_proven_falls_back_to_the_standalone_path_and_says_so(running, world, inventory):
    world.proof = "eastus was not shut down cleanly (pg_controldata: 'in production')"
    report = await approved(running, inventory)
    assert report.status == "succeeded" and not report.switchover and report.old_primary_replica is None
    assert report.switchover_detail.startswith("not proven, standalone promotion: eastus was not shut down cleanly")
    steps = {s.name: s for s in report.steps}
    assert steps["shut-down"].outcome == "ok" and steps["shut-down"].detail.startswith("switchover not proven: ")
    assert "the failback rebuilds" in steps["shut-down"].detail
    assert steps["old-replica"].outcome == "skipped" and "stays a fenced primary" in steps["old-replica"].detail
    assert DB_FOLLOW.name not in world.calls and "eastus" in world.fenced and world.primary == "westeurope"
    assert report.rpo_bytes == 0 and report.rpo_proven  # the catch-up before the shutdown still proves it


async def test_undo_after_the_shutdown_starts_it_again_before_lifting_the_fence(running, world, inventory):
    world.fail[DB_PROMOTE.name] = "pg_promote refused"
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    report = await failed_report(handle)
    assert report.status == "failed" and "verifiably still a replica, so the failover was undone" in report.failure
    assert world.unchanged  # started again, unfenced, maintenance off
    undone = [s.title for s in report.steps if s.outcome == "compensated"]
    assert undone[0] == "Start eastus again (the primary, fenced)" and undone[1].startswith("Lift the write fence")
    assert DB_START.name in world.calls


async def test_failback_after_it_is_a_switchover_back_without_a_rebuild(running, world, inventory):
    report = await switched_back(running, inventory)
    assert report.status == "succeeded" and world.primary == "eastus" and world.rebuilds == []
    steps = {s.name: s for s in report.steps}
    assert steps["rebuild"].outcome == "skipped" and steps["restandby"].outcome == "skipped"
    assert report.failover.switchover and report.failover.old_primary_replica
    assert world.calls.count(DB_SHUT_DOWN.name) == 2 and world.calls.count(DB_FOLLOW.name) == 2
    assert world.status_of("westeurope").role == "replica" and "westeurope" not in world.fenced


async def test_without_host_access_the_failover_is_standalone_as_before(running, world, inventory):
    regions = {name: r.model_copy(update={"database": r.database.model_copy(update={"host": None})})
               for name, r in inventory.regions.items()}
    inventory = inventory.model_copy(update={"regions": regions})
    report = await approved(running, inventory)
    assert report.status == "succeeded" and not report.switchover and report.switchover_detail is None
    names = [s.name for s in report.steps]
    assert "shut-down" not in names and "old-replica" not in names and DB_SHUT_DOWN.name not in world.calls


async def test_dry_run_plans_the_shutdown_and_the_follow(running, world, inventory):
    report = FailoverReport.model_validate(await (await start(running, inventory, dry_run=True)).result())
    plan = {s.name: s for s in report.steps}
    assert plan["shut-down"].outcome == "planned" and "shutdown checkpoint" in plan["shut-down"].detail
    assert plan["old-replica"].outcome == "planned" and "no pg_rewind, no base backup" in plan["old-replica"].detail
    assert "sessions are idle" in plan["drain"].detail and world.calls.count(DB_SHUT_DOWN.name) == 0


async def test_the_drain_reports_the_limit_and_the_sessions_the_fence_ends(running, world, inventory):
    world.busy_sessions = 3
    report = await approved(running, inventory)
    assert report.status == "succeeded"
    assert report.drain_ended == "drain limit reached, 3 session(s) ended by the fence"
    assert report.drain_seconds == 60
    drain = next(s for s in report.steps if s.name == "drain")
    assert drain.kind == "wait" and drain.detail.startswith("drain limit reached, 3 session(s)")
