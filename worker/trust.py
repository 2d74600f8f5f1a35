"""The hand that holds the keys checks the signatures (README "Who decides the rules").

Where the worker's inventory requires signatures, an activity that changes the world (a fence, a promotion, a
traffic move, a scale, a restore or delete, a VACUUM, a canary weight, a status page call) runs only for a run
whose history shows, checked here on the worker against the worker's own keys: a start signed by an operator
over that very input (or a Schedule an operator signed, or the failback/fleet parent that was), and, for the
steps behind the approval gate, the gate's quorum of signed approvals bound to that run. So a rogue workflow
worker polling the workflow queue, or a doctored history, cannot drive a promotion. Checked once per run and
cached by run id (the gate again until it has passed); reads the history, so it is the same on every retry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from activities.rules import RULEBOOK
from opsflow import signing
from opsflow.contracts.db import DB_FENCE, DB_FENCE_CONTROL_PLANE, DB_PROMOTE, DB_REBUILD_REPLICA, DB_UNFENCE
from opsflow.contracts.k8s import K8S_SCALE_TO_ZERO, K8S_SCALE_UP, K8S_SET_MAINTENANCE
from opsflow.contracts.maintenance import BACKUP_TAKE, MAINT_RUN_ITEM
from opsflow.contracts.notify import STATUSPAGE_UPDATE
from opsflow.contracts.restore import RESTORE_DELETE, RESTORE_LEFTOVERS, RESTORE_START
from opsflow.contracts.rollout import (
    K8S_CREATE_CANARY,
    K8S_CREATE_COLOUR,
    K8S_DELETE_CANARY,
    K8S_SCALE_DEPLOYMENT,
    K8S_SET_IMAGE,
    K8S_SET_WEIGHT,
    K8S_SWITCH_SERVICE,
    ROUTER_SET_WEIGHT,
)
from opsflow.contracts.traffic import TRAFFIC_PREPARE, TRAFFIC_SWITCH
from opsflow.inventory import ApprovalPolicy, Inventory
from opsflow.models import Decision, RegionTarget
from opsflow.procedures import SCHEDULABLE
from opsflow.rules import START_UNSIGNED, input_digest
from workflows.procedure import GateState, Request

log = logging.getLogger("opsflow.trust")

# Activities that change the world -> whether they run only behind the approval gate (False: a checked start
# is enough, e.g. a drill's scratch restore, the maintenance announcement, the undo of a fence).
CHANGES_WORLD: dict[str, bool] = {
    DB_FENCE.name: True, DB_PROMOTE.name: True, DB_REBUILD_REPLICA.name: True,
    TRAFFIC_SWITCH.name: True, TRAFFIC_PREPARE.name: True, K8S_SCALE_UP.name: True,
    DB_UNFENCE.name: False, DB_FENCE_CONTROL_PLANE.name: False,
    K8S_SCALE_TO_ZERO.name: False, K8S_SET_MAINTENANCE.name: False,
    RESTORE_START.name: False, RESTORE_DELETE.name: False, RESTORE_LEFTOVERS.name: False,
    MAINT_RUN_ITEM.name: True, BACKUP_TAKE.name: False, STATUSPAGE_UPDATE.name: False,
    K8S_CREATE_CANARY.name: True, K8S_SET_WEIGHT.name: True, K8S_SET_IMAGE.name: True, K8S_CREATE_COLOUR.name: True,
    K8S_SWITCH_SERVICE.name: True, K8S_SCALE_DEPLOYMENT.name: True, K8S_DELETE_CANARY.name: False,
    ROUTER_SET_WEIGHT.name: True,
}
# An emergency failover passes no gate unless the inventory asks for one.
GATE = "approval"


class NotTrusted(Exception):
    pass


@dataclass
class RunFacts:
    procedure: str
    workflow_id: str
    run_id: str
    environment: str
    arg: dict[str, Any]
    memo: dict[str, Any]
    started_at: Any
    parent: tuple[str, str] | None  # workflow id, run id
    decisions: list[tuple[Request, Any, str]]  # (request, accepted at, update name)


class Verifier:
    """Reads a run's history and checks it against the worker's rules; caches what passed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.started_ok: set[str] = set()
        self.gated_ok: set[str] = set()

    async def facts(self, workflow_id: str, run_id: str) -> RunFacts:
        handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
        history = await handle.fetch_history()
        conv = self.client.data_converter
        first = history.events[0].workflow_execution_started_event_attributes
        [arg] = await conv.decode(list(first.input.payloads)[:1], [dict])
        memo = {k: (await conv.decode([v], [dict]))[0] for k, v in first.memo.fields.items()
                if k in (signing.START_MEMO, signing.SCHEDULE_MEMO)}
        parent = None
        if first.HasField("parent_workflow_execution"):
            parent = (first.parent_workflow_execution.workflow_id, first.parent_workflow_execution.run_id)
        decisions = []
        for e in history.events:
            if e.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
                continue
            req = e.workflow_execution_update_accepted_event_attributes.accepted_request
            if req.input.name not in ("approve", "reject"):
                continue
            [body] = await conv.decode(list(req.input.args.payloads)[:1], [dict])
            decisions.append(
                (Request.model_validate(body), e.event_time.ToDatetime(tzinfo=timezone.utc), req.input.name)
            )
        env = arg.get("environment") or (arg.get("inventory") or {}).get("environment") or ""
        if not env and arg.get("environments"):
            env = arg["environments"][0]
        return RunFacts(
            history.events[0].workflow_execution_started_event_attributes.workflow_type.name,
            workflow_id,
            run_id,
            env,
            arg,
            memo,
            history.events[0].event_time.ToDatetime(tzinfo=timezone.utc),
            parent,
            decisions,
        )

    # -- the start ----------------------------------------------------------------------------------------------

    def check_start(self, run: RunFacts, inv: Inventory) -> None:
        """A top-level run: its requester is an operator and signed this very input. (Re-checked here, on the
        worker, from the history: what the workflow checked may have been run by someone else's worker.)"""
        try:
            signing.check_start(inv, procedure=run.procedure, requester=run.arg.get("requester", ""),
                                reason=run.arg.get("reason", ""), memo=run.memo.get(signing.START_MEMO),
                                now=run.started_at, input_sha256=input_digest(run.arg, START_UNSIGNED))
        except ValueError as e:
            raise NotTrusted(f"the start of {run.workflow_id}: {e}") from None
        if not run.memo.get(signing.START_MEMO):
            raise NotTrusted(f"the start of {run.workflow_id} is not signed")

    async def check_run(self, run: RunFacts, inv: Inventory) -> RunFacts | None:
        """The run's start; -> the run whose gate stands for this one (a failback's failover: its parent)."""
        if run.parent is None:
            self.check_start(run, inv)
            return run
        parent_id, parent_run = run.parent
        if (
            run.procedure == "failover"
            and run.workflow_id == f"{parent_id}-failover" == f"opsflow-{inv.environment}-failover"
        ):
            parent = await self.facts(parent_id, parent_run)
            if parent.procedure != "failback" or parent.parent is not None:
                raise NotTrusted(f"{run.workflow_id}'s parent {parent_id} is not a failback started by a person")
            self.check_start(parent, inv)
            return parent
        if run.procedure == "maintenance" and parent_id.startswith("opsflow-fleet-"):
            fleet = await self.facts(parent_id, parent_run)
            if fleet.procedure != "maintenance-fleet" or fleet.parent is not None:
                raise NotTrusted(f"{run.workflow_id}'s parent {parent_id} is not a maintenance fleet")
            fleet_inv = RULEBOOK.get(fleet.environment) or inv
            self.check_start(fleet, fleet_inv)
            return run
        record = run.memo.get(signing.SCHEDULE_MEMO)
        if record is None:
            raise NotTrusted(f"{run.workflow_id} was started by {parent_id}, which may not start a {run.procedure}")
        try:
            signed = signing.check_schedule(
                inv,
                procedure=run.procedure,
                record=record,
                parent_workflow_id=parent_id,
                input_sha256=input_digest(run.arg, START_UNSIGNED),
                dry_run=bool(run.arg.get("dry_run")),
                schedulable=SCHEDULABLE,
            )
        except ValueError as e:
            raise NotTrusted(str(e)) from None
        if signed is None:
            raise NotTrusted(f"the Schedule that launched {run.workflow_id} is not signed")
        return run

    # -- the gate -----------------------------------------------------------------------------------------------

    def gate_passed(self, gated: RunFacts, inv: Inventory, policy: ApprovalPolicy) -> str | None:
        """None when the run's approval gate holds a signed quorum by the worker's approvers; else what is missing."""
        requester = gated.arg.get("requester", "")
        gate = GateState(GATE, GATE, policy, requester, [])
        keyring = signing.Keyring.of(inv, policy)
        for req, at, name in gated.decisions:
            if req.gate not in (None, GATE):
                continue
            try:
                signing.verify_request(keyring, req, workflow_id=gated.workflow_id, run_id=gated.run_id, gate_id=GATE,
                                       action="approve" if name == "approve" else "reject", now=at)
            except ValueError as e:
                log.warning("%s: a decision in the history does not verify: %s", gated.workflow_id, e)
                continue
            if req.by not in policy.names() or policy.require_distinct_approver and req.by == requester:
                continue
            if name == "reject":
                return f"rejected by {req.by}"
            if all(d.by != req.by for d in gate.decisions):
                gate.decisions.append(
                    Decision(approved=True, by=req.by, at=at, gate=GATE, roles=policy.roles_of(req.by))
                )
        return gate.missing() if gate.decisions else "no signed approval"

    def needs_gate(self, run: RunFacts, inv: Inventory) -> bool:
        if run.procedure == "failover" and run.arg.get("emergency"):
            return inv.approval.emergency_requires_approval
        return run.procedure in ("failover", "failback", "maintenance", "canary", "bluegreen")

    def policy_of(self, run: RunFacts, inv: Inventory) -> ApprovalPolicy:
        if run.procedure in ("canary", "bluegreen") and inv.rollout is not None and inv.rollout.approval is not None:
            return inv.rollout.approval
        return inv.approval

    async def check(self, workflow_id: str, run_id: str, gated: bool, queue: str, args: Any) -> None:
        """Raise NotTrusted unless the run may change the world through this activity (on `queue`, with `args`)."""
        serving = [inv for env in RULEBOOK.environments() if (inv := RULEBOOK.get(env)) and queue in inv.all_queues()]
        strict = any(signing.Keyring.of(inv).require_signed for inv in serving)
        if not strict and serving:
            return  # signatures off: the namespace's permissions are the lock (README)
        run = await self.facts(workflow_id, run_id)
        inv = RULEBOOK.get(run.environment)
        if inv is None or inv not in serving:
            raise NotTrusted(f"a run of environment {run.environment!r} may not act through {queue}, a queue of "
                             f"{', '.join(i.environment for i in serving) or 'no environment this worker holds'}")
        check_targets(inv, args)
        if run_id in self.started_ok and (not gated or run_id in self.gated_ok):
            return
        gate_run = await self.check_run(run, inv)
        self.started_ok.add(run_id)
        if not gated or gate_run is None or not self.needs_gate(gate_run, inv):
            return
        missing = self.gate_passed(gate_run, inv, self.policy_of(gate_run, inv))
        if missing:
            raise NotTrusted(
                f"the approval gate of {gate_run.workflow_id} has not passed by the worker's rules: {missing}"
            )
        self.gated_ok.add(run_id)


