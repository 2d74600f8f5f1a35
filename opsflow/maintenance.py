"""The weekly maintenance window: the inventory's `maintenance:` section (requests, results and reports are in
`opsflow/maintenance_models.py`).

Table names are identifiers, validated strictly here (`schema.table`, letters/digits/underscore): a name that
is anything else -- an injection attempt included -- is refused when the inventory is loaded, naming the
field, and nothing runs. The activities still build SQL with `psycopg.sql.Identifier`, never by formatting.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from opsflow.calendar import Calendar, Freeze, FreezeCalendar, WeeklyWindow, Window
from opsflow.rollout import Direction, Missing
from opsflow.sections import LateFields, Seconds, SecretRef, Strict, parse_duration

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def table_name(value: object) -> str:
    """'schema.table' or 'table' (schema public), each part a plain SQL identifier. Anything else is refused."""
    text = str(value)
    parts = text.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"{text!r} is not a table name: use schema.table with letters, digits and underscores only")
    return text if len(parts) == 2 else f"public.{text}"


def parse_size(value: object) -> int:
    """'64MB', '1GB', 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 16MB, 1GB or a number of bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


TaskKind = Literal["vacuum", "analyze", "vacuum-analyze", "vacuum-freeze", "reindex", "repack", "sql"]
VACUUM_KINDS = ("vacuum", "vacuum-analyze", "vacuum-freeze")


class AutoSelect(LateFields):
    """`tables: auto`: for a vacuum task, first the tables nearing transaction-ID wraparound -- `age(relfrozenxid)`
    (its TOAST table's included) at least `freeze_ratio` of `autovacuum_freeze_max_age`, or `mxid_age(relminmxid)`
    at least that share of `autovacuum_multixact_freeze_max_age` -- oldest first, each given `VACUUM (FREEZE,
    ANALYZE)` (as `vacuumdb --min-xid-age/--min-mxid-age`, before the anti-wraparound autovacuum starts on its
    own at a time nobody chose); then the tables of pg_stat_user_tables with at least `min_dead_tuples` dead
    tuples and a dead share of at least `dead_ratio`, worst first; at most `limit` tables in all.
    `freeze_ratio: null` looks at dead tuples only. For a reindex task: the tables with a btree index of at
    least `min_index_bytes` that is at least `min_index_bloat` bloat, the most wasted bytes first. For a repack
    task (an online rebuild with pg_repack): the tables of at least `min_table_bytes` whose heap is at least
    `min_table_bloat` dead or free space, the most wasted bytes first."""

    late_fields = frozenset({"min_table_bloat", "min_table_bytes"})  # added after inventories had digests

    min_dead_tuples: int = Field(default=10_000, ge=0)
    dead_ratio: float = Field(default=0.1, ge=0, le=1)
    freeze_ratio: float | None = Field(default=0.5, gt=0, le=2)
    # a reindex task: the tables with a btree index of at least min_index_bytes that is at least min_index_bloat
    # bloat (pgstattuple's leaf density where the extension is installed, else the catalogue estimate)
    min_index_bloat: float = Field(default=0.3, gt=0, le=1)
    min_index_bytes: int = 1024 * 1024
    # a repack task: the tables of at least min_table_bytes whose heap is at least min_table_bloat dead or free
    # space (pgstattuple_approx where installed, else the catalogue estimate)
    min_table_bloat: float = Field(default=0.3, gt=0, le=1)
    min_table_bytes: int = 8 * 1024 * 1024
    limit: int = Field(default=100, ge=1, le=1000)

    _s = field_validator("min_index_bytes", "min_table_bytes", mode="before")(parse_size)


