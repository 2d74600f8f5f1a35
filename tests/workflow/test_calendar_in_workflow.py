"""The calendar inside a real (sandboxed) workflow on the time-skipping server: the model travels in the input
with its .ics events already expanded (the file is gone by then), the answers at `workflow.now()` are the ones
the same calendar gives outside, and a workflow can sleep until `next_opening`."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel
from temporalio import workflow
from temporalio.worker import Worker

from opsflow.calendar import Calendar, Freeze, FreezeCalendar, WeeklyWindow


class Probe(BaseModel):
    calendar: Calendar


class Seen(BaseModel):
    at: datetime
    open: bool
    next_opening: datetime | None
    frozen: str | None
    opened_at: datetime
    open_then: bool
    time_left: timedelta


@workflow.defn(name="calendar-probe")
class CalendarProbe:
    @workflow.run
    async def run(self, probe: Probe) -> Seen:
        cal, now = probe.calendar, workflow.now()
        opens = cal.next_opening(now)
        hit = cal.frozen(now)
        if opens is not None:
            await workflow.sleep(opens - now)
        later = workflow.now()
        return Seen(at=now, open=cal.is_open(now), next_opening=opens, frozen=hit.name if hit else None,
                    opened_at=later, open_then=cal.is_open(later), time_left=cal.time_left(later))


async def test_calendar_answers_in_a_workflow_as_outside_and_waits_for_the_opening(env, tmp_path):
    data = Path(__file__).resolve().parents[1] / "unit" / "data"  # not at import: the sandbox re-imports this module
    (tmp_path / "freezes.ics").write_bytes((data / "freezes.ics").read_bytes())
    ics = FreezeCalendar.model_validate("freezes.ics", context={"base_dir": str(tmp_path)})
    (tmp_path / "freezes.ics").unlink()  # the workflow must not need the file
    soon = datetime.now(timezone.utc) + timedelta(hours=3)
    window = WeeklyWindow(days="mon-sun", start=f"{soon:%H}:00", end=f"{(soon + timedelta(hours=1)):%H}:00")
    cal = Calendar(
        windows=[window], freezes=[Freeze(name="never mind", start="2020-01-01", end="2020-01-02")], ics=[ics]
    )
    queue = f"calendar-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=queue, workflows=[CalendarProbe]):
        seen = await env.client.execute_workflow(
            "calendar-probe",
            Probe(calendar=cal),
            id=f"probe-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=Seen,
        )
    assert seen.open == cal.is_open(seen.at) and seen.next_opening == cal.next_opening(seen.at)
    assert seen.frozen == (cal.frozen(seen.at).name if cal.frozen(seen.at) else None)
    assert not seen.open and seen.next_opening > seen.at  # the window is hours away
    assert seen.opened_at >= seen.next_opening and seen.open_then  # slept until it opened
    assert seen.time_left == cal.time_left(seen.opened_at) and timedelta(0) < seen.time_left <= timedelta(hours=1)
