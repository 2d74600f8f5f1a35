"""The documentation tells the truth: the example inventory is valid, the README's commands exist."""

from pathlib import Path

from opsflow.inventory import load_inventory
from starters.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_example_inventory_is_valid():
    inv = load_inventory(ROOT / "docs" / "inventory.example.yaml")
    assert inv.environment == "shop-prod" and inv.failback.window is not None and inv.drill.checks
    assert "password" not in inv.regions["eastus"].database.dsn


def test_readme_commands_parse():
    parser = build_parser()
    for argv in (
        ["failover", "--to", "westeurope", "--dry-run"],
        ["failback", "--to", "eastus"],
        ["drill", "--wait"],
        ["approve", "opsflow-lab", "--as", "bob"],
        ["report", "opsflow-lab", "--markdown"],
        ["lab", "up", "--cloud", "aws"],
        ["schedule", "list", "--env", "x.yaml"],
    ):
        parser.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    assert readme.splitlines()[3].startswith("make demo") and "make test" in readme.splitlines()[4]
