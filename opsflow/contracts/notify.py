"""What people are told: notifications, the status page, stored reports."""

from __future__ import annotations

from opsflow.contracts.base import HEARTBEATS, Activity
from opsflow.maintenance_models import StatusPageRequest, StatusPageResult
from opsflow.models import NotifyRequest, StoreReportRequest

# The kernel's own calls heartbeat while they send or write (a worker lost mid-call costs HEARTBEATS).
NOTIFY_SEND = Activity("notify.send", NotifyRequest, list[str], heartbeat=HEARTBEATS)
REPORT_STORE = Activity("report.store", StoreReportRequest, list[str], heartbeat=HEARTBEATS)
STATUSPAGE_UPDATE = Activity("statuspage.update", StatusPageRequest, StatusPageResult, heartbeat=HEARTBEATS)
