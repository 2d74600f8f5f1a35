"""The one list of procedures: from it the worker registers its workflows, the client reads reports and decides
what an emergency may preempt, a Schedule knows what it may launch, and the replay test what must have a recorded
history. A new procedure is one line here (and its module in workflows/).

The kernel imports nothing above it, so workflow classes are named by import path and loaded on demand
(`workflow_classes()`): the worker and the tests load them, the CLI and the client never need to.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

from opsflow.maintenance_models import FleetReport, MaintenanceReport
from opsflow.models import DrillReport, FailbackReport, FailoverReport, ProcedureReport, ReadinessReport
from opsflow.rollout_report import RolloutReport


@dataclass(frozen=True)
class Procedure:
    name: str  # the workflow type, as histories record it
    workflow: str  # "module:Class"
    report: type[ProcedureReport] | None  # None: not a procedure of its own (the launcher)
    preemptible: bool = True  # an emergency failover may cancel it (with its undo) to take the environment's lock
    schedulable: bool = False  # a Schedule may launch it (anything may be launched as a dry run)

    def workflow_class(self) -> type:
        module, _, cls = self.workflow.partition(":")
        return getattr(importlib.import_module(module), cls)


PROCEDURES: tuple[Procedure, ...] = (
    Procedure("failover", "workflows.failover:FailoverWorkflow", FailoverReport, preemptible=False),
    Procedure("failback", "workflows.failback:FailbackWorkflow", FailbackReport, preemptible=False),
    Procedure("drill", "workflows.drill:DrillWorkflow", DrillReport, schedulable=True),
    Procedure("maintenance", "workflows.maintenance:MaintenanceWorkflow", MaintenanceReport, schedulable=True),
    Procedure("maintenance-fleet", "workflows.maintenance:MaintenanceFleetWorkflow", FleetReport),
    Procedure("canary", "workflows.canary:CanaryWorkflow", RolloutReport),
    Procedure("bluegreen", "workflows.canary:BlueGreenWorkflow", RolloutReport),
    Procedure("readiness", "workflows.readiness:ReadinessWorkflow", ReadinessReport, schedulable=True),
    # What a Schedule starts: it starts the procedure as a child under the environment's lock id.
    Procedure("scheduled", "workflows.scheduled:ScheduledLaunch", None),
)
BY_NAME = {p.name: p for p in PROCEDURES}

REPORT_TYPES: dict[str, type[ProcedureReport]] = {p.name: p.report for p in PROCEDURES if p.report is not None}
NOT_PREEMPTIBLE = frozenset(p.name for p in PROCEDURES if not p.preemptible)
SCHEDULABLE = frozenset(p.name for p in PROCEDURES if p.schedulable)
LAUNCHERS = frozenset(p.name for p in PROCEDURES if p.report is None)


def fleet_workflow_id(environments: list[str]) -> str:
    """A maintenance fleet's id: one per set of environments (its members still take each environment's lock)."""
    digest = hashlib.sha256(",".join(sorted(environments)).encode()).hexdigest()[:8]
    return f"opsflow-fleet-{len(environments)}-{digest}"


def workflow_classes() -> list[type]:
    """Every workflow a worker registers (imports workflows/: for the worker and the tests, not the CLI)."""
    return [p.workflow_class() for p in PROCEDURES]
