"""Steps: declared and planned, run as bounded activities between boundaries (pause/abort), undone newest first."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.base import Activity
    from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES
    from opsflow.models import StepRecord

from workflows.kernel.common import RETRY_NEVER, A, R, Stop, failure_message, not_started


@dataclass
class StepDecl:
    """One declared step: the dry-run plan prints these, and a run may only record declared names."""

    name: str
    what: str  # what it would change
    when: str | None = None  # the condition under which it runs, if any
    runs: bool = True  # the condition, evaluated at plan time (False: listed as skipped)


@dataclass(frozen=True)
class Undo:
    """What reverses a change, run (on the change's task queue) should the procedure stop before the point of no
    return. `name` is the step it runs under (default `undo:<activity>`); a long undo (a `timeout` of minutes) takes
    a `heartbeat` timeout, so a worker lost while it runs costs that, not the whole timeout."""

    activity: Activity
    title: str
    arg: Any = None
    queue: str | None = None
    timeout: float = 60
    name: str | None = None
    heartbeat: float | None = None


class Steps:
    """The steps of a procedure (a part `Procedure` composes; `self` is the procedure)."""

    def declare(self, decls: list[StepDecl]) -> None:
        """The steps this run will take from here on; `plan()` prints them, `step()` keeps to them."""
        self.declared = decls

    def plan(self) -> None:
        """Dry run: record every declared step as planned (or skipped, with its condition), change nothing."""
        for d in self.declared or []:
            detail = d.what + (f" (when {d.when})" if d.when else "")
            self.end_step(self.begin_step(d.name, d.what), "planned" if d.runs else "skipped", detail)
        self.report.status = "planned"

    def activity_options(self, queue: str | None, timeout: float, heartbeat: float | None, attempts: int) -> dict:
        """Every activity is bounded: how long it may wait for a worker, run, and be retried."""
        return dict(
            task_queue=queue,
            schedule_to_start_timeout=timedelta(seconds=self.inventory.limits.worker_wait),
            start_to_close_timeout=timedelta(seconds=timeout),
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=20),
                maximum_attempts=attempts,
                non_retryable_error_types=RETRY_NEVER,
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    def aside_options(self, activity: Activity, timeout: float, attempts: int) -> dict:
        """The options of what the kernel runs beside the steps, best effort, on the workflow's queue (a notification,
        the report's keeping, the drill's trend): bounded, with the contract's heartbeat timeout, and not waited for
        should the procedure be cancelled meanwhile."""
        opts = self.activity_options(self.inventory.task_queue, timeout, activity.heartbeat, attempts)
        opts.pop("cancellation_type")
        return opts

    async def step(
        self,
        name: str,
        title: str,
        activity: Activity[A, R],
        arg: A,
        *,
        queue: str | None = None,
        timeout: float = 60,
        heartbeat: float | None = None,
        attempts: int = 5,
        detail: Callable[[R], str] | None = None,
        undo: Undo | None = None,
        undo_timeout: float = 60,
        interruptible: bool = False,
        kind: str = "action",
        waiting: str | None = None,
    ) -> R:
        """Run one activity as a recorded step, between step boundaries (pause/abort are honoured there).

        An abort cancels the running activity (it stops on its next heartbeat) and the undo follows.
        `interruptible` steps (long waits) are also cancelled by a pause and run again after the resume.
        `undo=Undo(activity, title, arg)` registers what reverses this step should the procedure stop before
        the point of no return (on the step's queue); it is owed as soon as the step has started, since it may
        have acted. `kind` is how the timeline draws it ("wait": an activity that waits, e.g. the drain) and
        `waiting` what `opsflow status` shows as waited for meanwhile. `heartbeat`: the heartbeat timeout, by default
        the contract's (the kernel's own activities heartbeat: a worker lost just after it took one costs that)."""
        self._check_declared(name)
        while True:
            await self.boundary()
            record = self.begin_step(name, title, kind)
            if waiting:
                self.report.waiting_for = waiting
                self.show()
            opts = self.activity_options(queue, timeout, heartbeat or activity.heartbeat, attempts)
            handle = workflow.start_activity(activity.name, arg, result_type=activity.result_type, summary=title,
                                             **opts)
            if undo is not None:
                self.owe(replace(undo, queue=queue, timeout=undo_timeout))
            paused = await self._race(handle, interruptible)
            try:
                result = await handle
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    if paused and self.abort_requested is None:
                        self.end_step(record, "skipped", "interrupted by the pause; runs again after the resume")
                        continue
                    self.end_step(record, "failed", "cancelled")
                    if self.abort_requested is None:  # cancelled from the UI/CLI: an abort
                        raise Stop("aborted", "cancelled") from None
                    await self.boundary()
                if not_started(err):
                    if await self._worker_busy(queue or self.inventory.task_queue, record):
                        continue
                    waited = self.inventory.limits.worker_wait
                    message = f"no worker serves {queue or self.inventory.task_queue} (waited {waited:.0f}s)"
                else:
                    message = failure_message(err)
                self.end_step(record, "failed", message)
                raise Stop("failed", f"{title}: {message}") from None
            except asyncio.CancelledError:
                self.end_step(record, "failed", "cancelled")
                raise
            self.end_step(record, "ok", detail(result) if detail else "")
            if waiting:
                self.report.waiting_for = None
            if self.abort_requested is not None:
                await self.boundary()
            return result

    async def _worker_busy(self, queue: str, record: StepRecord) -> bool:
        """A step not picked up in `limits.worker_wait`: is a worker polling `queue` (busy, every slot taken)
        rather than missing? Then it is scheduled again, for up to `limits.busy_wait` in all. Asked on the workflow's
        queue, not as a local activity: with a full workflow cache, pending local activities stall a worker
        (temporalio/sdk-rust#886; seen here with 1000 procedures on one worker)."""
        if not workflow.patched("busy-workers"):
            return False
        limits = self.inventory.limits
        waited = self.busy_waited.get(record.name, 0.0) + limits.worker_wait
        if waited > limits.busy_wait:
            return False
        try:
            unserved: list[str] = await workflow.execute_activity(
                TEMPORAL_UNSERVED_QUEUES.name, [queue], result_type=TEMPORAL_UNSERVED_QUEUES.result_type,
                summary=f"is a worker polling {queue}?",
                **self.activity_options(self.inventory.task_queue, 10, None, 3))
        except ActivityError:
            return False
        if unserved:
            return False
        self.busy_waited[record.name] = waited
        busy = f"the worker serving {queue} is busy; scheduled again"
        self.end_step(record, "skipped", f"not picked up in {limits.worker_wait:.0f}s: {busy}")
        return True

    async def _race(self, handle: Any, interruptible: bool) -> bool:
        """Wait for the activity, or cancel it on an abort (or a pause, when interruptible). True if paused."""

        def interrupted() -> bool:
            return self.abort_requested is not None and not self.point_of_no_return or interruptible and self.paused

        await workflow.wait_condition(lambda: handle.done() or interrupted())
        if handle.done():
            return False
        # Histories recorded before interruptible steps waited for the step to end (replay keeps that).
        if not workflow.patched("interruptible-steps"):
            await workflow.wait_condition(handle.done)
            return False
        paused = self.paused and self.abort_requested is None
        self.report.waiting_for = "the running step to stop (cancelled)"
        self.show()
        handle.cancel()
        await workflow.wait_condition(handle.done)
        return paused

    def _check_declared(self, name: str) -> None:
        if self.declared is not None and not name.startswith("undo:") and name not in {d.name for d in self.declared}:
            raise ApplicationError(f"step {name!r} is not declared in the procedure's plan", type="BadProcedure",
                                   non_retryable=True)

    def begin_step(self, name: str, title: str, kind: str = "action") -> StepRecord:
        record = StepRecord(name=name, title=title, kind=kind, started_at=workflow.now())
        self.report.steps.append(record)
        self.report.current_step = name
        self.report.status = "running"
        self.report.waiting_for = None
        self.show()
        return record

    def end_step(self, record: StepRecord, outcome: str, detail: str = "") -> None:
        record.outcome = outcome  # type: ignore[assignment]
        record.ended_at = workflow.now()
        record.detail = detail
        self.show()

    async def wait(self, name: str, title: str, seconds: float) -> None:
        """A timed wait shown as a step (e.g. the drain, a bake); an abort ends it at once."""
        self._check_declared(name)
        await self.boundary()
        record = self.begin_step(name, title, "wait")
        self.report.waiting_for = f"{title} ({seconds:.0f}s)"
        self.show()
        try:
            await workflow.wait_condition(lambda: self.abort_requested is not None, timeout=timedelta(seconds=seconds))
        except asyncio.TimeoutError:
            pass
        self.report.waiting_for = None
        aborted = self.abort_requested is not None
        self.end_step(record, "failed" if aborted else "ok", "aborted" if aborted else "")
        await self.boundary()

    async def boundary(self) -> None:
        """Honour a pause (with its deadline and escalation) and an abort."""
        if self.abort_requested is None and self.paused:
            self.report.status = "paused"
            down = f" — WRITES ARE DOWN: {self.writes_down}" if self.writes_down else ""
            self.report.waiting_for = "resume (opsflow resume)" + down
            self.show()
            # A pause has a deadline (recorded histories paused without one: replay keeps that).
            limit = timedelta(seconds=self.inventory.limits.pause_timeout)
            deadline = limit if workflow.patched("pause-deadline") else None
            try:
                await workflow.wait_condition(lambda: not self.paused or self.abort_requested is not None,
                                              timeout=deadline)
            except asyncio.TimeoutError:
                minutes = self.inventory.limits.pause_timeout / 60
                await self.notify(
                    f"ESCALATION: {self.report.procedure} of {self.inventory.environment} paused for {minutes:.0f} min"
                    + (f"; WRITES ARE DOWN: {self.writes_down}" if self.writes_down else ""),
                    severity="critical",
                )
                self.report.waiting_for += " (escalated)"
                self.show()
                await workflow.wait_condition(lambda: not self.paused or self.abort_requested is not None)
            self.report.status = "running"
            self.report.waiting_for = None
        if self.abort_requested is not None:
            a = self.abort_requested
            raise Stop("aborted", f"aborted by {a.by}" + (f": {a.reason}" if a.reason else ""))

    def owe(self, undo: Undo) -> None:
        """Record what undoes a change, to run if the procedure stops (once, however often it is owed)."""
        if undo not in self.undo_stack:
            self.undo_stack.append(undo)

    async def undo(self) -> None:
        """Reverse the recorded steps, newest first. Each undo is tried hard, and bounded: one that cannot
        run says so in `remaining`, for a person to do."""
        while self.undo_stack:
            u = self.undo_stack.pop()
            record = self.begin_step(u.name or f"undo:{u.activity.name}", u.title, "undo")
            opts = self.activity_options(u.queue, u.timeout, u.heartbeat or u.activity.heartbeat, 10)
            opts["retry_policy"] = RetryPolicy(maximum_interval=timedelta(seconds=20), maximum_attempts=10)
            try:
                await workflow.execute_activity(u.activity.name, u.arg, summary=u.title, **opts)
                self.end_step(record, "compensated")
            except ActivityError as err:
                why = f"no worker serves {u.queue}" if not_started(err) else failure_message(err)
                self.end_step(record, "failed", why)
                self.report.remaining.append(f"{u.title} (undo failed: {why})")

    async def check_workers(self, queues: list[str], *, name: str = "preflight-workers") -> None:
        """Refuse before changing anything when a task queue this procedure will use has no worker."""
        if not workflow.patched("check-workers"):
            return
        unserved: list[str] = await self.step(
            name,
            "Check that a worker serves every task queue",
            TEMPORAL_UNSERVED_QUEUES,
            sorted(set(queues)),
            queue=self.inventory.task_queue,
            timeout=10,  # one DescribeTaskQueue per queue; a worker lost mid-check costs this, not the 60 s default
            attempts=3,
            detail=lambda u: f"unserved: {', '.join(u)}" if u else "all served",
        )
        if unserved:
            raise Stop("refused", "; ".join(f"no worker serves {q}" for q in unserved)
                       + " (start one: opsflow worker --env ...)")
