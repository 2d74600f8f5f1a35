"""`opsflow schedule ...`: procedures on a Temporal Schedule (the monthly restore drill).

    opsflow schedule create NAME --env INVENTORY --procedure drill (--calendar "day_of_month=1 hour=3" | --cron "0 3 1 * *")
                            [--timezone Europe/Berlin] [--source REGION] [--pause-on-failure | --keep-going]
                            [--catchup-window 1d] [--paused] [--note TEXT] [--json]
    opsflow schedule list      --env INVENTORY [--json]
    opsflow schedule describe  NAME --env INVENTORY [--json]
    opsflow schedule pause     NAME --env INVENTORY [--reason TEXT] [--json]
    opsflow schedule unpause   NAME --env INVENTORY [--reason TEXT] [--json]
    opsflow schedule trigger   NAME --env INVENTORY [--json]
    opsflow schedule backfill  NAME --env INVENTORY --start ISO --end ISO [--overlap buffer-all] [--limit 12] [--json]
    opsflow schedule delete    NAME --env INVENTORY [--json]

The schedule's id is `opsflow-<environment>-<NAME>`; the workflows it starts are named after it (Temporal appends
the scheduled time). Everything is validated before anything is created: a malformed calendar, an unknown
procedure or region, a bad time zone, a calendar that never fires are exit code 2 with a message naming the
bad part. Overlapping runs are skipped; a failed drill alerts (the drill notifies) and the schedule goes on,
unless --pause-on-failure.

Calendar syntax (`--calendar`): space-separated `key=value`, keys second, minute, hour, day_of_month, month,
day_of_week, year. A value is `*`, `N`, `N-M`, `N/S`, `N-M/S`, `*/S` or a comma list of those; months may be
named (jan..dec), days of the week too (sun..sat; 0 and 7 are Sunday; fri-mon wraps round the week-end). Unset fields default as in Temporal:
second, minute and hour to 0, the others to every value. Temporal matches a day only when it satisfies BOTH
day_of_month and day_of_week (classic cron takes either). Times are wall-clock times in --timezone (default
UTC): on the night clocks go forward a time that does not exist is skipped, on the night they go back a time
that exists twice fires twice.

The drill's input (with the inventory) is stored in the schedule when it is created: after changing the
inventory, delete and create the schedule again (`describe` tells when the stored inventory is stale).
"""

from __future__ import annotations

import argparse
import getpass
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleBackfill,
    ScheduleCalendarSpec,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from opsflow.client import connect
from opsflow.inventory import Inventory, InventoryError, load_inventory, parse_duration
from opsflow.temporal import OPS_ENVIRONMENT, OPS_PROCEDURE, OPS_STATUS
from starters.common import CliError, emit, inventory_path

# ---------------------------------------------------------------------------------------------------------
# The calendar: "day_of_month=1 hour=3" <-> ScheduleCalendarSpec
# ---------------------------------------------------------------------------------------------------------


class CalendarError(ValueError):
    """A malformed calendar or cron expression; the message names the bad key or value."""


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_FULL_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"]
_FULL_DAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]


@dataclass(frozen=True)
class _Field:
    lo: int
    hi: int  # the highest value accepted in input (day_of_week: 7, another name for Sunday)
    default: tuple[ScheduleRange, ...]
    names: dict[str, int] | None = None
    what: str = "value"

    @property
    def top(self) -> int:  # the highest value stored (day_of_week: 6)
        return 6 if self.hi == 7 else self.hi


FIELDS: dict[str, _Field] = {
    "second": _Field(0, 59, (ScheduleRange(0, 0, 1),), what="second"),
    "minute": _Field(0, 59, (ScheduleRange(0, 0, 1),), what="minute"),
    "hour": _Field(0, 23, (ScheduleRange(0, 0, 1),), what="hour"),
    "day_of_month": _Field(1, 31, (ScheduleRange(1, 31, 1),), what="day of the month"),
    "month": _Field(1, 12, (ScheduleRange(1, 12, 1),), {**{n: i + 1 for i, n in enumerate(MONTHS)}, **{n: i + 1 for i, n in enumerate(_FULL_MONTHS)}}, "month"),
    "day_of_week": _Field(0, 7, (ScheduleRange(0, 6, 1),), {**{n: i for i, n in enumerate(DAYS)}, **{n: i for i, n in enumerate(_FULL_DAYS)}}, "day of the week"),
    "year": _Field(2000, 9999, (), what="year"),
}
# The order a person reads a date in; `format_calendar` writes keys in it.
DISPLAY_ORDER = ["year", "month", "day_of_month", "day_of_week", "hour", "minute", "second"]
CRON_FIELDS = {5: ["minute", "hour", "day_of_month", "month", "day_of_week"],
               6: ["minute", "hour", "day_of_month", "month", "day_of_week", "year"],
               7: ["second", "minute", "hour", "day_of_month", "month", "day_of_week", "year"]}
