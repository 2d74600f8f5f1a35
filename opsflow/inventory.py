"""The inventory: one YAML file describing an environment.

It is validated by pydantic, and a bad file is reported with the path of the
bad field (``regions.westeurope.database.provider: ...``). The worker's inventories are the rules its procedures
run by (opsflow/rules.py); the model is recorded in each run's history, so it must never hold a secret: it only
names where a secret lives (``SecretRef``); activities fetch it on the worker.

Built last, from one module per section: opsflow/sections.py (regions, databases, traffic, approvals, limits,
policies), opsflow/maintenance.py, opsflow/rollout.py, opsflow/alert_routes.py.

A new optional section is added to `LATE_SECTIONS` (a new optional field of a section, to its model's
`late_fields`): absent, it is left out of the serialised inventory, so the digest of an inventory without it
(opsflow/rules.py: what a requester's start, a Schedule's stored input and the worker compare) stays what it was,
and the rules an upgraded worker records decode on a worker not yet upgraded (`extra="forbid"`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from opsflow.alert_routes import AlertRouting
from opsflow.maintenance import MaintenancePolicy
from opsflow.rollout import RolloutPolicy
from opsflow.secret_scan import plaintext_secrets
from opsflow.sections import (
    ApprovalPolicy,
    AwsConnection,
    AwsRdsDatabase,
    AwsSecretsManagerRef,
    AzureConnection,
    AzureFlexibleDatabase,
    AzureKeyVaultRef,
    AzureTrafficManager,
    Database,
    DeploymentTarget,
    DrillPolicy,
    FailbackPolicy,
    FailoverPolicy,
    InventoryError,
    KubernetesConfig,
    LateFields,
    Limits,
    MysqlDrill,
    MysqlSource,
    NotificationChannel,
    PatroniDatabase,
    People,
    Person,
    PostgresDatabase,
    Region,
    ReportStore,
    Route53Traffic,
    RowCountCheck,
    S3Location,
    Seconds,
    SecretRef,
    SqlCheck,
    Strict,
    TimeWindow,
    Traffic,
    parse_duration,
)

# What `from opsflow.inventory import X` has always given: the sections' models, and the whole.
__all__ = [
    "AlertRouting",
    "ApprovalPolicy",
    "AwsConnection",
    "AwsRdsDatabase",
    "AwsSecretsManagerRef",
    "AzureConnection",
    "AzureFlexibleDatabase",
    "AzureKeyVaultRef",
    "AzureTrafficManager",
    "Database",
    "DeploymentTarget",
    "DrillPolicy",
    "MysqlDrill",
    "MysqlSource",
    "FailbackPolicy",
    "FailoverPolicy",
    "Inventory",
    "InventoryError",
    "KubernetesConfig",
    "Limits",
    "load_inventory",
    "MaintenancePolicy",
    "NotificationChannel",
    "parse_duration",
    "People",
    "Person",
    "PatroniDatabase",
    "PostgresDatabase",
    "Region",
    "ReportStore",
    "RolloutPolicy",
    "Route53Traffic",
    "RowCountCheck",
    "S3Location",
    "Seconds",
    "SecretRef",
    "SqlCheck",
    "Strict",
    "TimeWindow",
    "Traffic",
]

# Optional sections added after inventories had digests: left out of the serialised form when absent (LateFields).
LATE_SECTIONS = frozenset({"alerts"})


class Inventory(LateFields):
    environment: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    primary_region: str = Field(
        description="the region that is primary when the inventory was written; the live role is read from the database"
    )
    regions: dict[str, Region] = Field(min_length=2)
    traffic: Traffic
    approval: ApprovalPolicy
    limits: Limits = Limits()
    # Who may start which procedure (procedure name -> people); a procedure not listed: anyone.
    operators: dict[str, People] = {}
    failover: FailoverPolicy = FailoverPolicy()
    failback: FailbackPolicy = FailbackPolicy()
    azure: AzureConnection | None = None
    aws: AwsConnection | None = None
    notifications: list[NotificationChannel] = []
    drill: DrillPolicy = DrillPolicy()
    reports_dir: str = "reports"
    reports: ReportStore = ReportStore()
    workflow_task_queue: str | None = None
    rollout: RolloutPolicy | None = None  # canary and blue-green (opsflow/rollout.py)
    maintenance: MaintenancePolicy | None = None  # the maintenance window (opsflow/maintenance.py)
    alerts: AlertRouting | None = None  # which alerts request a failover (opsflow/alert_routes.py)

    late_fields = LATE_SECTIONS

    @model_validator(mode="after")
    def _consistent(self) -> "Inventory":
        if self.primary_region not in self.regions:
            raise ValueError(
                f"primary_region {self.primary_region!r} is not one of the regions: {', '.join(self.regions)}"
            )
        names = {c.name for c in self.notifications}
        if self.approval.escalation_channel and self.approval.escalation_channel not in names:
            raise ValueError(
                f"approval.escalation_channel {self.approval.escalation_channel!r} is not a notification channel"
            )
        if self.alerts is not None:
            self._check_alerts(self.alerts)
        self._check_stretched_patroni()
        uses_azure = isinstance(self.traffic, AzureTrafficManager) or any(
            isinstance(r.database, AzureFlexibleDatabase) for r in self.regions.values()
        )
        if uses_azure and self.azure is None:
            self.azure = AzureConnection()
        return self

    def _check_stretched_patroni(self) -> None:
        """Regions in one stretched Patroni cluster: all of them, one scope, a member each."""
        stretched = {n: r.database for n, r in self.regions.items()
                     if isinstance(r.database, PatroniDatabase) and r.database.layout == "stretched"}
        if not stretched:
            return
        if len(stretched) != len(self.regions):
            others = ", ".join(n for n in self.regions if n not in stretched)
            raise ValueError(f"regions {', '.join(stretched)} are members of a stretched Patroni cluster, {others} "
                             "not: every region must be (database.layout: stretched) or none")
        if len({d.scope for d in stretched.values()}) != 1:
            raise ValueError("the regions of a stretched Patroni cluster name different scopes ("
                             + ", ".join(f"{n}: {d.scope}" for n, d in stretched.items()) + "): one cluster, one scope")
        if len({d.member for d in stretched.values()}) != len(stretched):
            raise ValueError("the regions of a stretched Patroni cluster name the same member: each its own")

    def _check_alerts(self, alerts: AlertRouting) -> None:
        for i, route in enumerate(alerts.routes):
            if route.to is not None and route.to not in self.regions:
                raise ValueError(f"alerts.routes.{i}.to: {route.to!r} is not a region ({', '.join(self.regions)})")
        if alerts.requester in self.approval.names():
            raise ValueError(f"alerts.requester {alerts.requester!r} is an approver: an alert may request a "
                             "failover, never approve one")
        for procedure in {r.procedure for r in alerts.routes}:
            allowed = [p if isinstance(p, str) else p.name for p in self.operators.get(procedure, [])]
            if allowed and alerts.requester not in allowed:
                raise ValueError(f"alerts.requester {alerts.requester!r} is not among the operators of {procedure} "
                                 f"({', '.join(allowed)}): every start it requested would be refused")

    # -- derived names ---------------------------------------------------------------------------------
    def region(self, name: str) -> Region:
        if name not in self.regions:
            raise InventoryError(f"unknown region {name!r}; the inventory has: {', '.join(self.regions)}")
        return self.regions[name]

    def region_queue(self, name: str) -> str:
        return self.region(name).task_queue or f"opsflow-{self.environment}-{name}"

    @property
    def task_queue(self) -> str:
        return self.workflow_task_queue or f"opsflow-{self.environment}"

    def all_queues(self) -> list[str]:
        routers = sorted(self.rollout.router_queues()) if self.rollout else []  # a router's own (the NGINX host)
        return [self.task_queue, *(self.region_queue(r) for r in self.regions), *routers]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # A discriminated union puts the provider tag in the path: regions.x.database.aws-rds.aws_region
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def load_inventory(path: str | Path) -> Inventory:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InventoryError(f"inventory {p} does not exist") from None
    except yaml.YAMLError as e:
        raise InventoryError(f"inventory {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise InventoryError(f"inventory {p} must be a mapping at the top level")
    # Checked on the file, not in the model: a workflow input recorded before a rule tightened must still decode.
    found = plaintext_secrets(raw)
    if found:
        raise InventoryError(f"inventory {p} holds secrets in plain text:\n" + "\n".join(f"  {f}" for f in found))
    try:
        # .ics freeze calendars named in the file are read (relative to it) and expanded now, not in a workflow.
        return Inventory.model_validate(raw, context={"base_dir": str(p.resolve().parent)})
    except ValidationError as e:
        raise InventoryError(f"inventory {p} is invalid:\n{_format_errors(e)}") from None
