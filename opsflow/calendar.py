"""One calendar for every procedure: weekly windows, cutoffs and freezes, answered at a given instant.

Safe inside Temporal workflows: every answer is a pure function of the aware datetime passed in (give it
`workflow.now()`), with no I/O and no clock. Only `zoneinfo` is used at call time.

- `WeeklyWindow(days, start, end, timezone)`: e.g. Sunday 02:00-04:00 Europe/Berlin; `end <= start` crosses
  midnight (Sat 22:00-02:00 runs into Sunday), `start == end` is a whole day. Times are wall-clock times in
  the window's zone. DST, as chosen here: a wall time the clocks skip (02:30 on the spring-forward night)
  is the first instant the clock shows a later time (03:00), so that night's 02:00-04:00 lasts 1 hour; a
  wall time that happens twice opens at its first occurrence and closes at its last, so the fall-back
  night's 02:00-04:00 lasts 3 hours. A window never loses or gains a day.
- `Freeze(name, start, end)` (one-off) or `Freeze(name, weekly=WeeklyWindow(...))` (every week).
- `FreezeCalendar` (`ics:` in an inventory): an RFC 5545 file with RRULE/EXDATE/RDATE, read with
  `icalendar` + `recurring-ical-events` when the inventory is LOADED (outside any workflow) and expanded
  into plain events over a bounded horizon (`ICS_HORIZON_DAYS` = 400 days from the load). The model keeps
  the expanded events and the covered range, so a workflow never reads a file; an instant past the
  covered range counts as frozen ("reload the inventory"): not knowing is not permission.
- `Calendar(windows, freezes, ics)`: open = inside a window (any; no windows = always) and in no freeze.

All datetimes returned are in the time zone of the `now` given (UTC for `workflow.now()`).
"""

from __future__ import annotations

import hashlib
import re
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterable, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from temporalio.exceptions import ApplicationError

__all__ = ["Calendar", "Day", "Freeze", "FreezeCalendar", "FreezeEvent", "FreezeHit", "ICS_HORIZON_DAYS", "NeverOpens",
           "SEARCH_DAYS", "MonthlyWindow", "WeeklyWindow", "Window", "load_ics", "wall_to_instant"]

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_FULL_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ICS_HORIZON_DAYS = 400  # how far ahead an .ics calendar's recurrences are expanded when the inventory is loaded
SEARCH_DAYS = 400  # how far ahead next_opening / closes_at look
_HHMM = r"^([01]\d|2[0-3]):[0-5]\d$"
UTC = timezone.utc