CRON_SHORTHANDS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                   "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_ITEM = re.compile(r"^(?P<start>\*|[a-z0-9]+)(?:-(?P<end>[a-z0-9]+))?(?:/(?P<step>[^/]*))?$")


def _number(key: str, f: _Field, token: str, whole: str) -> int:
    if f.names and token in f.names:
        return f.names[token]
    if not token.isdigit():
        named = f" or {', '.join(list(f.names)[: 12 if key == 'month' else 7])}" if f.names else ""
        raise CalendarError(f"{key}={whole}: {token!r} is not a {f.what} ({f.lo}-{f.hi}{named})")
    n = int(token)
    if not f.lo <= n <= f.hi:
        raise CalendarError(f"{key}={whole}: {n} is out of range for {key} ({f.lo}-{f.hi})")
    return n


def _compress(values: set[int]) -> list[ScheduleRange]:
    out: list[ScheduleRange] = []
    for v in sorted(values):
        if out and out[-1].end == v - 1:
            out[-1] = ScheduleRange(out[-1].start, v, 1)
        else:
            out.append(ScheduleRange(v, v, 1))
    return out


def parse_field(key: str, value: str) -> list[ScheduleRange]:
    """One field's value ('1', '1-5', '*/15', 'mon-fri', '1,15') -> Temporal ranges. Raises CalendarError."""
    if key not in FIELDS:
        raise CalendarError(f"unknown calendar key {key!r}; the keys are: {', '.join(FIELDS)}")
    f = FIELDS[key]
    whole = value
    value = value.strip().lower()
    if not value:
        raise CalendarError(f"{key}= has no value (e.g. {key}={f.lo})")
    ranges: list[ScheduleRange] = []
    for item in value.split(","):
        m = _ITEM.match(item)
        if not m:
            raise CalendarError(f"{key}={whole}: {item!r} is not N, N-M, N-M/S, */S or *" if item else f"{key}={whole}: an empty item in the list")
        start_tok, end_tok, step_tok = m.group("start"), m.group("end"), m.group("step")
        if step_tok is None:
            step = 1
        elif not step_tok.isdigit() or int(step_tok) < 1:
            raise CalendarError(f"{key}={whole}: the step {step_tok!r} must be a whole number of at least 1")
        else:
            step = int(step_tok)
        if start_tok == "*":
            if end_tok is not None:
                raise CalendarError(f"{key}={whole}: '*' cannot start a range")
            if key == "year":
                if step != 1:
                    raise CalendarError(f"{key}={whole}: a year step needs a start year (e.g. 2026/2)")
                return []  # every year
            start, end = f.lo, f.top
        else:
            start = _number(key, f, start_tok, whole)
            # N/S means N, N+S, N+2S, ... up to the field's top (Temporal's x/y).
            end = _number(key, f, end_tok, whole) if end_tok is not None else (f.top if step_tok is not None else start)
            if end < start and key == "day_of_week":
                end += 7  # fri-sun wraps round the week-end
            if end < start:
                raise CalendarError(f"{key}={whole}: the range {start_tok}-{end_tok} runs backwards (start {start} is after end {end})")
        if key == "day_of_week" and end >= 7:  # 7 is Sunday too: store it as 0
            values = {v % 7 for v in range(start, end + 1, step)}
            ranges.extend(_compress(values))
            continue
        if start == end or start + step > end:
            ranges.append(ScheduleRange(start, start, 1))
        else:
            ranges.append(ScheduleRange(start, end, step))
    return _dedupe(ranges)


def _dedupe(ranges: list[ScheduleRange]) -> list[ScheduleRange]:
    seen: list[ScheduleRange] = []
    for r in ranges:
        if r not in seen:
            seen.append(r)
    return seen


def parse_calendar(text: str, comment: str | None = None) -> ScheduleCalendarSpec:
    """'day_of_month=1 hour=3' -> ScheduleCalendarSpec (second/minute/hour default to 0, the rest to every)."""
    if not text or not text.strip():
        raise CalendarError("the calendar is empty; e.g. --calendar 'day_of_month=1 hour=3'")
    given: dict[str, list[ScheduleRange]] = {}
    for part in text.split():
        if "=" not in part:
            raise CalendarError(f"{part!r} is not key=value (e.g. hour=3); the keys are: {', '.join(FIELDS)}")
        key, value = part.split("=", 1)
        key = key.strip().lower().replace("-", "_")
        if key not in FIELDS:
            raise CalendarError(f"unknown calendar key {key!r} in {part!r}; the keys are: {', '.join(FIELDS)}")
        if key in given:
            raise CalendarError(f"{key} is given twice; use a comma list instead (e.g. {key}=1,15)")
        given[key] = parse_field(key, value)
    kwargs: dict[str, Any] = {k: tuple(given.get(k, FIELDS[k].default)) for k in FIELDS}
    return ScheduleCalendarSpec(**kwargs, comment=comment if comment is not None else f"calendar: {' '.join(text.split())}")


