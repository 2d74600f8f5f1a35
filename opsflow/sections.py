"""The inventory's sections: every model an inventory is made of, but the whole (`opsflow.inventory.Inventory`).

The maintenance and rollout sections (opsflow/maintenance.py, opsflow/rollout.py) build on these; the inventory
module imports all of them and builds `Inventory` last, so nothing here imports a module that imports it back.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from opsflow.calendar import WeeklyWindow
from opsflow.signing import check_public_key


class InventoryError(ValueError):
    """The inventory file is missing, unreadable or invalid; the message names the bad field."""


class Strict(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LateFields(Strict):
    """A model that gained fields after inventories had digests (opsflow/rules.py), named in its `late_fields`:
    left out of the serialised form while at their default (unset), so an inventory that does not set them keeps
    its digest (a Schedule's stored one, a requester's copy one version behind) and its recorded form (which a worker
    not yet upgraded decodes: `extra="forbid"`). A model adding its first such field derives from this instead of
    Strict (only these models pay for a serializer in Python)."""

    late_fields: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_default_late_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if self.late_fields and isinstance(data, dict):
            fields = type(self).model_fields
            for name in self.late_fields:
                if name in data and getattr(self, name) == fields[name].get_default(call_default_factory=True):
                    del data[name]
        return data


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


class AwsSecretsManagerRef(Strict):
    secret_id: str = Field(min_length=1, description="name or ARN of the secret")
    region: str | None = Field(default=None, description="default: the inventory's aws.default_region")
    key: str | None = Field(default=None, description="for a JSON secret: the field holding the value")


class AzureKeyVaultRef(Strict):
    vault_url: str = Field(pattern=r"^https://", description="e.g. https://myvault.vault.azure.net (HTTPS only)")
    name: str = Field(pattern=r"^[0-9a-zA-Z-]{1,127}$")
    version: str | None = None


class SecretRef(Strict):
    """Where a secret lives. Exactly one of the fields is set; the worker fetches it (activities/secrets.py)."""

    env: str | None = None
    file: str | None = None
    aws_secrets_manager: AwsSecretsManagerRef | None = None
    azure_key_vault: AzureKeyVaultRef | None = None

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        if sum(x is not None for x in (self.env, self.file, self.aws_secrets_manager, self.azure_key_vault)) != 1:
            raise ValueError("a secret reference names exactly one of: env, file, aws_secrets_manager, azure_key_vault")
        return self

    def describe(self) -> str:
        """Where, never what: for messages and logs."""
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        if self.aws_secrets_manager is not None:
            return f"AWS Secrets Manager secret {self.aws_secrets_manager.secret_id}"
        assert self.azure_key_vault is not None
        return f"Key Vault secret {self.azure_key_vault.name} in {self.azure_key_vault.vault_url}"


def no_password_in_dsn(dsn: str) -> str:
    if re.search(r"(^|\s|[?&])password\s*=", dsn, re.IGNORECASE) or re.search(r"://[^/@:]+:[^/@]*@", dsn):
        raise ValueError("the DSN must not hold a password; name where it lives with 'password: {env: VAR}'")
    return dsn


class _SqlAccess(Strict):
    dsn: str = Field(
        description="libpq connection string without password, e.g. 'host=db port=5432 user=ops dbname=postgres'"
    )
    password: SecretRef | None = None

    _check_dsn = field_validator("dsn")(no_password_in_dsn)


_HOST_PATH = r"^/[A-Za-z0-9_./@%+=:,-]*$"  # an absolute path with nothing a remote shell would split or expand


class PostgresHost(Strict):
    """How the worker reaches a self-managed server's host, for a switchover without a rebuild (a clean shutdown,
    pg_controldata, standby.signal, a start as the new primary's standby). Without it the server is reached over
    SQL only: a planned failover leaves it fenced and the failback needs a rebuild on the host."""

    # The command prefix that runs a program on the host, e.g. ["ssh", "-o", "BatchMode=yes", "postgres@db-east"];
    # [] runs it on the worker's own host. Programs run as the server's OS user (never root: pg_ctl refuses).
    run: list[str] = []
    data_dir: str = Field(pattern=_HOST_PATH, description="the server's data directory (holds PG_VERSION)")
    config_dir: str | None = Field(default=None, pattern=_HOST_PATH,
                                   description="pg_ctl -D where postgresql.conf is, when not in data_dir (Debian: "
                                               "/etc/postgresql/15/main)")
    bin_dir: str = Field(default="/usr/lib/postgresql/15/bin", pattern=_HOST_PATH,
                         description="where pg_ctl and pg_controldata are")
    log_file: str | None = Field(default=None, pattern=_HOST_PATH,
                                 description="pg_ctl start -l (default: <data_dir>/opsflow-pg_ctl.log)")
    command_timeout: Seconds = Field(default=120, gt=0, description="bound of one command (a stop, a start)")

    _d = field_validator("command_timeout", mode="before")(parse_duration)


class PostgresDatabase(_SqlAccess, LateFields):
    """Self-managed PostgreSQL, reached over SQL, and on its host when `host` says how (switchover)."""

    late_fields = frozenset({"host"})  # added after inventories had digests
    provider: Literal["postgres"]
    host: PostgresHost | None = None


class AzureFlexibleDatabase(_SqlAccess):
    """Azure Database for PostgreSQL flexible server: control plane over ARM, lag over SQL."""

    provider: Literal["azure-flexible"]
    subscription_id: str
    resource_group: str
    server_name: str
    # The virtual endpoint over this server and its replica (Azure's writer/reader host names). Named: a planned
    # failover promotes with promoteMode Switchover (the old primary becomes the replica), an emergency with
    # Switchover/Forced; unnamed: Standalone promotion, and the failback rebuilds.
    virtual_endpoint: str | None = None


class PatroniStandbySettings(Strict):
    """What this region's cluster keeps in its `standby_cluster` (Patroni's dynamic configuration) whenever it follows
    another region, beside the host and port opsflow sets: a failover that demotes it writes these again, so the
    settings it had as a standby cluster (a slot, a restore_command reading the WAL archive) are not lost."""

    primary_slot_name: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]{1,63}$",
        description="the physical replication slot on the other region's leader this cluster streams through "
        "(checked to exist there before the switchover: a permanent slot in that cluster's `slots`)",
    )
    restore_command: str | None = Field(
        default=None, min_length=1, description="WAL from the archive when streaming falls behind (e.g. pgBackRest)"
    )
    archive_cleanup_command: str | None = Field(default=None, min_length=1)
    recovery_min_apply_delay: str | None = Field(default=None, pattern=r"^\d+\s*(ms|s|min|h|d)?$")
    create_replica_methods: list[str] = Field(
        default_factory=lambda: ["basebackup"], min_length=1,
        description="how a member of this standby cluster is copied (keys of its `postgresql` section)",
    )

    def of(self, address: str) -> dict:
        """The `standby_cluster` section following `address` (host:port, or several: libpq's lists of hosts and
        ports) with these settings."""
        hosts, ports = zip(*(a.rsplit(":", 1) for a in address.split(",")))
        port: int | str = int(ports[0]) if len(set(ports)) == 1 else ",".join(ports)
        return {"host": ",".join(hosts), "port": port, **self.model_dump(exclude_none=True)}


class PatroniDatabase(_SqlAccess, LateFields):
    """Patroni, driven through its REST API (never around it); LSNs over SQL. Two layouts:

    - "per-region" (the default): a Patroni cluster per region, the standby region a Patroni standby cluster
      (`standby_cluster` in its dynamic configuration); a planned failover demotes the old cluster to a standby
      cluster of the new one, then promotes the new one;
    - "stretched": the regions are members of ONE Patroni cluster (one DCS across regions), each region naming its
      `member`; a planned failover is Patroni's own switchover (POST /switchover leader -> candidate), an emergency
      its failover (POST /failover to the candidate)."""

    # added after inventories had digests
    late_fields = frozenset({"layout", "member", "sql_target", "standby_cluster"})
    provider: Literal["patroni"]
    rest_api: list[str] = Field(
        min_length=1, description="the members' REST API base URLs (http(s)://host:8008); the first that answers"
    )
    replication_address: str | None = Field(
        default=None,
        pattern=r"^[^\s:,]+:\d+(,[^\s:,]+:\d+)*$",
        description="host:port another region's standby cluster streams from (the leader, or an address that "
        "follows it), or the members' host:port,host:port,... (libpq tries them in turn; a standby leader streaming "
        "through a slot asks for the read-write one, the leader); layout per-region only, where it is required",
    )
    layout: Literal["per-region", "stretched"] = Field(
        default="per-region",
        description="per-region: a Patroni cluster per region (standby clusters across regions); stretched: the "
        "regions are members of one cluster (switchovers are Patroni's own)",
    )
    member: str | None = Field(
        default=None, min_length=1,
        description="layout stretched: the name of this region's Patroni member (its `name` in patroni.yml)",
    )
    sql_target: Literal["dsn", "leader"] = Field(
        default="dsn",
        description="dsn: SQL goes to the dsn as it is (a proxy or DNS name that follows the region's leader, e.g. "
        "HAProxy checking GET /leader); leader: to the host and port of the member Patroni says leads (GET "
        "/cluster), with the dsn's user, database and password (a region of several members and no such proxy); "
        "layout per-region only",
    )
    standby_cluster: PatroniStandbySettings | None = Field(
        default=None,
        description="layout per-region: what this region's cluster keeps in its standby_cluster section whenever it "
        "follows another region (slot, restore_command, ...); none: create_replica_methods [basebackup] alone",
    )
    scope: str | None = Field(default=None, description="the Patroni cluster's name, checked against its REST API")
    rest_username: str | None = None
    rest_password: SecretRef | None = None  # Patroni's restapi.authentication, for PATCH /config
    ca_bundle: str | None = None  # an https REST API signed by a private CA

    @model_validator(mode="after")
    def _layout_needs(self) -> "PatroniDatabase":
        if self.layout == "per-region" and not self.replication_address:
            raise ValueError("layout per-region needs replication_address (host:port another region streams from)")
        if self.layout == "stretched" and self.sql_target != "dsn":
            raise ValueError("sql_target leader is for layout per-region (a stretched region's SQL goes to its member)")
        if self.layout == "stretched" and self.standby_cluster is not None:
            raise ValueError("standby_cluster is for layout per-region (a stretched region's member is a replica)")
        if self.layout == "stretched" and not self.member:
            raise ValueError("layout stretched needs member: the name of this region's Patroni member")
        if self.layout == "stretched" and not self.scope:
            raise ValueError("layout stretched needs scope: the one cluster's name, checked against its REST API")
        return self


class AwsRdsDatabase(Strict):
    """Amazon RDS for PostgreSQL: control plane over boto3, lag over SQL where reachable."""

    provider: Literal["aws-rds"]
    db_instance_identifier: str
    aws_region: str
    dsn: str | None = None
    password: SecretRef | None = None

    _check_dsn = field_validator("dsn")(lambda v: v if v is None else no_password_in_dsn(v))


Database = Annotated[
    Union[PostgresDatabase, AzureFlexibleDatabase, PatroniDatabase, AwsRdsDatabase], Field(discriminator="provider")
]


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


class KubernetesConfig(LateFields):
    late_fields = frozenset({"standby_min_replicas"})  # added after inventories had digests
    kubeconfig: str | None = Field(default=None, description="path; default: in-cluster or ~/.kube/config")
    context: str | None = None
    namespace: str = "default"
    service: str | None = Field(
        default=None, description="service annotated maintenance=true while the region is drained"
    )
    deployments: list[DeploymentTarget] = []
    standby_min_replicas: int = Field(
        default=1, ge=1, description="the HPA floor (minReplicas) of this region's deployments while another region "
        "is primary: a planned failover lowers its HPAs to it (never raises them), the failback restores them"
    )


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
    # A webhook URL is a credential (whoever holds it can post, Slack's and PagerDuty's carry the token in the
    # path): the inventory only says where it lives. `url` is still read so that procedures started before
    # this rule (their inventory is in the history) replay; load_inventory refuses it in a file.
    url_secret: SecretRef | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _url(self) -> "NotificationChannel":
        if (self.url is None) == (self.url_secret is None):
            raise ValueError("a channel needs url_secret (where its webhook URL lives, e.g. {env: VAR})")
        return self


class Person(Strict):
    """Someone who may approve or operate; with `ssh_key` their requests can be proven (signed)."""

    name: str = Field(min_length=1)
    ssh_key: str | None = Field(default=None, description="OpenSSH public key, e.g. 'ssh-ed25519 AAAA... bob@laptop'")

    # a usable key, or the field is named
    _k = field_validator("ssh_key")(lambda v: v if v is None else check_public_key(v))


People = list[Union[str, Person]]


def _people(entries: People) -> list[Person]:
    return [Person(name=e) if isinstance(e, str) else e for e in entries]


class ApprovalPolicy(Strict):
    """Who may approve, and what a gate needs: a plain list of approvers, or role groups
    (`{platform-lead: [...], qa: [...]}`) with `require: [platform-lead, qa]` (each role approved by a
    different person), and `min_approvals` distinct approvals in all."""

    approvers: Union[People, dict[str, People]] = Field(min_length=1)
    require: list[str] = []
    min_approvals: int = Field(default=1, ge=1)
    require_distinct_approver: bool = True
    require_signed: bool = False
    timeout: Seconds = 3600
    # What happens when nobody answers by the deadline: an escalation is always sent first.
    on_timeout: Literal["abort", "keep-waiting"] = "abort"
    escalation_channel: str | None = None
    emergency_requires_approval: bool = False

    _t = field_validator("timeout", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _roles(self) -> "ApprovalPolicy":
        roles = self.approvers if isinstance(self.approvers, dict) else {}
        unknown = [r for r in self.require if r not in roles]
        if unknown:
            raise ValueError(
                f"require names role(s) {', '.join(unknown)} that are not approver groups "
                f"({', '.join(roles) or 'none'})"
            )
        if len(self.require) > len(self.names()):
            raise ValueError(
                f"require needs {len(self.require)} different people but only {len(self.names())} approvers exist"
            )
        if self.require_signed and any(p.ssh_key is None for p in self.people()):
            missing = [p.name for p in self.people() if p.ssh_key is None]
            raise ValueError(f"require_signed: approver(s) without ssh_key: {', '.join(missing)}")
        return self

    def people(self) -> list[Person]:
        groups = self.approvers.values() if isinstance(self.approvers, dict) else [self.approvers]
        seen: dict[str, Person] = {}
        for group in groups:
            for p in _people(group):
                seen.setdefault(p.name, p)
        return list(seen.values())

    def names(self) -> list[str]:
        return [p.name for p in self.people()]

    def roles_of(self, name: str) -> list[str]:
        if not isinstance(self.approvers, dict):
            return []
        return [role for role, group in self.approvers.items() if name in (p.name for p in _people(group))]

    def key_of(self, name: str) -> str | None:
        return next((p.ssh_key for p in self.people() if p.name == name), None)


class Limits(Strict):
    """Bounds every procedure keeps, whatever it does."""

    # How long a step may wait for a worker to pick it up before it fails with "no worker serves <queue>".
    worker_wait: Seconds = 60
    # A step whose queue has a worker that is only busy (every slot taken) is scheduled again, up to this in all.
    busy_wait: Seconds = 1800
    # A pause longer than this escalates (the procedure keeps waiting).
    pause_timeout: Seconds = 1800
    # Long waits read the cloud's control plane at most this often (the database is polled over SQL).
    control_plane_interval: Seconds = 10
    # How long Temporal waits for the worker that took a procedure's next decision (a workflow task) before another
    # worker gets it: what a worker that dies mid-decision costs the procedure. Temporal's default; at most 120 s.
    workflow_task_timeout: Seconds = Field(default=10, ge=1, le=120)

    _d = field_validator("worker_wait", "busy_wait", "pause_timeout", "control_plane_interval", "workflow_task_timeout",
                         mode="before")(parse_duration)


class FailoverPolicy(Strict):
    drain: Seconds = 60
    max_planned_lag_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    catch_up_timeout: Seconds = 600
    promote_timeout: Seconds = 900
    # How long a silent worker may hold a long step (catch-up, promotion, traffic, scale-up) before another
    # worker takes it over after a crash.
    heartbeat_timeout: Seconds = 30

    _d = field_validator("drain", "catch_up_timeout", "promote_timeout", "heartbeat_timeout", mode="before")(
        parse_duration
    )


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


class MysqlSource(Strict):
    """A MySQL/MariaDB server reached over SQL: the drill's source, whose rows the restore is counted against."""

    host: str
    port: int = Field(default=3306, ge=1, le=65535)
    user: str
    password: SecretRef | None = None


