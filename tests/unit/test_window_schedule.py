"""The maintenance window as a Temporal Schedule's calendar (`opsflow.cron.window_spec`): weekly and monthly
windows, offsets, time zones with DST, and the windows no calendar can follow, refused.

The fire times are computed here from the structured spec by Temporal's documented rules (a time matches when
every field matches -- day_of_month AND day_of_week, unlike classic cron -- read in the spec's time zone; a wall
time the clocks skip does not fire, one they repeat fires at both instants: what the dev server answers,
tests/integration/test_schedules.py checks the same windows against it) and held against the calendar module's
own window openings: each window is fired for exactly once, at its opening or (DST) an hour before it."""

from __future__ import annotations

import argparse
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import yaml
from pydantic import TypeAdapter
from temporalio.client import ScheduleCalendarSpec, ScheduleRange

from opsflow.calendar import Calendar, Window
from opsflow.cron import CalendarError, window_spec
from starters.common import CliError
from starters.schedule_actions import build_schedule
from starters.schedules import _show_dry_run, register
from tests.workflow.conftest import inventory_dict

UTC = timezone.utc
TODAY = date(2026, 12, 7)
WINDOW = TypeAdapter(Window)


def _in(value: int, ranges) -> bool:
    return any(r.start <= value <= max(r.end, r.start) and (value - r.start) % (r.step or 1) == 0 for r in ranges)


def fire_times(spec: ScheduleCalendarSpec, zone_name: str, first: date, last: date) -> list[datetime]:
    """The instants (UTC) the spec matches on local days [first, last], by Temporal's rules (see the module)."""
    zone = ZoneInfo(zone_name)
    out = []
    day = first
    while day <= last:
        if (_in(day.month, spec.month) and _in(day.day, spec.day_of_month)
                and _in((day.weekday() + 1) % 7, spec.day_of_week)):
            for h in range(24):
                for m in range(60):
                    if not (_in(h, spec.hour) and _in(m, spec.minute)):
                        continue
                    naive = datetime.combine(day, time(h, m))
                    for fold in (0, 1):
                        t = naive.replace(tzinfo=zone, fold=fold)
                        if t.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive:  # exists
                            out.append(t.astimezone(UTC))
        day += timedelta(days=1)
    return sorted(set(out))


def openings(window, first: date, last: date) -> list[datetime]:
    return sorted(a for a, _ in window.occurrences(first, last))


@pytest.mark.parametrize(
    "text, calendar, zone, lead",
    [
        ("2nd sun 02:00-04:00 Europe/Berlin", "day_of_month=8-14 day_of_week=sun hour=2", "Europe/Berlin", 0),
        ("2nd sun +1d 02:00-04:00", "day_of_month=9-15 day_of_week=mon hour=2", "UTC", 0),
        # the Sunday after Patch Tuesday (SSM's schedule offset)
        ("2nd tue +5d 03:00-05:00 Australia/Sydney", "day_of_month=13-19 day_of_week=sun hour=3", "Australia/Sydney",
         0),
        ("1st sat +14d 23:00-01:00 Asia/Tokyo", "day_of_month=15-21 day_of_week=sat hour=23", "Asia/Tokyo", 0),
        ("5th sat 22:00-02:00 UTC", "day_of_month=29-31 day_of_week=sat hour=22", "UTC", 0),  # not every month
        # the US clocks spring forward on the 2nd Sunday of March at 02:00: 02:30 does not exist that day
        ("2nd sun 02:30-04:00 America/New_York", "day_of_month=8-14 day_of_week=sun hour=1 minute=30",
         "America/New_York", 1),
        # and fall back on the 1st Sunday of November: 01:30 happens twice
        ("1st sun 01:30-03:00 America/New_York", "day_of_month=1-7 day_of_week=sun minute=30", "America/New_York", 1),
        ({"days": ["sat", "sun"], "start": "02:30", "end": "03:30", "timezone": "Europe/Berlin"},
         "day_of_week=sun,sat hour=1 minute=30", "Europe/Berlin", 1),
        ({"days": ["mon", "tue", "wed", "fri"], "start": "04:15", "end": "05:00", "timezone": "America/Chicago"},
         "day_of_week=mon-wed,fri hour=4 minute=15", "America/Chicago", 0),
    ],
)
def test_each_window_is_fired_for_exactly_once(text, calendar, zone, lead):
    window = WINDOW.validate_python(text)
    ws = window_spec(window, TODAY)
    assert (ws.text, ws.timezone, ws.lead) == (calendar, zone, timedelta(hours=lead))
    assert ws.calendar.comment == f"window: {window.describe()}"
    assert bool(ws.warnings()) == bool(lead)
    # Three years of fire times against the calendar module's own openings of the window.
    first, last = TODAY, TODAY + timedelta(days=3 * 366)
    fires = fire_times(ws.calendar, ws.timezone, first, last)
    opens = openings(window, first, last)
    assert len(opens) >= 20 if "days" in str(text) or "sun" in str(text) else len(opens) >= 5
    assert len(fires) == len(opens), "a window fired for twice, or not at all"
    cal = Calendar(windows=[window])
    for f, o in zip(fires, opens):
        assert timedelta(0) <= o - f <= timedelta(hours=lead)  # at the opening, or (DST) at most an hour before
        assert (cal.next_opening(f) or f) == o  # the run waits for that opening (None: open now)


