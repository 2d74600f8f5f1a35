"""The schedule calendar: `day_of_month=1 hour=3` and cron strings to Temporal calendar specs, the errors that
name the bad key or value, and the fire times computed locally (used to refuse a calendar that never fires)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import pytest
import yaml
from temporalio.client import ScheduleCalendarSpec, ScheduleRange as R

from starters.common import CliError
from starters.schedules import (
    CalendarError,
    add_arguments,
    build_schedule,
    calendar_warnings,
    format_calendar,
    parse_calendar,
    parse_cron,
    parse_field,
    upcoming,
)
from tests.workflow.conftest import inventory_dict

UTC = timezone.utc


def test_monthly_drill_calendar():
    spec = parse_calendar("day_of_month=1 hour=3")
    assert spec.day_of_month == (R(1, 1, 1),)
    assert spec.hour == (R(3, 3, 1),)
    # Temporal's defaults: second/minute/hour 0, the others every value, every year.
    assert spec.second == (R(0, 0, 1),) and spec.minute == (R(0, 0, 1),)
    assert spec.month == (R(1, 12, 1),) and spec.day_of_week == (R(0, 6, 1),) and spec.year == ()
    assert spec.comment == "calendar: day_of_month=1 hour=3"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("hour", "3", [R(3, 3, 1)]),
        ("hour", "1-5", [R(1, 5, 1)]),
        ("minute", "0-59/15", [R(0, 59, 15)]),
        ("minute", "*/15", [R(0, 59, 15)]),
        ("minute", "5/20", [R(5, 59, 20)]),  # Temporal's x/y: x, x+y, ... up to the top
        ("hour", "*", [R(0, 23, 1)]),
        ("day_of_month", "1,15", [R(1, 1, 1), R(15, 15, 1)]),
        ("day_of_month", "1,1", [R(1, 1, 1)]),
        ("day_of_week", "mon-fri", [R(1, 5, 1)]),
        ("day_of_week", "SUN", [R(0, 0, 1)]),
        ("day_of_week", "Sunday,saturday", [R(0, 0, 1), R(6, 6, 1)]),
        ("day_of_week", "7", [R(0, 0, 1)]),  # 7 is Sunday too
        ("day_of_week", "fri-7", [R(0, 0, 1), R(5, 6, 1)]),
        ("day_of_week", "*", [R(0, 6, 1)]),
        ("day_of_week", "fri-mon", [R(0, 1, 1), R(5, 6, 1)]),
        ("day_of_week", "sat-sun", [R(0, 0, 1), R(6, 6, 1)]),
        ("month", "jan,jul", [R(1, 1, 1), R(7, 7, 1)]),
        ("month", "mar-oct/2", [R(3, 10, 2)]),
        ("month", "december", [R(12, 12, 1)]),
        ("year", "2027", [R(2027, 2027, 1)]),
        ("year", "*", []),
        ("second", "10-10/5", [R(10, 10, 1)]),
        ("hour", "22-23/5", [R(22, 22, 1)]),  # a step past the end leaves the start only
    ],
)
def test_field_values(key, value, expected):
    assert parse_field(key, value) == expected


@pytest.mark.parametrize(
    "text, needle",
    [
        ("hour=25", "hour=25: 25 is out of range for hour (0-23)"),
        ("minute=60", "minute=60: 60 is out of range"),
        ("day_of_month=0", "day_of_month=0: 0 is out of range for day_of_month (1-31)"),
        ("month=13", "month=13: 13 is out of range"),
        ("day_of_week=8", "day_of_week=8: 8 is out of range"),
        ("day_of_week=funday", "'funday' is not a day of the week"),
        ("month=foo", "'foo' is not a month"),
        ("hour=three", "hour=three: 'three' is not a hour"),
        ("hours=3", "unknown calendar key 'hours'"),
        ("dom=1", "unknown calendar key 'dom'"),
        ("hour3", "'hour3' is not key=value"),
        ("hour=", "hour= has no value"),
        ("hour=5-3", "hour=5-3: the range 5-3 runs backwards"),
        ("minute=*/0", "the step '0' must be a whole number of at least 1"),
        ("minute=*/x", "the step 'x'"),
        ("minute=1-2-3", "'1-2-3' is not N, N-M"),
        ("hour=1,,2", "an empty item"),
        ("hour=1 hour=2", "hour is given twice"),
        ("hour=-1", "'-1' is not N, N-M"),
        ("year=1999", "1999 is out of range for year"),
        ("", "the calendar is empty"),
        ("   ", "the calendar is empty"),
    ],
)
def test_malformed_calendar_names_the_bad_part(text, needle):
    with pytest.raises(CalendarError) as exc:
        parse_calendar(text)
    assert needle in str(exc.value)


def test_key_spelling_is_forgiving_but_strict():
    assert parse_calendar("Day-Of-Month=1 HOUR=3").day_of_month == (R(1, 1, 1),)


@pytest.mark.parametrize(
    "cron, calendar",
    [
        ("0 3 1 * *", "day_of_month=1 hour=3"),
        ("30 2 * * mon-fri", "day_of_week=mon-fri hour=2 minute=30"),
        ("*/15 * * * *", "hour=* minute=*/15"),
        ("0 0 1 1 * 2027", "year=2027 month=jan day_of_month=1"),
        ("15 0 3 1 * * *", "day_of_month=1 hour=3 second=15"),
        ("@monthly", "day_of_month=1"),
        ("@weekly", "day_of_week=sun"),
        ("@daily", "second=0"),
        ("0 3 ? * 0", "day_of_week=sun hour=3"),
    ],
)
def test_cron_matches_the_equivalent_calendar(cron, calendar):
    a, b = parse_cron(cron), parse_calendar(calendar)
    fields = ("second", "minute", "hour", "day_of_month", "month", "day_of_week", "year")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert a.comment == f"cron: {cron}"


@pytest.mark.parametrize(
    "cron, needle",
    [
        ("0 3 1 *", "has 4 fields"),
        ("0 25 1 * *", "hour=25: 25 is out of range"),
        ("0 3 32 * *", "day_of_month=32"),
        ("0 3 1 13 *", "month=13"),
        ("0 3 * * funday", "'funday' is not a day of the week"),
        ("TZ=Europe/Berlin 0 3 * * *", "with --timezone"),
        ("@every 1h", "@every is not supported"),
        ("@fortnightly", "unknown shorthand"),
        ("", "empty"),
    ],
)
def test_malformed_cron(cron, needle):
    with pytest.raises(CalendarError) as exc:
        parse_cron(cron)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    "text",
    ["day_of_month=1 hour=3", "day_of_week=mon-fri hour=2 minute=30", "month=jan,jul day_of_month=1,15 hour=*/6",
     "year=2027 minute=*/5 second=30", "day_of_week=fri-sun hour=22-23", "hour=* minute=5/20"],
)
def test_format_round_trips(text):
    spec = parse_calendar(text)
    again = parse_calendar(format_calendar(spec))
    fields = ("second", "minute", "hour", "day_of_month", "month", "day_of_week", "year")
    assert [getattr(spec, f) for f in fields] == [getattr(again, f) for f in fields]


def test_format_is_what_a_person_writes():
    assert format_calendar(parse_calendar("hour=3 day_of_month=1")) == "day_of_month=1 hour=3"
    assert format_calendar(parse_calendar("day_of_week=1-5 hour=2 minute=30")) == "day_of_week=mon-fri hour=2 minute=30"
    assert format_calendar(parse_cron("@daily")) == "second=0"  # every default: midnight


def test_warns_when_day_of_month_and_day_of_week_both_restrict():
    assert calendar_warnings(parse_cron("0 3 1-7 * mon"))
    assert not calendar_warnings(parse_calendar("day_of_month=1 hour=3"))


def test_upcoming_in_utc():
    after = datetime(2026, 5, 15, 12, 0, tzinfo=UTC)
    got = upcoming([parse_calendar("day_of_month=1 hour=3")], "UTC", after, count=3)
    assert got == [datetime(2026, 6, 1, 3, tzinfo=UTC), datetime(2026, 7, 1, 3, tzinfo=UTC), datetime(2026, 8, 1, 3, tzinfo=UTC)]


def test_upcoming_in_a_time_zone_follows_summer_time():
    after = datetime(2026, 1, 15, tzinfo=UTC)
    got = upcoming([parse_calendar("day_of_month=1 hour=3")], "Europe/Berlin", after, count=4)
    # 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer (from 29 March 2026).
    assert got == [datetime(2026, 2, 1, 2, tzinfo=UTC), datetime(2026, 3, 1, 2, tzinfo=UTC),
                   datetime(2026, 4, 1, 1, tzinfo=UTC), datetime(2026, 5, 1, 1, tzinfo=UTC)]


def test_upcoming_on_the_nights_the_clocks_change():
    # 2026-03-29: Berlin skips 02:00-03:00, so 02:30 does not happen. 2026-10-25: 02:30 happens twice.
    cal = [parse_calendar("hour=2 minute=30")]
    spring = upcoming(cal, "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), count=2)
    assert spring == [datetime(2026, 3, 30, 0, 30, tzinfo=UTC), datetime(2026, 3, 31, 0, 30, tzinfo=UTC)]
    autumn = upcoming(cal, "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC), count=3)
    assert autumn == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 1, 30, tzinfo=UTC), datetime(2026, 10, 26, 1, 30, tzinfo=UTC)]


def test_upcoming_until_and_never():
    cal = [parse_calendar("month=jan day_of_month=1")]
    got = upcoming(cal, "UTC", datetime(2022, 12, 31, tzinfo=UTC), count=10, until=datetime(2025, 12, 31, tzinfo=UTC))
    assert [t.year for t in got] == [2023, 2024, 2025]
    assert upcoming([parse_calendar("month=feb day_of_month=30")], "UTC", datetime(2026, 1, 1, tzinfo=UTC), count=1) == []
    assert upcoming([parse_calendar("year=2020")], "UTC", datetime(2026, 1, 1, tzinfo=UTC), count=1) == []
    # 29 February comes round within the horizon.
    assert upcoming([parse_calendar("month=feb day_of_month=29")], "UTC", datetime(2026, 1, 1, tzinfo=UTC), count=1) == [datetime(2028, 2, 29, tzinfo=UTC)]


# -- the create command's checks, all before any Temporal call ---------------------------------------------


def _args(tmp_path, *argv: str) -> argparse.Namespace:
    inv = tmp_path / "inventory.yaml"
    if not inv.exists():
        inv.write_text(yaml.safe_dump(inventory_dict(environment="unit")))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_arguments(sub.add_parser("schedule"))
    return p.parse_args(["schedule", "create", *argv, "--env", str(inv)])


def test_build_schedule(tmp_path):
    inv, name, schedule, warnings = build_schedule(_args(tmp_path, "monthly", "--procedure", "drill", "--calendar", "day_of_month=1 hour=3",
                                                        "--timezone", "Europe/Berlin", "--source", "westeurope", "--pause-on-failure", "--paused"))
    assert name == "monthly" and warnings == []
    assert schedule.spec.time_zone_name == "Europe/Berlin" and schedule.spec.calendars[0].hour == (R(3, 3, 1),)
    assert schedule.policy.pause_on_failure and schedule.policy.overlap.name == "SKIP" and schedule.state.paused
    action = schedule.action
    assert action.workflow == "drill" and action.id == "opsflow-unit-monthly" and action.task_queue == inv.task_queue
    (inp,) = action.args
    assert inp.requester == "schedule:monthly" and inp.source_region == "westeurope" and inp.inventory.environment == "unit"
    assert {p.key.name: p.value for p in action.typed_search_attributes} == {"OpsProcedure": "drill", "OpsEnvironment": "unit"}
    _, _, default, _ = build_schedule(_args(tmp_path, "m2", "--procedure", "drill", "--cron", "0 3 1 * *"))
    assert not default.policy.pause_on_failure and not default.state.paused and default.spec.time_zone_name == "UTC"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--procedure", "failover", "--calendar", "hour=3"], "unknown procedure 'failover'; a schedule can run: drill"),
        (["--procedure", "drill"], "give exactly one of --calendar"),
        (["--procedure", "drill", "--calendar", "hour=25"], "bad --calendar: hour=25: 25 is out of range"),
        (["--procedure", "drill", "--cron", "0 3 1 *"], "bad --cron: cron '0 3 1 *' has 4 fields"),
        (["--procedure", "drill", "--calendar", "hour=3", "--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--procedure", "drill", "--calendar", "hour=3", "--timezone", "../etc"], "unknown time zone"),
        (["--procedure", "drill", "--calendar", "hour=3", "--source", "mars"], "unknown region 'mars'; the inventory has: eastus, westeurope"),
        (["--procedure", "drill", "--calendar", "month=feb day_of_month=31"], "never fires"),
        (["--procedure", "drill", "--calendar", "hour=3", "--catchup-window", "5s"], "at least 10s"),
        (["--procedure", "drill", "--calendar", "hour=3", "--catchup-window", "soon"], "--catchup-window: not a duration"),
    ],
)
def test_create_refuses_bad_input(tmp_path, argv, needle):
    with pytest.raises(CliError) as exc:
        build_schedule(_args(tmp_path, "monthly", *argv))
    assert exc.value.code == 2 and needle in str(exc.value)


@pytest.mark.parametrize("name", ["Monthly", "a_b", "ü", "x" * 52, "drill/1"])
def test_schedule_names(tmp_path, name):
    with pytest.raises(CliError, match="schedule name"):
        build_schedule(_args(tmp_path, name, "--procedure", "drill", "--calendar", "hour=3"))


def test_calendar_and_cron_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(tmp_path, "m", "--procedure", "drill", "--calendar", "hour=3", "--cron", "0 3 * * *")
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_spec_defaults_match_the_sdk():
    # The defaults format_calendar omits are the SDK's own, so a spec described back from the server
    # formats the same as the text it was created from.
    sdk = ScheduleCalendarSpec()
    mine = parse_calendar("second=0")
    assert [getattr(sdk, f) for f in ("second", "minute", "hour", "day_of_month", "month", "day_of_week", "year")] == \
           [getattr(mine, f) for f in ("second", "minute", "hour", "day_of_month", "month", "day_of_week", "year")]
