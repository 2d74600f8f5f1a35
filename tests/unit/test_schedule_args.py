"""`opsflow schedule create`'s own checks, before the server reads the calendar: `day_of_month=1 hour=3` and cron
strings become the cron string the server parses, with errors that name the bad key or value; a procedure
table (drill, maintenance); the display of the server's structured spec. The times themselves come from the
server (tests/integration/test_schedules.py)."""

from __future__ import annotations

import argparse

import pytest
import yaml
from temporalio.client import ScheduleCalendarSpec
from temporalio.client import ScheduleRange as R

from opsflow.cron import CalendarError, check_calendar, check_cron, check_field, format_calendar
from opsflow.rules import digest_of
from starters.common import CliError
from starters.schedule_actions import build_schedule
from starters.schedules import register
from tests.workflow.conftest import inventory_dict


def test_monthly_drill_calendar_is_a_cron_string_with_the_text_as_comment():
    spec = check_calendar("day_of_month=1 hour=3")
    # second minute hour day_of_month month day_of_week year; unset fields default as in Temporal.
    assert spec.cron == "0 0 3 1 * * * # calendar: day_of_month=1 hour=3"
    assert check_calendar("day_of_week=sun hour=2").cron == "0 0 2 * * 0 * # calendar: day_of_week=sun hour=2"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("hour", "3", "3"),
        ("hour", "1-5", "1-5"),
        ("minute", "*/15", "*/15"),
        ("minute", "5/20", "5/20"),
        ("day_of_month", "1,15", "1,15"),
        ("day_of_week", "mon-fri", "1-5"),
        ("day_of_week", "SUN", "0"),
        ("day_of_week", "Sunday,saturday", "0,6"),
        ("day_of_week", "7", "7"),
        ("day_of_week", "fri-mon", "5-7,0-1"),  # round the weekend: the server wants start <= end
        ("day_of_week", "sat-sun", "6-7"),
        ("month", "jan,jul", "1,7"),
        ("month", "mar-oct/2", "3-10/2"),
        ("month", "december", "12"),
        ("year", "2027", "2027"),
        ("year", "*", "*"),
    ],
)
def test_field_values(key, value, expected):
    assert check_field(key, value) == expected


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
        ("hour3", "'hour3' is not key=value"),
        ("hour=", "hour= has no value"),
        ("hour=5-3", "hour=5-3: the range 5-3 runs backwards"),
        ("minute=*/0", "the step '0' must be a whole number of at least 1"),
        ("minute=1-2-3", "'1-2-3' is not N, N-M"),
        ("hour=1,,2", "an empty item"),
        ("hour=1 hour=2", "hour is given twice"),
        ("day_of_week=fri-mon/2", "a step cannot go round the weekend"),
        ("year=1999", "1999 is out of range for year"),
        ("", "the calendar is empty"),
    ],
)
def test_malformed_calendar_names_the_bad_part(text, needle):
    with pytest.raises(CalendarError) as exc:
        check_calendar(text)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    "cron, sent",
    [
        ("0 3 1 * *", "0 0 3 1 * * * # cron: 0 3 1 * *"),
        ("30 2 * * mon-fri", "0 30 2 * * 1-5 * # cron: 30 2 * * mon-fri"),
        ("15 0 3 1 * * *", "15 0 3 1 * * * # cron: 15 0 3 1 * * *"),
        ("@monthly", "@monthly # cron: @monthly"),
    ],
)
def test_cron_goes_to_the_server_checked(cron, sent):
    assert check_cron(cron).cron == sent


@pytest.mark.parametrize(
    "cron, needle",
    [
        ("0 3 1 *", "has 4 fields"),
        ("0 25 1 * *", "hour=25: 25 is out of range"),
        ("0 3 * * funday", "'funday' is not a day of the week"),
        ("TZ=Europe/Berlin 0 3 * * *", "with --timezone"),
        ("0 3 * * * # monthly", "no comments"),
        ("@fortnightly", "unknown shorthand"),
        ("", "empty"),
    ],
)
def test_malformed_cron(cron, needle):
    with pytest.raises(CalendarError) as exc:
        check_cron(cron)
    assert needle in str(exc.value)


