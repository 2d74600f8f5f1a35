"""The rollout procedures' report (canary, blue-green): what a change board files."""

from __future__ import annotations

from typing import Literal

from opsflow.models import ControlEvent, ProcedureReport
from opsflow.rollout import CheckResult, StepAnalysis


class RolloutReport(ProcedureReport):
    procedure: str = "canary"
    strategy: Literal["canary", "bluegreen"] = "canary"
    app: str = ""
    region: str = ""
    image: str = ""
    previous_image: str | None = None
    rolled_back: bool = False
    rollback_reason: str | None = None
    weights: list[int] = []  # the plan
    weight: int = 0  # the canary's weight now
    router: str | None = None  # what split the traffic (kind: httproute, nginx, traffic-manager)
    baseline: str | None = None  # analysis.baseline: fresh: the deployment the canary was judged against
    checks_run: int = 0  # HTTP checks (rollout.checks) run during the bakes
    check_failures: list[CheckResult] = []  # every failed one, critical or not
    held: str | None = None  # held by the calendar now: why (a freeze began, the window closed)
    analysis: list[StepAnalysis] = []
    overrides: list[ControlEvent] = []
    promoted_by: list[ControlEvent] = []
    active: str | None = None  # blue-green: the deployment serving
