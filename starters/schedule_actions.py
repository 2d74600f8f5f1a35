"""What `opsflow schedule create` sends, built without a Temporal call: the checks a person needs a clear message
for (name, calendar or cron through `opsflow.cron`, time zone, catch-up window, procedure and region), and the
start action of each procedure a schedule can run.

A schedule starts the `scheduled` launcher (Temporal appends the scheduled time to the ids it starts), which
starts the procedure as a child under the environment's lock id `opsflow-<env>`: one procedure per environment.
"""

from __future__ import annotations

import argparse
import getpass
import re
from dataclasses import replace
from datetime import date, timedelta
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from opsflow import cron
from opsflow.client import inventory_path
from opsflow.inventory import Inventory, InventoryError, load_inventory, parse_duration
from opsflow.rules import START_UNSIGNED, input_digest
from opsflow.signing import SigningError
from opsflow.temporal import OPS_ENVIRONMENT, OPS_PROCEDURE
from starters.common import CliError, SigningFailed, signer_for
from workflows.drill import DrillInput
from workflows.maintenance import MaintenanceInput
from workflows.readiness import ReadinessInput
from workflows.scheduled import LaunchInput

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,50}$")


def schedule_id(environment: str, name: str) -> str:
    return f"opsflow-{environment}-{name}"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise CliError(f"schedule name {name!r}: use lower-case letters, digits and '-' "
                       "(at most 51, e.g. monthly-drill)")
    return name


def check_timezone(tz: str | None) -> str:
    tz = tz or "UTC"
    if tz == "UTC":
        return tz
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise CliError(f"unknown time zone {tz!r} "
                       "(an IANA name such as UTC, Europe/Berlin, America/New_York)") from None
    return tz


def schedule_inventory(args: argparse.Namespace) -> Inventory:
    """The inventory of `--env` (default: the running lab's); a bad one is exit 2."""
    try:
        return load_inventory(inventory_path(args.env))
    except InventoryError as e:
        raise CliError(str(e)) from None


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def attributes(environment: str, procedure: str) -> TypedSearchAttributes:
    return TypedSearchAttributes([SearchAttributePair(OPS_PROCEDURE, procedure),
                                  SearchAttributePair(OPS_ENVIRONMENT, environment)])


def procedure_of(action: ScheduleActionStartWorkflow) -> str | None:
    """The procedure a schedule runs (its action starts the `scheduled` launcher)."""
    return action.typed_search_attributes.get(OPS_PROCEDURE) if action.typed_search_attributes else action.workflow


# -- the procedures a schedule can run: name -> how to build the start action -------------------------------------


def _drill_action(inv: Inventory, name: str, schedule_id: str, args: argparse.Namespace) -> ScheduleActionStartWorkflow:
    if args.region is not None:
        raise CliError("--region is for --procedure maintenance; a drill restores from --source REGION")
    reason = args.note or f"schedule {name}"
    inp = DrillInput(inventory=inv, source_region=args.source, requester=f"schedule:{name}", reason=reason)
    source = f" from {args.source}" if args.source else ""
    summary = f"Restore drill of {inv.environment}{source} (schedule {name})"
    return _launch(inv, "drill", inp, schedule_id, summary, reason, name, args)


def _maintenance_action(inv: Inventory, name: str, schedule_id: str,
                        args: argparse.Namespace) -> ScheduleActionStartWorkflow:
    if args.source is not None:
        raise CliError("--source is for --procedure drill; a maintenance runs on --region REGION "
                       "(default: the current primary)")
    reason = args.note or f"schedule {name}"
    inp = MaintenanceInput(inventory=inv, requester=f"schedule:{name}", reason=reason, region=args.region)
    region = f" in {args.region}" if args.region else ""
    summary = f"Maintenance window of {inv.environment}{region} (schedule {name})"
    return _launch(inv, "maintenance", inp, schedule_id, summary, reason, name, args)


def _readiness_action(inv: Inventory, name: str, schedule_id: str,
                      args: argparse.Namespace) -> ScheduleActionStartWorkflow:
    if args.source is not None or args.region is not None:
        raise CliError("--source and --region are not for --procedure readiness: it checks every region")
    reason = args.note or f"schedule {name}"
    inp = ReadinessInput(inventory=inv, requester=f"schedule:{name}", reason=reason)
    summary = f"Readiness of {inv.environment} (schedule {name})"
    return _launch(inv, "readiness", inp, schedule_id, summary, reason, name, args)


def _launch(inv: Inventory, procedure: str, inp: Any, schedule_id: str, summary: str, reason: str, name: str,
            args: argparse.Namespace) -> ScheduleActionStartWorkflow:
    """The schedule starts the `scheduled` launcher, which starts the procedure under the environment's lock. The
    input carries no rules (the worker's inventory is); the creator (`--as`, an operator) signs the schedule's id,
    procedure, environment and input where the inventory requires signatures (or with --key)."""
    arg = inp.without_rules(inv).model_dump(mode="json")
    by = getattr(args, "as_name", None) or user()
    signed: dict = {}
    if not getattr(args, "dry_run", False):
        try:
            signer = signer_for(inv, by, getattr(args, "key", None))
            if signer is not None:
                signed = signer.sign_schedule(schedule_id=schedule_id, procedure=procedure, environment=inv.environment,
                                              input_sha256=input_digest(arg, START_UNSIGNED))
        except (SigningFailed, SigningError) as e:
            raise CliError(f"cannot sign the schedule as {by!r}: {e}") from None
    launch = LaunchInput(procedure=procedure, environment=inv.environment, task_queue=inv.task_queue,
                         arg=arg, summary=summary, schedule_id=schedule_id, by=by, **signed)
    return ScheduleActionStartWorkflow(
        "scheduled",
        launch,
        id=schedule_id,
        task_queue=inv.task_queue,
        typed_search_attributes=attributes(inv.environment, procedure),
        static_summary=summary,
        static_details=f"requested by schedule:{name}: {reason}",
    )


