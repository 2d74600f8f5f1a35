"""The inventory's maintenance: section: strict table names, durations, sizes, and errors that name the field."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from opsflow.inventory import InventoryError, load_inventory
from opsflow.maintenance import MaintenancePolicy, MaintenanceTask, table_name
from tests.workflow.conftest import inventory_dict

WINDOW = {"days": ["sun"], "start": "02:00", "end": "04:00"}


@pytest.mark.parametrize(
    "evil",
    [
        "orders; DROP TABLE orders",
        "a.b.c",
        "orders--",
        '"Orders"',
        "public.",
        "1orders",
        "or ders",
        "pg_catalog.pg_class)",
    ],
)
def test_a_table_name_that_is_not_a_plain_identifier_is_refused(evil):
    with pytest.raises(ValueError, match="is not a table name"):
        table_name(evil)


def test_table_names_get_their_schema_and_tasks_their_shape():
    assert table_name("orders") == "public.orders" and table_name("sales.Orders_2") == "sales.Orders_2"
    with pytest.raises(ValidationError, match="needs 'tables'"):
        MaintenanceTask(kind="vacuum")
    with pytest.raises(ValidationError, match="needs 'name' and 'sql'"):
        MaintenanceTask(kind="sql", sql="DELETE FROM x")
    assert MaintenanceTask(kind="reindex", tables="auto").tables == "auto"


def test_durations_and_sizes_parse():
    p = MaintenancePolicy.model_validate(
        {
            "window": WINDOW,
            "cutoff": "20m",
            "tasks": [{"kind": "analyze", "tables": ["t"]}],
            "guards": {"lock_timeout": "500ms", "max_replication_lag": "16MB", "parallel": 2},
        }
    )
    assert (
        p.cutoff == 1200
        and p.guards.lock_timeout == 0.5
        and p.guards.max_replication_lag == 16 * 1024 * 1024
        and p.guards.parallel == 2
    )


def test_a_bad_maintenance_section_is_refused_naming_the_field(tmp_path):
    bad = inventory_dict(
        maintenance={
            "window": WINDOW,
            "on_cutoff": "explode",
            "tasks": [{"kind": "vacuum", "tables": ["x; DROP TABLE x"]}],
            "status_page": {"page_id": "p", "api_key": {"env": "STATUSPAGE_KEY"}},
        }
    )
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    text = str(err.value)
    assert "maintenance.on_cutoff" in text
    assert "maintenance.tasks.0.tables" in text and "is not a table name" in text


def test_a_status_page_key_in_plain_text_is_refused(tmp_path):
    plain = inventory_dict(maintenance={"window": WINDOW, "tasks": [{"kind": "vacuum", "tables": ["orders"]}],
                                        "status_page": {"page_id": "p", "api_key": "plain-text-key"}})
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(plain))
    with pytest.raises(
        InventoryError, match=r"maintenance\.status_page\.api_key"
    ):  # a reference ({env: VAR}), never the key
        load_inventory(path)
