"""`opsflow schedule ...`: procedures on a Temporal Schedule (the monthly restore drill, the weekly maintenance).

    opsflow schedule create NAME --env INVENTORY --procedure drill|maintenance
                            (--calendar "day_of_month=1 hour=3" | --cron "0 3 1 * *" | --every 30m
                             | --window) [--timezone Europe/Berlin]
                            [--source REGION (drill) | --region REGION (maintenance)]
                            [--pause-on-failure | --keep-going] [--catchup-window 1d] [--paused] [--note TEXT]
                            [--json]
    opsflow schedule list      --env INVENTORY [--json]
    opsflow schedule describe  NAME --env INVENTORY [--json]
    opsflow schedule pause     NAME --env INVENTORY [--reason TEXT] [--json]
    opsflow schedule unpause   NAME --env INVENTORY [--reason TEXT] [--json]
    opsflow schedule trigger   NAME --env INVENTORY [--json]
    opsflow schedule backfill  NAME --env INVENTORY --start ISO --end ISO [--overlap buffer-all] [--limit 12]
                               [--json]
    opsflow schedule delete    NAME --env INVENTORY [--json]

The Temporal server is the one that reads the calendar: `--calendar` becomes a 7-field cron string the server
parses (the text as given rides along as the spec's comment), and every time shown — the next runs after a
create or describe, the runs a backfill will make — is the server's own answer (`next_action_times`,
`ListScheduleMatchingTimes`). Before anything is created, `starters/schedule_actions.py` checks what a person
needs a clear message for (the calendar's keys, each value's shape and range, the cron field count through
`opsflow/cron.py`, which also has the calendar syntax; the time zone, the procedure and its region) and builds
the schedule. Whatever the server still refuses comes back as exit code 2, nothing created; a calendar the
server finds no next time for ("never fires") is deleted again and refused the same way. Times are wall-clock
times in --timezone (default UTC); the server skips a time the clocks skip and fires twice at a time that
happens twice.

The schedule's id is `opsflow-<environment>-<NAME>`. Temporal appends the scheduled time to the id of every
workflow a schedule starts (the API's `keep_original_workflow_id` policy is not in the Python SDK, and the
server we ship ignored it when tried), so a scheduled run cannot hold the environment's lock id
`opsflow-<environment>` itself: a scheduled maintenance runs as `opsflow-<environment>-<time>`, a scheduled
drill as `opsflow-<environment>-<NAME>-<time>`. Overlapping runs of one schedule are skipped.

A maintenance schedule fires, by default (`--window`), when the inventory's maintenance window opens: the spec is
derived from the window, weekly or monthly by weekday, in its time zone (`opsflow.cron.window_spec`; "2nd sun" is
day_of_week=sun day_of_month=8-14, which Temporal matches on days satisfying both), and shown as the server reads
it. A window no Temporal calendar follows exactly ("last sun", an offset that can pass the 28th) is refused.

A procedure's input (with the inventory) is stored in the schedule when it is created: after changing the
inventory, delete and create the schedule again (`describe` tells when the stored inventory is stale).
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from temporalio.api.workflowservice.v1 import ListScheduleMatchingTimesRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleBackfill,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleOverlapPolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from opsflow.client import connect, inventory_path
from opsflow.cron import format_calendar
from opsflow.inventory import Inventory
from opsflow.temporal import OPS_PROCEDURE
from starters.common import CliError, add_key_argument, emit
from starters.schedule_actions import (
    PROCEDURES,
    attributes,
    build_schedule,
    check_name,
    procedure_of,
    schedule_id,
    schedule_inventory,
    user,
)
from starters.schedule_show import description, inventory_current, iso, local_time, outcomes

OVERLAP = {"skip": ScheduleOverlapPolicy.SKIP, "buffer-one": ScheduleOverlapPolicy.BUFFER_ONE,
           "buffer-all": ScheduleOverlapPolicy.BUFFER_ALL, "allow-all": ScheduleOverlapPolicy.ALLOW_ALL}


def register(sub: argparse._SubParsersAction) -> None:
    """`opsflow schedule` and its subcommands, each with its handler."""
    p = sub.add_parser("schedule", help="procedures on a Temporal Schedule: create, list, describe, pause, trigger, "
                                        "backfill, delete")
    p.description = "Run procedures on a Temporal Schedule (e.g. the monthly restore drill)."
    commands = p.add_subparsers(dest="schedule_command", required=True,
                                metavar="{create,list,describe,pause,unpause,trigger,backfill,delete}")

    def cmd(name: str, help: str, handler, named: bool = True) -> argparse.ArgumentParser:
        sp = commands.add_parser(name, help=help)
        if named:
            sp.add_argument("name", metavar="NAME",
                            help="the schedule's name within the environment, e.g. monthly-drill")
        sp.add_argument("--env", help="inventory YAML (default: the running lab's)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=handler)
        return sp

    c = cmd("create", "create a schedule; the server reads the calendar and shows the next runs (--paused to look "
                      "first)", cmd_create)
    c.add_argument("--procedure", required=True, help=f"what to run: {', '.join(PROCEDURES)}")
    when = c.add_mutually_exclusive_group()
    when.add_argument("--calendar", metavar="SPEC",
                      help="e.g. 'day_of_month=1 hour=3' or 'day_of_week=mon-fri hour=2 minute=30'")
    when.add_argument("--cron", metavar="EXPR",
                      help="e.g. '0 3 1 * *' (minute hour day_of_month month day_of_week)")
    when.add_argument("--every", metavar="DURATION",
                      help="a fixed interval, e.g. 30m (readiness checks); at least 1m")
    when.add_argument("--window", action="store_true",
                      help="maintenance: fire when the inventory's maintenance window opens, weekly or monthly, in its "
                           "time zone (the default for --procedure maintenance)")
    c.add_argument("--timezone", default="UTC",
                   help="IANA time zone the calendar is read in (default UTC), e.g. Europe/Berlin")
    c.add_argument("--source", metavar="REGION",
                   help="drill: region whose backups are restored (default: the inventory's primary)")
    c.add_argument("--region", metavar="REGION",
                   help="maintenance: region whose database is maintained (default: the current primary)")
    failure = c.add_mutually_exclusive_group()
    failure.add_argument("--pause-on-failure", dest="pause_on_failure", action="store_true",
                         help="pause the schedule when a run fails")
    failure.add_argument("--keep-going", dest="pause_on_failure", action="store_false",
                         help="a failed run alerts and the schedule goes on (default)")
    c.set_defaults(pause_on_failure=False)
    c.add_argument("--catchup-window", default="1d",
                   help="how late a run missed while Temporal was down may still start (default 1d)")
    c.add_argument("--paused", action="store_true",
                   help="create it paused (to look at the server's next run times first)")
    c.add_argument("--dry-run", action="store_true",
                   help="check and show what would be sent; create nothing (no run times: the server computes them)")
    c.add_argument("--note", help="a note shown with the schedule (and the reason given to each run)")
    c.add_argument("--as", dest="as_name", metavar="NAME",
                   help="who creates it (an operator of the procedure; signs where required; default: your login)")
    add_key_argument(c)

    cmd("list", "the environment's schedules", cmd_list, named=False)
    cmd("describe", "spec, next and recent runs, state", cmd_describe)
    for name, help in (("pause", "stop taking scheduled actions"), ("unpause", "take scheduled actions again")):
        cmd(name, help, cmd_pause).add_argument("--reason", help="recorded in the schedule's note")
    cmd("trigger", "run now (refused while a run of this schedule is in progress)", cmd_trigger)
    b = cmd("backfill", "run the scheduled times of a past period", cmd_backfill)
    b.add_argument("--start", required=True, metavar="ISO",
                   help="e.g. 2026-05-01T00:00 (no offset: the schedule's time zone)")
    b.add_argument("--end", required=True, metavar="ISO")
    b.add_argument("--overlap", choices=list(OVERLAP), default="buffer-all",
                   help="default buffer-all: the runs go one after another")
    b.add_argument("--limit", type=int, default=12,
                   help="refuse a range holding more scheduled times than this (default 12)")
    cmd("delete", "delete the schedule (runs in progress go on)", cmd_delete)


async def _client(client: Client | None) -> Client:
    return client or await connect()


async def _describe(client: Client, inv: Inventory, name: str) -> tuple[ScheduleHandle, ScheduleDescription]:
    handle = client.get_schedule_handle(schedule_id(inv.environment, check_name(name)))
    try:
        return handle, await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no schedule {name} in environment {inv.environment} "
                           "(see: opsflow schedule list --env ...)") from None
        raise


def _show_dry_run(inv: Inventory, name: str, schedule: Schedule, warnings: list[str], args) -> int:
    """What create would send. The run times are not shown: the server computes them once the schedule exists, and a
    time computed here could disagree with it (create with --paused to see them before anything runs)."""
    action = schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    out = {"name": name, "schedule_id": schedule_id(inv.environment, name), "environment": inv.environment,
           "procedure": procedure_of(action), "workflow_id": f"opsflow-{inv.environment}",
           "task_queue": action.task_queue, "cron_sent": (schedule.spec.cron_expressions or [None])[0],
           "calendars": [format_calendar(c) for c in schedule.spec.calendars],
           "every": [str(i.every) for i in schedule.spec.intervals],
           "timezone": schedule.spec.time_zone_name, "paused": schedule.state.paused,
           "warnings": warnings, "next_action_times": None,
           "why_no_times": "Temporal computes the run times when the schedule is created; "
                           "create it with --paused to see them first"}
    if args.json:
        emit(out, True)
        return 0
    for w in warnings:
        print(f"note: {w}")
    print(f"would create schedule {name} ({out['schedule_id']}): {action.workflow} of {inv.environment}, "
          f"runs as {out['workflow_id']}")
    spec = out["cron_sent"] or " | ".join(out["calendars"]) or ", ".join(f"every {e}" for e in out["every"])
    print(f"  spec sent to Temporal: {spec}  [{out['timezone']}]")
    print(f"  next runs: {out['why_no_times']}")
    return 0


async def cmd_create(args, client: Client | None = None) -> int:
    inv, name, schedule, warnings = build_schedule(args)  # all checks first: nothing exists yet
    if args.dry_run:
        return _show_dry_run(inv, name, schedule, warnings, args)
    client = await _client(client)
    sid = schedule_id(inv.environment, name)
    memo = {"opsflow": {"name": name, "environment": inv.environment, "procedure": args.procedure,
                        "source_region": args.source, "region": args.region,
                        "inventory": str(Path(inventory_path(args.env)).resolve()), "created_by": user()}}
    try:
        handle = await client.create_schedule(sid, schedule, memo=memo,
                                              search_attributes=attributes(inv.environment, args.procedure))
    except ScheduleAlreadyRunningError:
        raise CliError(f"schedule {name} already exists in environment {inv.environment} "
                       f"(opsflow schedule describe {name}; delete it to recreate)") from None
    except RPCError as e:
        if e.status == RPCStatusCode.INVALID_ARGUMENT:
            raise CliError(f"Temporal refused the schedule: {e.message}") from None
        raise
    desc = await _firstdescription(handle)
    if not desc.info.next_action_times:  # the server finds no time the calendar matches
        await handle.delete()
        given = ((args.calendar and f"--calendar {args.calendar!r}") or (args.cron and f"--cron {args.cron!r}")
                 or "the maintenance window")
        read_as = ", ".join(format_calendar(c) for c in desc.schedule.spec.calendars)
        zone = desc.schedule.spec.time_zone_name or "UTC"
        raise CliError(f"{given} never fires: Temporal finds no time matching it ({read_as} in {zone}); "
                       "nothing was created")
    out = description(desc, name, inv)
    out["warnings"] = warnings
    if args.json:
        emit(out, True)
    else:
        for w in warnings:
            print(f"note: {w}")
        print(f"created schedule {name} ({sid}): {args.procedure} of {inv.environment} "
              f"at {out['spec']['calendars'][0]} {out['spec']['timezone']}" + (" — PAUSED" if out["paused"] else ""))
        for t in desc.info.next_action_times[:3]:
            print(f"  next: {local_time(t, schedule.spec.time_zone_name)}")
    return 0


async def _firstdescription(handle: ScheduleHandle, patience: float = 3) -> ScheduleDescription:
    """The new schedule as the server describes it; an empty list of next times is asked again briefly before it
    is believed (the server computes them when it takes the schedule in)."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        desc = await handle.describe()
        if desc.info.next_action_times or asyncio.get_running_loop().time() > deadline:
            return desc
        await asyncio.sleep(0.5)


