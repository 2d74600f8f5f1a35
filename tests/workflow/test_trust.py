"""The worker holds the rules (issue 18): each attack, as someone with only the CLI's client and a raw Temporal
client would make it, is refused with nothing changed in the world; a Temporal cancel never leaves it half-moved."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone

import pytest
from temporalio.client import WorkflowUpdateFailedError

from opsflow.client import send_update, start_procedure
from opsflow.contracts.db import DB_PROMOTE
from opsflow.contracts.k8s import K8S_SCALE_UP
from opsflow.contracts.traffic import TRAFFIC_SWITCH
from opsflow.inventory import Inventory
from opsflow.models import Decision, FailoverReport
from opsflow.rules import START_UNSIGNED, input_digest
from opsflow.signing import Signer, start_memo
from tests.helpers import ssh_key_pair
from tests.workflow.conftest import inventory_dict, queue_workers, worker_holds
from tests.workflow.test_failover_workflow import failed_report, start, until_waiting, update_names_in_history
from workflows.failover import FailoverInput
from workflows.procedure import Procedure, Request


@pytest.fixture
def inventory() -> Inventory:
    # A 1 s drain: these tests wait in real time for a step to be in flight (the test server skips time only
    # while a result is awaited).
    return Inventory.model_validate(inventory_dict(failover={"drain": "1s", "max_planned_lag_bytes": 1024 * 1024}))


async def test_an_edited_local_inventory_is_refused_naming_what_differs(running, world, inventory):
    """mallory copies the inventory, adds herself as approver and operator, and starts with the ordinary client."""
    worker_holds(inventory)
    mine = Inventory.model_validate(
        {
            **inventory.model_dump(mode="json"),
            "approval": {**inventory.approval.model_dump(mode="json"), "approvers": ["mallory"]},
            "operators": {"failover": ["mallory"]},
        }
    )
    inp = FailoverInput(inventory=mine, to_region="westeurope", requester="mallory")
    report = await failed_report(await start_procedure(running.client, mine, "failover", inp, "mallory's failover"))
    assert report.status == "refused"
    assert "differs from the worker's" in report.failure and "approval.approvers, operators.failover" in report.failure
    assert world.unchanged and world.calls == []  # not even a read of the database


async def test_a_raw_start_runs_by_the_worker_rules_and_refuses_a_stranger(running, world, inventory):
    """A raw start that carries no inventory (so no digest to compare) still runs by the worker's rules: a name
    that is in no real inventory cannot approve."""
    worker_holds(inventory)
    wid = f"opsflow-{inventory.environment}"
    raw = FailoverInput(environment=inventory.environment, to_region="westeurope", requester="mallory")
    handle = await running.client.start_workflow("failover", raw, id=wid, task_queue=inventory.task_queue)
    await until_waiting(handle)
    with pytest.raises(WorkflowUpdateFailedError) as exc:
        await send_update(handle, Procedure.approve, Request(by="mallory-friend"))
    assert "may not approve" in str(exc.value.cause) and "alice, bob" in str(exc.value.cause)
    assert await update_names_in_history(handle) == [] and world.unchanged
    await send_update(handle, Procedure.abort, Request(by="alice"))
    assert (await failed_report(handle)).status == "aborted"


async def test_a_raw_start_with_doctored_rules_or_a_ready_made_approval_is_refused(running, world, inventory):
    worker_holds(inventory)
    wid = f"opsflow-{inventory.environment}"
    doctored = Inventory.model_validate(
        inventory_dict(
            environment=inventory.environment,
            approval={"approvers": ["mallory", "eve"], "require_distinct_approver": False},
        )
    )
    inp = FailoverInput(inventory=doctored, to_region="westeurope", requester="mallory")
    report = await failed_report(
        await running.client.start_workflow("failover", inp, id=wid, task_queue=inventory.task_queue)
    )
    assert report.status == "refused" and "approval.approvers" in report.failure

    approved = Decision(approved=True, by="bob", at=datetime.now(timezone.utc), gate="approval", reason="trust me")
    inp = FailoverInput(
        environment=inventory.environment, to_region="westeurope", requester="mallory", approval=approved
    )
    report = await failed_report(
        await running.client.start_workflow("failover", inp, id=wid, task_queue=inventory.task_queue)
    )
    assert report.status == "refused" and "honoured only from a failback" in report.failure
    assert world.unchanged


async def test_a_start_under_another_id_dodges_no_lock(running, world, inventory):
    worker_holds(inventory)
    inp = FailoverInput(environment=inventory.environment, to_region="westeurope", requester="alice")
    report = await failed_report(
        await running.client.start_workflow("failover", inp, id="side-door", task_queue=inventory.task_queue)
    )
    assert report.status == "refused" and f"runs as opsflow-{inventory.environment}" in report.failure
    assert world.unchanged


@pytest.fixture
def signed_inventory(tmp_path) -> tuple[Inventory, dict[str, str]]:
    paths, keys = {}, {}
    for name in ("alice", "bob", "mallory"):
        paths[name], keys[name] = ssh_key_pair(tmp_path, name)
    inv = Inventory.model_validate(
        inventory_dict(
            failover={"drain": "1s", "max_planned_lag_bytes": 1024 * 1024},
            approval={
                "approvers": [{"name": "bob", "ssh_key": keys["bob"]}],
                "require_signed": True,
                "require_distinct_approver": True,
                "timeout": "1h",
                "escalation_channel": "oncall",
            },
            operators={"failover": [{"name": "alice", "ssh_key": keys["alice"]}]},
        )
    )
    worker_holds(inv)
    return inv, paths


async def test_a_start_signature_made_for_a_dry_run_starts_nothing_real(dev_env, world, signed_inventory):
    env = dev_env  # the start's nonce is looked up in visibility, which the time-skipping server lacks
    inv, paths = signed_inventory
    async with running_worker(env, world, inv):
        alice = Signer(name="alice", key_path=paths["alice"])
        dry = FailoverInput(inventory=inv, to_region="westeurope", requester="alice", dry_run=True).without_rules(inv)
        memo = start_memo(
            alice.sign_start(
                environment=inv.environment,
                procedure="failover",
                input_sha256=input_digest(dry, START_UNSIGNED),
                nonce="n1",
            )
        )
        real = dry.model_copy(update={"dry_run": False})
        handle = await env.client.start_workflow(
            "failover", real, id=f"opsflow-{inv.environment}", task_queue=inv.task_queue, memo=memo
        )
        report = await failed_report(handle)
        assert (
            report.status == "refused" and "does not match this start" in report.failure and "dry run" in report.failure
        )
        # The same signed start used twice: the nonce was spent by the first run (a refused run spends it too).
        memo = start_memo(
            alice.sign_start(
                environment=inv.environment,
                procedure="failover",
                input_sha256=input_digest(dry, START_UNSIGNED),
                nonce="n2",
            )
        )
        first = await env.client.start_workflow(
            "failover", dry, id=f"opsflow-{inv.environment}", task_queue=inv.task_queue, memo=memo
        )
        assert FailoverReport.model_validate(await first.result()).status == "planned"
        again = await env.client.start_workflow(
            "failover", dry, id=f"opsflow-{inv.environment}", task_queue=inv.task_queue, memo=memo
        )
        report = await failed_report(again)
        assert report.status == "refused" and "replayed start signature" in report.failure
        # mallory signs her own start with her own key: not an operator of the worker's rules.
        mallory = Signer(name="mallory", key_path=paths["mallory"])
        inp = FailoverInput(inventory=inv, to_region="westeurope", requester="mallory")
        report = await failed_report(await start_procedure(env.client, inv, "failover", inp, "x", signer=mallory))
        assert report.status == "refused" and "'mallory' may not start failover" in report.failure
        assert world.unchanged


async def test_a_signed_request_replayed_in_another_armor_is_refused(dev_env, world, signed_inventory):
    env = dev_env
    inv, paths = signed_inventory
    async with running_worker(env, world, inv):
        alice = Signer(name="alice", key_path=paths["alice"])
        inp = FailoverInput(inventory=inv, to_region="westeurope", requester="alice")
        handle = await start_procedure(env.client, inv, "failover", inp, "signed failover", signer=alice)
        await until_waiting(handle)
        desc = await handle.describe()
        signed = alice.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=None, action="pause")
        await send_update(handle, Procedure.pause, Request(by="alice", **signed))
        resume = alice.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=None, action="resume")
        await send_update(handle, Procedure.resume, Request(by="alice", **resume))
        rewrapped = "\n".join(line for line in signed["signature"].splitlines()) + "\n\n"  # the same blob, other text
        assert rewrapped != signed["signature"]
        with pytest.raises(WorkflowUpdateFailedError) as exc:
            await send_update(
                handle, Procedure.pause, Request(by="alice", signature=rewrapped, signed_at=signed["signed_at"])
            )
        assert "replayed signature" in str(exc.value.cause)
        await send_update(
            handle,
            Procedure.abort,
            Request(
                by="alice",
                **alice.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id=None, action="abort"),
            ),
        )
        report = await failed_report(handle)
        assert report.start_input_sha256 and report.start_nonce and report.status == "aborted"
        assert world.unchanged


class running_worker:
    """A worker on the inventory's queues with the world's stand-ins (for inventories made in the test)."""

    def __init__(self, env, world, inv):
        import concurrent.futures


        self.ex = concurrent.futures.ThreadPoolExecutor(8)
        self.workers = queue_workers(env.client, inv, world.activities(), self.ex)

    async def __aenter__(self):
        for w in self.workers:
            await w.__aenter__()
        return self

    async def __aexit__(self, *exc):
        for w in reversed(self.workers):
            await w.__aexit__(*exc)
        self.ex.shutdown(wait=False)


# -- a Temporal cancel at every step boundary of a planned failover ---------------------------------------------


async def approved(running, inventory):
    handle = await start(running, inventory)
    await until_waiting(handle)
    await send_update(handle, Procedure.approve, Request(by="bob"))
    return handle


def consistent(world) -> bool:
    """Writes go somewhere: either nothing moved, or the new primary takes the traffic."""
    return world.unchanged or (
        world.primary == "westeurope" and world.serving == "westeurope" and "westeurope" not in world.fenced
    )


@pytest.mark.parametrize("where", ["approval", "drain", "catch-up"])
async def test_a_cancel_before_the_promotion_is_an_abort_with_its_undo(running, world, inventory, where):
    world.block_catch_up = threading.Event() if where == "catch-up" else None
    if where == "drain":
        world.busy_sessions, world.block_drain = 1, threading.Event()
    handle = await start(running, inventory)
    await until_waiting(handle)
    if where != "approval":
        await send_update(handle, Procedure.approve, Request(by="bob"))
        if where == "drain":
            await until_waiting(handle, "Drain")
        else:
            while world.catch_up_attempts == 0:
                await asyncio.sleep(0.02)
    await handle.cancel()
    report = await failed_report(handle)
    assert report.status == "aborted" and "cancelled through Temporal, unsigned" in report.failure
    assert any(e.by == "temporal" and e.action == "abort" for e in report.events)
    assert world.unchanged and world.promotions == 0


@pytest.mark.parametrize("blocked", [DB_PROMOTE.name, TRAFFIC_SWITCH.name, K8S_SCALE_UP.name])
async def test_a_cancel_past_the_promotion_goes_forward_to_a_consistent_world(running, world, inventory, blocked):
    hold = threading.Event()
    world.hold[blocked] = hold
    handle = await approved(running, inventory)
    while blocked not in world.calls:
        await asyncio.sleep(0.02)
    await handle.cancel()
    while not any(
        e.action == "cancel-refused"
        for e in FailoverReport.model_validate(await handle.query("progress", result_type=dict)).events
    ):
        await asyncio.sleep(0.02)
    hold.set()
    report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and report.remaining == []
    assert (
        consistent(world)
        and world.primary == "westeurope"
        and world.serving == "westeurope"
        and "westeurope" in world.scaled
    )
    assert any("past the point of no return" in text for _, text, _ in world.notifications)


# -- the hand that holds the keys: world-changing activities check the run on the worker -------------------------

from temporalio import workflow as wf  # noqa: E402 - the rogue workflows below only


@wf.defn(name="failover", sandboxed=False)
class RogueFailover:
    """What someone else's workflow worker on the environment's workflow queue could run: straight to db.promote."""

    @wf.run
    async def run(self, arg: dict) -> str:
        from datetime import timedelta

        from temporalio.common import RetryPolicy

        await wf.execute_activity(
            DB_PROMOTE.name,
            {"target": arg["target"], "force": False},
            task_queue=arg["queue"],
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        return "promoted"


async def test_a_rogue_workflow_worker_cannot_drive_a_promotion(dev_env, world, signed_inventory):
    """With signatures required, db.promote on the region queue runs only for a run whose history the worker
    verifies: a signed start by an operator, and a signed quorum at the approval gate."""
    from temporalio.client import WorkflowFailureError
    from temporalio.worker import Worker

    from worker.trust import trust_interceptor

    inv, paths = signed_inventory
    acts = world.activities()
    queue = inv.region_queue("westeurope")
    from opsflow.models import RegionTarget

    target = RegionTarget.of(inv, "westeurope").model_dump(mode="json")
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        ours = Worker(
            dev_env.client,
            task_queue=queue,
            activities=acts,
            activity_executor=ex,
            interceptors=[trust_interceptor(dev_env.client)],
        )
        rogue = Worker(dev_env.client, task_queue=inv.task_queue, workflows=[RogueFailover])
        async with ours, rogue:
            # An unsigned run of the attacker's own making.
            rogue_arg = {"environment": inv.environment, "target": target, "queue": queue}
            handle = await dev_env.client.start_workflow("failover", rogue_arg, id=f"opsflow-{inv.environment}",
                                                         task_queue=inv.task_queue)
            with pytest.raises(WorkflowFailureError) as exc:
                await handle.result()
            assert "refused by the worker" in str(exc.value.cause.cause) and "may not start failover" in str(
                exc.value.cause.cause
            )
            # alice's real, signed start, picked up by the rogue worker: no approval has passed.
            alice = Signer(name="alice", key_path=paths["alice"])
            inp = FailoverInput(inventory=inv, to_region="westeurope", requester="alice").without_rules(inv)
            signed = alice.sign_start(
                environment=inv.environment,
                procedure="failover",
                input_sha256=input_digest(inp, START_UNSIGNED),
                nonce="n-rogue",
            )
            arg = {**inp.model_dump(mode="json"), "target": target, "queue": queue}
            digest = input_digest(arg, START_UNSIGNED)
            assert digest != signed.get("input_sha256")  # the rogue's input is not what alice signed...
            signed = alice.sign_start(
                environment=inv.environment, procedure="failover", input_sha256=digest, nonce="n-rogue"
            )
            # ...so say alice signed the rogue's input
            handle = await dev_env.client.start_workflow(
                "failover", arg, id=f"opsflow-{inv.environment}", task_queue=inv.task_queue, memo=start_memo(signed)
            )
            with pytest.raises(WorkflowFailureError) as exc:
                await handle.result()
            assert "approval gate" in str(exc.value.cause.cause) and "no signed approval" in str(exc.value.cause.cause)
    assert world.promotions == 0 and DB_PROMOTE.name not in world.calls


async def test_honest_signed_use_passes_the_worker_check(dev_env, world, signed_inventory):
    import concurrent.futures

    from worker.trust import trust_interceptor

    inv, paths = signed_inventory
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        workers = queue_workers(dev_env.client, inv, world.activities(), ex,
                                interceptors=[trust_interceptor(dev_env.client)])
        async with workers[0], workers[1], workers[2]:
            alice, bob = Signer(name="alice", key_path=paths["alice"]), Signer(name="bob", key_path=paths["bob"])
            inp = FailoverInput(inventory=inv, to_region="westeurope", requester="alice")
            handle = await start_procedure(dev_env.client, inv, "failover", inp, "signed failover", signer=alice)
            await until_waiting(handle)
            desc = await handle.describe()
            await send_update(
                handle,
                Procedure.approve,
                Request(
                    by="bob",
                    **bob.sign_request(workflow_id=handle.id, run_id=desc.run_id, gate_id="approval", action="approve"),
                ),
            )
            report = FailoverReport.model_validate(await handle.result())
    assert report.status == "succeeded" and world.primary == "westeurope" and world.promotions == 1
