from datetime import datetime

import pytest
from pydantic import ValidationError

from opsflow.inventory import TimeWindow


def at(s: str) -> datetime:
    return datetime.fromisoformat(s)


def test_inside_the_window_is_none_and_outside_gives_the_next_opening():
    w = TimeWindow(days=["sun"], start="02:00", end="04:00")
    assert w.next_opening(at("2026-11-22T03:00:00+00:00")) is None  # Sunday 03:00
    assert w.next_opening(at("2026-11-22T01:59:00+00:00")) == at("2026-11-22T02:00:00+00:00")
    assert w.next_opening(at("2026-11-22T04:00:00+00:00")) == at("2026-11-29T02:00:00+00:00")  # closed at 04:00
    assert w.next_opening(at("2026-11-23T03:00:00+00:00")) == at("2026-11-29T02:00:00+00:00")


def test_window_across_midnight_and_time_zone():
    w = TimeWindow(days=["sat"], start="23:00", end="01:00", timezone="Europe/Berlin")
    assert w.next_opening(at("2026-11-21T23:30:00+00:00")) is None  # Sunday 00:30 Berlin, inside Saturday's window
    assert w.next_opening(at("2026-11-22T00:30:00+00:00")) == at("2026-11-28T22:00:00+00:00")


def test_bad_window_is_refused():
    with pytest.raises(ValidationError, match="timezone"):
        TimeWindow(days=["sun"], start="02:00", end="04:00", timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="start"):
        TimeWindow(days=["sun"], start="25:00", end="04:00")


def test_monthly_window_by_weekday_in_a_time_zone_across_dst():
    from opsflow.calendar import MonthlyWindow

    w = MonthlyWindow.model_validate("2nd sun 02:00-04:00 Europe/Berlin")
    assert (w.monthly, w.start, w.end, w.timezone) == ("2nd sun", "02:00", "04:00", "Europe/Berlin")
    # 2nd Sunday of March 2026 is the 8th (CET, UTC+1); of April the 12th (CEST, UTC+2): the same wall time
    assert w.next_opening(at("2026-03-01T00:00:00+00:00")) == at("2026-03-08T01:00:00+00:00")
    assert w.closes_at(at("2026-03-08T01:30:00+00:00")) == at("2026-03-08T03:00:00+00:00")
    assert w.next_opening(at("2026-03-08T03:00:00+00:00")) == at("2026-04-12T00:00:00+00:00")
    assert w.is_open(at("2026-04-12T01:59:00+00:00")) and not w.is_open(at("2026-04-19T01:00:00+00:00"))
    # the last Sunday of March is the spring-forward night: 02:00 does not exist, the window is 03:00-04:00 CEST
    last = MonthlyWindow.model_validate("last sun 02:00-04:00 Europe/Berlin")
    opens = last.next_opening(at("2026-03-09T00:00:00+00:00"))
    assert opens == at("2026-03-29T01:00:00+00:00") and last.closes_at(opens) == at("2026-03-29T02:00:00+00:00")
    # ... and the last Sunday of October the fall-back night: 02:00 first time to 04:00, three hours
    opens = last.next_opening(at("2026-10-01T00:00:00+00:00"))
    assert opens == at("2026-10-25T00:00:00+00:00") and last.closes_at(opens) == at("2026-10-25T03:00:00+00:00")
    # across midnight, in New York
    ny = MonthlyWindow.model_validate("1st sat 23:00-01:00 America/New_York")
    assert ny.next_opening(at("2026-11-01T00:00:00+00:00")) == at("2026-11-08T04:00:00+00:00")  # Sat 7th, EST
    assert ny.closes_at(at("2026-11-08T05:00:00+00:00")) == at("2026-11-08T06:00:00+00:00")


