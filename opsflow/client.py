"""The one way in to Temporal for everything above `opsflow/`: the CLI, the lab demo, the bench and the tests.

It connects, starts a procedure under its environment's lock, follows it, reads its report (also of a failed
run: the kernel puts the report in the failure's details), lists procedures and describes a procedure's
status without needing a live worker. It never imports `workflows/`: callers pass the already-built input
model (FailoverInput, DrillInput, ...) and the procedure's registered name.

Errors a person can act on are `ClientError`s carrying the CLI's exit code (2 bad input, 3 another procedure
is running, 1 the procedure or request failed).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from temporalio.api.enums.v1 import PendingActivityState, TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from opsflow.contracts.kernel import RULES_INVENTORY
from opsflow.inventory import Inventory
from opsflow.models import ProcedureReport
from opsflow.procedures import LAUNCHERS, NOT_PREEMPTIBLE, REPORT_TYPES
from opsflow.rules import START_UNSIGNED, WorkerRules, input_digest
from opsflow.signing import start_memo
from opsflow.temporal import DATA_CONVERTER, OPS_ENVIRONMENT, OPS_PROCEDURE, OPS_STATUS, OPS_STEP

PREEMPT_TIMEOUT = timedelta(minutes=10)


class ClientError(Exception):
    """A clear message for a person, and the CLI exit code that goes with it."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class ProcedureRunning(ClientError):
    """The environment's lock is held: another procedure runs there (exit code 3)."""

    def __init__(self, message: str, workflow_id: str):
        super().__init__(message, 3)
        self.workflow_id = workflow_id


# -- where: the running lab, Temporal, the inventory ----------------------------------------------------------


def lab_pointer() -> Path:
    """Where `opsflow lab up` notes the directory of the running lab ($OPSFLOW_HOME, default ~/.opsflow)."""
    return Path(os.environ.get("OPSFLOW_HOME") or Path.home() / ".opsflow") / "current-lab"


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie child of ours does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def lab_state() -> dict | None:
    """The state of the lab `opsflow lab up` started last, only while its Temporal server still runs: a lab
    left behind by a crash or a reboot must not be mistaken for an environment."""
    try:
        lab_dir = Path(lab_pointer().read_text().strip())
        state = json.loads((lab_dir / "lab.json").read_text())
    except (OSError, ValueError):
        return None
    temporal = state.get("processes", {}).get("temporal")
    if not state.get("ready") or not temporal or not pid_alive(temporal["pid"]):
        return None
    return state


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def inventory_path(given: str | None, say: Callable[[str], None] = _stderr) -> str:
    """The inventory to use: the one given, else the running lab's (and `say` so), else a clear error."""
    if given:
        return given
    lab = lab_state()
    if lab:
        say(f"using the lab's inventory at {lab['inventory']} (pass --env FILE for another environment)")
        return lab["inventory"]
    raise ClientError(
        "no inventory: pass --env FILE (no lab is running to take one from; `opsflow lab up` starts one)", 2
    )