PROCEDURES: dict[str, Callable[[Inventory, str, str, argparse.Namespace], ScheduleActionStartWorkflow]] = {
    "drill": _drill_action,
    "maintenance": _maintenance_action,
    "readiness": _readiness_action,
}


def maintenance_window_spec(inv: Inventory, today: date | None = None) -> tuple[ScheduleSpec, list[str], str]:
    """The Schedule spec of the inventory's maintenance window (weekly or monthly, in its time zone): one place,
    `opsflow.cron.window_spec`. A window a Temporal calendar cannot follow is exit 2, naming why."""
    if inv.maintenance is None:
        raise CliError("the inventory has no maintenance: section, so no window to schedule; add one "
                       "(see README, Maintenance window) or give --calendar/--cron")
    try:
        ws = cron.window_spec(inv.maintenance.window, today or date.today())
    except cron.CalendarError as e:
        raise CliError(f"maintenance.window: {e}") from None
    return ScheduleSpec(calendars=[ws.calendar]), ws.warnings(), ws.timezone


def build_schedule(args: argparse.Namespace) -> tuple[Inventory, str, Schedule, list[str]]:
    """Check what a person needs a clear message for and build the Schedule, touching nothing (no Temporal call).
    The server reads the calendar when the schedule is created (`schedule create`)."""
    name = check_name(args.name)
    if args.procedure not in PROCEDURES:
        raise CliError(f"unknown procedure {args.procedure!r}; a schedule can run: {', '.join(PROCEDURES)}")
    every = getattr(args, "every", None)
    window = bool(getattr(args, "window", False))
    if args.procedure == "maintenance" and not (args.calendar or args.cron or every):
        window = True  # the inventory's maintenance window is the default calendar of a maintenance schedule
    if sum(bool(w) for w in (args.calendar, args.cron, every, window)) != 1:
        raise CliError("give exactly one of --calendar (e.g. 'day_of_month=1 hour=3'), --cron (e.g. '0 3 1 * *'), "
                       "--every (e.g. 30m) and --window (maintenance: the inventory's window)")
    if window and args.procedure != "maintenance":
        raise CliError("--window is for --procedure maintenance: it reads the inventory's maintenance window")
    if window and args.timezone not in (None, "UTC"):
        raise CliError("--timezone does not go with the maintenance window: the window has its own time zone "
                       "(maintenance.window.timezone in the inventory)")
    if window:
        spec, warnings = ScheduleSpec(), []  # from the inventory's window, below
    elif every:
        try:
            interval = timedelta(seconds=parse_duration(every))
        except ValueError as e:
            raise CliError(f"--every: {e}") from None
        if interval < timedelta(minutes=1):
            raise CliError(f"--every {every}: at least 1m (each run checks every region)")
        spec, warnings = ScheduleSpec(intervals=[ScheduleIntervalSpec(every=interval)]), []
    else:
        try:
            checked = cron.check_calendar(args.calendar) if args.calendar else cron.check_cron(args.cron)
        except cron.CalendarError as e:
            raise CliError(f"bad {'--calendar' if args.calendar else '--cron'}: {e}") from None
        spec, warnings = ScheduleSpec(cron_expressions=[checked.cron]), checked.warnings()
    tz = check_timezone(args.timezone)
    try:
        catchup = timedelta(seconds=parse_duration(args.catchup_window))
    except ValueError as e:
        raise CliError(f"--catchup-window: {e}") from None
    if catchup < timedelta(seconds=10):
        raise CliError("--catchup-window must be at least 10s (Temporal's minimum)")
    inv = schedule_inventory(args)
    if window:
        spec, warnings, tz = maintenance_window_spec(inv)
    for flag, region in (("--source", args.source), ("--region", args.region)):
        if region is not None and region not in inv.regions:
            raise CliError(f"{flag}: unknown region {region!r}; the inventory has: {', '.join(inv.regions)}")
    sid = schedule_id(inv.environment, name)
    note = args.note or (f"created paused by {user()}" if args.paused else f"created by {user()}")
    schedule = Schedule(
        action=PROCEDURES[args.procedure](inv, name, sid, args),
        spec=replace(spec, time_zone_name=tz),
        # SKIP: a run still going when the next time comes is not doubled (scheduled runs cannot take the
        # environment's lock id, see starters/schedules.py).
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup,
                              pause_on_failure=bool(args.pause_on_failure)),
        state=ScheduleState(note=note, paused=bool(args.paused)),
    )
    return inv, name, schedule, warnings