async def matching_times(client: Client, handle: ScheduleHandle, start: datetime, end: datetime) -> list[datetime]:
    """The times in [start, end] at which the server's reading of the schedule's spec takes action."""
    req = ListScheduleMatchingTimesRequest(namespace=client.namespace, schedule_id=handle.id)
    req.start_time.FromDatetime(start.astimezone(timezone.utc))
    req.end_time.FromDatetime(end.astimezone(timezone.utc))
    resp = await client.workflow_service.list_schedule_matching_times(req)
    return [t.ToDatetime(tzinfo=timezone.utc) for t in resp.start_time]


async def cmd_describe(args, client: Client | None = None) -> int:
    inv = schedule_inventory(args)
    check_name(args.name)
    client = await _client(client)
    _, desc = await _describe(client, inv, args.name)
    out = description(desc, args.name, inv)
    await outcomes(client, out["recent_actions"])
    out["inventory_current"] = await inventory_current(client, desc, inv)
    if args.json:
        emit(out, True)
        return 0
    tz = out["spec"]["timezone"]
    print(f"schedule {args.name} ({out['schedule_id']}): {out['procedure']} of {inv.environment} "
          f"on task queue {out['task_queue']}")
    for cal, given in zip(out["spec"]["calendars"], out["spec"]["as_given"]):
        print(f"  when:    {cal}  [{tz}]" + (f"   (given as {given})" if given and given != f"calendar: {cal}" else ""))
    print(f"  state:   {'PAUSED' if out['paused'] else 'active'}" + (f" — {out['note']}" if out["note"] else ""))
    p = out["policy"]
    print(f"  policy:  overlap {p['overlap']}, catch-up window {p['catchup_window']}, "
          + ("pause on failure" if p["pause_on_failure"] else "keep going after a failure"))
    print(f"  actions: {out['num_actions']} taken, {out['skipped_overlap']} skipped (overlap), "
          f"{out['missed_catchup_window']} missed (catch-up window)")
    if out["inventory_current"] is False:
        print("  WARNING: this schedule was created with an inventory that differs from the inventory file; "
              "its runs are refused where that differs from the worker's: delete and create it again")
    print("  next runs:" if desc.info.next_action_times else "  next runs: none")
    for t in desc.info.next_action_times[:5]:
        print(f"    {local_time(t, tz)}")
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
    inv = schedule_inventory(args)
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
            "next_action_time": iso(info.next_action_times[0]) if info and info.next_action_times else None,
            "last_action_time": iso(info.recent_actions[-1].scheduled_at) if info and info.recent_actions else None,
        })
    rows.sort(key=lambda r: r["name"])
    if args.json:
        emit(rows, True)
        return 0
    for r in rows:
        state = "PAUSED" if r["paused"] else "active"
        print(f"{r['name']:<24} {r['procedure'] or '':<8} {state:<7} next {r['next_action_time'] or '-':<21} "
              f"{' | '.join(r['calendars'])} [{r['timezone']}]")
    if not rows:
        print(f"no schedules in environment {inv.environment}")
    return 0


