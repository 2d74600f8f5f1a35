"""The maintenance window's activities: provider-neutral, each picks what the region's database needs.

SQL work (VACUUM/ANALYZE/REINDEX, statistics, lag) is PostgreSQL's on every provider (activities/postgres/);
backups go through the provider's control plane (Azure on-demand backup, RDS manual snapshot) or, for a
self-managed server, pg_basebackup over the replication protocol into a directory on the worker.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from temporalio.exceptions import ApplicationError

from activities import prometheus
from activities.context import heartbeat, time_limit
from activities.http_checks import probe
from activities.postgres.backup import base_backup, verify_base_backup
from activities.postgres.maintenance import (
    bloated_index_tables,
    bloated_tables,
    dead_tuple_candidates,
    missing_tables,
    run_maintenance,
    wraparound_candidates,
)
from activities.postgres.repack import repack_table
from activities.providers import database_provider
from opsflow.contracts.maintenance import (
    BACKUP_TAKE,
    BACKUP_VERIFY,
    MAINT_HEALTH,
    MAINT_PLAN,
    MAINT_RUN_ITEM,
    WATCH_JUDGE,
    WATCH_METRICS,
)
from opsflow.maintenance import VACUUM_KINDS, table_name
from opsflow.maintenance_models import (
    AppJudgement,
    AppJudgeRequest,
    AppMetric,
    BackupRequest,
    BackupResult,
    HealthRequest,
    HealthResult,
    ItemResult,
    PlanRequest,
    PlanResult,
    RunItemRequest,
    VerifyBackupRequest,
    WatchQueryResult,
    WatchRequest,
    WatchResult,
    WorkItem,
)
from opsflow.models import lsn_to_int


def _sql_db(target):
    if getattr(target.database, "dsn", None) is None:
        raise ApplicationError(
            f"{target.region}: maintenance needs SQL access; the inventory gives no dsn",
            type="BadInput",
            non_retryable=True,
        )
    return target.database


@MAINT_PLAN.implementation
def plan(req: PlanRequest) -> PlanResult:
    """The work, in order: each task's tables (listed ones must exist; `auto` ones picked, with the reason: for
    a vacuum task the tables nearing transaction-ID wraparound first, as `vacuum-freeze`, then by their dead
    tuples; for a reindex task by the bloat of their btree indexes; for a repack task by their table bloat),
    bounded by max_tables; and what the backup will use."""
    db = _sql_db(req.target)
    items: list[WorkItem] = []
    missing: list[str] = []
    for i, task in enumerate(req.tasks):
        if task.kind == "sql":
            items.append(WorkItem(task=i, kind="sql", name=task.name, sql=task.sql, reason="listed"))
            continue
        if task.tables == "auto":
            picked: list[tuple[str, str, str]] = []  # (table, kind, why)
            if task.kind in VACUUM_KINDS and task.auto.freeze_ratio is not None:
                old = wraparound_candidates(db, task.auto.freeze_ratio, task.auto.limit)
                picked += [(t, "vacuum-freeze", why) for t, why in old]
            if task.kind == "reindex":
                a = task.auto
                picked += [(t, "reindex", why) for t, why in bloated_index_tables(db, a.min_index_bloat,
                                                                                  a.min_index_bytes, a.limit)]
            elif task.kind == "repack":
                a = task.auto
                picked += [(t, "repack", why) for t, why in bloated_tables(db, a.min_table_bloat,
                                                                           a.min_table_bytes, a.limit)]
            elif task.kind != "vacuum-freeze":
                dead = dead_tuple_candidates(db, task.auto.min_dead_tuples, task.auto.dead_ratio, task.auto.limit)
                seen = {t for t, _, _ in picked}
                picked += [(t, task.kind, why) for t, why in dead if t not in seen]
            for table, kind, why in picked[: task.auto.limit]:
                try:
                    table_name(table)
                except ValueError:
                    continue  # a catalog name that is not a plain identifier: never sent back as SQL
                items.append(WorkItem(task=i, kind=kind, table=table, reason=f"auto: {why}"))
        else:
            gone = missing_tables(db, list(task.tables))
            missing += [t for t in gone if t not in missing]
            items += [WorkItem(task=i, kind=task.kind, table=t, reason="listed") for t in task.tables if t not in gone]
    return PlanResult(
        items=items[: req.max_tables],
        missing=missing,
        over_limit=items[req.max_tables :],
        backup_target=_backup_target(req),
    )


def _backup_target(req: PlanRequest) -> str:
    if not req.backup.take:
        return "no backup (backup.take is false)"
    provider = req.target.database.provider
    if provider == "azure-flexible":
        return f"Azure on-demand backup of {req.target.database.server_name}"
    if provider == "aws-rds":
        return f"RDS manual snapshot of {req.target.database.db_instance_identifier}"
    if not req.backup.directory:
        raise ApplicationError(
            "maintenance.backup.directory is needed to back up a self-managed server (pg_basebackup target)",
            type="BadInput",
            non_retryable=True,
        )
    directory = Path(req.backup.directory)
    probe_dir = directory if directory.exists() else directory.parent
    if not probe_dir.exists() or not _writable(probe_dir):
        raise ApplicationError(
            f"backup directory {directory} is not writable on this worker", type="Refused", non_retryable=True
        )
    return f"pg_basebackup into {directory}"


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


@MAINT_RUN_ITEM.implementation
def run_item(req: RunItemRequest) -> ItemResult:
    """One table (or named statement) under the guards; progress heartbeated; cancellation stops it cleanly.
    A repack is pg_repack's online rebuild (activities/postgres/repack.py), with its own lock and lag guards."""
    if req.item.kind == "repack":
        return repack_table(_sql_db(req.target), req.item, req.guards, cancel_at=req.cancel_at)
    return run_maintenance(_sql_db(req.target), req.item, req.guards, cancel_at=req.cancel_at)


