"""What every CLI command shares: finding the inventory and Temporal, reading reports, printing, exit codes."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from opsflow.models import DrillReport, FailbackReport, FailoverReport, ProcedureReport
from opsflow.temporal import lab_state

REPORT_TYPES: dict[str, type[ProcedureReport]] = {"failover": FailoverReport, "failback": FailbackReport, "drill": DrillReport}


class CliError(Exception):
    """A clear message for the person at the terminal, and the exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def inventory_path(given: str | None) -> str:
    if given:
        return given
    lab = lab_state()
    if lab:
        return lab["inventory"]
    raise CliError("no inventory: pass --env FILE (or start the lab: opsflow lab up)")


def parse_report(data: Any) -> ProcedureReport:
    if isinstance(data, ProcedureReport):
        return data
    kind = REPORT_TYPES.get(data.get("procedure", ""), ProcedureReport)
    return kind.model_validate(data)


async def handle_for(client: Client, workflow_id: str) -> WorkflowHandle:
    handle = client.get_workflow_handle(workflow_id)
    try:
        await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no procedure with workflow id {workflow_id!r} (see: opsflow list)") from None
        raise
    return handle


async def fetch_report(handle: WorkflowHandle) -> ProcedureReport:
    """Live: the progress query. Ended: the result, or the report carried by the failure."""
    desc = await handle.describe()
    if desc.status == WorkflowExecutionStatus.RUNNING:
        return parse_report(await handle.query("progress", result_type=dict))
    try:
        return parse_report(await handle.result())
    except WorkflowFailureError as e:
        cause = e.cause
        if isinstance(cause, ApplicationError) and cause.details:
            return parse_report(cause.details[0])
        raise CliError(f"{handle.id} ended {desc.status.name.lower()}: {cause}", 1) from None


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