def test_warns_when_day_of_month_and_day_of_week_both_restrict():
    assert check_cron("0 3 1-7 * mon").warnings()
    assert not check_calendar("day_of_month=1 hour=3").warnings()


def test_format_shows_the_servers_spec_as_a_person_writes_it():
    spec = ScheduleCalendarSpec(day_of_week=(R(1, 5, 1),), hour=(R(2, 2, 1),), minute=(R(30, 30, 1),))
    assert format_calendar(spec) == "day_of_week=mon-fri hour=2 minute=30"
    assert (
        format_calendar(ScheduleCalendarSpec(day_of_month=(R(1, 1, 1),), hour=(R(3, 3, 1),))) == "day_of_month=1 hour=3"
    )
    assert format_calendar(ScheduleCalendarSpec()) == "second=0"  # every default: midnight
    assert format_calendar(ScheduleCalendarSpec(minute=(R(0, 59, 15),), hour=(R(0, 23, 1),))) == "hour=* minute=*/15"


# -- the create command's checks, all before any Temporal call ---------------------------------------------


def _args(tmp_path, *argv: str) -> argparse.Namespace:
    inv = tmp_path / "inventory.yaml"
    if not inv.exists():
        inv.write_text(yaml.safe_dump(inventory_dict(environment="unit")))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    return p.parse_args(["schedule", "create", *argv, "--env", str(inv)])


def test_build_schedule(tmp_path):
    inv, name, schedule, warnings = build_schedule(
        _args(
            tmp_path,
            "monthly",
            "--procedure",
            "drill",
            "--calendar",
            "day_of_month=1 hour=3",
            "--timezone",
            "Europe/Berlin",
            "--source",
            "westeurope",
            "--pause-on-failure",
            "--paused",
        )
    )
    assert name == "monthly" and warnings == []
    assert schedule.spec.time_zone_name == "Europe/Berlin" and schedule.spec.cron_expressions == [
        "0 0 3 1 * * * # calendar: day_of_month=1 hour=3"
    ]
    assert schedule.policy.pause_on_failure and schedule.policy.overlap.name == "SKIP" and schedule.state.paused
    action = schedule.action
    # The schedule starts the launcher, which starts the drill under the environment's lock opsflow-unit.
    assert (
        action.workflow == "scheduled" and action.id == "opsflow-unit-monthly" and action.task_queue == inv.task_queue
    )
    (launch,) = action.args
    assert launch.procedure == "drill" and launch.environment == "unit"
    inp = launch.arg
    assert (
        inp["requester"] == "schedule:monthly" and inp["source_region"] == "westeurope" and inp["environment"] == "unit"
    )
    # No rules ride in the input: the worker's inventory is what runs; the digest says which version was seen.
    assert inp["inventory"] is None and inp["inventory_digest"]["sha256"] == digest_of(inv).sha256
    assert launch.schedule_id == "opsflow-unit-monthly" and launch.by and launch.signature is None
    assert {p.key.name: p.value for p in action.typed_search_attributes} == {
        "OpsProcedure": "drill",
        "OpsEnvironment": "unit",
    }
    _, _, default, _ = build_schedule(_args(tmp_path, "m2", "--procedure", "drill", "--cron", "0 3 1 * *"))
    assert not default.policy.pause_on_failure and not default.state.paused and default.spec.time_zone_name == "UTC"


