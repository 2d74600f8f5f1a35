"""The inventory: one YAML file describing an environment.

It is validated by pydantic, and a bad file is reported with the path of the
bad field (``regions.westeurope.database.provider: ...``). The validated model
travels inside workflow inputs, so it must never hold a secret: it only names
where a secret lives (``SecretRef``); activities fetch it on the worker.
"""

from __future__ import annotations

import re
from datetime import datetime, time as dtime, timedelta
from pathlib import Path
from typing import Annotated, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class InventoryError(ValueError):
    """The inventory file is missing, unreadable or invalid; the message names the bad field."""


class Strict(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """'90s', '5m', '1.5h', 30 -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


Seconds = Annotated[float, Field(ge=0)]


class SecretRef(Strict):
    """Where a secret lives. Exactly one of the fields is set."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        if sum(x is not None for x in (self.env, self.file)) != 1:
            raise ValueError("a secret reference names exactly one of: env, file")
        return self


def _no_password_in_dsn(dsn: str) -> str:
    if re.search(r"(^|\s)password\s*=", dsn) or re.search(r"://[^/@:]+:[^/@]+@", dsn):
        raise ValueError("the DSN must not hold a password; name where it lives with 'password: {env: VAR}'")
    return dsn


class _SqlAccess(Strict):
    dsn: str = Field(description="libpq connection string without password, e.g. 'host=db port=5432 user=ops dbname=postgres'")
    password: SecretRef | None = None

    _check_dsn = field_validator("dsn")(_no_password_in_dsn)


class PostgresDatabase(_SqlAccess):
    """Self-managed PostgreSQL, reached over SQL only."""

    provider: Literal["postgres"]


class AzureFlexibleDatabase(_SqlAccess):
    """Azure Database for PostgreSQL flexible server: control plane over ARM, lag over SQL."""

    provider: Literal["azure-flexible"]
    subscription_id: str
    resource_group: str
    server_name: str


class AwsRdsDatabase(Strict):
    """Amazon RDS for PostgreSQL: control plane over boto3, lag over SQL where reachable."""

    provider: Literal["aws-rds"]
    db_instance_identifier: str
    aws_region: str
    dsn: str | None = None
    password: SecretRef | None = None

    _check_dsn = field_validator("dsn")(lambda v: v if v is None else _no_password_in_dsn(v))


Database = Annotated[Union[PostgresDatabase, AzureFlexibleDatabase, AwsRdsDatabase], Field(discriminator="provider")]


class AzureTrafficManager(Strict):
    provider: Literal["azure-traffic-manager"]
    subscription_id: str
    resource_group: str
    profile: str


class Route53Traffic(Strict):
    provider: Literal["route53"]
    hosted_zone_id: str
    record_name: str
    record_type: str = "CNAME"


Traffic = Annotated[Union[AzureTrafficManager, Route53Traffic], Field(discriminator="provider")]


class DeploymentTarget(Strict):
    name: str
    replicas: int = Field(ge=0, description="replicas to run when this region is primary")


class KubernetesConfig(Strict):
    kubeconfig: str | None = Field(default=None, description="path; default: in-cluster or ~/.kube/config")
    context: str | None = None
    namespace: str = "default"
    service: str | None = Field(default=None, description="service annotated maintenance=true while the region is drained")
    deployments: list[DeploymentTarget] = []


class Region(Strict):
    database: Database
    traffic_endpoint: str = Field(description="Traffic Manager endpoint name, or Route 53 set identifier")
    kubernetes: KubernetesConfig | None = None
    smoke_urls: list[str] = []
    task_queue: str | None = Field(default=None, description="default: opsflow-<environment>-<region>")


class AzureConnection(Strict):
    arm_endpoint: str = "https://management.azure.com"
    # 'default' is azure-identity's DefaultAzureCredential; 'static-token' is for the lab's emulator only.
    credential: Literal["default", "static-token"] = "default"
    ca_bundle: str | None = Field(default=None, description="CA file to trust for ARM (the lab's test CA)")
    # ARM's long-running operations ask clients to poll after a few seconds; the lab answers faster.
    polling_interval: Seconds = 5


class AwsConnection(Strict):
    endpoint_url: str | None = Field(default=None, description="override, e.g. a moto server in the lab")
    default_region: str = "us-east-1"


class NotificationChannel(Strict):
    name: str
    kind: Literal["webhook", "slack"] = "webhook"
    url: str | None = None
    url_secret: SecretRef | None = None

    @model_validator(mode="after")
    def _url(self) -> "NotificationChannel":
        if (self.url is None) == (self.url_secret is None):
            raise ValueError("a channel has exactly one of: url, url_secret")
        return self


class ApprovalPolicy(Strict):
    approvers: list[str] = Field(min_length=1)
    require_distinct_approver: bool = True
    timeout: Seconds = 3600
    # What happens when nobody answers by the deadline: an escalation is always sent first.
    on_timeout: Literal["abort", "keep-waiting"] = "abort"
    escalation_channel: str | None = None
    emergency_requires_approval: bool = False

    _t = field_validator("timeout", mode="before")(parse_duration)


class FailoverPolicy(Strict):
    drain: Seconds = 60
    max_planned_lag_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    catch_up_timeout: Seconds = 600
    promote_timeout: Seconds = 900
    # How long a silent worker may hold a long step (catch-up, promotion, traffic, scale-up) before another
    # worker takes it over after a crash.
    heartbeat_timeout: Seconds = 30

    _d = field_validator("drain", "catch_up_timeout", "promote_timeout", "heartbeat_timeout", mode="before")(parse_duration)


class RowCountCheck(Strict):
    table: str = Field(description="schema-qualified or plain table name")
    # With a commit-time column the source is counted as of the restore point (exact); without one the
    # live source is counted and `tolerance` rows of difference are accepted.
    timestamp_column: str | None = None
    tolerance: int = Field(default=0, ge=0)


class SqlCheck(Strict):
    name: str
    query: str = Field(description="must return a single boolean true on the restored server")


class S3Location(Strict):
    bucket: str
    prefix: str = ""


class DrillPolicy(Strict):
    """The monthly restore test: where to restore, what to verify."""

    # Default: by the source region's database provider (azure-flexible -> azure-pitr, aws-rds -> rds-pitr).
    method: Literal["azure-pitr", "rds-pitr", "s3-dump"] | None = None
    scratch_prefix: str = Field(default="opsflow-drill", pattern=r"^[a-z][a-z0-9-]{2,40}$")
    # s3-dump: where the dumps are, and the PostgreSQL server that hosts the scratch database.
    dumps: S3Location | None = None
    scratch_server: _SqlAccess | None = None
    retention: Seconds = 7 * 86400
    restore_timeout: Seconds = 4 * 3600
    heartbeat_timeout: Seconds = 120
    row_counts: list[RowCountCheck] = []
    checks: list[SqlCheck] = []
    schema_objects: list[str] = []
    notify_channels: list[str] = []

    _d = field_validator("retention", "restore_timeout", "heartbeat_timeout", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _s3(self) -> "DrillPolicy":
        if self.method == "s3-dump" and (self.dumps is None or self.scratch_server is None):
            raise ValueError("method s3-dump needs 'dumps' (bucket/prefix) and 'scratch_server' (dsn)")
        return self


class ReportStore(Strict):
    s3: S3Location | None = None


_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class TimeWindow(Strict):
    """A weekly window, e.g. Sunday 02:00-04:00 UTC (end before start: the window spans midnight)."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(min_length=1)
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    def next_opening(self, now: datetime) -> datetime | None:
        """None when `now` is inside the window, else when it next opens (aware datetimes)."""
        tz = ZoneInfo(self.timezone)
        local = now.astimezone(tz)
        sh, sm = map(int, self.start.split(":"))
        eh, em = map(int, self.end.split(":"))
        length = ((eh * 60 + em) - (sh * 60 + sm)) % (24 * 60) or 24 * 60
        for back in (0, 1):  # a window is at most a day long: it opened today or yesterday
            day = (local - timedelta(days=back)).date()
            if _DAYS[day.weekday()] not in self.days:
                continue
            opens = datetime.combine(day, dtime(sh, sm), tz)
            if opens <= local < opens + timedelta(minutes=length):
                return None
        for ahead in range(0, 8):
            day = (local + timedelta(days=ahead)).date()
            opens = datetime.combine(day, dtime(sh, sm), tz)
            if _DAYS[day.weekday()] in self.days and opens > local:
                return opens.astimezone(now.tzinfo)
        raise ValueError("window never opens")


class FailbackPolicy(Strict):
    rebuild_timeout: Seconds = 6 * 3600
    catch_up_timeout: Seconds = 6 * 3600
    # The low-traffic window for the switch back; none: as soon as it is approved.
    window: TimeWindow | None = None

    _d = field_validator("rebuild_timeout", "catch_up_timeout", mode="before")(parse_duration)


class Inventory(Strict):
    environment: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    primary_region: str = Field(description="the region that is primary when the inventory was written; the live role is read from the database")
    regions: dict[str, Region] = Field(min_length=2)
    traffic: Traffic
    approval: ApprovalPolicy
    failover: FailoverPolicy = FailoverPolicy()
    failback: FailbackPolicy = FailbackPolicy()
    azure: AzureConnection | None = None
    aws: AwsConnection | None = None
    notifications: list[NotificationChannel] = []
    drill: DrillPolicy = DrillPolicy()
    reports_dir: str = "reports"
    reports: ReportStore = ReportStore()
    workflow_task_queue: str | None = None
    maintenance: MaintenancePolicy | None = None  # the weekly maintenance window (opsflow/maintenance.py)

    @model_validator(mode="after")
    def _consistent(self) -> "Inventory":
        if self.primary_region not in self.regions:
            raise ValueError(f"primary_region {self.primary_region!r} is not one of the regions: {', '.join(self.regions)}")
        names = {c.name for c in self.notifications}
        if self.approval.escalation_channel and self.approval.escalation_channel not in names:
            raise ValueError(f"approval.escalation_channel {self.approval.escalation_channel!r} is not a notification channel")
        uses_azure = isinstance(self.traffic, AzureTrafficManager) or any(
            isinstance(r.database, AzureFlexibleDatabase) for r in self.regions.values()
        )
        if uses_azure and self.azure is None:
            self.azure = AzureConnection()
        return self

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
        return [self.task_queue, *(self.region_queue(r) for r in self.regions)]


# Sections kept in their own modules build on the models above, so they are imported last. When one of them is
# the first module imported, it is still half-built here and completes Inventory itself at its end.
try:
    from opsflow.maintenance import MaintenancePolicy  # noqa: E402
except ImportError:
    pass
else:
    Inventory.model_rebuild()


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
    try:
        return Inventory.model_validate(raw)
    except ValidationError as e:
        raise InventoryError(f"inventory {p} is invalid:\n{_format_errors(e)}") from None