def test_monthly_window_fifth_weekday_only_in_months_that_have_one_and_ssm_offset():
    from opsflow.calendar import MonthlyWindow

    fifth = MonthlyWindow.model_validate("5th sun 02:00-04:00")
    # March 2026 has five Sundays (the 29th), April has four, May five again (the 31st)
    assert fifth.next_opening(at("2026-03-01T00:00:00+00:00")) == at("2026-03-29T02:00:00+00:00")
    assert fifth.next_opening(at("2026-03-30T00:00:00+00:00")) == at("2026-05-31T02:00:00+00:00")
    # SSM's schedule offset: the Sunday after Patch Tuesday (2nd Tuesday + 5 days)
    patch = MonthlyWindow.model_validate({"monthly": "second tuesday", "offset_days": 5, "start": "02:00",
                                          "end": "06:00"})
    assert patch.monthly == "2nd tue"
    assert patch.next_opening(at("2026-03-01T00:00:00+00:00")) == at("2026-03-15T02:00:00+00:00")
    assert patch.next_opening(at("2026-03-16T00:00:00+00:00")) == at("2026-04-19T02:00:00+00:00")  # Apr 14 + 5
    assert MonthlyWindow.model_validate("2nd tue +5d 02:00-06:00") == patch


def test_bad_monthly_windows_are_refused_naming_what_is_wrong():
    from opsflow.calendar import MonthlyWindow
    from opsflow.maintenance import MaintenancePolicy

    for text, says in (("9th sun 02:00-04:00", "weekday of the month"),
                       ("2nd funday 02:00-04:00", "weekday of the month"),
                       ("2nd sun", "is not a monthly window"),
                       ("2nd sun 02:00-04:00 Mars/Olympus", "unknown time zone"),
                       ("2nd sun 25:00-04:00", "not a time of day")):
        with pytest.raises(ValidationError, match=says):
            MonthlyWindow.model_validate(text)
    with pytest.raises(ValidationError, match=r"window\.monthly\.offset_days"):
        window = {"monthly": "2nd sun", "offset_days": 30, "start": "02:00", "end": "04:00"}
        MaintenancePolicy.model_validate({"window": window, "tasks": [{"kind": "vacuum", "tables": ["t"]}]})


def test_an_ics_freeze_skips_a_monthly_maintenance_window_and_the_notes_say_which(tmp_path):
    """The rollout section's .ics calendar (read by icalendar + recurring-ical-events when the inventory loads,
    expanded from today) holds the maintenance window too; a freeze over a window skips it, one over the end of
    the next shortens it."""
    from datetime import timedelta, timezone

    import yaml

    from opsflow.calendar import Calendar, MonthlyWindow
    from opsflow.inventory import load_inventory
    from opsflow.maintenance import calendar_notes
    from tests.workflow.conftest import inventory_dict
    from tests.workflow.test_canary_workflow import ROLLOUT

    window = MonthlyWindow.model_validate("2nd sun 02:00-04:00")
    since = datetime.now(timezone.utc) + timedelta(days=40)
    first = window.next_opening(since)
    second = window.next_opening(first + timedelta(days=1))

    def stamp(t: datetime) -> str:
        return t.strftime("%Y%m%dT%H%M%SZ")

    (tmp_path / "freezes.ics").write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:a@test\r\nSUMMARY:quarter close\r\nDTSTART:{stamp(first - timedelta(days=3))}\r\n"
        f"DTEND:{stamp(first + timedelta(days=3))}\r\nEND:VEVENT\r\n"
        f"BEGIN:VEVENT\r\nUID:b@test\r\nSUMMARY:batch\r\nDTSTART:{stamp(second + timedelta(hours=1))}\r\n"
        f"DTEND:{stamp(second + timedelta(hours=7))}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
    raw = inventory_dict(rollout={**ROLLOUT, "ics": ["freezes.ics"]},
                         maintenance={"window": "2nd sun 02:00-04:00", "tasks": [{"kind": "vacuum", "tables": ["t"]}]})
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(raw))
    inv = load_inventory(tmp_path / "inv.yaml")
    policy = inv.maintenance
    cal = policy.calendar(inv.rollout)
    opens, notes = calendar_notes(cal, Calendar(windows=[policy.window]), since)
    assert opens == second
    assert notes == [f"the window {first:%Y-%m-%d} 02:00-04:00Z is skipped (freeze quarter close)",
                     f"the window of {second:%Y-%m-%d} is shortened: it closes at 03:00Z instead of 04:00Z "
                     "(freeze batch starts)"]
    # rollout_freezes: false -- the window's own freezes only
    alone = policy.model_copy(update={"rollout_freezes": False}).calendar(inv.rollout)
    assert alone.next_opening(since) == first
