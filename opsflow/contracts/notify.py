"""What people are told: notifications, the status page, stored reports."""

from __future__ import annotations

from opsflow.contracts.base import Activity
from opsflow.maintenance_models import StatusPageRequest, StatusPageResult
from opsflow.models import NotifyRequest, StoreReportRequest

NOTIFY_SEND = Activity("notify.send", NotifyRequest, list[str])
REPORT_STORE = Activity("report.store", StoreReportRequest, list[str])
STATUSPAGE_UPDATE = Activity("statuspage.update", StatusPageRequest, StatusPageResult)