class MaintenanceTask(Strict):
    kind: TaskKind
    tables: list[str] | Literal["auto"] = []
    auto: AutoSelect = AutoSelect()
    # sql tasks: a named statement (e.g. a cleanup) that runs with the same guards
    name: str | None = None
    sql: str | None = None

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v: object) -> object:
        if isinstance(v, list):
            return [table_name(t) for t in v]
        return v

    @model_validator(mode="after")
    def _shape(self) -> "MaintenanceTask":
        if self.kind == "sql":
            if not (self.name and self.sql):
                raise ValueError("an sql task needs 'name' and 'sql'")
            if self.tables:
                raise ValueError("an sql task has no 'tables'")
        elif not self.tables:
            raise ValueError(f"a {self.kind} task needs 'tables': a list, or auto")
        return self

    @property
    def label(self) -> str:
        return self.name if self.kind == "sql" and self.name else self.kind


class Guards(LateFields):
    late_fields = frozenset({"transaction_wait"})  # added after inventories had digests

    lock_timeout: Seconds = 5  # per session: a table whose lock is held is retried later, then skipped
    lock_retries: int = Field(default=1, ge=0, le=10)
    statement_timeout: Seconds = 3600
    parallel: int = Field(default=1, ge=1, le=16)  # tables at once, like vacuumdb --jobs
    max_replication_lag: int = 64 * 1024 * 1024  # bytes; no new task starts while a replica lags more
    lag_wait: Seconds = 600  # how long to wait for a lagging replica before the run stops
    # repack: pg_repack waits for every transaction older than its copy to finish before it swaps; one left open
    # (idle in transaction, a long report) would hold it, and the table, for as long. After this it gives up on
    # the table (lock-timeout: retried after the others, then skipped, the transaction named).
    transaction_wait: Seconds = 60

    _d = field_validator("lock_timeout", "statement_timeout", "lag_wait", "transaction_wait",
                         mode="before")(parse_duration)
    _s = field_validator("max_replication_lag", mode="before")(parse_size)


class BackupPolicy(Strict):
    take: bool = True
    verify: bool = True
    # provider postgres (self-managed): pg_basebackup over the replication protocol into this directory on
    # the worker (needs a role with REPLICATION); Azure and RDS back up through their control plane.
    directory: str | None = None
    timeout: Seconds = 3600

    _d = field_validator("timeout", mode="before")(parse_duration)


class StatusPage(Strict):
    """An Atlassian-Statuspage-shaped API: scheduled-maintenance incidents on a page."""

    api_url: str = "https://api.statuspage.io/v1"
    page_id: str
    api_key: SecretRef
    component_ids: list[str] = []
    title: str = "Scheduled database maintenance"


class WatchQuery(LateFields):
    late_fields = frozenset({"judge", "direction", "effect", "missing"})  # added after inventories had digests

    name: str
    query: str = Field(description="PromQL returning one number")
    max: float | None = None
    min: float | None = None
    # watch.during: how the canary's judge reads this query's values in the window against those before it
    judge: bool = True  # false: only its max/min apply during the window
    direction: Direction = "increase"  # which shift is a worsening (an error rate, a latency: increase)
    effect: float | None = Field(default=None, ge=0)  # the relative change a clear shift must exceed (default:
    # during.tolerance)
    missing: Missing = "inconclusive"  # no series (e.g. no 5xx yet): zero | skip | inconclusive


class DuringWatch(Strict):
    """The application watched during the window: after each table (once its health check passed), each watch
    query's values since the work began (the last `recent` of them, one every `step`) are judged against its
    values in the `baseline` before the work began, with the canary's judge (opsflow/judge.py: Mann-Whitney,
    Hodges-Lehmann shift, effect size), and against its max/min. A significant worsening (verdict fail) stops
    new work -- no further table is started, the rest is deferred -- and alerts the notification channels; the
    table that is running finishes (`opsflow abort` stops it too). Too few values yet is inconclusive: the
    work goes on."""

    baseline: Seconds = 900
    recent: Seconds = 300
    step: Seconds = 15
    confidence: float = Field(default=0.98, gt=0.5, lt=1)
    tolerance: float = Field(default=0.25, ge=0)
    min_samples: int = Field(default=5, ge=1)

    _d = field_validator("baseline", "recent", "step", mode="before")(parse_duration)


