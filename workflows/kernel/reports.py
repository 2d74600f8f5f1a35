"""The report kept at the end: JSON and Markdown in the inventory's reports directory and S3, for every procedure
(the evidence a postmortem or an audit asks for), best effort and bounded."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.notify import REPORT_STORE
    from opsflow.models import ControlEvent, StoreReportRequest
    from opsflow.report import to_markdown

from workflows.kernel.common import failure_message


class Reports:
    """The report's keeping (a part `Procedure` composes; `self` is the procedure)."""

    stores_own_report = False  # True: the procedure's finalize() stores it (the drill, before its summary line)

    async def store_report(self) -> None:
        """Keep the report; one that cannot be stored is noted in it, and the procedure's outcome stands."""
        report, inv = self.report, self.inventory
        if inv is None or report.dry_run:  # refused before the worker's rules were taken, or a plan: nothing to keep
            return
        run_id = workflow.info().run_id
        # The whole run id: its first 8 characters are a time prefix (UUIDv7) that runs a minute apart share, and
        # one run's report overwrote the other's (the drill's trend read one drill where two had run).
        stem = f"{report.workflow_id}-{run_id}" if workflow.patched("report-whole-run-id") else \
            f"{report.workflow_id}-{run_id[:8]}"
        request = StoreReportRequest(
            environment=inv.environment,
            workflow_id=stem,
            reports_dir=inv.reports_dir,
            store=inv.reports,
            aws=inv.aws,
            json_text=report.model_dump_json(indent=2),
            markdown=to_markdown(report),
        )
        try:  # a worker lost while it writes costs the heartbeat timeout, not the 60 s bound (the activity heartbeats)
            report.stored_at = await workflow.execute_activity(
                REPORT_STORE.name, request, result_type=REPORT_STORE.result_type,
                summary=f"store the {report.procedure} report", **self.aside_options(REPORT_STORE, 60, 5))
        except ActivityError as err:
            report.events.append(ControlEvent(action="report-store-failed", by="opsflow", at=workflow.now(),
                                              reason=failure_message(err)))