def test_maintenance_schedule_builds_its_input_under_the_environment_id(tmp_path):
    _, _, schedule, _ = build_schedule(
        _args(
            tmp_path,
            "weekly",
            "--procedure",
            "maintenance",
            "--calendar",
            "day_of_week=sun hour=2",
            "--region",
            "eastus",
        )
    )
    action = schedule.action
    assert action.workflow == "scheduled" and action.id == "opsflow-unit-weekly"
    (launch,) = action.args
    inp = launch.arg
    assert (
        launch.procedure == "maintenance"
        and inp["requester"] == "schedule:weekly"
        and inp["region"] == "eastus"
        and not inp["dry_run"]
    )
    assert {p.key.name: p.value for p in action.typed_search_attributes} == {
        "OpsProcedure": "maintenance",
        "OpsEnvironment": "unit",
    }


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--procedure", "failover", "--calendar", "hour=3"],
            "unknown procedure 'failover'; a schedule can run: drill, maintenance, readiness",
        ),
        (["--procedure", "drill"], "give exactly one of --calendar"),
        (["--procedure", "drill", "--calendar", "hour=25"], "bad --calendar: hour=25: 25 is out of range"),
        (["--procedure", "drill", "--cron", "0 3 1 *"], "bad --cron: cron '0 3 1 *' has 4 fields"),
        (
            ["--procedure", "drill", "--calendar", "hour=3", "--timezone", "Mars/Olympus"],
            "unknown time zone 'Mars/Olympus'",
        ),
        (["--procedure", "drill", "--calendar", "hour=3", "--timezone", "../etc"], "unknown time zone"),
        (
            ["--procedure", "drill", "--calendar", "hour=3", "--source", "mars"],
            "--source: unknown region 'mars'; the inventory has: eastus, westeurope",
        ),
        (
            ["--procedure", "drill", "--calendar", "hour=3", "--region", "eastus"],
            "--region is for --procedure maintenance",
        ),
        (
            ["--procedure", "maintenance", "--calendar", "hour=3", "--source", "eastus"],
            "--source is for --procedure drill",
        ),
        (["--procedure", "drill", "--calendar", "hour=3", "--catchup-window", "5s"], "at least 10s"),
        (
            ["--procedure", "drill", "--calendar", "hour=3", "--catchup-window", "soon"],
            "--catchup-window: not a duration",
        ),
        (["--procedure", "readiness", "--every", "10s"], "--every 10s: at least 1m"),
        (["--procedure", "readiness", "--every", "often"], "--every: not a duration"),
        (["--procedure", "readiness", "--every", "30m", "--source", "eastus"], "not for --procedure readiness"),
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


def test_readiness_every_30_minutes_is_an_interval_schedule_of_the_launcher(tmp_path):
    _, _, schedule, warnings = build_schedule(_args(tmp_path, "ready", "--procedure", "readiness", "--every", "30m"))
    assert [i.every.total_seconds() for i in schedule.spec.intervals] == [1800] and not schedule.spec.cron_expressions
    (launch,) = schedule.action.args
    assert launch.procedure == "readiness" and launch.arg["requester"] == "schedule:ready" and warnings == []


def test_calendar_and_cron_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(tmp_path, "m", "--procedure", "drill", "--calendar", "hour=3", "--cron", "0 3 * * *")
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


async def test_dry_run_checks_and_shows_what_would_be_sent_without_temporal(tmp_path, capsys):
    import json

    from starters.schedules import cmd_create

    args = _args(
        tmp_path,
        "monthly",
        "--procedure",
        "drill",
        "--calendar",
        "day_of_month=1 hour=3",
        "--timezone",
        "Europe/Berlin",
        "--dry-run",
        "--json",
    )
    assert await cmd_create(args, client=None) == 0  # no client: nothing is asked of Temporal
    out = json.loads(capsys.readouterr().out)
    assert out["cron_sent"] == "0 0 3 1 * * * # calendar: day_of_month=1 hour=3" and out["timezone"] == "Europe/Berlin"
    assert out["workflow_id"] == "opsflow-unit" and out["next_action_times"] is None  # the environment lock
    assert "--paused" in out["why_no_times"]
    with pytest.raises(CliError, match="hour=25"):
        await cmd_create(
            _args(tmp_path, "m", "--procedure", "drill", "--calendar", "hour=25", "--dry-run"), client=None
        )


def test_a_schedule_builds_exactly_the_procedures_a_schedule_may_launch():
    from opsflow.procedures import SCHEDULABLE
    from starters.schedule_actions import PROCEDURES

    assert set(PROCEDURES) == SCHEDULABLE
