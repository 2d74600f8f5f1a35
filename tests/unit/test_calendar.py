"""opsflow/calendar.py: weekly windows (DST nights, across midnight), cutoffs, inline and .ics freezes, and the
calendar answering at an instant."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from opsflow.calendar import Calendar, Freeze, FreezeCalendar, FreezeHit, NeverOpens, WeeklyWindow, wall_to_instant
from opsflow.inventory import Inventory, TimeWindow, load_inventory
from tests.workflow.conftest import inventory_dict

UTC = timezone.utc
DATA = Path(__file__).parent / "data"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- weekly windows on the nights the clocks change ---------------------------------------------------------


def test_spring_forward_berlin_window_is_one_hour_shorter():
    # 2026-03-29: Berlin's clocks jump 02:00 CET -> 03:00 CEST (01:00 UTC). 02:00 does not exist: the window
    # opens when the clocks jump, and closes at 04:00 CEST: one hour instead of two.
    w = WeeklyWindow(days=["sun"], start="02:00", end="04:00", timezone="Europe/Berlin")
    assert w.next_opening(utc(2026, 3, 29, 0, 59)) == utc(2026, 3, 29, 1, 0)
    assert w.is_open(utc(2026, 3, 29, 1, 0)) and w.closes_at(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 29, 2, 0)
    assert w.time_left(utc(2026, 3, 29, 1, 0)) == timedelta(hours=1)
    assert not w.is_open(utc(2026, 3, 29, 2, 0))
    # The week before, in winter time, the same window is two hours: 01:00-03:00 UTC.
    assert w.time_left(utc(2026, 3, 22, 1, 0)) == timedelta(hours=2)


def test_fall_back_berlin_window_is_one_hour_longer():
    # 2026-10-25: 03:00 CEST -> 02:00 CET (01:00 UTC), so 02:00-03:00 happens twice. The window opens at the first
    # 02:00 (00:00 UTC) and closes at 04:00 CET (03:00 UTC): three hours.
    w = WeeklyWindow(days=["sun"], start="02:00", end="04:00", timezone="Europe/Berlin")
    assert w.next_opening(utc(2026, 10, 24, 23, 0)) == utc(2026, 10, 25, 0, 0)
    assert w.time_left(utc(2026, 10, 25, 0, 0)) == timedelta(hours=3)
    assert w.is_open(utc(2026, 10, 25, 1, 30))  # the second 02:30
    assert not w.is_open(utc(2026, 10, 25, 3, 0))


def test_a_window_ending_in_the_repeated_hour_closes_at_its_last_occurrence():
    w = WeeklyWindow(days=["sun"], start="01:00", end="02:30", timezone="Europe/Berlin")
    # 01:00 CEST = 23:00 UTC (Saturday); the last 02:30 is CET = 01:30 UTC.
    assert w.time_left(utc(2026, 10, 24, 23, 0)) == timedelta(hours=2, minutes=30)


def test_spring_forward_new_york():
    # 2026-03-08: New York jumps 02:00 EST -> 03:00 EDT (07:00 UTC).
    w = WeeklyWindow(days=["sun"], start="02:00", end="04:00", timezone="America/New_York")
    assert w.next_opening(utc(2026, 3, 8, 6, 0)) == utc(2026, 3, 8, 7, 0)
    assert w.time_left(utc(2026, 3, 8, 7, 0)) == timedelta(hours=1)
    # A window entirely inside the skipped hour does not happen that night.
    gap = WeeklyWindow(days=["sun"], start="02:10", end="02:50", timezone="America/New_York")
    assert gap.next_opening(utc(2026, 3, 8, 6, 0)) == utc(2026, 3, 15, 6, 10)  # the next Sunday, EDT


def test_fall_back_new_york():
    # 2026-11-01: 02:00 EDT -> 01:00 EST (06:00 UTC): 01:00-02:00 happens twice.
    w = WeeklyWindow(days=["sun"], start="01:00", end="03:00", timezone="America/New_York")
    assert w.next_opening(utc(2026, 11, 1, 4, 0)) == utc(2026, 11, 1, 5, 0)  # the first 01:00 (EDT)
    assert w.time_left(utc(2026, 11, 1, 5, 0)) == timedelta(hours=3)  # until 03:00 EST = 08:00 UTC


def test_wall_to_instant_gap_and_fold():
    from datetime import date, time
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    assert wall_to_instant(date(2026, 3, 29), time(2, 30), berlin) == utc(2026, 3, 29, 1, 0)  # the jump
    assert wall_to_instant(date(2026, 10, 25), time(2, 30), berlin) == utc(2026, 10, 25, 0, 30)
    assert wall_to_instant(date(2026, 10, 25), time(2, 30), berlin, last=True) == utc(2026, 10, 25, 1, 30)


# -- across midnight ---------------------------------------------------------------------------------------


def test_window_across_midnight():
    w = WeeklyWindow(days=["sat"], start="22:00", end="02:00")
    assert w.is_open(utc(2026, 11, 22, 1, 0))  # Sunday 01:00, in Saturday's window
    assert w.next_opening(utc(2026, 11, 22, 1, 0)) is None
    assert w.closes_at(utc(2026, 11, 22, 1, 0)) == utc(2026, 11, 22, 2, 0)
    assert w.time_left(utc(2026, 11, 22, 1, 0, 30)) == timedelta(minutes=59, seconds=30)
    assert not w.is_open(utc(2026, 11, 22, 3, 0))  # Sunday 03:00
    assert w.closes_at(utc(2026, 11, 22, 3, 0)) is None and w.time_left(utc(2026, 11, 22, 3, 0)) == timedelta(0)
    assert w.next_opening(utc(2026, 11, 22, 3, 0)) == utc(2026, 11, 28, 22, 0)
    assert not w.is_open(utc(2026, 11, 21, 1, 0))  # Saturday 01:00: Friday has no window


def test_whole_days_chain_and_never_report_a_false_close():
    w = WeeklyWindow(days="sat-sun", start="00:00", end="00:00")
    assert w.closes_at(utc(2026, 11, 21, 9, 0)) == utc(2026, 11, 23, 0, 0)  # Saturday: open until Monday
    every = WeeklyWindow(days="mon-sun", start="00:00", end="00:00")
    assert every.is_open(utc(2026, 11, 21, 9, 0)) and every.time_left(utc(2026, 11, 21, 9, 0)) > timedelta(days=7)


def test_time_zone_of_the_answer_follows_now():
    w = WeeklyWindow(days=["sun"], start="02:00", end="04:00")
    now = datetime.fromisoformat("2026-11-22T00:30:00+01:00")
    assert w.next_opening(now) == utc(2026, 11, 22, 2, 0) and w.next_opening(now).utcoffset() == timedelta(hours=1)
    with pytest.raises(ValueError, match="no time zone"):
        w.is_open(datetime(2026, 11, 22, 3, 0))


def test_cutoff():
    w = WeeklyWindow(days=["sun"], start="02:00", end="04:00")
    assert not w.cutoff_reached(utc(2026, 11, 22, 3, 39), 20 * 60)  # 21 minutes left
    assert w.cutoff_reached(utc(2026, 11, 22, 3, 40), 20 * 60)  # 20 left: no new task
    assert w.cutoff_reached(utc(2026, 11, 22, 5, 0), 0)  # closed
    cal = Calendar(
        windows=[w], freezes=[Freeze(name="db upgrade", start=utc(2026, 11, 22, 3, 30), end=utc(2026, 11, 22, 6))]
    )
    # A freeze starting inside the window ends it early: the cutoff counts from the freeze.
    assert cal.closes_at(utc(2026, 11, 22, 3, 0)) == utc(2026, 11, 22, 3, 30)
    assert cal.cutoff_reached(utc(2026, 11, 22, 3, 15), 15 * 60) and not cal.cutoff_reached(
        utc(2026, 11, 22, 3, 14), 15 * 60
    )


def test_days_and_times_as_people_write_them():
    assert WeeklyWindow(days="mon-fri", start="9:00", end="17:00").days == ["mon", "tue", "wed", "thu", "fri"]
    assert WeeklyWindow(days=["Sunday", "fri-mon"], start="02:00", end="04:00").days == ["mon", "fri", "sat", "sun"]
    # YAML 1.1 reads an unquoted 22:30 as the number 1350 (base 60), and 2:00 as 120.
    assert yaml.safe_load("{start: 22:30, end: 2:00}") == {"start": 1350, "end": 120}
    w = WeeklyWindow.model_validate(yaml.safe_load("{days: [sat], start: 22:30, end: 2:00}"))
    assert (w.start, w.end) == ("22:30", "02:00")
    assert TimeWindow is WeeklyWindow


@pytest.mark.parametrize(
    "fields, where, needle",
    [
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone 'Mars/Olympus'"),
        ({"start": "25:00"}, "start", "'25:00' is not a time of day HH:MM"),
        ({"end": "24:00"}, "end", "'24:00' is not a time of day HH:MM"),
        ({"end": 1500}, "end", "'25:00' is not a time of day HH:MM"),  # YAML's unquoted 25:00
        ({"days": ["funday"]}, "days", "'funday' is not a day"),
        ({"days": []}, "days", "at least 1 item"),
        ({"until": "04:00"}, "until", "Extra inputs are not permitted"),
    ],
)
def test_bad_window_names_the_field(fields, where, needle):
    with pytest.raises(ValidationError) as exc:
        WeeklyWindow.model_validate({"days": ["sun"], "start": "02:00", "end": "04:00", **fields})
    err = exc.value.errors()[0]
    assert err["loc"][0] == where and needle in str(exc.value)


def test_bad_window_in_an_inventory_names_its_path(tmp_path):
    inv = inventory_dict(
        failback={"window": {"days": ["sun"], "start": "02:00", "end": "04:00", "timezone": "Europe/Atlantis"}}
    )
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
    with pytest.raises(ValueError, match=r"failback\.window\.timezone: .*unknown time zone 'Europe/Atlantis'"):
        load_inventory(tmp_path / "inv.yaml")


# -- freezes -----------------------------------------------------------------------------------------------


WEEKEND = [
    {"days": ["fri"], "start": "12:00", "end": "00:00"},
    {"days": ["sat", "sun"], "start": "00:00", "end": "00:00"},
]


def test_weekly_freeze_friday_noon_through_the_weekend():
    cal = Calendar(
        windows=[WeeklyWindow(days="tue-thu", start="10:00", end="16:00")],
        freezes=[Freeze(name="weekend", weekly=WEEKEND)],
    )
    assert cal.frozen(utc(2026, 11, 27, 11, 59)) is None  # Friday morning
    assert cal.frozen(utc(2026, 11, 27, 12, 0)) == FreezeHit(name="weekend", until=utc(2026, 11, 30, 0, 0))
    assert cal.frozen(utc(2026, 11, 29, 23, 0)).until == utc(2026, 11, 30, 0, 0)
    assert not cal.is_open(utc(2026, 11, 30, 11, 0))  # Monday: no freeze, but outside the window
    assert cal.next_opening(utc(2026, 11, 27, 13, 0)) == utc(2026, 12, 1, 10, 0)


def test_inline_freeze_with_dates_covers_the_end_date():
    f = Freeze(name="holidays", start="2026-12-24", end="2026-12-26", timezone="Europe/Berlin")
    assert f.start == utc(2026, 12, 23, 23, 0) and f.end == utc(2026, 12, 26, 23, 0)
    assert f.describe() == "holidays: 2026-12-24 00:00 to 2026-12-27 00:00 Europe/Berlin"
    cal = Calendar(freezes=[f])
    assert cal.is_open(utc(2026, 12, 23, 22, 59)) and not cal.is_open(utc(2026, 12, 26, 22, 0))
    assert cal.closes_at(utc(2026, 12, 20)) == utc(2026, 12, 23, 23, 0)
    assert cal.next_opening(utc(2026, 12, 25)) == utc(2026, 12, 26, 23, 0)


def test_overlapping_freezes_join_and_name_each():
    cal = Calendar(freezes=[Freeze(name="black friday", start=utc(2026, 11, 26), end=utc(2026, 11, 28)),
                            Freeze(name="weekend", weekly=WEEKEND)])
    hit = cal.frozen(utc(2026, 11, 27, 13, 0))
    assert hit.name == "black friday, weekend" and hit.until == utc(2026, 11, 30)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"start": "2026-12-24T00:00:00Z"}, "give both start and end"),
        ({}, "give either start and end, or weekly"),
        ({"start": "2026-12-24", "end": "2026-12-20"}, "is not after start"),
        ({"start": "2026-12-24", "end": "2026-12-25", "weekly": WEEKEND}, "give either start and end, or weekly"),
        ({"start": "2026-12-24", "end": "2026-12-25", "timezone": "Nowhere/Land"}, "unknown time zone"),
        ({"start": "2026-12-24", "end": "2026-12-25", "reason": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_freezes(fields, needle):
    with pytest.raises(ValidationError, match=needle):
        Freeze.model_validate({"name": "f", **fields})


def test_a_calendar_that_never_opens_says_so():
    cal = Calendar(freezes=[Freeze(name="forever", start=utc(2026, 1, 1), end=utc(2030, 1, 1))])
    with pytest.raises(NeverOpens, match="does not open within 400 days") as exc:
        cal.next_opening(utc(2026, 6, 1))
    # Uncaught in a workflow, it fails the run rather than retrying the workflow task for ever.
    assert exc.value.non_retryable and exc.value.type == "NeverOpens" and isinstance(exc.value, ValueError)


# -- .ics freeze calendars ---------------------------------------------------------------------------------


def ics(now: datetime, path: str = "freezes.ics") -> FreezeCalendar:
    return FreezeCalendar.model_validate(
        {"path": path, "timezone": "Europe/Berlin"}, context={"base_dir": str(DATA), "now": now}
    )


def test_ics_weekly_freeze_with_an_exdate_and_a_holiday():
    cal = Calendar(ics=[ics(utc(2026, 11, 1))])
    # The weekly freeze: Friday 12:00 Berlin (11:00 UTC) until Monday 00:00 Berlin.
    assert cal.frozen(utc(2026, 11, 13, 10, 59)) is None
    assert cal.frozen(utc(2026, 11, 13, 11, 0)) == FreezeHit(
        name="Friday release freeze", until=utc(2026, 11, 15, 23, 0)
    )
    # 20 November is excluded (EXDATE): that weekend is open.
    assert cal.frozen(utc(2026, 11, 21, 12, 0)) is None
    assert cal.frozen(utc(2026, 11, 28, 12, 0)).name == "Friday release freeze"
    # The one-off holiday, an all-day event in the calendar's zone (Thursday 24 December).
    assert cal.frozen(utc(2026, 12, 24, 12, 0)) == FreezeHit(name="Christmas Eve", until=utc(2026, 12, 24, 23, 0))
    assert cal.next_opening(utc(2026, 12, 24, 12, 0)) == utc(2026, 12, 24, 23, 0)


def test_ics_is_expanded_at_load_over_a_bounded_horizon_and_travels_without_the_file(tmp_path):
    loaded = ics(utc(2026, 11, 1))
    assert loaded.covered_from == utc(2026, 10, 31) and loaded.covered_until == utc(2026, 10, 31) + timedelta(days=400)
    assert len(loaded.events) == 400 // 7 - 1 + 1  # a weekly freeze over 400 days, one excluded, plus the holiday
    # What a workflow receives (the model as JSON) needs no file to answer.
    again = FreezeCalendar.model_validate_json(loaded.model_dump_json(), context={"base_dir": str(tmp_path)})
    assert again.events == loaded.events
    # Past the expanded range the calendar does not know: frozen, with the reason.
    hit = Calendar(ics=[loaded]).frozen(utc(2028, 1, 7))
    assert hit.until is None and "reload the inventory" in hit.name
    # Where the expanded range ends, an open calendar closes (a freeze-free file: only the holiday).
    holiday = (DATA / "freezes.ics").read_text().split("BEGIN:VEVENT")
    (tmp_path / "holiday.ics").write_text(holiday[0] + "BEGIN:VEVENT" + holiday[2])
    only = FreezeCalendar.model_validate("holiday.ics", context={"base_dir": str(tmp_path), "now": utc(2026, 11, 1)})
    assert [e.name for e in only.events] == ["Christmas Eve"]
    assert Calendar(ics=[only]).closes_at(utc(2027, 12, 1, 1)) == only.covered_until


def test_bad_ics_names_the_file(tmp_path):
    (tmp_path / "bad.ics").write_text("this is not a calendar")
    with pytest.raises(ValidationError, match="bad.ics is not valid iCalendar"):
        FreezeCalendar.model_validate("bad.ics", context={"base_dir": str(tmp_path)})
    with pytest.raises(ValidationError, match="cannot read the freeze calendar .*missing.ics"):
        FreezeCalendar.model_validate("missing.ics", context={"base_dir": str(tmp_path)})


def test_inventory_ics_path_is_relative_to_the_inventory(tmp_path):
    # The inventory has no calendar section of its own yet: a Calendar model loaded the way load_inventory does.
    (tmp_path / "freezes.ics").write_bytes((DATA / "freezes.ics").read_bytes())
    cal = Calendar.model_validate(
        {"ics": ["freezes.ics"]}, context={"base_dir": str(tmp_path), "now": utc(2026, 11, 1)}
    )
    assert "Christmas Eve" in {e.name for e in cal.ics[0].events}
    inv = Inventory.model_validate(inventory_dict())
    assert inv.failback.window is None


# -- the calendar as a whole -------------------------------------------------------------------------------


def test_describe():
    cal = Calendar(windows=[WeeklyWindow(days="tue-thu", start="10:00", end="16:00")],
                   freezes=[Freeze(name="weekend", weekly=WEEKEND)], ics=[ics(utc(2026, 11, 1))])
    text = cal.describe()
    assert text.startswith("open tue-thu 10:00-16:00 UTC; frozen weekend: every fri 12:00-00:00")
    assert "frozen by freezes.ics (57 events until 2027-12-05)" in text
    assert Calendar().describe() == "open at any time"


WINDOWS = [
    WeeklyWindow(days=["sun"], start="02:00", end="04:00", timezone="Europe/Berlin"),
    WeeklyWindow(days=["sat"], start="22:00", end="02:00", timezone="America/New_York"),
    WeeklyWindow(days="tue-thu", start="10:00", end="16:00"),
    WeeklyWindow(days="fri-mon", start="23:30", end="00:30", timezone="Australia/Lord_Howe"),  # a 30-minute DST shift
]
CALENDARS = [Calendar(windows=[w]) for w in WINDOWS] + [
    Calendar(windows=WINDOWS[1:3], freezes=[Freeze(name="weekend", weekly=WEEKEND)]),
    Calendar(windows=[WINDOWS[2]], freezes=[Freeze(name="xmas", start="2026-12-20", end="2027-01-03")]),
]


@settings(max_examples=300, deadline=None)
@given(instant=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)),
       which=st.integers(0, len(CALENDARS) - 1))
def test_answers_agree_with_each_other(instant, which):
    cal = CALENDARS[which]
    opens = cal.next_opening(instant)
    assert cal.is_open(instant) == (opens is None)
    if opens is None:
        closes = cal.closes_at(instant)
        assert closes > instant and cal.time_left(instant) == closes - instant
        assert not cal.is_open(closes)  # it really closes then
        assert cal.is_open(closes - timedelta(seconds=1))
    else:
        assert opens > instant and cal.closes_at(instant) is None and cal.time_left(instant) == timedelta(0)
        assert cal.is_open(opens) and not cal.is_open(opens - timedelta(seconds=1))


def test_the_readme_example_is_valid():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Windows and freeze calendars", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    example = yaml.safe_load(block)
    window = WeeklyWindow.model_validate(example["window"])
    assert window.is_open(utc(2026, 11, 21, 23, 30)) and window.closes_at(utc(2026, 11, 21, 23, 30)) == utc(
        2026, 11, 22, 1, 0
    )
    cal = Calendar.model_validate(example["calendar"], context={"base_dir": str(DATA), "now": utc(2026, 11, 1)})
    assert cal.frozen(utc(2026, 12, 24, 12, 0)).name == "christmas, Christmas Eve"
    assert cal.is_open(utc(2026, 12, 23, 12, 0)) and cal.closes_at(utc(2026, 12, 23, 12, 0)) == utc(2026, 12, 23, 16, 0)
    assert cal.next_opening(utc(2026, 12, 23, 17, 0)) == utc(2026, 12, 29, 10, 0)


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata"]


@settings(max_examples=300, deadline=None)
@given(instant=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)),
       days=st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1, max_size=7),
       start=st.integers(0, 24 * 60 - 1), end=st.integers(0, 24 * 60 - 1), zone=st.sampled_from(ZONES))
def test_any_window_answers_agree_and_lasts_its_wall_clock_length_give_or_take_the_clock_change(
    instant, days, start, end, zone
):
    w = WeeklyWindow(
        days=days, start=f"{start // 60:02d}:{start % 60:02d}", end=f"{end // 60:02d}:{end % 60:02d}", timezone=zone
    )
    opens = w.next_opening(instant)
    assert w.is_open(instant) == (opens is None)
    if opens is not None:
        assert opens > instant and w.is_open(opens) and not w.is_open(opens - timedelta(seconds=1))
        assert opens - instant <= timedelta(days=7, hours=1)
        closes = w.closes_at(opens)
        length = timedelta(minutes=(end - start) % (24 * 60) or 24 * 60)
        if len(set(days)) == 1:  # one opening a week: no neighbour to join, so the span is one window
            assert abs((closes - opens) - length) <= timedelta(hours=1)
    else:
        closes = w.closes_at(instant)
        assert closes > instant and w.time_left(instant) == closes - instant
        if not (len(set(days)) == 7 and start == end):  # only round-the-clock windows every day chain for ever
            assert not w.is_open(closes)