def parse_cron(expr: str) -> ScheduleCalendarSpec:
    """A 5/6/7-field cron string (or @daily & co.) -> ScheduleCalendarSpec, with the same checks as a calendar."""
    text = " ".join((expr or "").split())
    if not text:
        raise CalendarError("the cron expression is empty; e.g. --cron '0 3 1 * *'")
    if re.match(r"^(CRON_)?TZ=", text, re.I):
        raise CalendarError(f"cron {text!r}: give the time zone with --timezone, not inside the expression")
    if text.lower().startswith("@every"):
        raise CalendarError(f"cron {text!r}: @every is not supported here; write the times as a calendar")
    body = CRON_SHORTHANDS.get(text.lower(), text)
    if body.startswith("@"):
        raise CalendarError(f"cron {text!r}: unknown shorthand; use one of {', '.join(CRON_SHORTHANDS)}")
    parts = body.split()
    keys = CRON_FIELDS.get(len(parts))
    if keys is None:
        raise CalendarError(f"cron {text!r} has {len(parts)} fields; it needs 5 (minute hour day_of_month month day_of_week), 6 (+ year) or 7 (second first)")
    given: dict[str, list[ScheduleRange]] = {}
    for key, value in zip(keys, parts):
        if value == "?":
            value = "*"
        try:
            given[key] = parse_field(key, value)
        except CalendarError as e:
            raise CalendarError(f"cron {text!r}: {e}") from None
    kwargs: dict[str, Any] = {k: tuple(given.get(k, FIELDS[k].default)) for k in FIELDS}
    return ScheduleCalendarSpec(**kwargs, comment=f"cron: {text}")


def _render_value(key: str, f: _Field, r: ScheduleRange) -> str:
    def name(v: int) -> str:
        if key == "month":
            return MONTHS[v - 1]
        if key == "day_of_week":
            return DAYS[v % 7]
        return str(v)

    start, end, step = r.start, max(r.end, r.start), r.step or 1
    if start == f.lo and end == f.top:
        return "*" if step == 1 else f"*/{step}"
    if start == end:
        return name(start)
    return f"{name(start)}-{name(end)}" + (f"/{step}" if step != 1 else "")


def format_calendar(spec: ScheduleCalendarSpec) -> str:
    """The inverse of parse_calendar: only what differs from the defaults, largest unit first."""
    parts = []
    for key in DISPLAY_ORDER:
        f = FIELDS[key]
        ranges = tuple(_normal(r) for r in getattr(spec, key))
        if ranges == tuple(f.default):
            continue
        if key == "year" and not ranges:
            continue
        parts.append(f"{key}={','.join(_render_value(key, f, r) for r in ranges) if ranges else '*'}")
    return " ".join(parts) or "second=0"


def _normal(r: ScheduleRange) -> ScheduleRange:
    end, step = max(r.end, r.start), r.step or 1
    return ScheduleRange(r.start, r.start, 1) if r.start == end else ScheduleRange(r.start, end, step)


def _values(ranges: Sequence[ScheduleRange]) -> set[int]:
    out: set[int] = set()
    for r in ranges:
        out.update(range(r.start, max(r.end, r.start) + 1, r.step or 1))
    return out


def calendar_warnings(spec: ScheduleCalendarSpec) -> list[str]:
    dom = tuple(_normal(r) for r in spec.day_of_month) != FIELDS["day_of_month"].default
    dow = tuple(_normal(r) for r in spec.day_of_week) != FIELDS["day_of_week"].default
    if dom and dow:
        return ["day_of_month and day_of_week both restrict the days: Temporal runs only on days matching both (classic cron takes either)"]
    return []