def check_targets(inv: Inventory, args: Any) -> None:
    """The regions an activity acts on are the worker's, as its inventory describes them (a run cannot point a
    promotion at a database of its own choosing)."""
    for arg in args or ():
        for value in (arg, *(getattr(arg, f, None) for f in ("target", "replica", "primary", "source"))):
            if isinstance(value, RegionTarget):
                if value.environment != inv.environment or value.region not in inv.regions:
                    raise NotTrusted(
                        f"the activity targets {value.environment}/{value.region}, not a region of {inv.environment}"
                    )
                if value.database != inv.regions[value.region].database:
                    raise NotTrusted(f"the activity's database for {value.region} is not the worker's inventory's")


class TrustInterceptor(Interceptor):
    def __init__(self, client: Client) -> None:
        self.verifier = Verifier(client)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next, self.verifier)


class _Inbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, verifier: Verifier) -> None:
        super().__init__(next)
        self.verifier = verifier

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        gated = CHANGES_WORLD.get(info.activity_type)
        if gated is not None:
            try:
                await asyncio.wait_for(self.verifier.check(info.workflow_id or "", info.workflow_run_id or "", gated,
                                                           info.task_queue, input.args), 30)
            except NotTrusted as e:
                raise ApplicationError(f"refused by the worker: {e}", type="NotAllowed", non_retryable=True) from None
        return await self.next.execute_activity(input)


_SHARED: dict[int, TrustInterceptor] = {}


def trust_interceptor(client: Client) -> TrustInterceptor:
    """One per client (process): every queue's workers share what was verified."""
    return _SHARED.setdefault(id(client), TrustInterceptor(client))
