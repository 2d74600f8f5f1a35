"""Helpers for code that runs both inside an activity and outside one (tests, the lab, the bench)."""

from __future__ import annotations

from typing import Any

from temporalio import activity


def heartbeat(*details: Any) -> None:
    """Heartbeat when running as an activity; nothing otherwise."""
    if activity.in_activity():
        activity.heartbeat(*details)


def time_limit(default: float) -> float:
    """How long this activity may wait: its start-to-close (else schedule-to-close) timeout less a margin, so
    it reports a timeout itself instead of being cut off by the server; `default` outside an activity."""
    if activity.in_activity():
        info = activity.info()
        limit = info.start_to_close_timeout or info.schedule_to_close_timeout
        if limit:
            return max(5.0, limit.total_seconds() - 5.0)
    return default