def inventory_paths(given: Iterable[str] | None, say: Callable[[str], None] = _stderr) -> list[str]:
    """Several inventories (a fleet worker): files, and directories standing for every *.yaml in them."""
    paths: list[str] = []
    for g in given or []:
        p = Path(g)
        if p.is_dir():
            found = sorted(str(f) for f in [*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                raise ClientError(f"no *.yaml inventory in directory {p}", 2)
            paths += found
        else:
            paths.append(g)
    return paths or [inventory_path(None, say)]


def data_converter(target_host: str | None = None):
    """The pydantic converter, encrypting payloads (opsflow/codec.py) when a codec key is configured
    (OPSFLOW_CODEC_KEY / OPSFLOW_CODEC_KEY_FILE), or when talking to a lab started with --encrypt (its key
    file). The CLI and the worker both use this."""
    import dataclasses

    from opsflow.codec import KEY_FILE_ENV, codec_from_env

    codec = codec_from_env()
    if codec is None:
        lab = lab_state()
        if lab and lab.get("codec") and target_host == lab["temporal"]["address"]:
            codec = codec_from_env({KEY_FILE_ENV: lab["codec"]["key_file"]})
    return dataclasses.replace(DATA_CONVERTER, payload_codec=codec) if codec else DATA_CONVERTER


def connect_config() -> dict:
    """Where to connect, from the standard places: a Temporal envconfig profile (TEMPORAL_CONFIG_FILE,
    TEMPORAL_PROFILE) and the TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE / TEMPORAL_API_KEY / TLS variables.
    With none of those, the running lab's server, else localhost:7233."""
    from temporalio.envconfig import ClientConfig

    config = dict(ClientConfig.load_client_connect_config())
    if "target_host" not in config:
        lab = lab_state()
        config["target_host"] = lab["temporal"]["address"] if lab else "localhost:7233"
    return config


async def connect(address: str | None = None, namespace: str | None = None, runtime=None) -> Client:
    """A client with opsflow's data converter, configured from the standard places (`connect_config`). Given an
    `address` (tests, benches), it connects exactly there, with no TLS or key from the caller's environment.
    `runtime` carries the worker's metrics."""
    extra = {"runtime": runtime} if runtime is not None else {}
    if address:
        return await Client.connect(
            address, namespace=namespace or "default", data_converter=data_converter(address), **extra
        )
    config = connect_config()
    if namespace:
        config["namespace"] = namespace
    target = config.pop("target_host")
    return await Client.connect(target, data_converter=data_converter(target), **config, **extra)


# -- starting under the environment's lock --------------------------------------------------------------------


def environment_workflow_id(environment: Inventory | str) -> str:
    """The environment's lock: every procedure on it (drills included, whoever starts them) runs with this id,
    and the conflict policy refuses a second one while it runs."""
    name = environment.environment if isinstance(environment, Inventory) else environment
    return f"opsflow-{name}"


def procedure_search_attributes(procedure: str, environment: str) -> TypedSearchAttributes:
    """What a start (or a schedule's action) sets so lists, the UI and the lock check find the procedure."""
    return TypedSearchAttributes(
        [SearchAttributePair(OPS_PROCEDURE, procedure), SearchAttributePair(OPS_ENVIRONMENT, environment)]
    )


@dataclass
class Preempted:
    """A routine procedure an emergency cancelled to take the environment's lock."""

    workflow_id: str
    run_id: str | None
    procedure: str
    outcome: str  # how it closed, in Temporal's words: canceled, failed, completed, terminated


class ProcedureHandle(WorkflowHandle):
    """For type checkers: the handle `start_procedure` returns carries `preempted`, what the start had to
    cancel (empty unless preempt=True). It is the client's own handle object (a test environment's handle
    skips time while awaiting the result), given the attribute."""

    preempted: list[Preempted]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def running_procedures(client: Client, environment: str, exclude: str | None = None) -> list[WorkflowHandle]:
    """Procedures running on the environment under another id than the lock (e.g. started by a Schedule, which
    appends the scheduled time to the id). Visibility lags, so each hit is confirmed with describe. A server
    without this visibility query (the time-skipping test server) answers nothing."""
    query = f"OpsEnvironment = {_quote(environment)} AND ExecutionStatus = 'Running'"
    found = []
    try:
        async for wf in client.list_workflows(query, limit=20):
            if wf.id == exclude or wf.parent_id or wf.workflow_type in LAUNCHERS:
                continue  # children run under their parent's lock; a launcher's child holds the lock id itself
            handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
            if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                found.append(handle)
    except RPCError as e:
        if e.status in (RPCStatusCode.UNIMPLEMENTED, RPCStatusCode.INVALID_ARGUMENT):
            return []
        raise
    return found


async def _describe_holder(handle: WorkflowHandle) -> tuple[str, str] | None:
    """(procedure name, a line saying who runs what) for a refusal message; None if it has ended meanwhile."""
    desc = await handle.describe()
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return None
    try:
        r = await fetch_report(handle, query_timeout=2)
        return desc.workflow_type, f"{r.procedure} requested by {r.requester}, {r.status} at step {r.current_step}"
    except Exception:  # a report is a courtesy here; the refusal stands without it
        return desc.workflow_type, desc.workflow_type


async def _preempt(handle: WorkflowHandle, procedure: str, timeout: timedelta) -> Preempted:
    """Cancel a routine procedure (the kernel treats cancellation as an abort with undo) and wait until it has
    closed, so its undo is done before the emergency touches the environment."""
    await handle.cancel()
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return Preempted(handle.id, desc.run_id, procedure, desc.status.name.lower() if desc.status else "closed")
        if time.monotonic() > deadline:
            raise ClientError(
                f"{handle.id} ({procedure}) was asked to cancel but is still running after {timeout}; its undo "
                f"may be stuck — look at it (opsflow status {handle.id}) and terminate it if you must, then retry",
                1,
            )
        await asyncio.sleep(0.5)


async def start_procedure(
    client: Client,
    inv: Inventory,
    procedure: str,
    arg: Any,
    summary: str,
    workflow_id: str | None = None,
    preempt: bool = False,
    preempt_timeout: timedelta = PREEMPT_TIMEOUT,
    memo: dict | None = None,
    signer: Any = None,
) -> ProcedureHandle:
    """Start `procedure` (its registered workflow name) with its input model `arg` on the environment's lock.

    Another procedure running on the environment: `ProcedureRunning` (exit 3). With `preempt` (the emergency
    failover), a running procedure that is not itself a failover/failback is cancelled, waited for (bounded by
    `preempt_timeout`), and the start retried; the handle's `preempted` lists what was cancelled. `memo`: e.g. the
    requester's signature over the start (opsflow/signing.py's start_memo); better `signer` (a signing.Signer): the
    start is signed here, over the very input sent. The input carries no rules: the environment and the digest of
    `inv` (the requester's copy), and the worker runs it by its own inventory (opsflow/rules.py)."""
    wid = workflow_id or environment_workflow_id(inv)
    if hasattr(arg, "without_rules"):
        arg = arg.without_rules(inv)
    if signer is not None:
        signed = signer.sign_start(
            environment=inv.environment,
            procedure=procedure,
            reason=getattr(arg, "reason", "") or "",
            input_sha256=input_digest(arg, START_UNSIGNED),
            nonce=uuid.uuid4().hex,
        )
        memo = {**(memo or {}), **start_memo(signed)}
    requester, reason = getattr(arg, "requester", ""), getattr(arg, "reason", "")
    preempted: list[Preempted] = []
    for _ in range(5):  # each round frees the lock of one holder; more rounds mean someone keeps starting
        holders = await running_procedures(client, inv.environment, exclude=wid)
        if not holders:
            try:
                started = await client.start_workflow(
                    procedure,
                    arg,
                    id=wid,
                    task_queue=inv.task_queue,
                    memo=memo or None,
                    task_timeout=timedelta(seconds=inv.limits.workflow_task_timeout),
                    id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    static_summary=summary,
                    static_details=f"requested by {requester}" + (f": {reason}" if reason else ""),
                    search_attributes=procedure_search_attributes(procedure, inv.environment),
                )
                started.preempted = preempted  # type: ignore[attr-defined]
                return started  # type: ignore[return-value]
            except WorkflowAlreadyStartedError:
                holders = [client.get_workflow_handle(wid)]
        holder = holders[0]
        described = await _describe_holder(holder)
        if described is None:
            continue  # it ended between our look and the start: try again
        kind, what = described
        if not preempt or kind in NOT_PREEMPTIBLE:
            why = "" if not preempt else "; an emergency does not preempt a failover or failback"
            raise ProcedureRunning(
                f"another procedure is running on environment {inv.environment}: {holder.id} ({what}); "
                f"one at a time per environment{why} (exit 3)",
                holder.id,
            )
        _stderr(f"preempting {holder.id} ({what}): cancelling it with its undo before the {procedure}")
        preempted.append(await _preempt(holder, kind, preempt_timeout))
        if hasattr(arg, "preempted"):  # an input that records what it preempted carries it into its report
            arg = arg.model_copy(
                update={"preempted": [f"{p.workflow_id} ({p.procedure}, {p.outcome})" for p in preempted]}
            )
    raise ProcedureRunning(f"environment {inv.environment} keeps getting new procedures; could not take its lock", wid)


# -- reading: reports, progress, lists, status -----------------------------------------------------------------


def parse_report(data: Any) -> ProcedureReport:
    if isinstance(data, ProcedureReport):
        return data
    kind = REPORT_TYPES.get(data.get("procedure", ""), ProcedureReport)
    return kind.model_validate(data)


async def get_handle(client: Client, workflow_id: str) -> WorkflowHandle:
    """The handle of an existing procedure, or a clear error naming the id."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise ClientError(f"no procedure with workflow id {workflow_id!r} (see: opsflow list)") from None
        raise
    return handle


async def fetch_report(handle: WorkflowHandle, query_timeout: float | None = None,
                       client: Client | None = None) -> ProcedureReport:
    """Running: the `progress` query (needs a worker; `query_timeout` bounds the wait for one). Ended: the
    result, or the report the kernel put in the failure's (or cancellation's) details. `client`: the caller's, on
    which a Schedule's running launch's procedure is looked up (see launched_report)."""
    desc = await handle.describe()
    if desc.workflow_type in LAUNCHERS:
        return await launched_report(handle, desc, query_timeout, client)
    if desc.status == WorkflowExecutionStatus.RUNNING:
        timeout = timedelta(seconds=query_timeout) if query_timeout else None
        return parse_report(await handle.query("progress", result_type=dict, rpc_timeout=timeout))
    try:
        return parse_report(await handle.result())
    except WorkflowFailureError as e:
        return report_in_failure(handle, desc, e)


def report_data_in_failure(e: WorkflowFailureError) -> dict | None:
    """The report (as data) the kernel put in a failed (or cancelled) procedure's failure details, or None."""
    cause = e.cause
    while cause is not None:
        details = getattr(cause, "details", None)
        if details and isinstance(details[0], dict) and "procedure" in details[0]:
            return details[0]
        cause = cause.__cause__
    return None


def report_in_failure(handle: WorkflowHandle, desc: WorkflowExecutionDescription,
                      e: WorkflowFailureError) -> ProcedureReport:
    """The report the kernel put in a failed (or cancelled) procedure's failure details."""
    data = report_data_in_failure(e)
    if data is None:
        raise ClientError(f"{handle.id} ended {desc.status.name.lower()}: {e.cause}", 1) from None
    return parse_report(data)


async def launched_report(handle: WorkflowHandle, desc: WorkflowExecutionDescription,
                          query_timeout: float | None, client: Client | None) -> ProcedureReport:
    """A Schedule's launch (the id `opsflow schedule trigger` prints) reports its procedure: the child it runs
    under the environment's lock id while it runs (looked up on `client`, the caller's), the report it returned
    after; a skipped launch says why."""
    if desc.status == WorkflowExecutionStatus.RUNNING:
        children = desc.raw_description.pending_children
        if not children:
            raise ClientError(f"{handle.id} is a Schedule's launch that has not started its procedure yet", 1)
        if client is None:
            raise ClientError(f"{handle.id} is a Schedule's launch: its running procedure is read on a client "
                              "(fetch_report(..., client=...))", 1)
        child = client.get_workflow_handle(children[0].workflow_id, run_id=children[0].run_id)
        return await fetch_report(child, query_timeout=query_timeout, client=client)
    try:
        launched = await handle.result()
    except WorkflowFailureError as e:  # the procedure failed: its report is in the failure's details
        return report_in_failure(handle, desc, e)
    if isinstance(launched, dict) and launched.get("report"):
        return parse_report(launched["report"])
    why = launched.get("reason", "") if isinstance(launched, dict) else ""
    raise ClientError(f"{handle.id}: the Schedule's launch ran no procedure ({why or launched})", 1)


async def follow(
    handle: WorkflowHandle, on_report: Callable[[ProcedureReport], None] | None = None, interval: float = 0.5
) -> ProcedureReport:
    """Poll the procedure until it ends, handing each report to `on_report`; return the final report. A worker
    restarting in between is waited out: the procedure is durable."""
    while True:
        running = (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        try:
            report = await fetch_report(handle, query_timeout=10)
        except RPCError:
            await asyncio.sleep(interval)
            continue
        if on_report:
            on_report(report)
        if not running:
            return report
        await asyncio.sleep(interval)


# -- talking to a running procedure ----------------------------------------------------------------------------


async def send_update(
    handle: WorkflowHandle, update: Callable[..., Any], request: Any, result_type: type | None = None
) -> Any:
    """Send a person's request to a running procedure by its Update method (`Procedure.approve`, `Procedure.pause`,
    `Rollout.promote`, ...: the `@workflow.update` methods of `workflows/`), never by its name, so a renamed or
    removed update fails where it is imported. The CLI, the lab, the bench and the tests send updates through
    here; this module does not import `workflows/`, the caller passes the method. `result_type` overrides the
    method's own return type (the CLI reads a decision as a dict). A refusal raises what the SDK raises
    (`WorkflowUpdateFailedError`)."""
    if isinstance(update, str):
        raise TypeError(f"send the Update method (e.g. Procedure.{update}), not its name {update!r}")
    return await handle.execute_update(update, request, result_type=result_type)


async def list_procedures(
    client: Client,
    environment: str | None = None,
    status: str | None = None,
    procedure: str | None = None,
    limit: int = 50,
) -> list[dict]:
    """Procedures, newest first, from the search attributes (no worker needed)."""
    query = "OpsProcedure IS NOT NULL"
    if environment:
        query += f" AND OpsEnvironment = {_quote(environment)}"
    if status:
        query += f" AND OpsStatus = {_quote(status)}"
    if procedure:
        query += f" AND OpsProcedure = {_quote(procedure)}"
    rows = []
    async for wf in client.list_workflows(query, limit=limit):
        sa = wf.typed_search_attributes
        rows.append({
            "workflow_id": wf.id,
            "run_id": wf.run_id,
            "procedure": sa.get(OPS_PROCEDURE),
            "environment": sa.get(OPS_ENVIRONMENT),
            "status": sa.get(OPS_STATUS),
            "step": sa.get(OPS_STEP),
            "temporal_status": wf.status.name.lower() if wf.status else None,
            "started_at": wf.start_time.isoformat() if wf.start_time else None,
        })
    return rows


def poller_stale_after() -> float:
    """A poller not seen for this long is gone. A live idle worker re-polls every long-poll interval (one minute
    on a default server), so the default must exceed it; a server with shorter long polls (the lab) sets
    OPSFLOW_POLLER_STALE_AFTER lower and a dead worker shows sooner."""
    return float(os.environ.get("OPSFLOW_POLLER_STALE_AFTER") or 75)


@dataclass
class QueueState:
    name: str
    kind: str  # workflow | activity
    pollers: int  # live ones
    last_poll_seconds_ago: float | None


async def queue_state(
    client: Client, name: str, kind: str = "activity", stale_after: float | None = None
) -> QueueState:
    """Who polls a task queue now (Temporal's DescribeTaskQueue), counting only pollers seen recently."""
    qtype = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW if kind == "workflow" else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=name, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=qtype,
        )
    )
    now = datetime.now(timezone.utc)
    ages = [
        (now - p.last_access_time.ToDatetime(timezone.utc)).total_seconds()
        for p in resp.pollers
        if p.HasField("last_access_time")
    ]
    limit = stale_after if stale_after is not None else poller_stale_after()
    return QueueState(name, kind, sum(1 for a in ages if a <= limit), min(ages) if ages else None)