def test_the_dst_lead_is_needed_where_it_is_taken():
    # Without the lead, the US spring-forward Sunday's window would not fire (Temporal skips 02:30 that day).
    window = WINDOW.validate_python("2nd sun 02:30-04:00 America/New_York")
    naive = ScheduleCalendarSpec(day_of_week=(ScheduleRange(0),), day_of_month=(ScheduleRange(8, 14),),
                                 hour=(ScheduleRange(2),), minute=(ScheduleRange(30),))
    fires = fire_times(naive, "America/New_York", date(2027, 1, 1), date(2027, 12, 31))
    assert len(fires) == 11 and len(openings(window, date(2027, 1, 1), date(2027, 12, 31))) == 12
    assert "2027-03-14" in window_spec(window, TODAY).warnings()[0]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("last sun 02:00-04:00", "the days of the last weekday depend on the month's length"),
        ("4th sun +1d 02:00-04:00", "falls on day 23-29, past the 28th"),
        ("5th sun +2d 02:00-04:00", "past the 28th"),
        ("3rd fri +8d 02:00-04:00", "falls on day 23-29"),
        # the clocks skip 00:00-01:00 in Santiago on some Sundays: no room to fire an hour early on the same day
        ({"days": ["sun"], "start": "00:30", "end": "02:00", "timezone": "America/Santiago"}, "too close to midnight"),
        # St John's skips 02:00-03:00 in March and repeats 01:00-02:00 in November: an hour early is no way out
        ({"days": ["sun"], "start": "02:30", "end": "03:30", "timezone": "America/St_Johns"},
         "and so does 01:30, 1h earlier"),
    ],
)
def test_a_window_no_calendar_follows_is_refused(text, needle):
    with pytest.raises(CalendarError) as e:
        window_spec(WINDOW.validate_python(text), TODAY)
    assert needle in str(e.value) and "--calendar/--cron" in str(e.value)


def test_a_month_end_window_that_fits_is_kept():
    # 3rd + 7 days ends on the 28th: always in the month.
    assert window_spec(WINDOW.validate_python("3rd wed +7d 02:00-03:00"), TODAY).text == \
        "day_of_month=22-28 day_of_week=wed hour=2"


# -- schedule create: the window is the maintenance schedule's default calendar --------------------------------


def _args(tmp_path, window, *argv: str) -> argparse.Namespace:
    inv = tmp_path / "inventory.yaml"
    maintenance = None if window is None else {"window": window, "tasks": [{"kind": "vacuum", "tables": ["orders"]}]}
    inv.write_text(yaml.safe_dump(inventory_dict(environment="unit", maintenance=maintenance)))
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p.parse_args(["schedule", "create", "w", *argv, "--env", str(inv)])


def test_schedule_create_derives_the_spec_from_the_window(tmp_path, capsys):
    args = _args(tmp_path, "2nd sun +1d 02:00-04:00 Europe/Berlin", "--procedure", "maintenance", "--dry-run")
    inv, name, schedule, warnings = build_schedule(args)
    (cal,) = schedule.spec.calendars
    assert schedule.spec.time_zone_name == "Europe/Berlin" and not schedule.spec.cron_expressions and warnings == []
    assert cal == window_spec(inv.maintenance.window, date.today()).calendar
    _show_dry_run(inv, name, schedule, warnings, args)
    assert "spec sent to Temporal: day_of_month=9-15 day_of_week=mon hour=2  [Europe/Berlin]" in capsys.readouterr().out
    # --window says the same explicitly
    again = build_schedule(_args(tmp_path, "2nd sun +1d 02:00-04:00 Europe/Berlin", "--procedure", "maintenance",
                                 "--window"))[2]
    assert again.spec.calendars == schedule.spec.calendars


@pytest.mark.parametrize(
    "window, argv, needle",
    [
        ("last sun 02:00-04:00", [], "maintenance.window: the window 'last sun of the month"),
        (None, [], "the inventory has no maintenance: section"),
        ("2nd sun 02:00-04:00", ["--window", "--timezone", "Europe/Berlin"], "the window has its own time zone"),
    ],
)
def test_schedule_create_refuses_what_the_window_cannot_be(tmp_path, window, argv, needle):
    with pytest.raises(CliError) as e:
        build_schedule(_args(tmp_path, window, "--procedure", "maintenance", *argv))
    assert needle in str(e.value)


def test_window_is_for_maintenance_only(tmp_path):
    with pytest.raises(CliError) as e:
        build_schedule(_args(tmp_path, "2nd sun 02:00-04:00", "--procedure", "drill", "--window"))
    assert "--window is for --procedure maintenance" in str(e.value)
