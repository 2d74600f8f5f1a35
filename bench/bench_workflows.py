"""Bench-only workflows and a no-op activity for `bench/overhead.py`. Not registered by the real worker.

`bench-steps` runs N no-op steps through the kernel's `Procedure.step` (the same code every procedure uses),
with a switch for what `show()` does at each step begin/end, so the cost of the UI mirror can be measured:

- full: the kernel's own show() (current details + search-attribute upsert on every begin and end)
- none: nothing (no details, no upsert)
- details: current details only
- upsert: the search-attribute upsert only
- changed: details always, the upsert only when OpsStep/OpsStatus change (the proposed fix)

`bench-raw` is the floor: the same N no-op activities with plain `workflow.execute_activity` (or
`execute_local_activity`), no kernel.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow

from workflows.procedure import Procedure

with workflow.unsafe.imports_passed_through():
    from opsflow.inventory import Inventory
    from opsflow.models import ProcedureReport
    from opsflow.temporal import OPS_STATUS, OPS_STEP


@activity.defn(name="bench.noop")
def noop(i: int) -> int:
    """A step with no work: what is left of the step's time is orchestration."""
    return i


class StepsInput(BaseModel):
    inventory: Inventory
    steps: int
    show: str = "full"  # full | none | details | upsert | changed
    queue: str


class BenchReport(ProcedureReport):
    procedure: str = "bench"


@workflow.defn(name="bench-steps")
class StepsWorkflow(Procedure):
    @workflow.init
    def __init__(self, inp: StepsInput) -> None:
        self.mode = inp.show
        self.shown: tuple[str, str] | None = None
        super().__init__(
            inp.inventory, BenchReport(workflow_id="", environment=inp.inventory.environment, requester="bench")
        )

    @workflow.run
    async def run(self, inp: StepsInput) -> BenchReport:
        async def body() -> None:
            for i in range(inp.steps):
                await self.step(
                    f"noop-{i}", f"No-op {i}", "bench.noop", i, result_type=int, queue=inp.queue, attempts=1
                )

        return await self.conclude(body)  # type: ignore[return-value]

    def show(self) -> None:
        if self.mode == "full":
            return super().show()
        if self.mode == "none":
            return
        r = self.report
        if self.mode in ("details", "changed"):
            lines = [
                f"**{r.procedure}** in `{r.environment}` — **{r.status}**",
                "",
                "| step | outcome | seconds |",
                "| --- | --- | --- |",
            ]
            lines += [f"| {s.title} | {s.outcome} | {s.seconds or ''} |" for s in r.steps]
            workflow.set_current_details("\n".join(lines))
        attrs = (r.current_step or "start", r.status)
        if self.mode == "upsert" or (self.mode == "changed" and attrs != self.shown):
            self.shown = attrs
            workflow.upsert_search_attributes([OPS_STEP.value_set(attrs[0]), OPS_STATUS.value_set(attrs[1])])


class RawInput(BaseModel):
    steps: int
    local: bool = False
    queue: str


@workflow.defn(name="bench-raw")
class RawWorkflow:
    @workflow.run
    async def run(self, inp: RawInput) -> int:
        for i in range(inp.steps):
            if inp.local:
                await workflow.execute_local_activity(
                    "bench.noop", i, result_type=int, start_to_close_timeout=timedelta(seconds=30)
                )
            else:
                await workflow.execute_activity("bench.noop", i, result_type=int, task_queue=inp.queue,
                                                start_to_close_timeout=timedelta(seconds=30))
        return inp.steps