@dataclass
class ProcedureStatus:
    """What `opsflow status` shows. Works without a worker: describe and the search attributes always answer;
    the live report comes from the progress query when a worker does."""

    workflow_id: str
    run_id: str | None
    procedure: str
    environment: str | None
    temporal_status: str
    status: str | None  # OpsStatus
    step: str | None  # OpsStep
    summary: str | None
    started_at: str | None
    closed_at: str | None
    report: ProcedureReport | None = None
    report_source: str | None = None  # query | result | None (no worker answered)
    pending_activities: list[dict] = field(default_factory=list)
    queues: list[QueueState] = field(default_factory=list)
    note: str | None = None

    @property
    def unserved(self) -> list[str]:
        return [q.name for q in self.queues if q.pollers == 0]

    def as_dict(self) -> dict:
        """The report's fields at the top (what `opsflow status --json` always printed), Temporal's view beside."""
        if self.report:
            d = self.report.model_dump(mode="json")
        else:
            d = {
                "procedure": self.procedure,
                "workflow_id": self.workflow_id,
                "environment": self.environment,
                "status": self.status,
                "current_step": self.step,
                "waiting_for": None,
                "steps": [],
            }
        d.update(
            {
                "temporal_status": self.temporal_status,
                "search_attributes": {"OpsStatus": self.status, "OpsStep": self.step},
                "summary": self.summary,
                "run_id": self.run_id,
                "report_source": self.report_source,
                "note": self.note,
                "pending_activities": self.pending_activities,
                "queues": [asdict(q) for q in self.queues],
                "unserved_queues": self.unserved,
            }
        )
        return d


