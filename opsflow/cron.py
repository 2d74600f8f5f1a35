"""Checking a Temporal Schedule's calendar or cron expression before the server reads it, and showing the server's
structured spec the way a person writes it. Pure functions: no I/O, no clock.

The Temporal server is the one that reads the calendar: a checked `--calendar` becomes the 7-field cron string
the server parses (the text as given rides along as the spec's comment), and every time a schedule shows comes
from the server. This module only gives a person a clear message first: the keys, each value's shape and range,
the cron field count. A cron library (croniter and the like, none of which opsflow depends on) computes times
by classic cron's rules, which are not Temporal's (a year field, 7 as Sunday, a day matching both day_of_month
and day_of_week), and its errors do not name the key; so the checks are written here, and no time is computed.

Calendar syntax (`--calendar`): space-separated `key=value`, keys second, minute, hour, day_of_month, month,
day_of_week, year. A value is `*`, `N`, `N-M`, `N/S`, `N-M/S`, `*/S` or a comma list of those; months may be
named (jan..dec), days of the week too (sun..sat; 0 and 7 are Sunday; fri-mon wraps round the weekend).
Unset fields default as in Temporal: second, minute and hour to 0, the others to every value. Temporal
matches a day only when it satisfies BOTH day_of_month and day_of_week (classic cron takes either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from temporalio.client import ScheduleCalendarSpec, ScheduleRange


class CalendarError(ValueError):
    """A malformed calendar or cron expression; the message names the bad key or value."""


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_FULL_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
                "november", "december"]
_FULL_DAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
_NAMES = {"month": {**{n: i + 1 for i, n in enumerate(MONTHS)}, **{n: i + 1 for i, n in enumerate(_FULL_MONTHS)}},
          "day_of_week": {**{n: i for i, n in enumerate(DAYS)}, **{n: i for i, n in enumerate(_FULL_DAYS)}}}
# key -> (lowest, highest accepted, what a value is, the server's default when the key is not given)
KEYS: dict[str, tuple[int, int, str, str]] = {
    "second": (0, 59, "second", "0"),
    "minute": (0, 59, "minute", "0"),
    "hour": (0, 23, "hour", "0"),
    "day_of_month": (1, 31, "day of the month", "*"),
    "month": (1, 12, "month", "*"),
    "day_of_week": (0, 7, "day of the week", "*"),  # 7 is Sunday too
    "year": (2000, 2100, "year", "*"),  # the server's own range
}
CRON_ORDER = ["second", "minute", "hour", "day_of_month", "month", "day_of_week", "year"]
CRON_FIELDS = {5: CRON_ORDER[1:6], 6: CRON_ORDER[1:], 7: CRON_ORDER}
CRON_SHORTHANDS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_ITEM = re.compile(r"^(?P<start>\*|[a-z0-9]+)(?:-(?P<end>[a-z0-9]+))?(?:/(?P<step>[^/]*))?$")


def _number(key: str, token: str, whole: str) -> int:
    lo, hi, what, _ = KEYS[key]
    names = _NAMES.get(key)
    if names and token in names:
        return names[token]
    if not token.isdigit():
        named = f" or {', '.join(list(names)[: 12 if key == 'month' else 7])}" if names else ""
        raise CalendarError(f"{key}={whole}: {token!r} is not a {what} ({lo}-{hi}{named})")
    n = int(token)
    if not lo <= n <= hi:
        raise CalendarError(f"{key}={whole}: {n} is out of range for {key} ({lo}-{hi})")
    return n


def check_field(key: str, value: str) -> str:
    """Check one field's value ('1', '1-5', '*/15', 'mon-fri', '1,15') and return it as the server reads it
    (numbers; a day range round the weekend split in two). Raises CalendarError naming the bad part."""
    if key not in KEYS:
        raise CalendarError(f"unknown calendar key {key!r}; the keys are: {', '.join(KEYS)}")
    lo = KEYS[key][0]
    whole, value = value, value.strip().lower()
    if not value:
        raise CalendarError(f"{key}= has no value (e.g. {key}={lo})")
    out: list[str] = []
    for item in value.split(","):
        m = _ITEM.match(item)
        if not m:
            if not item:
                raise CalendarError(f"{key}={whole}: an empty item in the list")
            raise CalendarError(f"{key}={whole}: {item!r} is not N, N-M, N-M/S, */S or *")
        start_tok, end_tok, step_tok = m.group("start"), m.group("end"), m.group("step")
        if step_tok is not None and (not step_tok.isdigit() or int(step_tok) < 1):
            raise CalendarError(f"{key}={whole}: the step {step_tok!r} must be a whole number of at least 1")
        step = f"/{int(step_tok)}" if step_tok is not None else ""
        if start_tok == "*":
            if end_tok is not None:
                raise CalendarError(f"{key}={whole}: '*' cannot start a range")
            out.append("*" + step)
            continue
        start = _number(key, start_tok, whole)
        if end_tok is None:
            out.append(f"{start}{step}")
            continue
        end = _number(key, end_tok, whole)
        if key == "day_of_week" and end < start:  # fri-mon, sat-sun: round the weekend
            if step:
                raise CalendarError(f"{key}={whole}: a step cannot go round the weekend; write the days as a list")
            out.append(f"{start}-7" + (f",0-{end}" if end > 0 else ""))
            continue
        if end < start:
            raise CalendarError(f"{key}={whole}: the range {start_tok}-{end_tok} runs backwards "
                                f"(start {start} is after end {end})")
        out.append(f"{start}-{end}{step}")
    return ",".join(out)


@dataclass(frozen=True)
class CheckedSpec:
    """What the server gets (a cron string with the text as given for its comment) and what it was."""

    cron: str
    given: str
    fields: dict[str, str]

    def warnings(self) -> list[str]:
        if self.fields.get("day_of_month", "*") != "*" and self.fields.get("day_of_week", "*") != "*":
            return ["day_of_month and day_of_week both restrict the days: Temporal runs only on days matching both "
                    "(classic cron takes either)"]
        return []


def _as_cron(fields: dict[str, str], given: str) -> CheckedSpec:
    cron = " ".join(fields.get(k, KEYS[k][3]) for k in CRON_ORDER)
    # The server keeps what follows '#' as the spec's comment: `describe` shows the text as it was given.
    return CheckedSpec(cron=f"{cron} # {given}", given=given, fields=fields)


def check_calendar(text: str) -> CheckedSpec:
    """'day_of_week=sun hour=2' -> a checked spec for the server. Raises CalendarError naming the bad part."""
    if not text or not text.strip():
        raise CalendarError("the calendar is empty; e.g. --calendar 'day_of_month=1 hour=3'")
    fields: dict[str, str] = {}
    for part in text.split():
        if "=" not in part:
            raise CalendarError(f"{part!r} is not key=value (e.g. hour=3); the keys are: {', '.join(KEYS)}")
        key, value = part.split("=", 1)
        key = key.strip().lower().replace("-", "_")
        if key not in KEYS:
            raise CalendarError(f"unknown calendar key {key!r} in {part!r}; the keys are: {', '.join(KEYS)}")
        if key in fields:
            raise CalendarError(f"{key} is given twice; use a comma list instead (e.g. {key}=1,15)")
        fields[key] = check_field(key, value)
    return _as_cron(fields, f"calendar: {' '.join(text.split())}")


def check_cron(expr: str) -> CheckedSpec:
    """A 5/6/7-field cron string (or @daily & co.) -> a checked spec for the server, with the calendar's checks
    on each field. Raises CalendarError naming the bad part."""
    text = " ".join((expr or "").split())
    if not text:
        raise CalendarError("the cron expression is empty; e.g. --cron '0 3 1 * *'")
    if re.match(r"^(CRON_)?TZ=", text, re.I):
        raise CalendarError(f"cron {text!r}: give the time zone with --timezone, not inside the expression")
    if "#" in text:
        raise CalendarError(f"cron {text!r}: no comments in the expression; use --note")
    if text.startswith("@"):
        if text.lower() not in CRON_SHORTHANDS:
            raise CalendarError(f"cron {text!r}: unknown shorthand; use one of {', '.join(CRON_SHORTHANDS)} "
                                "(or write the times)")
        return CheckedSpec(cron=f"{text.lower()} # cron: {text}", given=f"cron: {text}", fields={})
    parts = text.split()
    keys = CRON_FIELDS.get(len(parts))
    if keys is None:
        raise CalendarError(f"cron {text!r} has {len(parts)} fields; it needs 5 "
                            "(minute hour day_of_month month day_of_week), "
                            "6 (+ year) or 7 (second first)")
    fields: dict[str, str] = {}
    for key, value in zip(keys, parts):
        try:
            fields[key] = check_field(key, value)
        except CalendarError as e:
            raise CalendarError(f"cron {text!r}: {e}") from None
    fields.setdefault("second", "0")
    return _as_cron(fields, f"cron: {text}")


# -- showing the server's structured spec the way a person writes it -----------------------------------------

_DEFAULTS = {"second": (ScheduleRange(0, 0, 1),), "minute": (ScheduleRange(0, 0, 1),),
             "hour": (ScheduleRange(0, 0, 1),),
             "day_of_month": (ScheduleRange(1, 31, 1),), "month": (ScheduleRange(1, 12, 1),),
             "day_of_week": (ScheduleRange(0, 6, 1),), "year": ()}
_TOP = {"second": 59, "minute": 59, "hour": 23, "day_of_month": 31, "month": 12, "day_of_week": 6, "year": 2100}
DISPLAY_ORDER = ["year", "month", "day_of_month", "day_of_week", "hour", "minute", "second"]


def _normal(r: ScheduleRange) -> ScheduleRange:
    end, step = max(r.end, r.start), r.step or 1
    return ScheduleRange(r.start, r.start, 1) if r.start == end else ScheduleRange(r.start, end, step)


def _render(key: str, r: ScheduleRange) -> str:
    def name(v: int) -> str:
        return MONTHS[v - 1] if key == "month" else DAYS[v % 7] if key == "day_of_week" else str(v)

    start, end, step = r.start, r.end, r.step
    if start == KEYS[key][0] and end >= _TOP[key]:
        return "*" if step == 1 else f"*/{step}"
    if start == end:
        return name(start)
    return f"{name(start)}-{name(end)}" + (f"/{step}" if step != 1 else "")


def format_calendar(spec: ScheduleCalendarSpec) -> str:
    """A structured spec (as the server describes it) -> 'day_of_month=1 hour=3': only what differs from the
    defaults, largest unit first."""
    parts = []
    for key in DISPLAY_ORDER:
        ranges = tuple(_normal(r) for r in getattr(spec, key))
        if ranges == _DEFAULTS[key]:
            continue
        parts.append(f"{key}={','.join(_render(key, r) for r in ranges) if ranges else '*'}")
    return " ".join(parts) or "second=0"


# -- the maintenance window as a Schedule's calendar -----------------------------------------------------------

# opsflow.calendar counts days mon=0..sun=6; Temporal sun=0..sat=6
_TEMPORAL_DAY = {d: (i + 1) % 7 for i, d in enumerate(["mon", "tue", "wed", "thu", "fri", "sat", "sun"])}


@dataclass(frozen=True)
class WindowSpec:
    """A window's openings as a Schedule's structured calendar, in its time zone. It fires when the window opens,
    or `lead` earlier where the opening time falls in a DST gap or fold on some date of the window (the run then
    waits for the window to open)."""

    calendar: ScheduleCalendarSpec
    timezone: str
    text: str  # as `format_calendar` shows it
    lead: timedelta = timedelta(0)
    dst_dates: tuple[str, ...] = ()  # the window's dates whose opening time the clocks skip or repeat

    def warnings(self) -> list[str]:
        if not self.lead:
            return []
        return [f"the window opens at a time the clocks skip or repeat on {', '.join(self.dst_dates[:3])} "
                f"({self.timezone}): Temporal skips such a time (that window would not run) or fires twice; so the "
                f"schedule fires {_hours(self.lead)} before the window, and each run waits for the window to open"]


def _hours(td: timedelta) -> str:
    m = int(td.total_seconds()) // 60
    return f"{m // 60}h{m % 60:02d}" if m % 60 else f"{m // 60}h"


def _runs(values: list[int]) -> tuple[ScheduleRange, ...]:
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return tuple(ScheduleRange(a, b) for a, b in out)


def _dst_trouble(window: object, today: date, days: int, at: time | None = None) -> tuple[list[date], timedelta]:
    """The local dates (from `today`, for `days`) on which the window opens, where the wall time `at` (default: its
    start) does not exist (spring forward) or happens twice (fall back), and the largest such shift."""
    from opsflow.calendar import _zone

    zone = _zone(window.timezone)  # type: ignore[attr-defined]
    at = at or time.fromisoformat(window.start)  # type: ignore[attr-defined]
    opened = window.occurrences(today, today + timedelta(days=days))  # type: ignore[attr-defined]
    bad, shift = [], timedelta(0)
    for day in sorted({a.astimezone(zone).date() for a, _ in opened}):
        naive = datetime.combine(day, at)
        early, late = naive.replace(tzinfo=zone), naive.replace(tzinfo=zone, fold=1)
        if early.utcoffset() != late.utcoffset():
            bad.append(day)
            shift = max(shift, abs(early.utcoffset() - late.utcoffset()))  # type: ignore[operator]
    return bad, shift


def window_spec(window: object, today: date, years: int = 5) -> WindowSpec:
    """The inventory's maintenance window (a WeeklyWindow or MonthlyWindow of opsflow.calendar) -> the Schedule
    calendar that fires when it opens. Temporal matches a day only when it satisfies BOTH day_of_month and
    day_of_week, so the n-th weekday of the month is that weekday on days 7(n-1)+1..7n; an offset of d days
    shifts both the weekday and the days by d. A window the calendar cannot follow exactly is refused
    (CalendarError): 'last <day>' (its days depend on the month's length) and an n-th weekday plus offset that
    can pass the 28th into the next month (Temporal would skip the months where it does). Where the opening
    time falls in a DST gap or fold on one of the window's dates in the next `years` from `today`, the schedule
    fires that shift earlier on every date (Temporal skips a skipped time and fires twice at a repeated one)."""
    from opsflow.calendar import MonthlyWindow, WeeklyWindow

    if not isinstance(window, (WeeklyWindow, MonthlyWindow)):
        raise CalendarError(f"not a maintenance window: {window!r}")
    bad, lead = _dst_trouble(window, today, 366 * years)
    hour, minute = (int(x) for x in window.start.split(":"))
    fire = hour * 60 + minute - int(lead.total_seconds()) // 60
    if fire < 0:
        raise CalendarError(f"the window {window.describe()!r} opens at a time the clocks skip or repeat "
                            f"({bad[0]}), too close to midnight to fire {_hours(lead)} early on the same day; "
                            "move its start, or give --calendar/--cron")
    if lead and _dst_trouble(window, today, 366 * years, time(fire // 60, fire % 60))[0]:
        raise CalendarError(f"the window {window.describe()!r} opens at a time the clocks skip or repeat "
                            f"({bad[0]}), and so does {fire // 60:02d}:{fire % 60:02d}, {_hours(lead)} earlier; "
                            "move its start, or give --calendar/--cron")
    at = {"hour": (ScheduleRange(fire // 60),), "minute": (ScheduleRange(fire % 60),), "second": (ScheduleRange(0),)}
    comment = f"window: {window.describe()}"
    if isinstance(window, WeeklyWindow):
        spec = ScheduleCalendarSpec(day_of_week=_runs([_TEMPORAL_DAY[d] for d in window.days]), comment=comment, **at)
    else:
        nth, day = window.monthly.split()
        d = window.offset_days
        if nth == "last":
            raise CalendarError(f"the window {window.describe()!r} cannot be a Schedule's calendar: the days of the "
                                "last weekday depend on the month's length; use 4th or 5th, or give --calendar/--cron")
        n = int(nth[0])
        first, last = 7 * (n - 1) + 1 + d, 7 * n + d
        if last > 28 and not (n == 5 and d == 0):
            raise CalendarError(
                f"the window {window.describe()!r} cannot be a Schedule's calendar: {nth} {day} + {d} days falls on "
                f"day {first}-{last}, past the 28th, so in some months it is in the next month, where Temporal "
                "would not follow it (those months would be skipped); choose a window within the month, or give "
                "--calendar/--cron")
        spec = ScheduleCalendarSpec(day_of_week=(ScheduleRange((_TEMPORAL_DAY[day] + d) % 7),),
                                    day_of_month=(ScheduleRange(first, min(last, 31)),), comment=comment, **at)
    return WindowSpec(calendar=spec, timezone=window.timezone, text=format_calendar(spec), lead=lead,
                      dst_dates=tuple(str(b) for b in bad))