class WatchPolicy(LateFields):
    late_fields = frozenset({"during"})  # added after inventories had digests

    prometheus: str = Field(description="Prometheus base URL")
    duration: Seconds = 3600
    interval: Seconds = 60
    queries: list[WatchQuery] = Field(min_length=1)
    during: DuringWatch | None = None  # also watch between tables (judged against before the window)

    _d = field_validator("duration", "interval", mode="before")(parse_duration)


class MaintenancePolicy(Strict):
    # weekly ({days: [sun], start: "02:00", end: "04:00", timezone: UTC}) or monthly by weekday ("2nd sun
    # 02:00-04:00 Europe/Berlin", {monthly: 2nd tue, offset_days: 5, start: ..., end: ...})
    window: Window
    # No maintenance while a freeze holds: these, and the rollout section's freezes and .ics calendars (the
    # same calendar as deployments) unless rollout_freezes is false. A freeze over the window's start delays
    # it, one over its end shortens it, one over all of it skips it: the report says which.
    freezes: list[Freeze] = []
    ics: list[FreezeCalendar] = []
    rollout_freezes: bool = True
    cutoff: Seconds = 0  # no new task starts when less than this is left of the window
    on_cutoff: Literal["finish", "cancel"] = "finish"  # cancel: the running statement too (pg_cancel_backend)
    tasks: list[MaintenanceTask] = Field(min_length=1)
    guards: Guards = Guards()
    backup: BackupPolicy = BackupPolicy()
    status_page: StatusPage | None = None
    maintenance_mode: bool = True  # annotate the region's service maintenance=true for the window
    watch: WatchPolicy | None = None
    heartbeat_timeout: Seconds = 30
    # One step per table keeps the UI legible and each table retryable; this bounds the history of one run
    # (a few events per table): tables beyond it are deferred to the next window and listed.
    max_tables: int = Field(default=500, ge=1, le=5000)

    _d = field_validator("cutoff", "heartbeat_timeout", mode="before")(parse_duration)

    def calendar(self, rollout: object | None = None) -> Calendar:
        """The window with the freezes it honours: its own, and the rollout section's (`rollout`, the inventory's
        RolloutPolicy) unless rollout_freezes is false."""
        freezes, ics = list(self.freezes), list(self.ics)
        if self.rollout_freezes and rollout is not None:
            freezes += list(getattr(rollout, "freezes", []))
            ics += list(getattr(rollout, "ics", []))
        return Calendar(windows=[self.window], freezes=freezes, ics=ics)

    def window_text(self) -> str:
        w = self.window
        return f"{', '.join(w.days)} {w.start}-{w.end} {w.timezone}" if isinstance(w, WeeklyWindow) else w.describe()


def calendar_notes(calendar: Calendar, window: Calendar, now: datetime) -> tuple[datetime, list[str]]:
    """When `calendar` (the window and its freezes) next opens from `now` (now if open), and what the freezes did
    to the window (`window`, the same without freezes) on the way: each occurrence skipped, an opening delayed,
    a closing brought forward. Pure (workflow-safe): a function of `now` only."""
    opens = calendar.next_opening(now) or now
    notes: list[str] = []

    def why(at: datetime) -> str:
        hit = calendar.frozen(at)
        return f"freeze {hit.name}" if hit else "a freeze"

    t = now
    for _ in range(60):  # a year of monthly windows at most
        p = window.next_opening(t) or t
        if p >= opens:
            break
        closes = window.closes_at(p) or p
        if opens < closes:
            notes.append(f"the window of {p:%Y-%m-%d %H:%M}Z opens late, at {opens:%H:%M}Z ({why(p)})")
            break
        notes.append(f"the window {p:%Y-%m-%d %H:%M}-{closes:%H:%M}Z is skipped ({why(p)})")
        t = closes
    planned, actual = window.closes_at(opens), calendar.closes_at(opens)
    if planned and actual and actual < planned:
        notes.append(f"the window of {opens:%Y-%m-%d} is shortened: it closes at {actual:%H:%M}Z instead of "
                     f"{planned:%H:%M}Z ({why(actual)} starts)")
    return opens, notes
