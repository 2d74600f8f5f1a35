"""The rules: the worker's inventory taken at the start, and the checks of who started the run (README "Who decides
the rules")."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from opsflow import signing  # cryptography: a native extension, must not be re-imported in the sandbox
    from opsflow.alert_routes import REQUESTABLE
    from opsflow.contracts.kernel import RULES_INVENTORY
    from opsflow.inventory import Inventory
    from opsflow.procedures import SCHEDULABLE
    from opsflow.rules import START_UNSIGNED, InventoryDigest, RulesRequest, WorkerRules, input_digest

from workflows.kernel.common import RETRY_NEVER, Stop, failure_message


class Rules:
    """The rules of a procedure (a part `Procedure` composes; `self` is the procedure)."""

    def check_rules_taken(self) -> None:
        if not self.rules_taken:
            raise ApplicationError(
                "the procedure is still taking its rules from the worker; try again in a moment", type="NotWaiting"
            )

    async def fetch_rules(
        self, wanted: dict[str, InventoryDigest | None], nonce: str | None = None
    ) -> dict[str, Inventory]:
        """The worker's inventories for `wanted` (environment -> the digest the requester saw), recorded in the
        history; a refusal (a digest that differs, an environment the worker does not hold, a start signature
        already used) stops the run before anything changed."""
        try:
            rules: WorkerRules = await workflow.execute_activity(
                RULES_INVENTORY.name, RulesRequest(environments=wanted, start_nonce=nonce),
                result_type=RULES_INVENTORY.result_type, task_queue=workflow.info().task_queue,
                schedule_to_start_timeout=timedelta(seconds=60), start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=RULES_INVENTORY.heartbeat),  # a worker lost costs this, not 30 s
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=RETRY_NEVER),
                summary=f"the worker's rules for {', '.join(wanted)}")
        except ActivityError as err:
            raise Stop("refused", f"could not take the worker's rules: {failure_message(err)}") from None
        refusals = [r.refusal for r in rules.environments if r.inventory is None]
        if refusals:
            raise Stop("refused", "; ".join(str(r) for r in refusals))
        self.report.rules_sha256 = ",".join(r.sha256[:16] for r in rules.environments)
        return {r.environment: r.inventory for r in rules.environments if r.inventory is not None}

    async def take_rules(self, inp: Any) -> Any:
        """The input with the worker's inventory in place of whatever it carried (README "Who decides the rules").
        Histories recorded before (their inputs carried the inventory) replay as they ran."""
        if not workflow.patched("worker-rules"):
            self.rules_taken = True
            return inp
        self.worker_rules = True
        self.inventory = None  # type: ignore[assignment]
        nonce = (workflow.memo_value(signing.START_MEMO, None, type_hint=dict) or {}).get("nonce")
        found = await self.fetch_rules(self.rules_wanted(inp), nonce if self.is_top_level() else None)
        inp = self.with_rules(inp, found)
        self.rules_taken = True
        return inp

    def rules_wanted(self, inp: Any) -> dict[str, InventoryDigest | None]:
        """environment -> the digest of the inventory the requester saw (a fleet asks for each member's)."""
        return {inp.environment: inp.seen_digest()}

    def with_rules(self, inp: Any, found: dict[str, Inventory]) -> Any:
        """Keep the worker's inventory as this run's rules; -> the input carrying it."""
        self.inventory = found[inp.environment]
        return inp.model_copy(update={"inventory": self.inventory})

    def is_top_level(self) -> bool:
        return workflow.info().parent is None

    def expected_workflow_ids(self) -> list[str]:
        """The ids this run may have: the environment's lock (a run under another id would dodge it)."""
        return [f"opsflow-{self.inventory.environment}"]

    def check_start(self, received: Any = None) -> None:
        """Who may start this procedure (`operators:`) and, when signatures are required, the requester's start
        signature (in the memo; opsflow/signing.py) over this very input. A child procedure (a failback's
        failover, a fleet's member, a scheduled launch) is checked by `check_child`."""
        info = workflow.info()
        self.report.run_id = info.run_id
        if self.worker_rules and info.workflow_id not in self.expected_workflow_ids():
            raise Stop(
                "refused",
                f"a {self.report.procedure} of {self.inventory.environment} runs as "
                f"{' or '.join(self.expected_workflow_ids())} (the environment's lock), not {info.workflow_id}",
            )
        if info.parent is not None:
            if self.worker_rules:
                self.check_child(info.parent, received)
            return
        memo = workflow.memo_value(signing.START_MEMO, None, type_hint=dict)
        digest = input_digest(received, START_UNSIGNED) if self.worker_rules and received is not None else None
        try:
            record = signing.check_start(
                self.inventory,
                procedure=self.report.procedure,
                requester=self.report.requester,
                reason=self.report.reason,
                memo=memo,
                now=workflow.now(),
                input_sha256=digest,
            )
        except ValueError as e:
            raise Stop("refused", str(e)) from None
        self.check_alert_requester(received, self.report.requester)
        if record is not None:
            self.report.start_signature, self.report.start_signed_at = record.signature, record.signed_at
            self.report.start_input_sha256, self.report.start_nonce = record.input_sha256, record.nonce

    def check_alert_requester(self, received: Any, by: str | None, scheduled: bool = False) -> None:
        """The alert receiver's name (the inventory's `alerts.requester`) may request a planned failover, which waits
        at its approval gate, and nothing else (`by`: who started this run, or created the Schedule that launched
        it): an alert may request a failover, never perform one."""
        alerts = getattr(self.inventory, "alerts", None)
        if alerts is None or by != alerts.requester:
            return
        if scheduled:
            raise Stop("refused", f"{by!r} is the alert receiver (alerts.requester): a Schedule it created launches "
                                  "nothing")
        if self.report.procedure not in REQUESTABLE or getattr(received, "emergency", False):
            what = "an emergency failover" if getattr(received, "emergency", False) else f"a {self.report.procedure}"
            raise Stop("refused", f"{alerts.requester!r} is the alert receiver (alerts.requester): an alert may "
                                  f"request a planned failover, never start {what}")

    def check_child(self, parent: Any, received: Any = None) -> None:
        """A child run: a Schedule's launch (its signed creation is in the memo), or a parent that starts this
        procedure as a child (see the overrides)."""
        record = workflow.memo_value(signing.SCHEDULE_MEMO, None, type_hint=dict)
        if record is None:
            raise Stop("refused", f"a {self.report.procedure} is not started as the child of another workflow "
                                  f"({parent.workflow_id}); start it with opsflow")
        try:
            signed = signing.check_schedule(
                self.inventory,
                procedure=self.report.procedure,
                record=record,
                parent_workflow_id=parent.workflow_id,
                dry_run=self.report.dry_run,
                input_sha256=input_digest(received, START_UNSIGNED),
                schedulable=SCHEDULABLE,
            )
        except ValueError as e:
            raise Stop("refused", str(e)) from None
        self.report.scheduled_by, self.report.schedule_id = record.get("by"), record.get("schedule_id")
        self.check_alert_requester(received, record.get("by"), scheduled=True)
        if signed is not None:
            self.report.start_signature, self.report.start_signed_at = signed.signature, signed.signed_at
            self.report.start_input_sha256 = signed.input_sha256