@MAINT_HEALTH.implementation
def health(req: HealthRequest) -> HealthResult:
    """After each table: the primary answers, every replica streams within the lag limit (waiting up to
    lag_wait for it to come back under), and the region's smoke URLs answer."""
    started = time.monotonic()
    problems: list[str] = []
    status = database_provider(req.primary).status()
    if not status.reachable or status.role != "primary":
        return HealthResult(
            ok=False, detail=f"primary in {req.primary.region}: " + (status.error or f"role {status.role}")
        )
    lags: dict[str, int] = {}
    while True:
        lags, laggards = {}, []
        primary_lsn = lsn_to_int(database_provider(req.primary).status().current_lsn) or 0
        for replica in req.replicas:
            r = database_provider(replica).status()
            if not r.reachable or not r.streaming:
                return HealthResult(
                    ok=False,
                    detail=f"replica in {replica.region} is not streaming: {r.error or r.role}",
                    lag_bytes=lags,
                )
            lags[replica.region] = max(0, primary_lsn - (lsn_to_int(r.replay_lsn) or 0))
            if lags[replica.region] > req.max_lag_bytes:
                laggards.append(replica.region)
        waited = time.monotonic() - started
        heartbeat({"lag_bytes": lags})
        if not laggards:
            break
        if waited > req.lag_wait:
            return HealthResult(
                ok=False,
                detail=f"replication lag above {req.max_lag_bytes} bytes for {waited:.0f}s: "
                + ", ".join(f"{r} {lags[r]}" for r in laggards),
                lag_bytes=lags,
                waited_seconds=waited,
            )
        time.sleep(1)
    smoke = [probe(u) for u in req.primary.smoke_urls]
    problems += [f"{s.url}: {s.status or s.error}" for s in smoke if not s.ok]
    return HealthResult(
        ok=not problems,
        detail="; ".join(problems) or "healthy",
        lag_bytes=lags,
        waited_seconds=time.monotonic() - started,
        smoke=smoke,
    )


@BACKUP_TAKE.implementation
def take_backup(req: BackupRequest) -> BackupResult:
    limit = time_limit(req.policy.timeout)
    provider = req.target.database.provider
    if provider == "azure-flexible":
        from activities.azure.flexible_server import on_demand_backup  # the Azure clients load on first use

        return on_demand_backup(req.target, req.name, limit)
    if provider == "aws-rds":
        from activities.aws.rds import rds_manual_snapshot  # boto3 loads on first use

        return rds_manual_snapshot(req.target, req.name, limit)
    if not req.policy.directory:
        raise ApplicationError("maintenance.backup.directory is not set", type="BadInput", non_retryable=True)
    return base_backup(req.target.database, req.policy.directory, req.name, timeout=limit)


@BACKUP_VERIFY.implementation
def verify_backup(req: VerifyBackupRequest) -> str:
    """Completed, newer than the procedure's start, non-empty; a base backup also passes pg_verifybackup."""
    b = req.backup
    if b.state != "completed":
        raise ApplicationError(f"backup {b.id} is {b.state}, not completed", type="BackupInvalid", non_retryable=True)
    if b.method == "azure-on-demand":
        from activities.azure.flexible_server import backup_completed_at, get_backup  # on first use, as above

        found = get_backup(req.target, b.id.rsplit("/", 1)[-1])
        if found is None:
            raise ApplicationError(f"backup {b.id} is not listed by Azure", type="BackupInvalid", non_retryable=True)
        completed = backup_completed_at(found)
    else:
        completed = b.completed_at
    if completed is None or completed < req.not_before:
        raise ApplicationError(
            f"backup {b.id} completed at {completed}, before this maintenance started ({req.not_before:%H:%M:%S})",
            type="BackupInvalid",
            non_retryable=True,
        )
    if b.method != "azure-on-demand" and not b.size_bytes:
        raise ApplicationError(f"backup {b.id} is empty", type="BackupInvalid", non_retryable=True)
    detail = f"{b.method} {b.id.rsplit('/', 1)[-1]}: completed {completed:%Y-%m-%d %H:%M:%S}Z" + (
        f", {b.size_bytes} bytes" if b.size_bytes else ""
    )
    if b.method == "pg_basebackup":
        detail += "; " + verify_base_backup(b.location)
    return detail


