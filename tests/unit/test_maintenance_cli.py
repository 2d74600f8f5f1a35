"""`opsflow maintenance` refuses bad input before anything starts (exit code 2), naming what is wrong."""

from __future__ import annotations

import yaml

from opsflow.procedures import fleet_workflow_id as fleet_id
from starters.cli import build_parser, main
from tests.workflow.conftest import inventory_dict

WINDOW = {"days": ["sun"], "start": "02:00", "end": "04:00"}


def write(tmp_path, name: str, **overrides) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(inventory_dict(**overrides)))
    return str(path)


def test_the_readme_commands_parse():
    parser = build_parser()
    for argv in (
        ["maintenance", "--env", "a.yaml", "--dry-run", "--wait", "--json"],
        [
            "maintenance",
            "--env",
            "a.yaml",
            "--env",
            "b.yaml",
            "--max-concurrency",
            "2",
            "--max-errors",
            "1",
            "--region",
            "eastus",
        ],
    ):
        parser.parse_args(argv)


def test_refusals_before_anything_starts(tmp_path, capsys):
    plain = write(tmp_path, "plain")
    assert main(["maintenance", "--env", plain]) == 2
    assert "no maintenance: section" in capsys.readouterr().err
    good = write(tmp_path, "good", maintenance={"window": WINDOW, "tasks": [{"kind": "vacuum", "tables": ["orders"]}]})
    assert main(["maintenance", "--env", good, "--region", "mars"]) == 2
    assert "unknown region 'mars'" in capsys.readouterr().err
    assert main(["maintenance", "--env", good, "--env", good]) == 2
    assert "named twice" in capsys.readouterr().err
    other = write(
        tmp_path,
        "other",
        environment="other",
        maintenance={"window": WINDOW, "tasks": [{"kind": "vacuum", "tables": ["orders"]}]},
    )
    assert main(["maintenance", "--env", good, "--env", other, "--max-concurrency", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_a_fleet_id_is_the_same_for_the_same_environments_in_any_order():
    assert fleet_id(["b", "a"]) == fleet_id(["a", "b"]) != fleet_id(["a", "c"])
    assert fleet_id(["a", "b"]).startswith("opsflow-fleet-2-")