async def cmd_pause(args, client: Client | None = None) -> int:
    inv = schedule_inventory(args)
    check_name(args.name)
    client = await _client(client)
    handle, _ = await _describe(client, inv, args.name)
    done = "paused" if args.schedule_command == "pause" else "unpaused"
    note = f"{done} by {user()}" + (f": {args.reason}" if args.reason else "")
    if args.schedule_command == "pause":
        await handle.pause(note=note)
    else:
        await handle.unpause(note=note)
    desc = await handle.describe()
    if args.json:
        emit({"name": args.name, "schedule_id": handle.id, "paused": desc.schedule.state.paused,
              "note": desc.schedule.state.note}, True)
    else:
        print(f"{args.name}: {'PAUSED' if desc.schedule.state.paused else 'active'} ({desc.schedule.state.note})")
        if not desc.schedule.state.paused and desc.info.next_action_times:
            print(f"  next: {local_time(desc.info.next_action_times[0], desc.schedule.spec.time_zone_name)}")
    return 0


async def _wait_new_action(handle: ScheduleHandle, before: int, timeout: float = 15) -> ScheduleDescription:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        desc = await handle.describe()
        if desc.info.num_actions > before or asyncio.get_running_loop().time() > deadline:
            return desc
        await asyncio.sleep(0.2)