@WATCH_METRICS.implementation
def watch(req: WatchRequest) -> WatchResult:
    """Query each metric every interval for the duration; the first breach ends the watch (it alerts)."""
    results = {q.name: WatchQueryResult(name=q.name, query=q.query) for q in req.policy.queries}
    deadline = time.monotonic() + min(req.duration, time_limit(req.duration + 60))
    while True:
        for q in req.policy.queries:
            r = results[q.name]
            value = prometheus.query(req.policy.prometheus, q.query)
            if math.isnan(value):
                r.detail = "no data"
                continue
            r.samples += 1
            r.last = value
            worse = (lambda a, b: a > b) if q.max is not None else (lambda a, b: a < b)
            r.worst = value if r.worst is None or worse(value, r.worst) else r.worst
            if (q.max is not None and value > q.max) or (q.min is not None and value < q.min):
                r.breached = True
                r.detail = f"{value:g} is " + (
                    f"above {q.max:g}" if q.max is not None and value > q.max else f"below {q.min:g}"
                )
        heartbeat({q: r.last for q, r in results.items()})
        if any(r.breached for r in results.values()) or time.monotonic() >= deadline:
            break
        time.sleep(min(req.policy.interval, max(0.0, deadline - time.monotonic())))
    return WatchResult(ok=not any(r.breached for r in results.values()), results=list(results.values()))


@WATCH_JUDGE.implementation
def judge_app(req: AppJudgeRequest) -> AppJudgement:
    """The application during the window against the minutes before it: each watch query's values over
    [max(since, now - recent), now] against [baseline_start, baseline_end], one every `step` (Prometheus
    query_range), judged by the canary's judge (opsflow/judge.py); a value beyond the query's max/min fails it
    whatever the rank test says. A Prometheus that does not answer is inconclusive (the work goes on, the health
    checks still guard it); a query it rejects is bad input."""
    from opsflow.judge import classify, judge  # numpy/scipy: loaded where used

    d = req.policy.during
    if d is None:
        raise ApplicationError("watch.during is not configured", type="BadInput", non_retryable=True)
    now = datetime.now(timezone.utc)
    start = max(req.since, now - timedelta(seconds=d.recent))
    verdicts, metrics = [], []
    try:
        for q in req.policy.queries:
            heartbeat(q.name)
            zero = q.missing == "zero"
            before = prometheus.query_range(req.policy.prometheus, q.query, req.baseline_start, req.baseline_end,
                                            d.step, zero=zero)
            during = prometheus.query_range(req.policy.prometheus, q.query, start, now, d.step, zero=zero)
            limit = next((f"{v:g} is above its max {q.max:g}" for v in during if q.max is not None and v > q.max),
                         None) or next((f"{v:g} is below its min {q.min:g}" for v in during
                                        if q.min is not None and v < q.min), None)
            r = classify(q.name, during, before, direction=q.direction, confidence=d.confidence,
                         tolerance=d.tolerance, min_samples=d.min_samples, effect=q.effect, missing=q.missing)
            if limit:
                r.classification, r.failed, r.reason = "high" if "above" in limit else "low", True, limit
            if q.judge or limit:
                verdicts.append(r)
            metrics.append(AppMetric(name=q.name, verdict="breach" if limit else r.classification,
                                     baseline=r.baseline_mean, current=r.canary_mean, ratio=r.ratio,
                                     p_value=r.p_value, samples=r.canary_n,
                                     reason=r.reason.replace("canary", "window").replace("baseline", "before")))
    except ApplicationError as e:
        if e.type == "BadInput":
            raise
        return AppJudgement(after=req.after, at=now, verdict="inconclusive", reason=f"not judged: {e}")
    if not verdicts:
        return AppJudgement(after=req.after, at=now, verdict="inconclusive", reason="no query is judged",
                            metrics=metrics)
    v = judge(verdicts)
    reason = v.reason.replace("canary", "window").replace("baseline", "before")
    return AppJudgement(after=req.after, at=now, verdict=v.verdict, score=v.score, reason=reason, metrics=metrics)