def upcoming(calendars: Sequence[ScheduleCalendarSpec], tz: str | None, after: datetime, count: int = 10,
             until: datetime | None = None, horizon_days: int = 366 * 8) -> list[datetime]:
    """The next times (UTC, strictly after `after`) at which Temporal takes action for these calendars, computed
    here the way the server does: wall-clock matching in the time zone, a non-existent time skipped, an
    ambiguous one taken twice. Used to refuse a calendar that never fires, and to count a backfill."""
    zone = ZoneInfo(tz) if tz and tz != "UTC" else timezone.utc
    compiled = []
    for c in calendars:
        years = _values(c.year)
        compiled.append((years, _values(c.month), _values(c.day_of_month), _values(c.day_of_week),
                         sorted(_values(c.hour)), sorted(_values(c.minute)), sorted(_values(c.second))))
    after = after.astimezone(timezone.utc)
    day = after.astimezone(zone).date() - timedelta(days=1)
    last_day = (until.astimezone(zone).date() + timedelta(days=1)) if until else day + timedelta(days=horizon_days)
    found: list[datetime] = []
    while day <= last_day and len(found) < count:
        hits: set[datetime] = set()
        for years, months, doms, dows, hours, minutes, seconds in compiled:
            if (years and day.year not in years) or day.month not in months or day.day not in doms or (day.isoweekday() % 7) not in dows:
                continue
            hits.update(_times_of_day(day, hours, minutes, seconds, zone))
        for t in sorted(hits):
            if t > after and (until is None or t <= until) and len(found) < count:
                found.append(t)
        day += timedelta(days=1)
    return found


def _times_of_day(day: date, hours: list[int], minutes: list[int], seconds: list[int], zone) -> Iterator[datetime]:
    for h in hours:
        for m in minutes:
            for s in seconds:
                local = datetime.combine(day, time(h, m, s), tzinfo=zone)
                first = local.astimezone(timezone.utc)
                if first.astimezone(zone).replace(tzinfo=None) != local.replace(tzinfo=None):
                    continue  # the clocks skip this time on this day
                yield first
                second = local.replace(fold=1).astimezone(timezone.utc)
                if second != first:
                    yield second  # the clocks pass this time twice on this day


# ---------------------------------------------------------------------------------------------------------
# Procedures a schedule can run
# ---------------------------------------------------------------------------------------------------------


def _drill_action(inv: Inventory, name: str, schedule_id: str, args) -> ScheduleActionStartWorkflow:
    from workflows.drill import DrillInput  # imported here: the CLI's other commands do not need it

    reason = args.note or f"schedule {name}"
    inp = DrillInput(inventory=inv, source_region=args.source, requester=f"schedule:{name}", reason=reason)
    return ScheduleActionStartWorkflow(
        "drill",
        inp,
        id=schedule_id,  # Temporal appends the scheduled time: opsflow-<env>-<name>-2026-06-01T01:00:00Z
        task_queue=inv.task_queue,
        typed_search_attributes=_attributes(inv.environment, "drill"),
        static_summary=f"Restore drill of {inv.environment}" + (f" from {args.source}" if args.source else "") + f" (schedule {name})",
        static_details=f"requested by schedule:{name}: {reason}",
    )


PROCEDURES = {"drill": _drill_action}
OVERLAP = {"skip": ScheduleOverlapPolicy.SKIP, "buffer-one": ScheduleOverlapPolicy.BUFFER_ONE,
           "buffer-all": ScheduleOverlapPolicy.BUFFER_ALL, "allow-all": ScheduleOverlapPolicy.ALLOW_ALL}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,50}$")


def _attributes(environment: str, procedure: str) -> TypedSearchAttributes:
    return TypedSearchAttributes([SearchAttributePair(OPS_PROCEDURE, procedure), SearchAttributePair(OPS_ENVIRONMENT, environment)])


def schedule_id(environment: str, name: str) -> str:
    return f"opsflow-{environment}-{name}"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise CliError(f"schedule name {name!r}: use lower-case letters, digits and '-' (at most 51, e.g. monthly-drill)")
    return name


def check_timezone(tz: str | None) -> str:
    tz = tz or "UTC"
    if tz == "UTC":
        return tz
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise CliError(f"unknown time zone {tz!r} (an IANA name such as UTC, Europe/Berlin, America/New_York)") from None
    return tz


def _inventory(args) -> Inventory:
    try:
        return load_inventory(inventory_path(args.env))
    except InventoryError as e:
        raise CliError(str(e)) from None


async def _client(client: Client | None) -> Client:
    return client or await connect()


async def _describe(client: Client, inv: Inventory, name: str) -> tuple[ScheduleHandle, ScheduleDescription]:
    handle = client.get_schedule_handle(schedule_id(inv.environment, check_name(name)))
    try:
        return handle, await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no schedule {name} in environment {inv.environment} (see: opsflow schedule list --env ...)") from None
        raise


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if t else None


def _local(t: datetime, tz: str | None) -> str:
    zone = ZoneInfo(tz) if tz and tz != "UTC" else timezone.utc
    lt = t.astimezone(zone)
    return f"{lt:%Y-%m-%d %H:%M:%S %Z}" + ("" if zone is timezone.utc else f" ({t.astimezone(timezone.utc):%H:%M} UTC)")