async def recorded_rules(client: Client, handle: WorkflowHandle) -> Inventory | None:
    """The inventory a procedure acts by, read from its history without a worker: the worker's answer to
    `rules.inventory` (opsflow/rules.py), or, for a run started before the worker held the rules, its input's."""
    scheduled: set[int] = set()
    first = True
    async for event in handle.fetch_history_events():
        if first:
            first = False
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            if payloads:
                arg = (await client.data_converter.decode(payloads[:1], [dict]))[0]  # the codec's, if encrypted
                if isinstance(arg, dict) and arg.get("inventory"):
                    return Inventory.model_validate(arg["inventory"])
        elif event.HasField("activity_task_scheduled_event_attributes"):
            if event.activity_task_scheduled_event_attributes.activity_type.name == RULES_INVENTORY.name:
                scheduled.add(event.event_id)
        elif event.HasField("activity_task_completed_event_attributes"):
            done = event.activity_task_completed_event_attributes
            if done.scheduled_event_id in scheduled:
                rules = WorkerRules.model_validate(
                    (await client.data_converter.decode(list(done.result.payloads), [dict]))[0]
                )
                found = [r.inventory for r in rules.environments if r.inventory is not None]
                return found[0] if found else None
        elif scheduled == set() and event.event_id > 20:
            return None  # the rules are taken first thing: a history without them by now has none
    return None