async def cmd_trigger(args, client: Client | None = None) -> int:
    inv = schedule_inventory(args)
    check_name(args.name)
    client = await _client(client)
    handle, desc = await _describe(client, inv, args.name)
    running = [a.workflow_id for a in desc.info.running_actions if hasattr(a, "workflow_id")]
    if running:  # the overlap policy would skip the trigger silently; say so instead
        raise CliError(f"{args.name} has a run in progress ({', '.join(running)}); overlapping runs are skipped", 3)
    before = desc.info.num_actions
    await handle.trigger()
    after = await _wait_new_action(handle, before)
    started = [a for a in after.info.recent_actions
               if a.started_at and a.scheduled_at and a not in desc.info.recent_actions]
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
        raise CliError(f"{what} {value!r} is not an ISO date/time "
                       "(e.g. 2026-05-01T00:00 or 2026-05-01T00:00:00Z)") from None
    if t.tzinfo is None:  # a wall-clock time in the schedule's own time zone
        t = t.replace(tzinfo=ZoneInfo(tz) if tz and tz != "UTC" else timezone.utc)
    return t.astimezone(timezone.utc)


async def cmd_backfill(args, client: Client | None = None) -> int:
    inv = schedule_inventory(args)
    check_name(args.name)
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    client = await _client(client)
    handle, desc = await _describe(client, inv, args.name)
    tz = desc.schedule.spec.time_zone_name
    start, end = _parse_time(args.start, "--start", tz), _parse_time(args.end, "--end", tz)
    if start >= end:
        raise CliError(f"--start {iso(start)} is not before --end {iso(end)}")
    if end > datetime.now(timezone.utc) + timedelta(seconds=5):
        raise CliError(f"--end {iso(end)} is in the future; a backfill runs the times that have passed "
                       "(trigger runs one now)")
    times = await matching_times(client, handle, start, end)
    if not times:
        raise CliError(f"no scheduled time of {args.name} falls between {iso(start)} and {iso(end)}; "
                       "nothing to backfill")
    if len(times) > args.limit:
        raise CliError(f"the range holds more than {args.limit} scheduled times of {args.name}; "
                       "narrow it or raise --limit")
    await handle.backfill(ScheduleBackfill(start_at=start, end_at=end, overlap=OVERLAP[args.overlap]))
    out = {"name": args.name, "schedule_id": handle.id, "start": iso(start), "end": iso(end), "overlap": args.overlap,
           "scheduled_times": [iso(t) for t in times]}
    if args.json:
        emit(out, True)
    else:
        how = f"{args.overlap} (one after another)" if args.overlap == "buffer-all" else f"overlap {args.overlap}"
        print(f"backfilling {args.name}: {len(times)} run(s), {how}")
        for t in times:
            print(f"  {local_time(t, tz)}")
    return 0


async def cmd_delete(args, client: Client | None = None) -> int:
    inv = schedule_inventory(args)
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