def _duration(td: timedelta) -> str:
    """timedelta -> '1d', '6h', '90s', '1d12h'."""
    seconds, out = int(td.total_seconds()), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def _spec_summary(spec: ScheduleSpec) -> dict:
    return {
        "calendars": [format_calendar(c) for c in spec.calendars],
        "as_given": [c.comment for c in spec.calendars],
        "intervals": [str(i.every) for i in spec.intervals],
        "timezone": spec.time_zone_name or "UTC",
    }


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


def build_schedule(args) -> tuple[Inventory, str, Schedule, list[str]]:
    """Validate everything a create needs and build the Schedule, touching nothing (no Temporal call)."""
    name = check_name(args.name)
    if args.procedure not in PROCEDURES:
        raise CliError(f"unknown procedure {args.procedure!r}; a schedule can run: {', '.join(PROCEDURES)}")
    if bool(args.calendar) == bool(args.cron):
        raise CliError("give exactly one of --calendar (e.g. 'day_of_month=1 hour=3') and --cron (e.g. '0 3 1 * *')")
    try:
        cal = parse_calendar(args.calendar) if args.calendar else parse_cron(args.cron)
    except CalendarError as e:
        raise CliError(f"bad {'--calendar' if args.calendar else '--cron'}: {e}") from None
    tz = check_timezone(args.timezone)
    try:
        catchup = timedelta(seconds=parse_duration(args.catchup_window))
    except ValueError as e:
        raise CliError(f"--catchup-window: {e}") from None
    if catchup < timedelta(seconds=10):
        raise CliError("--catchup-window must be at least 10s (Temporal's minimum)")
    if not upcoming([cal], tz, datetime.now(timezone.utc), count=1):
        raise CliError(f"the calendar {format_calendar(cal)!r} never fires (no matching time in the next 8 years)")
    inv = _inventory(args)
    if args.source is not None and args.source not in inv.regions:
        raise CliError(f"unknown region {args.source!r}; the inventory has: {', '.join(inv.regions)}")
    sid = schedule_id(inv.environment, name)
    note = args.note or (f"created paused by {_user()}" if args.paused else f"created by {_user()}")
    schedule = Schedule(
        action=PROCEDURES[args.procedure](inv, name, sid, args),
        spec=ScheduleSpec(calendars=[cal], time_zone_name=tz),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup, pause_on_failure=bool(args.pause_on_failure)),
        state=ScheduleState(note=note, paused=bool(args.paused)),
    )
    return inv, name, schedule, calendar_warnings(cal)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


async def cmd_create(args, client: Client | None = None) -> int:
    inv, name, schedule, warnings = build_schedule(args)  # all checks first: nothing exists yet
    client = await _client(client)
    sid = schedule_id(inv.environment, name)
    memo = {"opsflow": {"name": name, "environment": inv.environment, "procedure": args.procedure, "source_region": args.source,
                        "inventory": str(Path(inventory_path(args.env)).resolve()), "created_by": _user()}}
    try:
        handle = await client.create_schedule(sid, schedule, memo=memo, search_attributes=_attributes(inv.environment, args.procedure))
    except ScheduleAlreadyRunningError:
        raise CliError(f"schedule {name} already exists in environment {inv.environment} (opsflow schedule describe {name}; delete it to recreate)") from None
    except RPCError as e:
        if e.status == RPCStatusCode.INVALID_ARGUMENT:
            raise CliError(f"Temporal refused the schedule: {e.message}") from None
        raise
    desc = await handle.describe()
    out = _description(desc, name, inv)
    out["warnings"] = warnings
    if args.json:
        emit(out, True)
    else:
        for w in warnings:
            print(f"note: {w}")
        print(f"created schedule {name} ({sid}): {args.procedure} of {inv.environment} at {out['spec']['calendars'][0]} {out['spec']['timezone']}"
              + (" — PAUSED" if out["paused"] else ""))
        for t in desc.info.next_action_times[:3]:
            print(f"  next: {_local(t, schedule.spec.time_zone_name)}")
    return 0


