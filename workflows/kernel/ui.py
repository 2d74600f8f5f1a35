"""What people see: notifications, and the report mirrored into the Temporal UI (details, search attributes)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.notify import NOTIFY_SEND
    from opsflow.models import ControlEvent, Notification, NotifyRequest
    from opsflow.temporal import OPS_STATUS, OPS_STEP

from workflows.kernel.common import failure_message


class Display:
    """The ui of a procedure (a part `Procedure` composes; `self` is the procedure)."""

    async def notify(self, text: str, *, severity: str = "info", channels: list[str] | None = None) -> None:
        """Best effort: a notification that cannot be delivered is noted, never fails the procedure."""
        if self.inventory is None or not self.inventory.notifications:
            return
        request = NotifyRequest(
            notification=Notification(
                environment=self.inventory.environment,
                channels=channels or [],
                text=text,
                severity=severity,
                workflow_id=self.report.workflow_id,
            ),  # type: ignore[arg-type]
            channels=self.inventory.notifications,
        )
        # A worker lost while it sends costs the heartbeat timeout, not the 30 s bound (the activity heartbeats).
        try:
            await workflow.execute_activity(NOTIFY_SEND.name, request, summary=f"notify: {text[:60]}",
                                            **self.aside_options(NOTIFY_SEND, 30, 3))
        except ActivityError as err:
            self.report.events.append(
                ControlEvent(action="notify-failed", by="opsflow", at=workflow.now(), reason=failure_message(err))
            )

    def show(self) -> None:
        """Mirror the report into the Temporal UI: current details (markdown) and search attributes."""
        r = self.report
        lines = [f"**{r.procedure}** in `{r.environment}` — **{r.status}**"]
        if r.current_step:
            lines.append(f"current step: `{r.current_step}`")
        if r.waiting_for:
            lines.append(f"waiting for: {r.waiting_for}")
        lines.append("")
        lines.append("| step | outcome | seconds |")
        lines.append("| --- | --- | --- |")
        for s in r.steps:
            secs = f"{s.seconds:.1f}" if s.seconds is not None else ""
            lines.append(f"| {s.title} | {s.outcome} | {secs} |")
        workflow.set_current_details("\n".join(lines))
        shown = (r.current_step or "start", r.status)
        # An upsert is a command in history and costs a round trip: only when a value changed (recorded
        # histories upserted on every redraw; replay keeps that).
        if shown == self._shown and workflow.patched("lean-ui"):
            return
        self._shown = shown
        workflow.upsert_search_attributes([OPS_STEP.value_set(shown[0]), OPS_STATUS.value_set(shown[1])])