class MysqlDrill(Strict):
    """method s3-mysqldump: the newest `mysqldump` file under drill.dumps (plain or gzip), loaded into a scratch
    MariaDB/MySQL server the worker starts for the drill (mariadbd, mariadb-install-db and the mariadb client on
    the worker: Debian's mariadb-server), verified, then the server stopped and its data directory removed."""

    database: str = Field(pattern=r"^[A-Za-z0-9_$]{1,64}$", description="the schema the dump is loaded into and the "
                          "checks run in")
    # The live server the row counts compare against (as of the dump with a timestamp column); none: no row counts.
    source: MysqlSource | None = None


class DrillHost(Strict):
    """method host-pitr, for self-managed PostgreSQL: on the host where the backups live, the newest base backup
    (a directory per backup under `base_backups`, made by `pg_basebackup -D <base_backups>/<name>` with -Ft [-z] or
    -Fp: it holds backup_manifest) restored into a scratch data directory under `scratch_dir`, the archived WAL
    replayed to the restore point (restore_command reading `wal_archive`: plain segments, as archive_command copies
    them), a scratch server started on a free port, checked over SQL at `address`, then stopped and removed.
    Commands run through the `run` prefix (as database.host.run), as the server's OS user, each bounded."""

    run: list[str] = []  # e.g. ["ssh", "-o", "BatchMode=yes", "postgres@db-backup"]; []: the worker's own host
    base_backups: str = Field(pattern=_HOST_PATH, description="the directory holding one directory per base backup")
    wal_archive: str = Field(pattern=_HOST_PATH, description="the WAL archive archive_command copies segments to")
    scratch_dir: str = Field(pattern=_HOST_PATH, description="where scratch data directories are made (and removed)")
    bin_dir: str = Field(default="/usr/lib/postgresql/15/bin", pattern=_HOST_PATH,
                         description="where pg_ctl and pg_waldump are")
    # The scratch server listens here and the worker connects here (the source's user, database and password:
    # a restore copies the roles); ports are picked at random in [ports[0], ports[1]].
    address: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9_.:-]+$")
    ports: tuple[int, int] = (54000, 54999)
    shared_buffers: str = Field(default="128MB", pattern=r"^\d+(kB|MB|GB)$",
                                description="the scratch server's, not the source's (it may share the host)")
    command_timeout: Seconds = Field(default=120, gt=0, description="bound of one command (a listing, a start); "
                                     "the extraction of a base backup is bounded by drill.restore_timeout")

    _d = field_validator("command_timeout", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _ports(self) -> "DrillHost":
        if not 1024 <= self.ports[0] <= self.ports[1] <= 65535:
            raise ValueError("ports is a range [low, high] within 1024..65535")
        return self


class DrillObjectives(Strict):
    """What the restore test proves: the restore took at most `restore_time` (the RTO a restore allows) and the
    newest restorable point was at most `restore_point_age` old (the RPO the backups give). A miss fails the
    drill (after the scratch target is deleted), naming the objective and the figure."""

    restore_time: Seconds | None = None
    restore_point_age: Seconds | None = None

    # None stays None: an objective not set round-trips (the worker's rules travel as JSON with nulls)
    _d = field_validator("restore_time", "restore_point_age", mode="before")(
        lambda v: v if v is None else parse_duration(v))


class DrillPolicy(LateFields):
    """The monthly restore test: where to restore, what to verify."""

    late_fields = frozenset({"mysql", "trend", "host"})  # added after inventories had digests

    # Default: by the source region's database provider (azure-flexible -> azure-pitr, aws-rds -> rds-pitr).
    method: Literal["azure-pitr", "rds-pitr", "s3-dump", "s3-mysqldump", "host-pitr"] | None = None
    scratch_prefix: str = Field(default="opsflow-drill", pattern=r"^[a-z][a-z0-9-]{2,40}$")
    # s3-dump: where the dumps are, and the PostgreSQL server that hosts the scratch database.
    dumps: S3Location | None = None
    scratch_server: _SqlAccess | None = None
    mysql: MysqlDrill | None = None  # s3-mysqldump: the database the dump holds, the MySQL source
    host: DrillHost | None = None  # host-pitr: the base backups, the WAL archive, the scratch directory, on a host
    retention: Seconds = 7 * 86400
    restore_timeout: Seconds = 4 * 3600
    heartbeat_timeout: Seconds = 120
    row_counts: list[RowCountCheck] = []
    checks: list[SqlCheck] = []
    schema_objects: list[str] = []
    notify_channels: list[str] = []
    objectives: DrillObjectives | None = None  # e.g. {restore_time: 30m, restore_point_age: 15m}
    # Which point a drill restores when none is given: the newest, or one at random within the restorable window
    # (AWS Backup's RANDOM_WITHIN_WINDOW): a backup that only restores well when fresh is found out. Point in time
    # methods only (a dump restores to when it was taken).
    restore_point: Literal["newest", "random"] = "newest"
    # The trend across runs: this many earlier drills are read back from their stored reports (reports_dir, S3)
    # and shown in the report beside this one (restore time, restore point age, objectives); 0: none; unset: 10.
    trend: int | None = Field(default=None, ge=0, le=100)

    _d = field_validator("retention", "restore_timeout", "heartbeat_timeout", mode="before")(parse_duration)

    @property
    def trend_runs(self) -> int:
        return 10 if self.trend is None else self.trend

    @model_validator(mode="after")
    def _s3(self) -> "DrillPolicy":
        if self.method == "s3-dump" and (self.dumps is None or self.scratch_server is None):
            raise ValueError("method s3-dump needs 'dumps' (bucket/prefix) and 'scratch_server' (dsn)")
        if self.method == "s3-mysqldump" and (self.dumps is None or self.mysql is None):
            raise ValueError("method s3-mysqldump needs 'dumps' (bucket/prefix) and 'mysql' (database)")
        if self.method == "s3-mysqldump" and self.row_counts and (self.mysql is None or self.mysql.source is None):
            raise ValueError("row_counts of method s3-mysqldump need 'mysql.source' (the server to count against)")
        if self.method == "host-pitr" and self.host is None:
            raise ValueError("method host-pitr needs 'host' (base_backups, wal_archive, scratch_dir)")
        if self.method in ("s3-dump", "s3-mysqldump") and self.restore_point == "random":
            raise ValueError("restore_point random needs a point-in-time method (azure-pitr, rds-pitr, host-pitr): "
                             "a dump restores to when it was taken")
        return self


class ReportStore(Strict):
    s3: S3Location | None = None


# The failback's low-traffic window is the calendar module's weekly window (the old name stays for callers).
TimeWindow = WeeklyWindow


class FailbackPolicy(Strict):
    rebuild_timeout: Seconds = 6 * 3600
    # How long a silent worker may hold a replica rebuild before another takes it over after a crash; none: four
    # times failover.heartbeat_timeout (a rebuild's cloud calls may block longer than other steps').
    rebuild_heartbeat_timeout: Annotated[float, Field(gt=0)] | None = None
    catch_up_timeout: Seconds = 6 * 3600
    # The low-traffic window for the switch back; none: as soon as it is approved.
    window: WeeklyWindow | None = None

    _d = field_validator("rebuild_timeout", "catch_up_timeout", mode="before")(parse_duration)
    _h = field_validator("rebuild_heartbeat_timeout", mode="before")(lambda v: v if v is None else parse_duration(v))

    def rebuild_heartbeat(self, failover: FailoverPolicy) -> float:
        return self.rebuild_heartbeat_timeout or failover.heartbeat_timeout * 4