def _description(desc: ScheduleDescription, name: str, inv: Inventory) -> dict:
    s, info = desc.schedule, desc.info
    action = s.action
    return {
        "name": name,
        "schedule_id": desc.id,
        "environment": inv.environment,
        "procedure": action.workflow if isinstance(action, ScheduleActionStartWorkflow) else None,
        "task_queue": action.task_queue if isinstance(action, ScheduleActionStartWorkflow) else None,
        "spec": _spec_summary(s.spec),
        "paused": s.state.paused,
        "note": s.state.note,
        "policy": {"overlap": s.policy.overlap.name.lower().replace("_", "-"), "catchup_window": _duration(s.policy.catchup_window),
                   "pause_on_failure": s.policy.pause_on_failure},
        "next_action_times": [_iso(t) for t in info.next_action_times],
        "num_actions": info.num_actions,
        "skipped_overlap": info.num_actions_skipped_overlap,
        "missed_catchup_window": info.num_actions_missed_catchup_window,
        "running": [a.workflow_id for a in info.running_actions if hasattr(a, "workflow_id")],
        "recent_actions": [{"scheduled_at": _iso(a.scheduled_at), "started_at": _iso(a.started_at), "workflow_id": getattr(a.action, "workflow_id", None),
                            "run_id": getattr(a.action, "first_execution_run_id", None)} for a in info.recent_actions],
        "created_at": _iso(info.created_at),
        "updated_at": _iso(info.last_updated_at),
    }


async def _inventory_current(client: Client, desc: ScheduleDescription, inv: Inventory) -> bool | None:
    """Does the inventory stored in the schedule's drill input still equal the inventory file?"""
    action = desc.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or not action.args:
        return None
    try:
        (stored,) = await client.data_converter.decode(list(action.args), [dict])
        return Inventory.model_validate(stored["inventory"]).model_dump(mode="json") == inv.model_dump(mode="json")
    except Exception:  # an older or foreign input shape: say nothing rather than guess
        return None


async def _outcomes(client: Client, recent: list[dict]) -> None:
    """Add each recent run's outcome (Temporal status, and the procedure's own OpsStatus) to the rows."""
    for row in recent:
        if not row["workflow_id"]:
            continue
        try:
            d = await client.get_workflow_handle(row["workflow_id"], run_id=row["run_id"]).describe()
        except RPCError:
            row["status"] = "unknown"  # past retention, or deleted
            continue
        row["status"] = d.status.name.lower() if d.status else None
        row["ops_status"] = d.typed_search_attributes.get(OPS_STATUS)


