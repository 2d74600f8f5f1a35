"""The maintenance window: plan, one table's work, health, backups, the watch (activities/maintenance.py)."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.maintenance_models import (
    AppJudgement,
    AppJudgeRequest,
    BackupRequest,
    BackupResult,
    HealthRequest,
    HealthResult,
    ItemResult,
    PlanRequest,
    PlanResult,
    RunItemRequest,
    VerifyBackupRequest,
    WatchRequest,
    WatchResult,
)

MAINT_PLAN = Activity("maint.plan", PlanRequest, PlanResult)
MAINT_RUN_ITEM = Activity("maint.run_item", RunItemRequest, ItemResult)
MAINT_HEALTH = Activity("maint.health", HealthRequest, HealthResult)
BACKUP_TAKE = Activity("backup.take", BackupRequest, BackupResult)
BACKUP_VERIFY = Activity("backup.verify", VerifyBackupRequest, str)
WATCH_METRICS = Activity("watch.metrics", WatchRequest, WatchResult)
WATCH_JUDGE = Activity("watch.judge", AppJudgeRequest, AppJudgement)  # the app during the window vs before it
