"""Deployment freeze calendars in iCalendar (.ics) files: every event (recurrences expanded) is a freeze.

The workflow decides at `workflow.now()` whether it is frozen; reading the files is I/O, so this activity
expands the events around now into plain intervals that go into the history."""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from pathlib import Path

import icalendar
import recurring_ical_events
from temporalio import activity
from temporalio.exceptions import ApplicationError

from opsflow.rollout import FreezeEvent, FreezesRequest


def _aware(value) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):  # an all-day event: the whole day in UTC
        return datetime.combine(value, time(0), timezone.utc)
    raise ValueError(f"not a date: {value!r}")


def freezes_in(path: str, start: datetime, end: datetime) -> list[FreezeEvent]:
    p = Path(path).expanduser()
    try:
        cal = icalendar.Calendar.from_ical(p.read_bytes())
    except FileNotFoundError:
        raise ApplicationError(f"freeze calendar {p} does not exist", type="BadInput", non_retryable=True) from None
    except ValueError as e:
        raise ApplicationError(f"freeze calendar {p} is not valid iCalendar: {e}", type="BadInput", non_retryable=True) from None
    out = []
    for ev in recurring_ical_events.of(cal).between(start, end):
        s = _aware(ev.get("DTSTART").dt)
        e = _aware(ev.get("DTEND").dt) if ev.get("DTEND") else s
        out.append(FreezeEvent(name=str(ev.get("SUMMARY", "freeze")), start=s, end=e))
    return out


@activity.defn(name="calendar.freezes")
def freezes(req: FreezesRequest) -> list[FreezeEvent]:
    """Every freeze event of the calendars that overlaps [start, end]."""
    return [f for path in req.calendars for f in freezes_in(path, req.start, req.end)]
