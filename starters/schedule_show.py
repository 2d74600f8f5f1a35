"""How a schedule reads: the server's description of it as the JSON `opsflow schedule create|describe` print (its
spec the way a person writes it, policy, next and recent runs with their outcomes, whether the inventory it was
created with is still the file's), and times in UTC or the schedule's own time zone."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from temporalio.client import Client, ScheduleActionStartWorkflow, ScheduleDescription, ScheduleSpec
from temporalio.service import RPCError

from opsflow.cron import format_calendar
from opsflow.inventory import Inventory
from opsflow.rules import InventoryDigest, differences, digest_of
from opsflow.temporal import OPS_STATUS
from starters.schedule_actions import procedure_of


def iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if t else None


def local_time(t: datetime, tz: str | None) -> str:
    zone = ZoneInfo(tz) if tz and tz != "UTC" else timezone.utc
    lt = t.astimezone(zone)
    return f"{lt:%Y-%m-%d %H:%M:%S %Z}" + ("" if zone is timezone.utc else f" ({t.astimezone(timezone.utc):%H:%M} UTC)")


def duration_text(td: timedelta) -> str:
    """timedelta -> '1d', '6h', '90s', '1d12h'."""
    seconds, out = int(td.total_seconds()), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def spec_summary(spec: ScheduleSpec) -> dict:
    return {
        "calendars": [format_calendar(c) for c in spec.calendars],
        "as_given": [c.comment for c in spec.calendars],
        "intervals": [str(i.every) for i in spec.intervals],
        "timezone": spec.time_zone_name or "UTC",
    }


def description(desc: ScheduleDescription, name: str, inv: Inventory) -> dict:
    s, info = desc.schedule, desc.info
    action = s.action
    return {
        "name": name,
        "schedule_id": desc.id,
        "environment": inv.environment,
        "procedure": procedure_of(action) if isinstance(action, ScheduleActionStartWorkflow) else None,
        "task_queue": action.task_queue if isinstance(action, ScheduleActionStartWorkflow) else None,
        "spec": spec_summary(s.spec),
        "paused": s.state.paused,
        "note": s.state.note,
        "policy": {"overlap": s.policy.overlap.name.lower().replace("_", "-"),
                   "catchup_window": duration_text(s.policy.catchup_window),
                   "pause_on_failure": s.policy.pause_on_failure},
        "next_action_times": [iso(t) for t in info.next_action_times],
        "num_actions": info.num_actions,
        "skipped_overlap": info.num_actions_skipped_overlap,
        "missed_catchup_window": info.num_actions_missed_catchup_window,
        "running": [a.workflow_id for a in info.running_actions if hasattr(a, "workflow_id")],
        "recent_actions": [{"scheduled_at": iso(a.scheduled_at), "started_at": iso(a.started_at),
                            "workflow_id": getattr(a.action, "workflow_id", None),
                            "run_id": getattr(a.action, "first_execution_run_id", None)} for a in info.recent_actions],
        "created_at": iso(info.created_at),
        "updated_at": iso(info.last_updated_at),
    }


async def inventory_current(client: Client, desc: ScheduleDescription, inv: Inventory) -> bool | None:
    """Does the digest of the inventory the schedule was created with still match the inventory file? (Its runs
    act by the worker's inventory and are refused, naming what differs, when the digest does not match it.)"""
    action = desc.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or not action.args:
        return None
    try:
        (stored,) = await client.data_converter.decode(list(action.args), [dict])
        stored = stored.get("arg", stored)  # the launcher's input carries the procedure's
        if stored.get("inventory_digest"):
            seen = InventoryDigest.model_validate(stored["inventory_digest"])
        else:  # schedules created before the worker held the rules carry the inventory itself
            seen = digest_of(Inventory.model_validate(stored["inventory"]))
        return not differences(digest_of(inv), seen)
    except Exception:  # an older or foreign input shape: say nothing rather than guess
        return None


async def outcomes(client: Client, recent: list[dict]) -> None:
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
