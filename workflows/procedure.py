"""What every procedure shares: steps, gates, pause/resume/abort, undo, UI details, the report.

A procedure subclasses `Procedure`, builds its state in `@workflow.init` and writes each step as one line:

    status = await self.step("preflight", "Check westeurope", DB_STATUS, target)

The activity is its typed declaration (opsflow/contracts/), so the step's result is a `DbStatus`.

A step's activity runs as a task raced against abort (and, for long steps, pause): an abort cancels it,
waits until it has stopped, then undoes what was done. Every activity has a bound on how long it may wait
for a worker. People talk to a running procedure through Updates whose validators reject a request that may
not happen (a non-approver, a self-approval, an abort past the point of no return) before it reaches history.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Awaitable, Callable, Generic, TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from opsflow.inventory import Inventory
    from opsflow.models import ControlEvent, ProcedureReport

from workflows.kernel.common import A, R, Request, Stop, child_task_timeout, failure_message
from workflows.kernel.controls import Controls
from workflows.kernel.gates import Gates, GateState
from workflows.kernel.reports import Reports
from workflows.kernel.rules import Rules
from workflows.kernel.steps import StepDecl, Steps, Undo
from workflows.kernel.ui import Display

# What a procedure module needs of the kernel, in one import (the parts are in workflows/kernel/).
__all__ = ["A", "R", "GateState", "Procedure", "Request", "StepDecl", "Stop", "Undo", "child_task_timeout",
           "failure_message"]


Rep = TypeVar("Rep", bound=ProcedureReport)


class Procedure(Steps, Gates, Controls, Rules, Display, Reports, Generic[Rep]):
    """Base class for procedure workflows (handlers are inherited by the @workflow.defn subclasses), generic over
    its report: `class FailoverWorkflow(Procedure[FailoverReport])` has a `self.report` that is a FailoverReport."""

    notify_on_stop = True

    def __init__(self, inventory: Inventory | None, report: Rep) -> None:
        # The rules: until `take_rules` has the worker's inventory, none (an input's inventory is not trusted).
        self.inventory: Inventory = inventory  # type: ignore[assignment]
        self.rules_taken = False
        self.used_requests: list[str] = []  # what accepted signed requests signed (signing.request_key): no replay
        self.worker_rules = False  # True: this run acts by the worker's inventory (every run since "worker-rules")
        self.report: Rep = report
        self.report.workflow_id = workflow.info().workflow_id
        self.report.started_at = workflow.now()
        self.gates: dict[str, GateState] = {}
        self.paused = False
        self.paused_at: datetime | None = None
        self.abort_requested: ControlEvent | None = None
        self.point_of_no_return = False  # past it, failures go forward instead of undoing
        self.writes_down: str | None = None  # set while a step has made the service unwritable (said on pause)
        self.undo_stack: list[Undo] = []
        self.busy_waited: dict[str, float] = {}  # step name -> seconds its activity waited for a busy worker
        self.window_override: ControlEvent | None = None  # an approver's `opsflow override` of a window wait
        self.awaiting_override = False
        self.declared: list[StepDecl] | None = None
        self._shown: tuple[str, str] | None = None  # the search attributes last upserted

    @workflow.query
    def progress(self) -> ProcedureReport:
        return self.report

    @workflow.query
    def rules(self) -> Inventory | None:
        """The inventory this run acts by (the worker's): the CLI reads whose keys sign a request from it."""
        return self.inventory if self.rules_taken else None

    async def conclude(self, inp: Any, body: Callable[[Any], Awaitable[None]]) -> Rep:
        """Take the worker's rules, check the start, run the procedure body; on a stop or failure undo what can
        be undone, and end with the report.

        A Temporal cancel (the UI, `temporal workflow cancel`, an emergency's preemption) is an abort: before
        the point of no return the running step is cancelled and the undo runs; after it the procedure goes
        forward to a consistent state, and says so. A procedure that did not succeed ends the workflow as failed
        (so the UI lists it as such) with the report in the failure's details; `opsflow report` reads it."""
        self.show()
        if not workflow.patched("cancel-as-abort"):  # histories recorded before: a cancel ended the body at once
            return await self._run_body(inp, body)
        task = asyncio.ensure_future(self._run_body(inp, body))
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                await self.cancelled_through_temporal()

    async def cancelled_through_temporal(self) -> None:
        now = workflow.now()
        if not self.point_of_no_return:
            if self.abort_requested is None:
                self.abort_requested = ControlEvent(action="abort", by="temporal", at=now,
                                                    reason="cancelled through Temporal, unsigned")
                self.report.events.append(self.abort_requested)
            return
        self.report.events.append(
            ControlEvent(
                action="cancel-refused",
                by="temporal",
                at=now,
                reason="cancelled through Temporal past the point of no return: going forward",
            )
        )
        self.show()
        await self.notify(
            f"{self.report.procedure} of {self.report.environment}: a Temporal cancel arrived past the point "
            "of no return; the procedure goes forward to a consistent state",
            severity="warning",
        )

    async def _run_body(self, inp: Any, body: Callable[[Any], Awaitable[None]]) -> Rep:
        try:
            received = inp
            inp = await self.take_rules(inp)
            self.check_start(received)
            await body(inp)
        except Stop as stop:
            return await self._stopped(stop.status, stop.reason)
        except asyncio.CancelledError:
            # Cancelled from the UI/CLI (or preempted by an emergency): an abort, and the undo still runs.
            return await self._stopped("aborted", "cancelled")
        if self.report.status not in ("planned",):
            self.report.status = "succeeded"
        self.report.current_step = None
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        await self.keep_report()
        self.show()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.report

    async def finalize(self) -> None:
        """Called once at the end, success or not, after any undo (e.g. a summary line)."""

    async def keep_report(self) -> None:
        """Every procedure's report is kept where the drill's always was (runs recorded before did not keep it)."""
        if not self.stores_own_report and workflow.patched("store-every-report"):
            await self.store_report()

    async def _stopped(self, status: str, reason: str) -> Rep:
        if not self.point_of_no_return:
            await self.undo()
            self.writes_down = None
        self.report.status = status  # type: ignore[assignment]
        self.report.failure = reason
        self.report.waiting_for = None
        self.report.ended_at = workflow.now()
        await self.finalize()
        await self.keep_report()
        self.show()
        if self.notify_on_stop:
            await self.notify(
                f"{self.report.procedure} {status}: {reason}", severity="critical" if status == "failed" else "warning"
            )
        await workflow.wait_condition(workflow.all_handlers_finished)  # a pause's notification, say, still in flight
        raise ApplicationError(
            f"{self.report.procedure} {status}: {reason}", self.report, type=status.capitalize(), non_retryable=True
        )