class NeverOpens(ApplicationError, ValueError):
    """The calendar does not open within the search horizon (e.g. a freeze longer than a year). A procedure should
    catch it and refuse; left uncaught in a workflow it fails the run (non-retryable) instead of retrying the task."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="NeverOpens", non_retryable=True)


class _Strict(BaseModel):
    # A typo in a key is an error, not a silently ignored setting (as in opsflow/inventory.py).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _zone(name: str) -> ZoneInfo | timezone:
    return UTC if name == "UTC" else ZoneInfo(name)


def _check_zone(v: str) -> str:
    try:
        _zone(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {v!r} (an IANA name such as UTC, Europe/Berlin, America/New_York)"
        ) from None
    return v


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{now!r} has no time zone; pass an aware datetime such as workflow.now()")
    return now


def wall_to_instant(day: date, at: time, zone: ZoneInfo | timezone, last: bool = False) -> datetime:
    """The UTC instant a wall clock in `zone` shows `at` on `day`. A skipped time (spring forward) -> the instant
    the clocks jump; a repeated time (fall back) -> its first occurrence, or its last with `last=True`."""
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:  # the time exists (once or twice)
        return max(first, second) if last else min(first, second)
    # In a gap: fold 0 reads it with the offset before the jump (later UTC), fold 1 with the one after.
    # The jump lies between them; find the first instant whose wall time is not before `naive`.
    lo, hi = int(min(first, second).timestamp()), int(max(first, second).timestamp())  # whole seconds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _merge(spans: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted, overlapping or touching spans joined."""
    out: list[tuple[datetime, datetime]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _parse_days(value: Any) -> Any:
    """'mon-fri', ['sat', 'Sunday'], 'fri-mon' (wraps) -> short names in week order."""
    if isinstance(value, str):
        value = [p for p in re.split(r"[,\s]+", value) if p]
    if not isinstance(value, list):
        return value
    days: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            return value  # let pydantic name the bad item
        parts = item.strip().lower().split("-")

        def one(name: str) -> int:
            name = name.strip()
            if name in DAYS:
                return DAYS.index(name)
            if name in _FULL_DAYS:
                return _FULL_DAYS.index(name)
            raise ValueError(
                f"{item!r}: {name!r} is not a day (mon, tue, wed, thu, fri, sat, sun, or a range like mon-fri)"
            )

        if len(parts) == 1:
            days.add(DAYS[one(parts[0])])
        elif len(parts) == 2:
            a, b = one(parts[0]), one(parts[1])
            days.update(DAYS[(a + i) % 7] for i in range((b - a) % 7 + 1))  # fri-mon wraps round the weekend
        else:
            raise ValueError(f"{item!r} is not a day or a range like mon-fri")
    return [d for d in DAYS if d in days]


def _hhmm(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):  # YAML 1.1 reads an unquoted 22:30 as 1350 (base 60)
        v = f"{v // 60:02d}:{v % 60:02d}"
    elif isinstance(v, time):
        v = v.strftime("%H:%M")
    elif isinstance(v, str) and re.match(r"^\d:[0-5]\d$", v.strip()):
        v = "0" + v.strip()
    if not isinstance(v, str) or not re.match(_HHMM, v):
        raise ValueError(f"{v!r} is not a time of day HH:MM (00:00-23:59; quote it in YAML, e.g. \"02:00\")")
    return v


class _Recurring(_Strict):
    """What a recurring window answers, given its `occurrences` (each subclass declares its own fields: start,
    end, timezone, and when it recurs)."""

    _LOOKAHEAD_DAYS: ClassVar[int] = 8  # far enough to see the next opening (and a chained window's end)
    if TYPE_CHECKING:  # declared by each subclass, in its own field order
        start: str
        end: str
        timezone: str

    def occurrences(self, first_day: date, last_day: date) -> list[tuple[datetime, datetime]]:
        raise NotImplementedError

    def _times(self) -> tuple[time, time, int]:
        s, e = time.fromisoformat(self.start), time.fromisoformat(self.end)
        return s, e, (0 if e > s else 1)

    def _span_on(self, day: date) -> tuple[datetime, datetime] | None:
        """(opens, closes) in UTC of the window opening on local `day` (DST as the module says), or None."""
        zone = _zone(self.timezone)
        s, e, days_later = self._times()
        opens = wall_to_instant(day, s, zone)
        closes = wall_to_instant(day + timedelta(days=days_later), e, zone, last=True)
        return (opens, closes) if closes > opens else None

    def spans(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        """Merged open spans (UTC) that overlap [since, until]."""
        zone = _zone(self.timezone)
        first = since.astimezone(zone).date() - timedelta(days=2)  # a window lasts at most ~25 hours
        last = until.astimezone(zone).date() + timedelta(days=1)
        return [(a, b) for a, b in _merge(self.occurrences(first, last)) if b > since and a <= until]

    # -- the questions -----------------------------------------------------------------------------------
    def _containing(self, now: datetime) -> tuple[datetime, datetime] | None:
        now = _aware(now)
        # Look far enough ahead that a window open every day (chained spans) shows its real end.
        for a, b in self.spans(now, now + timedelta(days=8)):
            if a <= now < b:
                return a, b
        return None

    def is_open(self, now: datetime) -> bool:
        return self._containing(now) is not None

    def next_opening(self, now: datetime) -> datetime | None:
        """None when `now` is inside the window, else when it next opens."""
        now = _aware(now)
        if self.is_open(now):
            return None
        for a, _ in self.spans(now, now + timedelta(days=self._LOOKAHEAD_DAYS)):
            if a > now:
                return a.astimezone(now.tzinfo)
        raise NeverOpens(f"the window {self.describe()} never opens")  # unreachable with at least one day

    def closes_at(self, now: datetime) -> datetime | None:
        """When the window that is open at `now` closes (None when closed). A window open round the clock every
        day reports the end of its 8-day look-ahead: read that as 'not this week'."""
        span = self._containing(now)
        return span[1].astimezone(now.tzinfo) if span else None

    def time_left(self, now: datetime) -> timedelta:
        """How long the window stays open from `now` (zero when closed)."""
        end = self.closes_at(now)
        return end - now if end else timedelta(0)

    def cutoff_reached(self, now: datetime, cutoff_seconds: float) -> bool:
        """True when closed, or when no more than `cutoff_seconds` remain (no new work should start)."""
        return self.time_left(now) <= timedelta(seconds=cutoff_seconds)

    def describe(self) -> str:
        raise NotImplementedError


class WeeklyWindow(_Recurring):
    """A weekly window, e.g. Sunday 02:00-04:00 UTC. `days` are the days it OPENS on; `end <= start` crosses
    midnight into the next day; `start == end` lasts 24 hours (wall clock)."""

    days: list[Day] = Field(min_length=1, description="days the window opens: [sun], [mon-fri], 'sat,sun'")
    start: str = Field(description="HH:MM wall-clock time in `timezone`")
    end: str = Field(description="HH:MM; at or before start: the next day")
    timezone: str = "UTC"

    _days = field_validator("days", mode="before")(_parse_days)
    _tz = field_validator("timezone")(_check_zone)
    _t = field_validator("start", "end", mode="before")(_hhmm)

    def occurrences(self, first_day: date, last_day: date) -> list[tuple[datetime, datetime]]:
        """(opens, closes) in UTC for every window opening on a local day in [first_day, last_day]."""
        out = []
        day = first_day
        while day <= last_day:
            if DAYS[day.weekday()] in self.days and (span := self._span_on(day)):
                out.append(span)
            day += timedelta(days=1)
        return out

    def describe(self) -> str:
        days = _describe_days(self.days)
        return f"{days} {self.start}-{self.end}{' (next day)' if self.end <= self.start else ''} {self.timezone}"


_ORDINALS = {"1st": 1, "first": 1, "2nd": 2, "second": 2, "3rd": 3, "third": 3, "4th": 4, "fourth": 4, "5th": 5,
             "fifth": 5, "last": -1}
_ORDINAL_NAMES = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 5: "5th", -1: "last"}
_MONTHLY = re.compile(r"^\s*(?P<nth>\w+)\s+(?P<day>[a-z]+)(?:\s*\+\s*(?P<offset>\d+)\s*d(?:ays?)?)?"
                      r"(?:\s+(?P<start>\d{1,2}:\d\d)\s*-\s*(?P<end>\d{1,2}:\d\d))?(?:\s+(?P<tz>\S+))?\s*$", re.I)


class MonthlyWindow(_Recurring):
    """A monthly window by weekday: "2nd sun 02:00-04:00", "last sat 22:00-02:00 Europe/Berlin", or with an
    offset in days after that weekday as AWS SSM's schedule offset ("2nd tue +5d 02:00-04:00": the Sunday after
    Patch Tuesday). The dates come from dateutil's rrule (RFC 5545 BYDAY=2SU semantics: a month with no 5th
    Sunday has no "5th sun" window); the wall times and DST are those of WeeklyWindow."""

    _LOOKAHEAD_DAYS: ClassVar[int] = 70  # two months and the offset: the next opening is always within

    monthly: str = Field(description="which weekday of the month: 1st..5th or last, and the day: '2nd sun'")
    offset_days: int = Field(default=0, ge=0, le=14, description="days after that weekday (SSM's ScheduleOffset)")
    start: str = Field(description="HH:MM wall-clock time in `timezone`")
    end: str = Field(description="HH:MM; at or before start: the next day")
    timezone: str = "UTC"

    _tz = field_validator("timezone")(_check_zone)
    _t = field_validator("start", "end", mode="before")(_hhmm)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        m = _MONTHLY.match(data)
        if not m or not m.group("start"):
            raise ValueError(f"{data!r} is not a monthly window: write e.g. \"2nd sun 02:00-04:00\", "
                             "\"last sat 22:00-02:00 Europe/Berlin\" or \"2nd tue +5d 02:00-04:00\"")
        out: dict[str, Any] = {"monthly": f"{m.group('nth')} {m.group('day')}", "start": m.group("start"),
                               "end": m.group("end")}
        if m.group("offset"):
            out["offset_days"] = int(m.group("offset"))
        if m.group("tz"):
            out["timezone"] = m.group("tz")
        return out

    @field_validator("monthly")
    @classmethod
    def _which(cls, v: str) -> str:
        parts = v.strip().lower().split()
        ok = len(parts) == 2 and parts[0] in _ORDINALS
        if ok:
            try:
                day = _parse_days([parts[1]])
            except ValueError:
                ok = False
            else:
                ok = isinstance(day, list) and len(day) == 1
        if not ok:
            raise ValueError(f"{v!r}: write the weekday of the month as '<1st|2nd|3rd|4th|5th|last> <day>', "
                             "e.g. '2nd sun'")
        return f"{_ORDINAL_NAMES[_ORDINALS[parts[0]]]} {day[0]}"

    def occurrences(self, first_day: date, last_day: date) -> list[tuple[datetime, datetime]]:
        from dateutil.rrule import MONTHLY, rrule, weekday

        nth, day = self.monthly.split()
        begin = first_day - timedelta(days=self.offset_days)
        rule = rrule(MONTHLY, byweekday=weekday(DAYS.index(day), _ORDINALS[nth]),
                     dtstart=datetime.combine(begin.replace(day=1), time(0)), until=datetime.combine(last_day, time(0)))
        out = []
        for occurrence in rule:
            local = occurrence.date() + timedelta(days=self.offset_days)
            if first_day <= local <= last_day and (span := self._span_on(local)):
                out.append(span)
        return out

    def describe(self) -> str:
        offset = f" +{self.offset_days}d" if self.offset_days else ""
        return (f"{self.monthly}{offset} of the month {self.start}-{self.end}"
                f"{' (next day)' if self.end <= self.start else ''} {self.timezone}")


def _window_kind(v: Any) -> str:
    if isinstance(v, (str, MonthlyWindow)) or (isinstance(v, dict) and "monthly" in v):
        return "monthly"
    return "weekly"


# A window, weekly or monthly (a string or a dict with `monthly:`), validated as exactly one of them so that an
# error names that one's fields only.
Window = Annotated[Annotated[WeeklyWindow, Tag("weekly")] | Annotated[MonthlyWindow, Tag("monthly")],
                   Discriminator(_window_kind)]


def _describe_days(days: list[str]) -> str:
    idx = [DAYS.index(d) for d in days]
    if len(idx) == 7:
        return "every day"
    if len(idx) > 2 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"{days[0]}-{days[-1]}"
    return ",".join(days)


def _instant(v: Any, zone_name: str, end: bool) -> Any:
    """A freeze bound: an aware datetime, a naive one (read in the freeze's zone) or a date (a whole day:
    start at its midnight, end at the next midnight, i.e. the end date is included)."""
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v) if ("T" in v or " " in v.strip() or ":" in v) else date.fromisoformat(v)
        except ValueError:
            return v
    zone = _zone(zone_name)
    if isinstance(v, datetime):
        return v if v.tzinfo is not None else v.replace(tzinfo=zone)
    if isinstance(v, date):
        return wall_to_instant(v + timedelta(days=1 if end else 0), time(0), zone)
    return v