async def cmd_describe(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    check_name(args.name)
    client = await _client(client)
    _, desc = await _describe(client, inv, args.name)
    out = _description(desc, args.name, inv)
    await _outcomes(client, out["recent_actions"])
    out["inventory_current"] = await _inventory_current(client, desc, inv)
    if args.json:
        emit(out, True)
        return 0
    tz = out["spec"]["timezone"]
    print(f"schedule {args.name} ({out['schedule_id']}): {out['procedure']} of {inv.environment} on task queue {out['task_queue']}")
    for cal, given in zip(out["spec"]["calendars"], out["spec"]["as_given"]):
        print(f"  when:    {cal}  [{tz}]" + (f"   (given as {given})" if given and given != f"calendar: {cal}" else ""))
    print(f"  state:   {'PAUSED' if out['paused'] else 'active'}" + (f" — {out['note']}" if out["note"] else ""))
    p = out["policy"]
    print(f"  policy:  overlap {p['overlap']}, catch-up window {p['catchup_window']}, "
          + ("pause on failure" if p["pause_on_failure"] else "keep going after a failure"))
    print(f"  actions: {out['num_actions']} taken, {out['skipped_overlap']} skipped (overlap), {out['missed_catchup_window']} missed (catch-up window)")
    if out["inventory_current"] is False:
        print("  WARNING: the inventory stored in this schedule differs from the inventory file; delete and create it again")
    print("  next runs:" if desc.info.next_action_times else "  next runs: none")
    for t in desc.info.next_action_times[:5]:
        print(f"    {_local(t, tz)}")
    for wid in out["running"]:
        print(f"  running: {wid}")
    if out["recent_actions"]:
        print("  recent runs:")
        for a in out["recent_actions"]:
            outcome = a.get("status") or ""
            if a.get("ops_status"):
                outcome += f" ({a['ops_status']})"
            print(f"    {a['scheduled_at'][:19]}Z  {a['workflow_id']}  {outcome}")
    return 0


async def cmd_list(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    client = await _client(client)
    rows = []
    async for s in await client.list_schedules(f"OpsEnvironment = '{inv.environment}'"):
        memo = (await s.memo()).get("opsflow") or {}
        prefix = schedule_id(inv.environment, "")
        name = memo.get("name") or (s.id[len(prefix):] if s.id.startswith(prefix) else s.id)
        sched, info = s.schedule, s.info
        rows.append({
            "name": name,
            "schedule_id": s.id,
            "procedure": s.typed_search_attributes.get(OPS_PROCEDURE),
            "calendars": [format_calendar(c) for c in sched.spec.calendars] if sched else [],
            "timezone": (sched.spec.time_zone_name or "UTC") if sched else None,
            "paused": sched.state.paused if sched else None,
            "note": sched.state.note if sched else None,
            "next_action_time": _iso(info.next_action_times[0]) if info and info.next_action_times else None,
            "last_action_time": _iso(info.recent_actions[-1].scheduled_at) if info and info.recent_actions else None,
        })
    rows.sort(key=lambda r: r["name"])
    if args.json:
        emit(rows, True)
        return 0
    for r in rows:
        state = "PAUSED" if r["paused"] else "active"
        print(f"{r['name']:<24} {r['procedure'] or '':<8} {state:<7} next {r['next_action_time'] or '-':<21} {' | '.join(r['calendars'])} [{r['timezone']}]")
    if not rows:
        print(f"no schedules in environment {inv.environment}")
    return 0


async def cmd_pause(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    check_name(args.name)
    client = await _client(client)
    handle, _ = await _describe(client, inv, args.name)
    note = f"{'paused' if args.schedule_command == 'pause' else 'unpaused'} by {_user()}" + (f": {args.reason}" if args.reason else "")
    if args.schedule_command == "pause":
        await handle.pause(note=note)
    else:
        await handle.unpause(note=note)
    desc = await handle.describe()
    if args.json:
        emit({"name": args.name, "schedule_id": handle.id, "paused": desc.schedule.state.paused, "note": desc.schedule.state.note}, True)
    else:
        print(f"{args.name}: {'PAUSED' if desc.schedule.state.paused else 'active'} ({desc.schedule.state.note})")
        if not desc.schedule.state.paused and desc.info.next_action_times:
            print(f"  next: {_local(desc.info.next_action_times[0], desc.schedule.spec.time_zone_name)}")
    return 0


async def _wait_new_action(handle: ScheduleHandle, before: int, timeout: float = 15) -> ScheduleDescription:
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        desc = await handle.describe()
        if desc.info.num_actions > before or asyncio.get_running_loop().time() > deadline:
            return desc
        await asyncio.sleep(0.2)


async def cmd_trigger(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    check_name(args.name)
    client = await _client(client)
    handle, desc = await _describe(client, inv, args.name)
    running = [a.workflow_id for a in desc.info.running_actions if hasattr(a, "workflow_id")]
    if running:  # the overlap policy would skip the trigger silently; say so instead
        raise CliError(f"{args.name} has a run in progress ({', '.join(running)}); overlapping runs are skipped", 3)
    before = desc.info.num_actions
    await handle.trigger()
    after = await _wait_new_action(handle, before)
    started = [a for a in after.info.recent_actions if a.started_at and a.scheduled_at and a not in desc.info.recent_actions]
    wid = getattr(started[-1].action, "workflow_id", None) if started else None
    if args.json:
        emit({"name": args.name, "schedule_id": handle.id, "triggered": True, "workflow_id": wid,
              "run_id": getattr(started[-1].action, "first_execution_run_id", None) if started else None}, True)
    elif wid:
        print(f"triggered {args.name}: started {wid}\n  follow with: opsflow status {wid}")
    else:
        print(f"triggered {args.name}; the run has not shown up yet (see: opsflow schedule describe {args.name})")
    return 0


def _parse_time(value: str, what: str, tz: str | None) -> datetime:
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise CliError(f"{what} {value!r} is not an ISO date/time (e.g. 2026-05-01T00:00 or 2026-05-01T00:00:00Z)") from None
    if t.tzinfo is None:  # a wall-clock time in the schedule's own time zone
        t = t.replace(tzinfo=ZoneInfo(tz) if tz and tz != "UTC" else timezone.utc)
    return t.astimezone(timezone.utc)


async def cmd_backfill(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    check_name(args.name)
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    client = await _client(client)
    handle, desc = await _describe(client, inv, args.name)
    tz = desc.schedule.spec.time_zone_name
    start, end = _parse_time(args.start, "--start", tz), _parse_time(args.end, "--end", tz)
    if start >= end:
        raise CliError(f"--start {_iso(start)} is not before --end {_iso(end)}")
    if end > datetime.now(timezone.utc) + timedelta(seconds=5):
        raise CliError(f"--end {_iso(end)} is in the future; a backfill runs the times that have passed (trigger runs one now)")
    times = upcoming(desc.schedule.spec.calendars, tz, start - timedelta(microseconds=1), count=args.limit + 1, until=end)
    if not times:
        raise CliError(f"no scheduled time of {args.name} falls between {_iso(start)} and {_iso(end)}; nothing to backfill")
    if len(times) > args.limit:
        raise CliError(f"the range holds more than {args.limit} scheduled times of {args.name}; narrow it or raise --limit")
    await handle.backfill(ScheduleBackfill(start_at=start, end_at=end, overlap=OVERLAP[args.overlap]))
    out = {"name": args.name, "schedule_id": handle.id, "start": _iso(start), "end": _iso(end), "overlap": args.overlap,
           "scheduled_times": [_iso(t) for t in times]}
    if args.json:
        emit(out, True)
    else:
        print(f"backfilling {args.name}: {len(times)} run(s), {args.overlap} (one after another)" if args.overlap == "buffer-all" else
              f"backfilling {args.name}: {len(times)} run(s), overlap {args.overlap}")
        for t in times:
            print(f"  {_local(t, tz)}")
    return 0


async def cmd_delete(args, client: Client | None = None) -> int:
    inv = _inventory(args)
    check_name(args.name)
    client = await _client(client)
    handle, desc = await _describe(client, inv, args.name)
    running = [a.workflow_id for a in desc.info.running_actions if hasattr(a, "workflow_id")]
    await handle.delete()
    if args.json:
        emit({"name": args.name, "schedule_id": handle.id, "deleted": True, "still_running": running}, True)
    else:
        print(f"deleted schedule {args.name} ({handle.id})")
        for wid in running:
            print(f"  still running (not stopped by the delete): {wid}")
    return 0


SCHEDULE_COMMANDS = {
    "create": cmd_create,
    "list": cmd_list,
    "describe": cmd_describe,
    "pause": cmd_pause,
    "unpause": cmd_pause,
    "trigger": cmd_trigger,
    "backfill": cmd_backfill,
    "delete": cmd_delete,
}


async def run(args, client: Client | None = None) -> int:
    """The `opsflow schedule` entry point: dispatch on the subcommand."""
    return await SCHEDULE_COMMANDS[args.schedule_command](args, client)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `schedule` subcommands to the parser of `opsflow schedule`."""
    p.description = "Run procedures on a Temporal Schedule (e.g. the monthly restore drill)."
    sub = p.add_subparsers(dest="schedule_command", required=True, metavar="{create,list,describe,pause,unpause,trigger,backfill,delete}")

    def cmd(name: str, help: str, named: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        if named:
            sp.add_argument("name", metavar="NAME", help="the schedule's name within the environment, e.g. monthly-drill")
        sp.add_argument("--env", help="inventory YAML (default: the running lab's)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    c = cmd("create", "create a schedule (everything is checked before anything is created)")
    c.add_argument("--procedure", required=True, help="what to run: drill")
    when = c.add_mutually_exclusive_group()
    when.add_argument("--calendar", metavar="SPEC", help="e.g. 'day_of_month=1 hour=3' or 'day_of_week=mon-fri hour=2 minute=30'")
    when.add_argument("--cron", metavar="EXPR", help="e.g. '0 3 1 * *' (minute hour day_of_month month day_of_week)")
    c.add_argument("--timezone", default="UTC", help="IANA time zone the calendar is read in (default UTC), e.g. Europe/Berlin")
    c.add_argument("--source", metavar="REGION", help="region whose backups are restored (default: the inventory's primary)")
    failure = c.add_mutually_exclusive_group()
    failure.add_argument("--pause-on-failure", dest="pause_on_failure", action="store_true", help="pause the schedule when a run fails")
    failure.add_argument("--keep-going", dest="pause_on_failure", action="store_false", help="a failed run alerts and the schedule goes on (default)")
    c.set_defaults(pause_on_failure=False)
    c.add_argument("--catchup-window", default="1d", help="how late a run missed while Temporal was down may still start (default 1d)")
    c.add_argument("--paused", action="store_true", help="create it paused")
    c.add_argument("--note", help="a note shown with the schedule (and the reason given to each run)")

    cmd("list", "the environment's schedules", named=False)
    cmd("describe", "spec, next and recent runs, state")
    for name, help in (("pause", "stop taking scheduled actions"), ("unpause", "take scheduled actions again")):
        cmd(name, help).add_argument("--reason", help="recorded in the schedule's note")
    cmd("trigger", "run now (refused while a run of this schedule is in progress)")
    b = cmd("backfill", "run the scheduled times of a past period")
    b.add_argument("--start", required=True, metavar="ISO", help="e.g. 2026-05-01T00:00 (no offset: the schedule's time zone)")
    b.add_argument("--end", required=True, metavar="ISO")
    b.add_argument("--overlap", choices=list(OVERLAP), default="buffer-all", help="default buffer-all: the runs go one after another")
    b.add_argument("--limit", type=int, default=12, help="refuse a range holding more scheduled times than this (default 12)")
    cmd("delete", "delete the schedule (runs in progress go on)")
