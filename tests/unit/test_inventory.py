"""The inventory names the bad field; the CLI refuses bad input before anything starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from opsflow.inventory import Inventory, InventoryError, load_inventory, parse_duration
from opsflow.rules import digest_of
from starters.cli import main as cli
from tests.workflow.conftest import inventory_dict


def write(tmp_path, data) -> str:
    path = tmp_path / "inventory.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_valid_inventory_loads(tmp_path):
    inv = load_inventory(write(tmp_path, inventory_dict(environment="prod")))
    assert inv.environment == "prod" and set(inv.regions) == {"eastus", "westeurope"}
    assert inv.region_queue("westeurope") == "opsflow-prod-westeurope" and inv.task_queue == "opsflow-prod"
    assert inv.failover.drain == 60 and inv.approval.timeout == 3600


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["regions"]["westeurope"]["database"].update(provider="oracle"), "regions.westeurope.database"),
        (
            lambda d: d["regions"]["westeurope"]["database"].update(provider="azure-flexible"),
            "regions.westeurope.database.azure-flexible.server_name",
        ),
        (
            lambda d: d["regions"]["eastus"]["database"].update(provider="aws-rds"),
            "regions.eastus.database.aws-rds.db_instance_identifier",
        ),
        (lambda d: d["traffic"].pop("profile"), "traffic.azure-traffic-manager.profile"),
        (lambda d: d["regions"]["eastus"].update(traffic_endpont="x"), "regions.eastus.traffic_endpont"),
        (lambda d: d["approval"].update(approvers=[]), "approval.approvers"),
        (lambda d: d["failover"].update(drain="soon"), "failover.drain"),
        (
            lambda d: d["regions"]["eastus"]["database"].update(dsn="host=db password=hunter2"),
            "regions.eastus.database.postgres.dsn",
        ),
        (lambda d: d.update(primary_region="mars"), "primary_region 'mars'"),
        (  # a path a remote shell would split or expand
            lambda d: d["regions"]["eastus"]["database"].update(host={"data_dir": "/var/lib/pg data; rm -rf /"}),
            "regions.eastus.database.postgres.host.data_dir",
        ),
        (
            lambda d: d["regions"]["eastus"]["database"].update(host={"run": []}),
            "regions.eastus.database.postgres.host.data_dir",
        ),
        (lambda d: d.update(drill={"method": "host-pitr"}), "method host-pitr needs 'host'"),
        (  # the drill's host paths: nothing a remote shell would split or expand
            lambda d: d.update(drill={"method": "host-pitr", "host": {
                "base_backups": "/backups/$(reboot)", "wal_archive": "/wal", "scratch_dir": "/scratch"}}),
            "drill.host.base_backups",
        ),
        (
            lambda d: d.update(drill={"method": "host-pitr", "host": {
                "base_backups": "/b", "wal_archive": "/wal", "scratch_dir": "/s", "ports": [80, 90]}}),
            "ports is a range [low, high] within 1024..65535",
        ),
    ],
)
def test_invalid_inventory_names_the_field(tmp_path, mutate, field):
    data = copy.deepcopy(inventory_dict())
    mutate(data)
    with pytest.raises(InventoryError) as exc:
        load_inventory(write(tmp_path, data))
    assert field in str(exc.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory(write(tmp_path, "regions: [unclosed"))
    with pytest.raises(InventoryError, match="does not exist"):
        load_inventory(tmp_path / "nope.yaml")


def test_secret_never_in_dsn_but_reference_allowed(tmp_path):
    data = inventory_dict()
    data["regions"]["eastus"]["database"]["password"] = {"env": "EASTUS_DB_PASSWORD"}
    inv = load_inventory(write(tmp_path, data))
    assert inv.regions["eastus"].database.password.env == "EASTUS_DB_PASSWORD"
    assert "hunter2" not in inv.model_dump_json()


def test_durations():
    assert (
        parse_duration("90s") == 90
        and parse_duration("5m") == 300
        and parse_duration("1.5h") == 5400
        and parse_duration(7) == 7
    )
    with pytest.raises(ValueError):
        parse_duration("tomorrow")


def test_cli_refuses_unknown_region_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")  # nothing listens: proves no connection was needed
    code = cli(["failover", "--env", write(tmp_path, inventory_dict()), "--to", "mars"])
    assert code == 2
    assert "unknown region 'mars'" in capsys.readouterr().err


def test_cli_refuses_malformed_inventory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    data = inventory_dict()
    data["regions"]["eastus"]["database"]["provider"] = "oracle"
    code = cli(["failover", "--env", write(tmp_path, data), "--to", "westeurope"])
    err = capsys.readouterr().err
    assert code == 2 and "regions.eastus.database" in err


def test_an_inventory_written_before_the_late_fields_keeps_its_digest():
    """docs/inventory.example.yaml as it was at 5f88f25 (every section, maintenance and rollout included): fields
    added since (LateFields: drill.trend, maintenance guards and watch.during, analysis.baseline, database.host, ...)
    are left out of its serialised form while unset, so the Schedules and requesters' copies made then still match
    the worker's digest. A new field with a default that is not listed in its model's late_fields fails this."""
    raw = yaml.safe_load((Path(__file__).parent / "data" / "inventory-5f88f25.yaml").read_text())
    inv = Inventory.model_validate(raw)
    assert digest_of(inv).sha256 == "bf7d7de3cad3ea4f407b7fa6701e7cc91abf5d2c28ff65c2c47669389c64565d"
    assert Inventory.model_validate(inv.model_dump(mode="json")) == inv


def patroni(layout: str = "stretched", **extra) -> dict:
    return {"provider": "patroni", "dsn": "host=db port=5432 user=ops dbname=postgres",
            "rest_api": ["http://db:8008"], "layout": layout, "scope": "shop", **extra}


@pytest.mark.parametrize(
    "east, west, message",
    [
        (patroni(member="e1"), patroni(), "regions.westeurope.database.patroni: Value error, layout stretched needs "
                                          "member"),
        (patroni(member="e1"), patroni(member="e1"), "name the same member"),
        (patroni(member="e1"), patroni(member="w1", scope="other"), "name different scopes"),
        (patroni(member="e1"), patroni("per-region", replication_address="db-w:5432"),
         "regions eastus are members of a stretched Patroni cluster, westeurope not"),
        (patroni("per-region"), patroni("per-region", replication_address="db-w:5432"),
         "layout per-region needs replication_address"),
        (patroni(member="e1", sql_target="leader"), patroni(member="w1"), "sql_target leader is for layout per-region"),
        (patroni("per-region", replication_address="db:5432", sql_target="primary"),
         patroni("per-region", replication_address="db-w:5432"), "sql_target"),
        (patroni(member="e1", standby_cluster={"restore_command": "x"}), patroni(member="w1"),
         "standby_cluster is for layout per-region"),
        (patroni("per-region", replication_address="db:5432", standby_cluster={"primary_slot_name": "East-1"}),
         patroni("per-region", replication_address="db-w:5432"), "standby_cluster.primary_slot_name"),
        (patroni("per-region", replication_address="db:5432,"), patroni("per-region", replication_address="w:1"),
         "replication_address"),
        (patroni("per-region", replication_address="db:5432", standby_cluster={"recovery_min_apply_delay": "soon"}),
         patroni("per-region", replication_address="db-w:5432"), "standby_cluster.recovery_min_apply_delay"),
    ],
)
def test_patroni_layouts_are_checked_at_load(tmp_path, east, west, message):
    """Stretched: every region a member of the one cluster (one scope, a member each); per-region: a replication
    address. Refused at load time, naming what is wrong."""
    data = copy.deepcopy(inventory_dict())
    data["regions"]["eastus"]["database"], data["regions"]["westeurope"]["database"] = east, west
    with pytest.raises(InventoryError) as exc:
        load_inventory(write(tmp_path, data))
    assert message in str(exc.value)


def test_a_stretched_patroni_inventory_loads_and_per_region_keeps_its_form():
    data = copy.deepcopy(inventory_dict())
    data["regions"]["eastus"]["database"] = patroni(member="e1")
    data["regions"]["westeurope"]["database"] = patroni(member="w1")
    inv = Inventory.model_validate(data)
    assert inv.region("westeurope").database.member == "w1"
    per_region = {k: v for k, v in patroni("per-region", replication_address="db:5432").items() if k != "layout"}
    data["regions"]["eastus"]["database"] = data["regions"]["westeurope"]["database"] = per_region
    dumped = Inventory.model_validate(data).model_dump(mode="json")["regions"]["eastus"]["database"]
    assert "layout" not in dumped and "member" not in dumped  # late fields: an older inventory's digest stays
    assert "sql_target" not in dumped and "standby_cluster" not in dumped


def test_a_region_s_standby_settings_are_what_it_follows_with():
    """database.standby_cluster: what the region's cluster keeps in its standby_cluster section whenever it follows
    (the host and port are the other region's replication_address); unset: basebackup alone, as before."""
    from opsflow.sections import PatroniDatabase

    plain = PatroniDatabase.model_validate(patroni("per-region", replication_address="db:5432"))
    assert plain.standby_cluster is None
    kept = PatroniDatabase.model_validate(patroni(
        "per-region", replication_address="db:5432",
        standby_cluster={"primary_slot_name": "dr_eastus", "restore_command": "pgbackrest --stanza=shop archive-get "
                         "%f %p", "recovery_min_apply_delay": "5min"}))
    assert kept.standby_cluster.of("db-w.internal:6432") == {
        "host": "db-w.internal", "port": 6432, "primary_slot_name": "dr_eastus",
        "restore_command": "pgbackrest --stanza=shop archive-get %f %p", "recovery_min_apply_delay": "5min",
        "create_replica_methods": ["basebackup"]}
    # the members of a region listed (libpq tries them in turn): one port, or one per host
    assert plain.standby_cluster is None and PatroniDatabase.model_validate(patroni(
        "per-region", replication_address="pg-e1:5432,pg-e2:5432")).replication_address == "pg-e1:5432,pg-e2:5432"
    listed = [kept.standby_cluster.of(a) for a in ("pg-e1:5432,pg-e2:5432", "h:5432,h:5433")]
    assert [(s["host"], s["port"]) for s in listed] == [("pg-e1,pg-e2", 5432), ("h,h", "5432,5433")]