class Freeze(_Strict):
    """No change while it holds: a one-off span (`start`, `end`; dates are whole days, the end date included)
    or a weekly recurrence (`weekly`: one window or a list whose touching spans join, e.g. Friday after 12:00
    through the weekend = [{days: [fri], start: "12:00", end: "00:00"}, {days: [sat, sun], start: "00:00",
    end: "00:00"}], frozen from Friday 12:00 until Monday 00:00)."""

    name: str = Field(min_length=1)
    start: datetime | None = None
    end: datetime | None = None
    weekly: list[WeeklyWindow] | None = None
    timezone: str = Field(default="UTC", description="for start/end given without an offset, or as dates")

    _tz = field_validator("timezone")(_check_zone)

    @model_validator(mode="before")
    @classmethod
    def _bounds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            tz = data.get("timezone", "UTC")
            try:
                _check_zone(tz)
            except (ValueError, TypeError):
                return data  # the field validator names it
            for key in ("start", "end"):
                if data.get(key) is not None:
                    data[key] = _instant(data[key], tz, end=key == "end")
            if isinstance(data.get("weekly"), (dict, WeeklyWindow)):
                data["weekly"] = [data["weekly"]]
        return data

    @model_validator(mode="after")
    def _shape(self) -> "Freeze":
        inline = self.start is not None or self.end is not None
        if inline == bool(self.weekly):
            raise ValueError(f"freeze {self.name!r}: give either start and end, or weekly")
        if inline:
            if self.start is None or self.end is None:
                raise ValueError(f"freeze {self.name!r}: give both start and end")
            if self.end <= self.start:
                raise ValueError(
                    f"freeze {self.name!r}: end {self.end.isoformat()} is not after start {self.start.isoformat()}"
                )
        return self

    def spans(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        if self.weekly:
            return _merge(s for w in self.weekly for s in w.spans(since, until))
        assert self.start is not None and self.end is not None
        s, e = self.start.astimezone(UTC), self.end.astimezone(UTC)
        return [(s, e)] if e > since and s <= until else []

    def describe(self) -> str:
        if self.weekly:
            return f"{self.name}: every {' and '.join(w.describe() for w in self.weekly)}"
        assert self.start is not None and self.end is not None
        zone = _zone(self.timezone)
        start, end = self.start.astimezone(zone), self.end.astimezone(zone)
        return f"{self.name}: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} {self.timezone}"


class FreezeEvent(_Strict):
    """One expanded occurrence of an .ics event (UTC)."""

    name: str
    start: datetime
    end: datetime


class FreezeCalendar(_Strict):
    """An .ics freeze calendar. In an inventory: `ics: [freezes.ics]` or `ics: [{path: ..., timezone: ...}]`;
    a relative path is read against the inventory file's folder. Loaded and expanded at validation time;
    after that only `events` (and the covered range) are used."""

    path: str
    timezone: str = Field(default="UTC", description="for floating times and all-day events in the file")
    covered_from: datetime | None = None
    covered_until: datetime | None = None
    events: list[FreezeEvent] | None = None
    sha256: str | None = None  # of the file read at load: what the worker's rules and a requester's copy compare

    _tz = field_validator("timezone")(_check_zone)

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> "FreezeCalendar":
        # Only a freshly read inventory has no events: a model coming back from a workflow input has them, so
        # validation inside a workflow reads no file and no clock.
        if self.events is not None:
            return self
        context = info.context or {}
        base = Path(context.get("base_dir") or ".")
        path = Path(self.path) if Path(self.path).is_absolute() else base / self.path
        since = context.get("now") or datetime.now(UTC)
        since = since.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        until = since + timedelta(days=ICS_HORIZON_DAYS)
        events = load_ics(path, since, until, self.timezone)
        self.events, self.covered_from, self.covered_until = events, since, until
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return self

    def spans(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        return [(e.start, e.end) for e in self.events or [] if e.end > since and e.start <= until]

    def hits(self, now: datetime) -> list[str]:
        return [e.name for e in self.events or [] if e.start <= now < e.end]

    def covers(self, now: datetime) -> bool:
        return (self.covered_from is None or now >= self.covered_from) and (
            self.covered_until is None or now < self.covered_until
        )


def load_ics(path: Path, since: datetime, until: datetime, zone_name: str = "UTC") -> list[FreezeEvent]:
    """Read an .ics file and expand its recurrences (RRULE, RDATE, EXDATE) into events between since and
    until. Outside workflows only (file I/O); raises ValueError naming the file on any problem."""
    import icalendar  # imported here: the workflow sandbox never needs them
    import recurring_ical_events

    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the freeze calendar {path}: {e.strerror or e}") from None
    try:
        cal = icalendar.Calendar.from_ical(text)
        found = recurring_ical_events.of(cal).between(since, until)
    except Exception as e:  # noqa: BLE001 - the parsers raise many kinds; all mean a bad file
        raise ValueError(f"the freeze calendar {path} is not valid iCalendar: {e}") from None
    zone = _zone(zone_name)
    events = []
    for ev in found:
        start = ev.get("DTSTART").dt
        end_prop = ev.get("DTEND")
        end = end_prop.dt if end_prop is not None else None
        if end is None:
            dur = ev.get("DURATION")
            end = (
                start + dur.dt
                if dur is not None
                else (start + timedelta(days=1) if not isinstance(start, datetime) else start)
            )

        def utc(v: date | datetime) -> datetime:
            if isinstance(v, datetime):
                return (v if v.tzinfo else v.replace(tzinfo=zone)).astimezone(UTC)
            return wall_to_instant(v, time(0), zone)  # an all-day event: midnight in the calendar's zone

        s, e = utc(start), utc(end)
        if e > s:
            events.append(FreezeEvent(name=str(ev.get("SUMMARY") or "freeze"), start=s, end=e))
    events.sort(key=lambda x: (x.start, x.end, x.name))
    return events


class FreezeHit(_Strict):
    """Why `now` is frozen, and until when (None: not known, e.g. past an .ics calendar's covered range)."""

    name: str
    until: datetime | None


class Calendar(_Strict):
    """Open = inside one of `windows` (no windows: always) and in none of `freezes`/`ics`."""

    windows: list[Window] = []
    freezes: list[Freeze] = []
    ics: list[FreezeCalendar] = []

    def _freeze_spans(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        spans = [s for f in self.freezes for s in f.spans(since, until)]
        spans += [s for c in self.ics for s in c.spans(since, until)]
        return _merge(spans)

    def _window_spans(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        if not self.windows:
            return [(since - timedelta(days=1), until + timedelta(days=1))]
        return _merge(s for w in self.windows for s in w.spans(since, until))

    def frozen(self, now: datetime) -> FreezeHit | None:
        """The freeze holding at `now` (names joined when several), until the merged freezes end."""
        now = _aware(now)
        stale = [c.path for c in self.ics if not c.covers(now)]
        if stale:
            return FreezeHit(
                name=f"freeze calendar {', '.join(stale)} is not expanded for {now:%Y-%m-%d}; reload the inventory",
                until=None,
            )
        names = [f.name for f in self.freezes if any(a <= now < b for a, b in f.spans(now, now))]
        names += [n for c in self.ics for n in c.hits(now)]
        if not names:
            return None
        until = None
        for a, b in self._freeze_spans(now - timedelta(days=1), now + timedelta(days=SEARCH_DAYS)):
            if a <= now < b:
                until = b
        return FreezeHit(name=", ".join(dict.fromkeys(names)), until=until.astimezone(now.tzinfo) if until else None)

    def in_window(self, now: datetime) -> bool:
        now = _aware(now)
        return not self.windows or any(w.is_open(now) for w in self.windows)

    def is_open(self, now: datetime) -> bool:
        return self.in_window(now) and self.frozen(now) is None

    def next_opening(self, now: datetime) -> datetime | None:
        """None when open at `now`; else the first instant it opens. Raises NeverOpens when that is not within
        SEARCH_DAYS (or beyond an .ics calendar's covered range): a procedure should refuse, not wait."""
        now = _aware(now)
        if self.is_open(now):
            return None
        horizon = now + timedelta(days=SEARCH_DAYS)
        # It can only become open where a window opens or a freeze ends. The spans are computed once: a year of
        # candidates must stay cheap inside a workflow task.
        windows, freezes = self._window_spans(now, horizon), self._freeze_spans(now, horizon)
        known_until = min([horizon, *(c.covered_until for c in self.ics if c.covered_until is not None)])
        candidates = sorted({a for a, _ in windows if a > now} | {b for _, b in freezes if b > now})
        for t in candidates:
            if t >= known_until:
                break
            if any(a <= t < b for a, b in windows) and not any(a <= t < b for a, b in freezes):
                return t.astimezone(now.tzinfo)
        raise NeverOpens(
            f"the calendar does not open within {SEARCH_DAYS} days of {now.isoformat()}: {self.describe()}"
        )

    def closes_at(self, now: datetime) -> datetime | None:
        """When it closes (a window ends or a freeze starts) if open at `now`; None when closed. Open round the
        clock with no freeze ahead: the end of the search horizon, read 'not soon'."""
        now = _aware(now)
        if not self.is_open(now):
            return None
        horizon = now + timedelta(days=SEARCH_DAYS)
        ends = [b for a, b in self._window_spans(now, now + timedelta(days=8)) if a <= now < b]
        end = min(ends[0] if ends and self.windows else horizon, horizon)
        starts = [a for a, _ in self._freeze_spans(now, end) if now < a < end]
        for c in self.ics:  # where an .ics calendar's knowledge ends, the calendar counts as closed
            if c.covered_until is not None and now < c.covered_until < end:
                starts.append(c.covered_until)
        return min([end, *starts]).astimezone(now.tzinfo)

    def time_left(self, now: datetime) -> timedelta:
        end = self.closes_at(now)
        return end - now if end else timedelta(0)

    def cutoff_reached(self, now: datetime, cutoff_seconds: float) -> bool:
        """True when closed or when no more than `cutoff_seconds` remain: start no new work (SSM's Cutoff)."""
        return self.time_left(now) <= timedelta(seconds=cutoff_seconds)

    def describe(self) -> str:
        parts = ["open " + (" or ".join(w.describe() for w in self.windows) if self.windows else "at any time")]
        for f in self.freezes:
            parts.append(f"frozen {f.describe()}")
        for c in self.ics:
            n = len(c.events or [])
            covered = f" until {c.covered_until:%Y-%m-%d}" if c.covered_until else ""
            parts.append(f"frozen by {c.path} ({n} event{'s' if n != 1 else ''}{covered})")
        return "; ".join(parts)