async def _started_queues(client: Client, handle: WorkflowHandle) -> list[str]:
    """The region task queues of the inventory the procedure acts by (read from its history)."""
    try:
        inv = await recorded_rules(client, handle)
    except Exception:  # an input or answer of another shape: the workflow's own queue is still checked
        return []
    return [inv.region_queue(r) for r in inv.regions] if inv is not None else []


async def describe_status(client: Client, workflow_id: str, query_timeout: float = 3) -> ProcedureStatus:
    handle = await get_handle(client, workflow_id)
    desc = await handle.describe()
    sa = desc.typed_search_attributes
    running = desc.status == WorkflowExecutionStatus.RUNNING
    st = ProcedureStatus(
        workflow_id=desc.id,
        run_id=desc.run_id,
        procedure=sa.get(OPS_PROCEDURE) or desc.workflow_type,
        environment=sa.get(OPS_ENVIRONMENT),
        temporal_status=desc.status.name.lower() if desc.status else "unknown",
        status=sa.get(OPS_STATUS),
        step=sa.get(OPS_STEP),
        summary=await desc.static_summary(),
        started_at=desc.start_time.isoformat() if desc.start_time else None,
        closed_at=desc.close_time.isoformat() if desc.close_time else None,
    )
    if running:
        st.queues.append(await queue_state(client, desc.task_queue, "workflow"))
        for q in await _started_queues(client, handle):
            st.queues.append(await queue_state(client, q, "activity"))
        for pa in desc.raw_description.pending_activities:
            st.pending_activities.append(
                {
                    "activity": pa.activity_type.name,
                    "state": PendingActivityState.Name(pa.state).removeprefix("PENDING_ACTIVITY_STATE_").lower(),
                    "attempt": pa.attempt,
                    "last_failure": pa.last_failure.message or None,
                }
            )
        if st.queues[0].pollers:
            try:
                st.report, st.report_source = await fetch_report(handle, query_timeout, client), "query"
            except (RPCError, asyncio.TimeoutError) as e:
                st.note = f"no live progress (the progress query failed: {e}); shown from Temporal's own record"
        else:
            st.note = "no live progress (no worker polls the workflow queue); shown from Temporal's own record"
    else:
        try:
            st.report, st.report_source = await fetch_report(handle, client=client), "result"
        except ClientError as e:
            st.note = str(e)
    return st
