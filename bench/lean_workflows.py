"""The procedures with the proposed `show()` fix, for `bench/concurrency.py --lean-show` (before/after figures).

Same workflow names and code as workflows/, only `show()` differs: the search attributes are upserted only when
OpsStep/OpsStatus change, and a dry-run plan draws once at its end instead of at every planned step (the lead
owns workflows/procedure.py; this is the measured shape of the proposed diff, not a second implementation).
"""

from __future__ import annotations

from temporalio import workflow

from workflows.drill import DrillInput, DrillWorkflow
from workflows.failback import FailbackWorkflow
from workflows.failover import FailoverInput, FailoverWorkflow
from workflows.procedure import Procedure
from workflows.scheduled import ScheduledLaunch

with workflow.unsafe.imports_passed_through():
    from opsflow.temporal import OPS_STATUS, OPS_STEP


class LeanShow(Procedure):
    _shown: tuple[str, str] | None = None
    _planning = False

    def plan(self) -> None:
        self._planning = True
        try:
            super().plan()
        finally:
            self._planning = False
        self.show()

    def show(self) -> None:
        if self._planning:
            return
        r = self.report
        lines = [f"**{r.procedure}** in `{r.environment}` — **{r.status}**"]
        if r.current_step:
            lines.append(f"current step: `{r.current_step}`")
        if r.waiting_for:
            lines.append(f"waiting for: {r.waiting_for}")
        lines += ["", "| step | outcome | seconds |", "| --- | --- | --- |"]
        for s in r.steps:
            lines.append(f"| {s.title} | {s.outcome} | {f'{s.seconds:.1f}' if s.seconds is not None else ''} |")
        workflow.set_current_details("\n".join(lines))
        attrs = (r.current_step or "start", r.status)
        if attrs != self._shown:
            self._shown = attrs
            workflow.upsert_search_attributes([OPS_STEP.value_set(attrs[0]), OPS_STATUS.value_set(attrs[1])])


@workflow.defn(name="failover")
class LeanFailover(LeanShow, FailoverWorkflow):
    @workflow.init
    def __init__(self, inp: FailoverInput) -> None:
        FailoverWorkflow.__init__(self, inp)

    @workflow.run
    async def run(self, inp: FailoverInput):
        return await FailoverWorkflow.run(self, inp)


@workflow.defn(name="drill")
class LeanDrill(LeanShow, DrillWorkflow):
    @workflow.init
    def __init__(self, inp: DrillInput) -> None:
        DrillWorkflow.__init__(self, inp)

    @workflow.run
    async def run(self, inp: DrillInput):
        return await DrillWorkflow.run(self, inp)


WORKFLOWS = [LeanFailover, LeanDrill, FailbackWorkflow, ScheduledLaunch]
